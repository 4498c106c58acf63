"""Output-directory safety and resume detection of the recipes (recipes/recipe_utils/output_dir.py). Quick (CPU).

The decisions (`plan_run`) and the replace-safely context manager (`OutputDir`) are tested on hand-made directories;
then a few tiny pretrain.py runs (2 layers of width 32, a few steps) check the whole path: a failing overwrite keeps
the earlier run, a successful one replaces it, an interrupted run resumes from its newest checkpoint when the same
command is run again, and resuming with another ``--max_steps`` is refused.
"""

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

import pretrain  # noqa: E402
import sft  # noqa: E402
from recipe_utils import RecipeError  # noqa: E402
from recipe_utils.output_dir import RUN_MARKER, OutputDir, aside_path, fingerprint, plan_run  # noqa: E402


@dataclass
class Script:
    overwrite_output_dir: bool = False


@dataclass
class Training:
    output_dir: str = ""
    resume_from_checkpoint: str | None = None
    max_steps: int = 10
    num_train_epochs: float = 3.0
    learning_rate: float = 1e-3
    lr_scheduler_type: str = "cosine"
    warmup_steps: float = 0.0


@dataclass
class Model:
    model_name_or_path: str | None = None


def _args(out, **kw):
    script = Script(overwrite_output_dir=kw.pop("overwrite", False))
    return script, Training(output_dir=str(out), **kw), Model()


def _fake_run(out: Path, recipe="pretrain", fp="other", finished=True, checkpoints=(), max_steps=10, schedule=None):
    out.mkdir(parents=True, exist_ok=True)
    marker = {"recipe": recipe, "fingerprint": fp, "finished": finished}
    if schedule is not None:
        marker["schedule"] = schedule
    (out / RUN_MARKER).write_text(json.dumps(marker))
    (out / "model.safetensors").write_text("earlier weights")
    for step in checkpoints:
        (out / f"checkpoint-{step}").mkdir()
        (out / f"checkpoint-{step}" / "trainer_state.json").write_text(
            json.dumps({"global_step": step, "max_steps": max_steps}))


def _snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _fp(out, **kw):
    return fingerprint(*_args(out, **kw))


# --------------------------------------------------------------------------------------------------------------------
# plan_run: the decision, nothing written
# --------------------------------------------------------------------------------------------------------------------
def test_new_or_empty_directory(tmp_path):
    plan = plan_run("pretrain", *_args(tmp_path / "new"))
    assert (plan.resume, plan.replace, plan.note) == (None, False, None)
    (tmp_path / "empty").mkdir()
    assert not plan_run("pretrain", *_args(tmp_path / "empty")).replace
    assert not (tmp_path / "new").exists()


def test_output_dir_that_is_a_file_or_under_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(RecipeError, match=r"output_dir .*f is a file; choose a directory"):
        plan_run("pretrain", *_args(tmp_path / "f"))
    with pytest.raises(RecipeError, match=r"cannot be created: .*f is a file"):
        plan_run("pretrain", *_args(tmp_path / "f" / "run"))


def test_read_only_output_dir(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == ro else real(p, mode))  # root ignores modes
    with pytest.raises(RecipeError, match=r"output_dir .*ro/run is not writable \(.*ro is read-only"):
        plan_run("pretrain", *_args(ro / "run"))


def test_user_files_are_never_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RecipeError, match="not a litespark recipe run"):
        plan_run("pretrain", *_args(out, overwrite=True))


def test_another_recipe_or_other_arguments(tmp_path):
    out = tmp_path / "out"
    _fake_run(out, recipe="sft")
    with pytest.raises(RecipeError, match=r"holds a sft run \(another recipe\); choose another --output_dir, or pass "
                                          r"--overwrite_output_dir true to replace it$"):
        plan_run("pretrain", *_args(out))
    assert plan_run("pretrain", *_args(out, overwrite=True)).replace
    with pytest.raises(RecipeError, match=r"cannot resume pretrain in .*: it holds a sft run"):
        (out / "checkpoint-3").mkdir()
        (out / "checkpoint-3" / "trainer_state.json").write_text(json.dumps({"max_steps": 10}))
        plan_run("pretrain", *_args(out, resume_from_checkpoint="true"))
    finished = tmp_path / "finished"
    _fake_run(finished, checkpoints=(5,))
    with pytest.raises(RecipeError, match=r"another pretrain run \(different arguments\); pass --overwrite_output_dir "
                                          r"true to replace it, or choose another --output_dir"):
        plan_run("pretrain", *_args(finished))  # finished: continuing is not offered


def test_same_arguments_interrupted_resumes_from_the_newest_checkpoint(tmp_path):
    out = tmp_path / "out"
    _fake_run(out, fp=_fp(out), finished=False, checkpoints=(2, 4))
    (out / "checkpoint-6").mkdir()  # killed while saving: no trainer_state.json, skipped
    plan = plan_run("pretrain", *_args(out))
    assert plan.resume == str(out / "checkpoint-4") and not plan.replace
    assert plan.note == (f"[pretrain] {out} holds an interrupted run with these arguments: resuming from "
                         "checkpoint-4 (pass --overwrite_output_dir true to start over)")
    over = plan_run("pretrain", *_args(out, overwrite=True))
    assert over.resume is None and over.replace


def test_same_arguments_finished_or_without_checkpoints_is_replaced(tmp_path):
    done = tmp_path / "done"
    _fake_run(done, fp=_fp(done), finished=True, checkpoints=(10,))
    plan = plan_run("pretrain", *_args(done))
    assert plan.replace and plan.resume is None
    old = tmp_path / "old"  # a marker of an older version (no 'finished'): results.json says finished
    _fake_run(old, fp=_fp(old), checkpoints=(10,))
    marker = json.loads((old / RUN_MARKER).read_text())
    del marker["finished"]
    (old / RUN_MARKER).write_text(json.dumps(marker))
    assert plan_run("pretrain", *_args(old)).resume == str(old / "checkpoint-10")
    (old / "results.json").write_text("{}")
    assert plan_run("pretrain", *_args(old)).replace
    bare = tmp_path / "bare"
    _fake_run(bare, fp=_fp(bare), finished=False)
    assert plan_run("pretrain", *_args(bare)).replace


def test_resume_with_another_schedule_is_refused(tmp_path):
    out = tmp_path / "out"
    _fake_run(out, finished=True, checkpoints=(5,), max_steps=5,
              schedule={"learning_rate": 1e-3, "lr_scheduler_type": "cosine", "warmup_steps": 0.0, "max_steps": 5})
    with pytest.raises(RecipeError, match=r"checkpoint .*checkpoint-5 belongs to a run of max_steps 5 .* so "
                                          r"--max_steps 10 cannot be honoured on resume; resume with --max_steps 5, "
                                          r"or start a new run from its weights \(--model_name_or_path .*checkpoint-5"):
        plan_run("pretrain", *_args(out, resume_from_checkpoint="true", max_steps=10))
    with pytest.raises(RecipeError, match=r"was trained with --learning_rate 0.001 \(now 0.002\)"):
        plan_run("pretrain", *_args(out, resume_from_checkpoint="true", max_steps=5, learning_rate=2e-3))
    plan = plan_run("pretrain", *_args(out, resume_from_checkpoint=str(out / "checkpoint-5"), max_steps=5))
    assert plan.resume == str(out / "checkpoint-5")
    with pytest.raises(RecipeError, match="give one of them"):
        plan_run("pretrain", *_args(out, resume_from_checkpoint="true", max_steps=5, overwrite=True))


def test_stale_aside_directory_is_reported(tmp_path):
    out = tmp_path / "out"
    _fake_run(out)
    aside_path(out).mkdir()
    with pytest.raises(RecipeError, match=r"holds the earlier run of .*out, moved aside by an overwrite that was "
                                          r"killed before its first training step; put it back"):
        plan_run("pretrain", *_args(out, overwrite=True))


# --------------------------------------------------------------------------------------------------------------------
# OutputDir: the earlier run is deleted only once training has started
# --------------------------------------------------------------------------------------------------------------------
def test_failure_before_the_first_step_restores_the_earlier_run(tmp_path):
    out = tmp_path / "out"
    _fake_run(out, checkpoints=(5,))
    before = _snapshot(out)
    plan = plan_run("pretrain", *_args(out, overwrite=True))
    with pytest.raises(RuntimeError, match="boom"):
        with OutputDir(plan, ["--x"]):
            assert aside_path(out).is_dir() and json.loads((out / RUN_MARKER).read_text())["finished"] is False
            (out / "partial.bin").write_text("new run")
            raise RuntimeError("boom")
    assert _snapshot(out) == before and not aside_path(out).exists()


def test_started_run_replaces_the_earlier_one(tmp_path):
    out = tmp_path / "out"
    _fake_run(out, checkpoints=(5,))
    plan = plan_run("pretrain", *_args(out, overwrite=True))
    with OutputDir(plan, ["--x"]) as guard:
        guard.callback().on_step_end(None, None, None)  # the first optimizer step
        assert not aside_path(out).exists()
        (out / "model.safetensors").write_text("new weights")
    marker = json.loads((out / RUN_MARKER).read_text())
    assert marker["finished"] is True and marker["fingerprint"] == plan.fingerprint and marker["argv"] == ["--x"]
    assert sorted(p.name for p in out.iterdir()) == [RUN_MARKER, "model.safetensors"]
    # after training started, a failure keeps the new run (its checkpoints are what a re-run resumes from)
    plan = plan_run("pretrain", *_args(out, overwrite=True))
    with pytest.raises(KeyboardInterrupt):
        with OutputDir(plan) as guard:
            guard.started()
            raise KeyboardInterrupt
    assert json.loads((out / RUN_MARKER).read_text())["finished"] is False


def test_failed_new_run_leaves_no_directory(tmp_path):
    plan = plan_run("pretrain", *_args(tmp_path / "new"))
    with pytest.raises(RuntimeError):
        with OutputDir(plan):
            raise RuntimeError("trainer failed")
    assert not (tmp_path / "new").exists()


# --------------------------------------------------------------------------------------------------------------------
# The recipes, end to end (tiny runs)
# --------------------------------------------------------------------------------------------------------------------
TINY = ["--hidden_size", "32", "--num_hidden_layers", "2", "--intermediate_size", "64", "--corpus_max_train_chars",
        "40000", "--corpus_max_eval_chars", "2000", "--max_length", "64", "--track_efficiency", "false",
        "--eval_strategy", "no", "--disable_tqdm", "true", "--logging_steps", "1", "--use_litespark", "false",
        "--warmup_steps", "0"]


class Interrupted(Exception):
    pass


def _count_steps(monkeypatch, fail_at=None, exc=Interrupted):
    """Count the optimizer steps run (and fail on step ``fail_at``), through the Trainer's training_step."""
    import transformers

    calls = []
    real = transformers.Trainer.training_step

    def training_step(self, *args, **kwargs):
        calls.append(self.state.global_step)
        if fail_at is not None and len(calls) == fail_at:
            raise exc(f"failed at step {fail_at}")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "training_step", training_step)
    return calls


def test_failing_overwrite_keeps_the_earlier_run_and_a_good_one_replaces_it(tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = pretrain.main([*TINY, "--max_steps", "2", "--save_strategy", "no", "--output_dir", str(out)])
    assert first["steps"] == 2
    before = _snapshot(out)
    # the new run fails on its first training step (after the trainer was built): nothing of the old run is lost
    _count_steps(monkeypatch, fail_at=1, exc=RuntimeError)
    with pytest.raises(RuntimeError, match="failed at step 1"):
        pretrain.main([*TINY, "--max_steps", "3", "--save_strategy", "no", "--overwrite_output_dir", "true",
                       "--output_dir", str(out)])
    assert _snapshot(out) == before and not aside_path(out).exists()
    # the peft error of the issue (an unknown LoRA target) comes before anything is moved
    _fake_run(tmp_path / "sft_run", recipe="sft")
    sft_before = _snapshot(tmp_path / "sft_run")
    with pytest.raises(RecipeError, match="--lora_target_modules foo_proj matches no module"):
        sft.main(["--use_peft", "--lora_target_modules", "foo_proj", "--overwrite_output_dir", "true", "--start_from",
                  str(tmp_path / "none"), "--sft_num_train", "16", "--sft_num_eval", "4", "--exact_match_samples", "0",
                  "--output_dir", str(tmp_path / "sft_run")])
    assert _snapshot(tmp_path / "sft_run") == sft_before
    monkeypatch.undo()
    second = pretrain.main([*TINY, "--max_steps", "3", "--save_strategy", "no", "--overwrite_output_dir", "true",
                            "--output_dir", str(out)])
    assert second["steps"] == 3 and not aside_path(out).exists()
    assert json.loads((out / "results.json").read_text())["steps"] == 3
    assert json.loads((out / RUN_MARKER).read_text())["finished"] is True
    assert (out / "model.safetensors").read_bytes() != before["model.safetensors"]


def test_interrupted_run_resumes_when_the_same_command_runs_again(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    argv = [*TINY, "--max_steps", "4", "--save_steps", "2", "--output_dir", str(out)]
    calls = _count_steps(monkeypatch, fail_at=3)  # Ctrl-C during step 3: checkpoint-2 is on disk
    with pytest.raises(Interrupted):
        pretrain.main(argv)
    assert (out / "checkpoint-2" / "trainer_state.json").is_file() and not (out / "results.json").exists()
    monkeypatch.undo()
    calls = _count_steps(monkeypatch)
    capsys.readouterr()
    r = pretrain.main(argv)
    log = capsys.readouterr().out
    assert f"[pretrain] {out} holds an interrupted run with these arguments: resuming from checkpoint-2 (pass " \
           "--overwrite_output_dir true to start over)" in log
    assert r["steps"] == 4 and calls == [2, 3]  # steps 3 and 4 only: it continued from checkpoint-2
    assert (out / "checkpoint-4").is_dir() and (out / "checkpoint-2").is_dir()
    # a longer run from the finished one's checkpoint would keep the 4-step learning-rate schedule: refused
    with pytest.raises(RecipeError, match=r"belongs to a run of max_steps 4 .*resume with --max_steps 4"):
        pretrain.main([*TINY, "--max_steps", "8", "--save_steps", "2", "--resume_from_checkpoint", "true",
                       "--output_dir", str(out)])
