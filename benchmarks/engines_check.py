"""The recipes under the sharding engines (issue #20), at world size 1: train, evaluate, save, reload, resume.

For each engine (``accelerate_configs/fsdp2.yaml``, ``deepspeed_zero3.yaml``) and recipe (pretrain, then SFT on the
pre-trained model, then DPO on the SFT model), all with ``--use_litespark`` through ``accelerate launch
--num_processes 1``:

1. ``train``: STEPS steps with an evaluation and a (sharded) checkpoint at STEPS/2 and at the end, the recipe's
   held-out figures, the final save; passes when the run exits 0, wrote ``results.json`` and an evaluation, and its
   checkpoint is the engine's (FSDP2's ``pytorch_model_fsdp_0``, DeepSpeed's ``global_step*``).
2. ``reload``: the saved model loaded with plain ``AutoModelForCausalLM.from_pretrained`` (fp32, stock attention);
   its logits on a fixed batch against the in-run model's (written by the recipe itself: ``LITESPARK_LOGITS_PROBE``,
   `recipe_utils.evaluation.write_logits_probe`); passes when the relative Frobenius difference is <= RELOAD_TOL
   (bf16 training: the in-run forward runs in bf16 on the Litespark kernels).
3. ``resume``: a copy of the run without its final model and last checkpoint, continued with
   ``--resume_from_checkpoint <copy>/checkpoint-STEPS/2``; passes when its logged losses of steps STEPS/2+1..STEPS equal
   the uninterrupted run's within RESUME_TOL (relative).

Prints one ``PASS``/``FAIL`` line per check and its time, and writes ``engines_check.json`` to ``--out``. On a
CPU-only machine the runs use DeepSpeed's CPU accelerator and ``--mixed_precision no`` (accelerate does not run FSDP
on the CPU: its state enables FSDP only for GPU-like devices, so ``--engines zero3`` there).

    python benchmarks/engines_check.py --out OUT [--engines fsdp2,zero3] [--recipes pretrain,sft,dpo] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"fsdp2": "accelerate_configs/fsdp2.yaml", "zero3": "accelerate_configs/deepspeed_zero3.yaml"}
RELOAD_TOL = 2e-2
RESUME_TOL = 1e-2
# what a checkpoint of each engine holds: FSDP2's sharded state dict, DeepSpeed's partitioned states
CHECKPOINT_MARK = {"fsdp2": "pytorch_model_fsdp_0", "zero3": "global_step"}
FINAL_FILES = ("model.safetensors", "results.json", "README.md", "efficiency.json", "efficiency.png")


def recipe_args(recipe: str, base: Path | None, steps: int) -> list[str]:
    half = max(1, steps // 2)
    common = ["--use_litespark", "--max_steps", str(steps), "--save_steps", str(half), "--eval_steps", str(half),
              "--logging_steps", "1", "--disable_tqdm", "true", "--lr_scheduler_type", "constant",
              "--warmup_steps", "0", "--dataloader_num_workers", "0"]
    if recipe == "pretrain":
        return ["recipes/pretrain.py", "--config", "recipes/configs/pretrain_tiny.yaml", "--max_length", "128",
                "--per_device_train_batch_size", "4", "--corpus_max_train_chars", "200000",
                "--corpus_max_eval_chars", "8000", *common]
    if recipe == "sft":
        return ["recipes/sft.py", "--config", "recipes/configs/sft_tiny.yaml", "--model_name_or_path", str(base),
                "--per_device_train_batch_size", "8", "--exact_match_samples", "8", "--max_eval_samples", "32",
                *common]
    return ["recipes/dpo.py", "--config", "recipes/configs/dpo_tiny.yaml", "--model_name_or_path", str(base),
            "--per_device_train_batch_size", "8", "--max_eval_samples", "32", "--preference_eval_samples", "16",
            *common]


def launch(engine: str, args: list[str], out_dir: Path, log: Path, extra: list[str] = (), probe: Path | None = None):
    import torch

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", CONFIGS[engine],
           "--num_processes", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if not torch.cuda.is_available():
        cmd += ["--mixed_precision", "no"]  # the recipes train fp32 on the CPU; the YAML asks for bf16
        env["DS_ACCELERATOR"] = "cpu"
    if probe is not None:
        env["LITESPARK_LOGITS_PROBE"] = str(probe)
    cmd += [*args, "--output_dir", str(out_dir), *extra]
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env).returncode
    return rc, time.perf_counter() - t0


def step_losses(run: Path, steps: int) -> dict[int, float]:
    state = json.loads((run / f"checkpoint-{steps}" / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


def reload_difference(run: Path, probe: Path) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    saved = torch.load(probe)
    model = AutoModelForCausalLM.from_pretrained(run, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=saved["input_ids"], use_cache=False).logits.float()
    ref = saved["logits"]
    return float((logits - ref).norm() / ref.norm())


def check(engine: str, recipe: str, base: Path | None, steps: int, out: Path, report) -> Path | None:
    half = max(1, steps // 2)
    run = out / f"{recipe}_{engine}"
    shutil.rmtree(run, ignore_errors=True)
    probe = out / f"{recipe}_{engine}_probe.pt"
    rc, secs = launch(engine, recipe_args(recipe, base, steps), run, out / f"{recipe}_{engine}.log", probe=probe)
    evaluated = sharded = False
    if rc == 0 and (run / "results.json").is_file():
        state = json.loads((run / f"checkpoint-{steps}" / "trainer_state.json").read_text())
        evaluated = any(k.startswith("eval_") for h in state["log_history"] for k in h)
        sharded = any(p.name.startswith(CHECKPOINT_MARK[engine]) for p in (run / f"checkpoint-{half}").iterdir())
    report(engine, recipe, "train", rc == 0 and evaluated and sharded, secs,
           f"exit {rc}, evaluation logged: {evaluated}, {engine} checkpoint ({CHECKPOINT_MARK[engine]}*): {sharded}, "
           f"log {recipe}_{engine}.log")
    if rc != 0:
        return None

    t0 = time.perf_counter()
    try:
        diff = reload_difference(run, probe)
        report(engine, recipe, "reload", diff <= RELOAD_TOL, time.perf_counter() - t0,
               f"logits rel. difference {diff:.2e} (<= {RELOAD_TOL})")
    except Exception as e:  # noqa: BLE001 - reported, the next check runs
        report(engine, recipe, "reload", False, time.perf_counter() - t0, f"{type(e).__name__}: {e}")

    resumed = out / f"{recipe}_{engine}_resumed"
    shutil.rmtree(resumed, ignore_errors=True)
    shutil.copytree(run, resumed, ignore=lambda d, names: [f"checkpoint-{steps}"] if Path(d) == run else [])
    for name in FINAL_FILES:  # the interrupted run wrote no final model (its checkpoints keep theirs)
        (resumed / name).unlink(missing_ok=True)
    rc2, secs2 = launch(engine, recipe_args(recipe, base, steps), resumed, out / f"{recipe}_{engine}_resumed.log",
                        extra=["--resume_from_checkpoint", str(resumed / f"checkpoint-{half}")])
    detail, ok = f"exit {rc2}", False
    if rc2 == 0:
        a, b = step_losses(run, steps), step_losses(resumed, steps)
        later = [s for s in range(half + 1, steps + 1) if s in a]
        if later and all(s in b for s in later):
            worst = max(abs(b[s] - a[s]) / abs(a[s]) for s in later)
            ok = worst <= RESUME_TOL
            detail = (f"steps {later[0]}-{later[-1]}: max rel. difference {worst:.2e} (<= {RESUME_TOL}); "
                      f"uninterrupted {[round(a[s], 4) for s in later]}, resumed {[round(b[s], 4) for s in later]}")
        else:
            detail = f"losses missing: uninterrupted {sorted(a)}, resumed {sorted(b)}"
    report(engine, recipe, "resume", ok, secs2, detail)
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--engines", default="fsdp2,zero3")
    p.add_argument("--recipes", default="pretrain,sft,dpo")
    p.add_argument("--steps", type=int, default=6)
    a = p.parse_args(argv)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = []

    def report(engine, recipe, name, ok, secs, detail):
        rows.append({"engine": engine, "recipe": recipe, "check": name, "pass": bool(ok), "seconds": round(secs, 1),
                     "detail": detail})
        print(f"{'PASS' if ok else 'FAIL'} {engine} {recipe} {name} ({secs:.0f} s): {detail}", flush=True)

    recipes = [r for r in a.recipes.split(",") if r]
    for engine in [e for e in a.engines.split(",") if e]:
        base = None
        for recipe in recipes:
            if recipe != "pretrain" and base is None:
                base = out / f"{'pretrain' if recipe == 'sft' else 'sft'}_{engine}"
                if not (base / "model.safetensors").is_file():
                    report(engine, recipe, "train", False, 0.0, f"no base model at {base}")
                    continue
            run = check(engine, recipe, base, a.steps, out, report)
            base = run if run is not None else None
    (out / "engines_check.json").write_text(json.dumps(rows, indent=1))
    failed = [r for r in rows if not r["pass"]]
    print(f"engines_check: {len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
