"""Bad input to the recipes: one clear message saying what to change, and nothing written. Quick (CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

import common  # noqa: E402
import dpo  # noqa: E402
import pretrain  # noqa: E402
import sft  # noqa: E402
from common import RecipeError  # noqa: E402


def _fails(main, argv, match, out):
    with pytest.raises(RecipeError, match=match):
        main(argv + ["--output_dir", str(out)])
    assert not out.exists() or sorted(os.listdir(out)) == sorted(_preexisting.get(str(out), [])), \
        "a failed run must not write to its output directory"


_preexisting = {}


def test_unknown_model_type(tmp_path):
    _fails(pretrain.main, ["--model_type", "lama"], r"unknown model_type 'lama' \(did you mean 'llama'\?\); choose one",
           tmp_path / "out")


def test_yaml_key_that_matches_no_argument(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_steps: 3\nlearning_rat: 0.1\nhiden_size: 64\n")
    _fails(pretrain.main, ["--config", str(cfg)],
           r"'learning_rat' \(did you mean 'learning_rate'\?\), 'hiden_size' \(did you mean 'hidden_size'\?\) "
           r"match no argument", tmp_path / "out")


def test_missing_or_misnamed_columns(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"conversation": [{"role": "user", "content": "hi"}]}) for _ in range(5)))
    _fails(sft.main, ["--dataset_name", str(data)], r"sft needs dataset columns 'messages' or 'prompt'\+'completion' "
           r"or 'text', but the dataset has \['conversation'\]", tmp_path / "out")
    pref = tmp_path / "p.jsonl"
    pref.write_text("\n".join(json.dumps({"prompt": "q", "chosen": "a", "rejectd": "b"}) for _ in range(5)))
    _fails(dpo.main, ["--dataset_name", str(pref)], r"rename 'rejectd' -> 'rejected'", tmp_path / "out2")
    text = tmp_path / "t.jsonl"
    text.write_text("\n".join(json.dumps({"content": "x = 1"}) for _ in range(5)))
    _fails(pretrain.main, ["--dataset_name", str(text)], r"set dataset_text_field", tmp_path / "out3")


def test_missing_local_file(tmp_path):
    _fails(sft.main, ["--dataset_name", str(tmp_path / "nope.jsonl")], "does not exist", tmp_path / "out")


def test_hub_dataset_while_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _fails(sft.main, ["--dataset_name", "someone-unknown/no-such-dataset-xyz"],
           r"cannot be loaded while offline \(HF_HUB_OFFLINE=1\).*unset dataset_name", tmp_path / "out")


def test_output_dir_holding_another_run(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / common.RUN_MARKER).write_text(json.dumps({"recipe": "sft", "fingerprint": "x"}))
    (out / "model.safetensors").write_text("previous run")
    _preexisting[str(out)] = os.listdir(out)
    _fails(pretrain.main, [], r"already holds another run \(sft.*--overwrite_output_dir true", out)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("user files")
    _preexisting[str(other)] = os.listdir(other)
    _fails(pretrain.main, ["--overwrite_output_dir", "true"], "not a litespark recipe run", other)


def test_resume_from_missing_checkpoint(tmp_path):
    _fails(pretrain.main, ["--resume_from_checkpoint", str(tmp_path / "checkpoint-99")],
           r"checkpoint .*checkpoint-99 does not exist", tmp_path / "out")
    _fails(pretrain.main, ["--resume_from_checkpoint", "true"], "holds no checkpoint", tmp_path / "out")


def test_command_line_prints_one_line_and_exit_status_2(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "recipes" / "pretrain.py"), "--model_type", "gpt9",
                        "--output_dir", str(tmp_path / "o")], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: unknown model_type 'gpt9'")
    assert "Traceback" not in r.stderr
