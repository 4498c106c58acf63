"""benchmarks/fp8_quality.py: the two recipe logs parsed in order, the tolerance verdict and its exit status."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _log(path: Path, train, evals):
    lines = ["[pretrain] llama model, 1.2M parameters"]
    lines.append(f"{{'eval_loss': '{evals[0]}', 'eval_runtime': '0.3', 'epoch': 0}}")
    for i, v in enumerate(train, 1):
        lines.append(f"{{'loss': '{v}', 'grad_norm': '0.9', 'learning_rate': '0.001', 'epoch': '{i / 100}'}}")
        if i % 5 == 0:
            lines.append(f"{{'eval_loss': '{evals[i // 5]}', 'eval_runtime': '0.3', 'epoch': '{i / 100}'}}")
    path.write_text("\n".join(lines))


def _run(tmp_path, fp8_train, fp8_evals):
    _log(tmp_path / "bf16.log", [8.0, 7.0, 6.0, 5.5, 5.0, 4.8, 4.6, 4.5, 4.4, 4.3], [8.1, 5.2, 4.5])
    _log(tmp_path / "fp8.log", fp8_train, fp8_evals)
    r = subprocess.run([sys.executable, "benchmarks/fp8_quality.py", "--bf16-log", str(tmp_path / "bf16.log"),
                        "--fp8-log", str(tmp_path / "fp8.log"), "--logging-steps", "10", "--eval-steps", "50",
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT)
    files = list((tmp_path / "out").glob("fp8_quality_llama-1b_*.json"))
    return r, (json.loads(files[0].read_text()) if files else None)


def test_within_tolerance(tmp_path):
    # step 10 differs by 10% but is before --from-step 50; afterwards within 1%
    r, res = _run(tmp_path, [8.8, 7.05, 6.05, 5.52, 5.02, 4.82, 4.61, 4.52, 4.41, 4.31], [8.1, 5.21, 4.52])
    assert r.returncode == 0, r.stdout + r.stderr
    assert res["within_tolerance"] and [row["step"] for row in res["rows"]] == list(range(10, 101, 10))
    assert [s for s, _ in res["fp8"]["eval"]] == [0, 50, 100]
    assert abs(res["heldout_rel"] - (4.52 / 4.5 - 1)) < 1e-9
    assert list((tmp_path / "out").glob("*.png"))


def test_outside_tolerance_and_unreadable(tmp_path):
    r, res = _run(tmp_path, [8.0, 7.0, 6.0, 5.5, 5.0, 4.8, 4.6, 4.9, 4.4, 4.3], [8.1, 5.2, 4.5])
    assert r.returncode == 1 and not res["within_tolerance"] and res["worst_train"]["step"] == 80
    r, _ = _run(tmp_path, [8.0, 7.0, 6.0, 5.5, 5.0, 4.8, 4.6, 4.5, 4.4, 4.3], [8.1, 5.2, 4.6])
    assert r.returncode == 1  # held-out 2.2% worse
    (tmp_path / "empty.log").write_text("nothing logged")
    r = subprocess.run([sys.executable, "benchmarks/fp8_quality.py", "--bf16-log", str(tmp_path / "empty.log"),
                        "--fp8-log", str(tmp_path / "empty.log"), "--out", str(tmp_path / "o2")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "no comparable" in r.stderr
