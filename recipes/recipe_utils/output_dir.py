"""What a recipe may do with ``--output_dir``, decided before anything is written, and replacing a run safely.

`plan_run` reads the directory and returns a `RunPlan`:

- absent or empty: a new run;
- files that are not a recipe run (no ``litespark_run.json`` marker): an error, never deleted;
- ``--resume_from_checkpoint true|<dir>``: resume (the checkpoint must exist and belong to this recipe, and its
  learning-rate schedule must be the one asked for: the Trainer restores the scheduler state);
- the same recipe and arguments (same fingerprint), interrupted (no final model) with checkpoints: resume from the
  newest checkpoint automatically, with one line saying so and how to start over (``--overwrite_output_dir true``);
- the same recipe and arguments, finished (or without checkpoints), or ``--overwrite_output_dir true``: replace it;
- another run: an error that fits the case (another recipe, or the same recipe with other arguments).

`OutputDir(plan)` is the context manager around building the trainer and training. A run to replace is moved aside
to a sibling directory (``.<name>.litespark-previous``) and deleted only once the new run has trained its first
step; if anything fails before that (the trainer's constructor, the first step, Ctrl-C), the earlier run is put
back and what the new run wrote is removed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import RecipeError

RUN_MARKER = "litespark_run.json"
ASIDE_SUFFIX = ".litespark-previous"

FINGERPRINT_SKIP = {"output_dir", "logging_dir", "resume_from_checkpoint", "overwrite_output_dir", "report_to",
                    "disable_tqdm", "run_name", "hub_token", "push_to_hub", "logging_steps", "eval_steps",
                    "save_steps", "save_total_limit", "dataloader_num_workers", "local_rank", "eval_strategy",
                    "save_strategy", "logging_strategy"}
# The settings whose learning-rate schedule a resumed run inherits from its checkpoint.
SCHEDULE_FIELDS = ("learning_rate", "lr_scheduler_type", "warmup_steps", "max_steps", "num_train_epochs")


def fingerprint(*arg_objects) -> str:
    items = {}
    for obj in arg_objects:
        for f in dataclasses.fields(obj):
            if f.init and f.name not in FINGERPRINT_SKIP:
                items[f"{type(obj).__name__}.{f.name}"] = getattr(obj, f.name, None)
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()[:16]


def schedule_of(training_args) -> dict:
    return {k: getattr(v, "value", v) for k, v in ((k, getattr(training_args, k, None)) for k in SCHEDULE_FIELDS)}


def read_marker(output_dir) -> dict | None:
    """The run marker of ``output_dir`` ({} when unreadable), or None when there is none."""
    p = Path(output_dir) / RUN_MARKER
    if not p.is_file():
        return None
    try:
        marker = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return marker if isinstance(marker, dict) else {}


def run_finished(output_dir, marker: dict) -> bool:
    """A run that wrote its final model and results (markers of older runs lack the flag: results.json says it)."""
    if "finished" in marker:
        return bool(marker["finished"])
    return (Path(output_dir) / "results.json").is_file()


def aside_path(output_dir) -> Path:
    p = Path(os.path.abspath(output_dir))
    return p.parent / f".{p.name}{ASIDE_SUFFIX}"


def latest_checkpoint(output_dir) -> str | None:
    """The newest complete ``checkpoint-N`` (with its trainer_state.json) in ``output_dir``, or None."""
    p = Path(output_dir)
    if not p.is_dir():
        return None
    steps = []
    for c in p.iterdir():
        if c.name.startswith("checkpoint-") and c.name[11:].isdigit() and (c / "trainer_state.json").is_file():
            steps.append((int(c.name[11:]), str(c)))
    return max(steps)[1] if steps else None


def resolve_resume(output_dir: str, resume) -> str | None:
    """The checkpoint to resume from (``True``/'true'/'latest' = the newest in output_dir), or a RecipeError."""
    if resume in (None, False, "", "false", "False"):
        return None
    if resume in (True, "true", "True", "latest", "last"):
        last = latest_checkpoint(output_dir)
        if last is None:
            raise RecipeError(f"resume_from_checkpoint asks for the latest checkpoint, but {output_dir} holds no "
                              "checkpoint-* directory; drop --resume_from_checkpoint to start afresh, or set "
                              "output_dir to the run to continue")
        return last
    if not os.path.isfile(os.path.join(str(resume), "trainer_state.json")):
        raise RecipeError(f"checkpoint {resume} does not exist (no trainer_state.json there); give an existing "
                          f"checkpoint-* directory, or 'true' for the newest one in output_dir")
    return str(resume)


def check_resume_schedule(checkpoint: str, training_args) -> None:
    """Resuming restores the checkpoint's optimizer and learning-rate scheduler: the schedule asked for must be the
    checkpoint's, or the run would follow neither (the first resumed step keeps the old learning rate, the rest a
    cut of the new schedule)."""
    try:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RecipeError(f"checkpoint {checkpoint} has an unreadable trainer_state.json ({e}); give another "
                          "checkpoint") from e
    fresh = f"start a new run from its weights (--model_name_or_path {checkpoint} --output_dir <new dir>)"
    old_max, new_max = state.get("max_steps"), training_args.max_steps
    if new_max > 0 and old_max and new_max != old_max:
        raise RecipeError(f"checkpoint {checkpoint} belongs to a run of max_steps {old_max} (its learning-rate "
                          f"schedule ends there and resuming restores it), so --max_steps {new_max} cannot be "
                          f"honoured on resume; resume with --max_steps {old_max}, or {fresh}")
    if new_max == -1 and state.get("num_train_epochs") not in (None, training_args.num_train_epochs):
        raise RecipeError(f"checkpoint {checkpoint} belongs to a run of num_train_epochs {state['num_train_epochs']} "
                          "(resuming restores its learning-rate schedule); resume with that value, or " + fresh)
    marker = read_marker(Path(checkpoint).parent) or {}
    old = marker.get("schedule") or {}
    new = schedule_of(training_args)
    changed = [k for k in SCHEDULE_FIELDS if k in old and k not in ("max_steps", "num_train_epochs")
               and old[k] != new[k]]
    if changed:
        what = ", ".join(f"--{k} {old[k]} (now {new[k]})" for k in changed)
        raise RecipeError(f"checkpoint {checkpoint} was trained with {what}; resuming restores its learning-rate "
                          f"schedule, so give the same value{'s' if len(changed) > 1 else ''}, or {fresh}")


def _check_writable(output_dir: str) -> None:
    p = Path(os.path.abspath(output_dir))
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and probe.is_dir() and not os.access(probe, os.W_OK | os.X_OK):
        raise RecipeError(f"output_dir {output_dir} is not writable ({probe} is read-only for this user); choose "
                          "another --output_dir")
    if probe.exists() and not probe.is_dir():
        raise RecipeError(f"output_dir {output_dir} cannot be created: {probe} is a file")


@dataclass
class RunPlan:
    """What a recipe does with its output directory (see the module docstring)."""

    recipe: str
    output_dir: str
    fingerprint: str
    resume: str | None = None  # the checkpoint to resume from
    replace: bool = False  # an earlier run is to be replaced (moved aside, deleted once training has started)
    note: str | None = None  # one line for the log (automatic resume)
    schedule: dict = field(default_factory=dict)


def plan_run(recipe: str, script_args, training_args, model_args) -> RunPlan:
    """Decide, without writing anything, what to do with ``training_args.output_dir`` (or a RecipeError)."""
    out = training_args.output_dir
    if not str(out or "").strip():
        raise RecipeError("--output_dir is empty; give the directory the run writes to")
    overwrite = script_args.overwrite_output_dir
    plan = RunPlan(recipe, out, fingerprint(script_args, training_args, model_args),
                   schedule=schedule_of(training_args))
    explicit = resolve_resume(out, training_args.resume_from_checkpoint)
    if explicit and overwrite:
        raise RecipeError("--overwrite_output_dir true starts over and --resume_from_checkpoint continues: give one "
                          "of them")
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise RecipeError(f"output_dir {out} is a file; choose a directory")
    aside = aside_path(out)
    if aside.exists():
        raise RecipeError(f"{aside} holds the earlier run of {out}, moved aside by an overwrite that was killed "
                          f"before its first training step; put it back (rm -rf {out}; mv {aside} {out}) or delete "
                          "it, then run again")
    _check_writable(out)
    has_files = p.is_dir() and any(p.iterdir())
    marker = read_marker(p) if has_files else None
    if has_files and marker is None:
        raise RecipeError(f"output_dir {out} already holds files that are not a litespark recipe run; "
                          "choose a new or empty --output_dir")
    other = (marker or {}).get("recipe")
    if explicit:
        if has_files and other != recipe:
            raise RecipeError(f"cannot resume {recipe} in {out}: it holds a {other} run; choose that run's "
                              "recipe or another --output_dir")
        check_resume_schedule(explicit, training_args)
        plan.resume = explicit
        return plan
    if not has_files:
        return plan
    if overwrite:
        plan.replace = True
        return plan
    if other != recipe:
        raise RecipeError(f"output_dir {out} holds a {other} run (another recipe); choose another --output_dir, or "
                          "pass --overwrite_output_dir true to replace it")
    checkpoint = latest_checkpoint(out)
    finished = run_finished(out, marker)
    if marker.get("fingerprint") == plan.fingerprint:
        if checkpoint and not finished:
            check_resume_schedule(checkpoint, training_args)
            plan.resume = checkpoint
            plan.note = (f"[{recipe}] {out} holds an interrupted run with these arguments: resuming from "
                         f"{os.path.basename(checkpoint)} (pass --overwrite_output_dir true to start over)")
        else:
            plan.replace = True  # the same run again: replace it
        return plan
    resume_hint = ", --resume_from_checkpoint true to continue it" if checkpoint and not finished else ""
    raise RecipeError(f"output_dir {out} already holds another {recipe} run (different arguments); pass "
                      f"--overwrite_output_dir true to replace it{resume_hint}, or choose another --output_dir")


class OutputDir:
    """``with OutputDir(plan, argv) as out:`` around building the trainer, training and saving; pass
    ``out.callback()`` to the trainer. See the module docstring."""

    def __init__(self, plan: RunPlan, argv=None):
        self.plan = plan
        self.argv = list(sys.argv[1:] if argv is None else argv)
        self.path = Path(plan.output_dir)
        self._aside: Path | None = None
        self._existed = False
        self._old_marker: str | None = None
        self._started = False

    @staticmethod
    def _state():
        from accelerate import PartialState

        return PartialState()

    def _write_marker(self, finished: bool) -> None:
        (self.path / RUN_MARKER).write_text(json.dumps({
            "recipe": self.plan.recipe, "fingerprint": self.plan.fingerprint, "finished": finished,
            "schedule": self.plan.schedule, "argv": self.argv}, indent=1, default=str))

    def __enter__(self) -> OutputDir:
        state = self._state()
        if state.is_main_process:
            self._existed = self.path.exists()
            if self.plan.replace and self._existed and any(self.path.iterdir()):
                self._aside = aside_path(self.path)
                try:
                    os.replace(self.path, self._aside)
                except OSError as e:
                    raise RecipeError(f"cannot move the earlier run in {self.path} aside to {self._aside} "
                                      f"({e.strerror or e}); choose another --output_dir") from e
                self._existed = False
            marker = self.path / RUN_MARKER
            self._old_marker = marker.read_text() if marker.is_file() else None
            self.path.mkdir(parents=True, exist_ok=True)
            self._write_marker(finished=False)
            if self.plan.note:
                print(self.plan.note, flush=True)
        state.wait_for_everyone()
        return self

    def callback(self):
        """A TrainerCallback that marks the run as started after its first optimizer step."""
        from transformers import TrainerCallback

        guard = self

        class _TrainingStarted(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                guard.started()

        return _TrainingStarted()

    def started(self) -> None:
        """Training has started: the earlier run (if one was moved aside) is deleted now."""
        if self._started:
            return
        self._started = True
        if self._aside is not None and self._state().is_main_process:
            shutil.rmtree(self._aside, ignore_errors=True)
            self._aside = None

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.started()
            if self._state().is_main_process:
                self._write_marker(finished=True)
            return False
        if not self._started and self._state().is_main_process:
            self._restore()
        return False

    def _restore(self) -> None:
        """The run failed before its first step: put the directory back as it was."""
        if self._aside is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            os.replace(self._aside, self.path)
            self._aside = None
            print(f"[{self.plan.recipe}] the run failed before its first training step; the earlier run in "
                  f"{self.path} is kept", file=sys.stderr, flush=True)
        elif not self._existed:
            shutil.rmtree(self.path, ignore_errors=True)
        elif self._old_marker is not None:
            (self.path / RUN_MARKER).write_text(self._old_marker)
        else:  # an empty directory before: empty again
            for child in self.path.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
