"""FP8 training quality (issue #17, item 2): the loss curves of two ``recipes/pretrain.py`` runs, bf16 and
``--fp8 true``, same config, data and seed, compared against a documented tolerance.

Reads the two runs' stdout logs (the Trainer's printed ``{'loss': ...}`` and ``{'eval_loss': ...}`` dicts, in order;
the k-th training log is step ``k * --logging-steps``, the evaluations are at step 0 and every ``--eval-steps``).

Tolerance (chosen before the run, on what float8 training with dynamic tensorwise scales is reported to give):
- every logged training loss from step ``--from-step`` on within ``--train-tol`` (3%) of bf16's, relative;
- the final held-out loss within ``--heldout-tol`` (1%) of bf16's, relative.

Writes ``fp8_quality_<config>_<device>.json`` (both curves, the deviations, the verdict) and ``.png`` to ``--out``
and prints a table. Exit status 0 when within tolerance, 1 when not, 2 for unreadable logs.

Usage (what ``benchmarks/gpu_run.sh fp8`` runs):
    python benchmarks/fp8_quality.py --bf16-log bf16.log --fp8-log fp8.log --logging-steps 10 --eval-steps 50
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from pathlib import Path

_DICT = re.compile(r"\{'(?:loss|eval_loss)'[^{}]*\}")


def parse_log(text: str, logging_steps: int, eval_steps: int) -> dict:
    """``{"train": [(step, loss)], "eval": [(step, loss)]}`` from a run's stdout."""
    train, evals = [], []
    for m in _DICT.finditer(text):
        d = ast.literal_eval(m.group(0))
        if "loss" in d:
            train.append(((len(train) + 1) * logging_steps, float(d["loss"])))
        else:
            evals.append((len(evals) * eval_steps, float(d["eval_loss"])))
    return {"train": train, "eval": evals}


def compare(bf16: dict, fp8: dict, from_step: int, train_tol: float, heldout_tol: float) -> dict:
    ref = dict(bf16["train"])
    rows = [(s, ref[s], v, (v - ref[s]) / ref[s]) for s, v in fp8["train"] if s in ref]
    checked = [r for r in rows if r[0] >= from_step]
    if not checked or not bf16["eval"] or not fp8["eval"]:
        raise ValueError("the logs hold no comparable training losses or no held-out loss")
    worst = max(checked, key=lambda r: abs(r[3]))
    h16, h8 = bf16["eval"][-1][1], fp8["eval"][-1][1]
    heldout_rel = (h8 - h16) / h16
    ok = abs(worst[3]) <= train_tol and abs(heldout_rel) <= heldout_tol
    return {"rows": [{"step": s, "bf16": a, "fp8": b, "rel": r} for s, a, b, r in rows],
            "worst_train": {"step": worst[0], "rel": worst[3]}, "heldout_bf16": h16, "heldout_fp8": h8,
            "heldout_rel": heldout_rel, "tolerance": {"train": train_tol, "heldout": heldout_tol,
                                                      "from_step": from_step}, "within_tolerance": ok}


def _plot(bf16: dict, fp8: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, run, style in (("bf16", bf16, "-"), ("fp8", fp8, "--")):
        ax.plot(*zip(*run["train"]), style, label=f"{name} train")
        if run["eval"]:
            ax.plot(*zip(*run["eval"]), style, marker="o", label=f"{name} held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bf16-log", required=True, help="stdout of the bf16 run")
    p.add_argument("--fp8-log", required=True, help="stdout of the --fp8 true run")
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--eval-steps", type=int, default=50)
    p.add_argument("--from-step", type=int, default=50, help="first step whose training loss is held to --train-tol")
    p.add_argument("--train-tol", type=float, default=0.03)
    p.add_argument("--heldout-tol", type=float, default=0.01)
    p.add_argument("--config", default="llama-1b", help="name in the output file")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    try:
        runs = [parse_log(Path(f).read_text(errors="replace"), a.logging_steps, a.eval_steps)
                for f in (a.bf16_log, a.fp8_log)]
        result = compare(*runs, a.from_step, a.train_tol, a.heldout_tol)
    except (OSError, ValueError, SyntaxError) as e:
        print(f"fp8_quality: {e}", file=sys.stderr)
        return 2
    from litespark_hf.efficiency.device import device_tag

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"fp8_quality_{a.config}_{device_tag()}"
    result |= {"config": a.config, "bf16": runs[0], "fp8": runs[1]}
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    _plot(*runs, stem.with_suffix(".png"), f"{a.config}: bf16 vs float8 projections")
    print("| step | bf16 loss | fp8 loss | fp8 / bf16 - 1 |\n|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['step']} | {r['bf16']:.4f} | {r['fp8']:.4f} | {r['rel'] * 100:+.2f}% |")
    print(f"held-out: bf16 {result['heldout_bf16']:.4f}, fp8 {result['heldout_fp8']:.4f} "
          f"({result['heldout_rel'] * 100:+.2f}%); worst training loss {result['worst_train']['rel'] * 100:+.2f}% "
          f"at step {result['worst_train']['step']}; within tolerance: {result['within_tolerance']}")
    print(f"wrote {stem}.json and .png")
    return 0 if result["within_tolerance"] else 1


if __name__ == "__main__":
    sys.exit(main())
