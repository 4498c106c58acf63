"""Side-by-side training benchmark: the same model, data and seed for N steps, once per variant.

Variants (``--variants``, in this order by default): ``sdpa`` (HF default, the baseline), ``eager``, ``liger``
(``use_liger_kernel=True``, when liger-kernel imports), ``compile`` (``torch_compile=True``), ``litespark``
(``use_litespark=True`` through `litespark_hf.TrainingArguments`/`Trainer`), ``litespark_compile``, ``litespark_fp8``
(``LitesparkConfig.fp8``: the projection GEMMs in float8; its MFU still counts against the bf16 dense peak),
``litespark_cudnn`` (``attention_cudnn``: plain causal attention through torch's cuDNN SDPA),
``litespark_compile_layers`` (``compile_layers``: each decoder layer compiled on its own).

Method (as in shared/docs/baselines.md): random-init model from a config, random token ids (every token real),
``bf16=True`` (fp32 master weights, AdamW fused), constant learning rate, the Trainer's usual loop, logging once at
the end. No step waits for the GPU (as in a run that logs every few steps): the timed window (``--time-from`` to
``--steps``, both 1-based and included) starts and ends with one device sync, each step's time is the GPU time
between CUDA events recorded at its begin and end, and the losses stay on the device until the run ends. Tokens/s =
tokens per step / median step time over the timed steps; MFU with ``6N + 12 L d T``
(`litespark_hf.efficiency.flops`); peak memory = ``torch.cuda.max_memory_allocated``; energy per token = NVML total-energy counter (all visible GPUs) over the timed
steps / their tokens, or, without NVML, CodeCarbon's offline estimate (flagged). Each variant runs in its own
subprocess by default (``--no-isolate`` to run in-process): Liger's and torch.compile's global patches and caches
cannot leak into the next variant, and an out-of-memory or a crash is recorded and the run goes on.

Engines (``--engine``): ``none`` (one device, the default), ``fsdp2`` or ``zero3``: every variant trained under
FSDP2 or DeepSpeed ZeRO-3 configured as ``accelerate_configs/fsdp2.yaml`` / ``deepspeed_zero3.yaml`` configure a
script, at world size 1 when not started by a launcher (`litespark_hf.efficiency.engines`); the speedups are then
over the same engine's ``sdpa`` run.

Usage: ``litespark-train-bench --config llama-1b`` (or ``python benchmarks/train_bench.py ...``); ``--tiny`` is
a CPU-sized config for tests. Writes ``train_bench_<config>_<device>.json`` and ``.png`` (with an engine:
``train_bench_<config>_<engine>_<device>``; device tag from `litespark_hf.efficiency.device.device_tag`: ``h100``,
``h200``, ``cpu``, ...; ``--tag`` appends a suffix) to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

from . import engines as _engines
from .family_configs import FAMILY_CONFIGS

__all__ = ["CONFIGS", "VARIANTS", "main", "run_variant", "run_bench", "format_table"]

CONFIGS = {
    "llama-1b": dict(
        family="llama", seq=2048, batch=4, gradient_checkpointing=False,
        model=dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                   intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=131072,
                   rope_theta=500000.0, rms_norm_eps=1e-5, head_dim=64,
                   rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
        note="Llama-3.2-1B shape (1,235.8M params), seq 2048, batch 4, no gradient checkpointing"),
    "llama-3b": dict(
        family="llama", seq=2048, batch=4, gradient_checkpointing=True,
        model=dict(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
                   intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=131072,
                   rope_theta=500000.0, rms_norm_eps=1e-5, head_dim=128,
                   rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
        note="Llama-3.2-3B shape (3,212.7M params), seq 2048, batch 4, gradient checkpointing"),
    "starcoder2-3b": dict(
        family="starcoder2", seq=2048, batch=4, gradient_checkpointing=True,
        model=dict(hidden_size=3072, num_hidden_layers=30, num_attention_heads=24, num_key_value_heads=2,
                   intermediate_size=12288, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=16384,
                   rope_theta=999999.4420358813, norm_epsilon=1e-5, use_bias=True, sliding_window=4096,
                   hidden_act="gelu_pytorch_tanh", attention_dropout=0.1, residual_dropout=0.1,
                   embedding_dropout=0.1, bos_token_id=0, eos_token_id=0),
        note="StarCoder2-3B shape (3,030.4M params; released dropouts 0.1), seq 2048, batch 4, gradient checkpointing"),
    "tiny": dict(
        family="llama", seq=64, batch=2, gradient_checkpointing=False, steps=6, time_from=3, bf16=False,
        model=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=128, vocab_size=256, tie_word_embeddings=True, max_position_embeddings=256,
                   bos_token_id=1, eos_token_id=2),
        note="tiny Llama for CPU tests"),
}
CONFIGS.update(FAMILY_CONFIGS)  # one ~1B shape per further family (family_configs.py)

# name -> (attn_implementation, TrainingArguments overrides, needs)
VARIANTS = {
    "sdpa": ("sdpa", {}, None),
    "eager": ("eager", {}, None),
    "liger": ("sdpa", {"use_liger_kernel": True}, "liger_kernel"),
    "compile": ("sdpa", {"torch_compile": True}, None),
    "litespark": ("sdpa", {"use_litespark": True}, None),
    "litespark_compile": ("sdpa", {"use_litespark": True, "torch_compile": True}, None),
    "litespark_fp8": ("sdpa", {"use_litespark": True, "litespark_config": '{"fp8": true}'}, None),
    "litespark_cudnn": ("sdpa", {"use_litespark": True, "litespark_config": '{"attention_cudnn": true}'}, None),
    "litespark_compile_layers": ("sdpa", {"use_litespark": True, "litespark_config": '{"compile_layers": true}'},
                                 None),
    # diagnostics: Litespark with one trainer-side part switched off (what that part is worth, in the same run)
    "litespark_clip_unfolded": ("sdpa", {"use_litespark": True, "litespark_config": '{"fused_grad_clip": false}'},
                                None),
    "litespark_torch_adamw": ("sdpa", {"use_litespark": True, "litespark_config": '{"fused_optimizer": false}'},
                              None),
    "litespark_no_prefetch": ("sdpa", {"use_litespark": True,
                                       "litespark_config": '{"fsdp2_forward_prefetch": false}'},
                              None),  # --engine fsdp2: FSDP2's default (host-issued) all-gathers
    "litespark_zero3_fine": ("sdpa", {"use_litespark": True, "litespark_config": '{"zero3_layer_units": false}'},
                             None),  # --engine zero3: DeepSpeed's hooks per sub-module, as before the layer units
    # configs with gradient checkpointing (llama-3b, starcoder2-3b): every layer recomputed, as transformers does
    # (and the sharding engines with several processes; checkpoint_layers="auto" plans in one process only)
    "litespark_checkpoint_all": ("sdpa", {"use_litespark": True,
                                          "litespark_config": '{"checkpoint_layers": "all"}'}, None),
}
BASELINE = "sdpa"


def _hf_config(cfg: dict):
    from transformers import AutoConfig

    return AutoConfig.for_model(cfg["family"], **cfg["model"])


class _Data:
    """Random token ids, fixed by the seed: the same batches for every variant."""

    def __init__(self, n: int, seq: int, vocab: int, seed: int):
        import torch

        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)

    def __len__(self):
        return self.ids.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@contextlib.contextmanager
def temporary_env(name: str, value: str | None = None):
    """For the duration: environment variable ``name`` set to ``value`` (``None``: left as it is, for the body to
    change); afterwards it is restored, or removed if it was not set. For switches the code reads per call
    (``LITESPARK_FAST_LAUNCH``)."""
    before = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _timer_callback(time_from: int, steps: int, cuda: bool, progress: bool, meter):
    import torch
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.losses = [], []
            self.marks = []  # (host t0, host t1, begin event, end event) per step
            self.loss_tensors = []
            self._ev = None
            self.window = None
            self._t = None
            self.bar = None
            self.gc_events = []  # (generation, pause s, end time) of Python's garbage collections during training
            self._gc_t0 = None

        def _gc_hook(self, phase, info):
            now = time.perf_counter()
            if phase == "start":
                self._gc_t0 = now
            elif self._gc_t0 is not None:
                self.gc_events.append((info.get("generation"), now - self._gc_t0, now))
                self._gc_t0 = None

        def gc_summary(self):
            """Collections that ended inside the timed window: count per generation, total and longest pause."""
            w = self.window or {}
            if "t1" not in w:
                return None
            inside = [(g, d) for g, d, t in self.gc_events if w["t0"] <= t <= w["t1"]]
            return {"collections": {str(g): sum(1 for x, _ in inside if x == g) for g in (0, 1, 2)},
                    "pause_ms_total": 1e3 * sum(d for _, d in inside),
                    "pause_ms_max": 1e3 * max((d for _, d in inside), default=0.0)}

        def _sync(self):
            if cuda:
                torch.cuda.synchronize()

        def _event(self):
            if not cuda:
                return None
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev

        def _energy(self):
            return meter.read() if meter is not None else None

        def on_train_begin(self, args, state, control, **kw):
            gc.callbacks.append(self._gc_hook)
            if progress:
                try:
                    from tqdm.auto import tqdm

                    self.bar = tqdm(total=steps, desc="  steps", leave=False, file=sys.stderr)
                except Exception:  # noqa: BLE001
                    self.bar = None

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step + 1 == time_from:  # the timed window starts on an idle GPU (one sync)
                self._sync()
                self.window = {"t0": time.perf_counter(), "e0": self._energy()}
            self._t = time.perf_counter()
            self._ev = self._event()

        def on_step_end(self, args, state, control, **kw):
            t = time.perf_counter()
            self.marks.append((self._t, t, self._ev, self._event()))
            if state.global_step == steps and self.window is not None:  # ... and ends when the GPU is done
                self._sync()
                self.window.update(t1=time.perf_counter(), e1=self._energy())
            if self.bar is not None:
                self.bar.update(1)

        def record_loss(self, loss):
            self.loss_tensors.append(loss.detach())

        def finish(self):
            """Per-step times (GPU time between the step's begin and end events; host time on CPU) and losses."""
            self._sync()
            self.times = [b.elapsed_time(e) / 1e3 if b is not None else t1 - t0 for t0, t1, b, e in self.marks]
            if self.loss_tensors:
                self.losses = [float(v) for v in torch.stack([x.float().reshape(()) for x in
                                                              self.loss_tensors]).cpu().tolist()]

        def on_train_end(self, args, state, control, **kw):
            if self._gc_hook in gc.callbacks:
                gc.callbacks.remove(self._gc_hook)
            if self.bar is not None:
                self.bar.close()

    return Timer()


class _EnergyMeter:
    """NVML counter (GPU, measured) or CodeCarbon's live estimate (CPU-only machines)."""

    def __init__(self, cuda: bool, out_dir: str):
        from .energy import CodeCarbonMeter, NvmlEnergyCounter

        self.source, self.is_estimate, self._nvml, self._cc = None, False, None, None
        if cuda:
            n = NvmlEnergyCounter()
            if n.available:
                self._nvml, self.source = n, "NVML total-energy counter (GPU only)"
                return
        cc = CodeCarbonMeter(out_dir, measure_power_secs=1.0)
        if cc.start():
            self._cc, self.source = cc, "CodeCarbon OfflineEmissionsTracker (node: GPU+CPU+RAM)"
            self.is_estimate = cc.is_estimate

    def read(self) -> float | None:
        """Joules so far."""
        if self._nvml is not None:
            return self._nvml.read()
        if self._cc is not None:
            s = self._cc.sample()
            return s["total"] * 3.6e6 if s else None
        return None

    def close(self):
        if self._cc is not None:
            self._cc.stop()


def _liger_applied(model) -> bool:
    """Whether Liger-Kernel patched ``model``: a module of a Liger class, a method bound on an instance from a
    ``liger_kernel`` module (Liger's instance patching), or the modeling module's functions replaced by Liger's."""
    import sys

    def liger(obj) -> bool:
        return (getattr(getattr(obj, "__func__", obj), "__module__", None) or "").startswith("liger_kernel")

    for m in model.modules():
        if type(m).__module__.startswith("liger_kernel") or any(liger(v) for v in vars(m).values() if callable(v)):
            return True
    modeling = sys.modules.get(type(model).__module__)
    return modeling is not None and any(liger(v) for v in vars(modeling).values() if callable(v))


def run_variant(config_name: str, variant: str, steps: int, time_from: int, seed: int = 0, progress: bool = True,
                out_dir: str | None = None, efficiency_callback: bool = False, callbacks=None,
                engine: str = "none") -> dict:
    """Train ``config_name`` with ``variant`` in this process; returns the measurements (status "ok").

    ``callbacks``: extra `TrainerCallback`s (e.g. a profiler window, ``benchmarks/profile_step.py``). ``engine``:
    "none", "fsdp2" or "zero3" (`litespark_hf.efficiency.engines`; this process is configured for it)."""
    import torch

    cfg = CONFIGS[config_name]
    attn, overrides, needs = VARIANTS[variant]
    result = {"name": variant, "attn_implementation": attn, **{k: v for k, v in overrides.items()}, "engine": engine}
    for module in (needs, "deepspeed" if engine == "zero3" else None):
        if module is None:
            continue
        try:
            __import__(module)
        except Exception as exc:  # noqa: BLE001
            return {**result, "status": f"skipped ({module} not importable: {type(exc).__name__})"}
    cuda = torch.cuda.is_available()
    bf16 = cfg.get("bf16", True) and cuda
    _engines.enter(engine, "bf16" if bf16 else "no", cuda)
    from transformers import AutoModelForCausalLM

    from . import flops as F

    hf_cfg = _hf_config(cfg)
    work = tempfile.mkdtemp(prefix=f"train_bench_{variant}_")
    meter = _EnergyMeter(cuda, out_dir or work)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(seed)
    t_build = time.perf_counter()
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation=attn, dtype=torch.float32)
    build_s = time.perf_counter() - t_build
    n_params = F.num_parameters(model)
    data = _Data(steps * cfg["batch"], cfg["seq"], hf_cfg.vocab_size, seed)
    common = dict(output_dir=work, per_device_train_batch_size=cfg["batch"], max_steps=steps, learning_rate=1e-4,
                  lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, logging_steps=steps,
                  save_strategy="no", report_to=[], bf16=bf16, gradient_checkpointing=cfg["gradient_checkpointing"],
                  gradient_checkpointing_kwargs={"use_reentrant": False} if cfg["gradient_checkpointing"] else None,
                  dataloader_num_workers=0, disable_tqdm=True, seed=seed, data_seed=seed,
                  use_cpu=not cuda and engine != "zero3",  # accelerate turns DeepSpeed off for use_cpu
                  optim="adamw_torch_fused" if cuda else "adamw_torch", max_grad_norm=1.0)
    if overrides.get("use_litespark"):
        from litespark_hf import Trainer, TrainingArguments
    else:
        from transformers import Trainer, TrainingArguments
    args = TrainingArguments(**common, **overrides)
    timer = _timer_callback(time_from, steps, cuda, progress, meter)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[timer, *(callbacks or [])])
    training_step = trainer.training_step

    def _training_step(*a, **kw):  # keep each step's loss on the device: reading it would wait for the GPU
        loss = training_step(*a, **kw)
        timer.record_loss(loss)
        return loss

    trainer.training_step = _training_step
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # no per-step log lines
    eff = None
    if efficiency_callback:  # the EfficiencyCallback alongside, as a cross-check (adds CodeCarbon threads)
        from .callback import track_efficiency

        eff = track_efficiency(trainer, warmup_steps=time_from - 1, write_plot=False, write_model_card=False,
                               measure_power_secs=1.0)
    t_train = time.perf_counter()
    try:
        trainer.train()
        timer.finish()
    finally:
        meter.close()
    wall = time.perf_counter() - t_train
    timed = timer.times[time_from - 1:]
    tokens_step = cfg["batch"] * cfg["seq"]
    med = statistics.median(timed)
    tps = tokens_step / med
    fpt = F.flops_per_token(hf_cfg, cfg["seq"], n_params)
    peak, peak_src = F.peak_flops(torch.cuda.get_device_name() if cuda else None) if cuda else (None, "cpu")
    w = timer.window or {}
    joules = (w["e1"] - w["e0"]) if w.get("e0") is not None and w.get("e1") is not None else None
    n_timed = len(timed)
    window_s = (w["t1"] - w["t0"]) if "t1" in w else None
    swapped = {}
    if overrides.get("use_litespark"):
        try:
            import litespark_hf

            swapped = litespark_hf.swapped_counts(model)
        except Exception:  # noqa: BLE001
            pass
    result.update({
        "status": "ok", "num_parameters": n_params, "tokens_per_step": tokens_step, "timed_steps": n_timed,
        "step_time_s_median": med, "step_time_s_mean": statistics.fmean(timed), "step_times_s": timer.times,
        "tokens_per_second": tps, "flops_per_token": fpt, "mfu": F.mfu(fpt * tps, peak) if peak else None,
        "peak_flops": peak, "peak_source": peak_src,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
        "peak_memory_reserved_gib": torch.cuda.max_memory_reserved() / 2 ** 30 if cuda else None,
        "energy_source": meter.source, "energy_is_estimate": meter.is_estimate,
        "timed_energy_j": joules,
        "joules_per_token": joules / (tokens_step * n_timed) if joules else None,
        "power_w": joules / window_s if joules and window_s else None,
        "window_s": window_s, "tokens_per_second_window": tokens_step * n_timed / window_s if window_s else None,
        "losses": timer.losses, "final_loss": timer.losses[-1] if timer.losses else None,
        "build_s": build_s, "train_wall_s": wall, "litespark_swapped": swapped,
        "liger_applied": _liger_applied(model),  # use_liger_kernel on an unsupported family runs stock (a warning)
        "engine_info": _engines.describe(trainer, model) if engine != "none" else None,
        "python_gc_timed": timer.gc_summary(),
    })
    if eff is not None and eff.report:
        tr, en = eff.report["training"], eff.report.get("energy") or {}
        result["efficiency_callback"] = {
            "tokens_per_second_steady": tr.get("tokens_per_second_steady"), "mfu_steady": tr.get("mfu_steady"),
            "tokens_seen": tr.get("tokens_seen"), "peak_memory_gib": tr.get("peak_memory_gib"),
            "energy_kwh": en.get("energy_kwh"), "gpu_kwh": en.get("gpu_kwh"), "cpu_kwh": en.get("cpu_kwh"),
            "ram_kwh": en.get("ram_kwh"), "emissions_g": en.get("emissions_g"), "energy_note": en.get("note"),
            "energy_error": en.get("error"), "joules_per_token_whole_run": en.get("joules_per_token")}
    del trainer, model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def _failure(variant: str, exc: BaseException) -> dict:
    import re

    name = type(exc).__name__
    text = str(exc)
    tb = traceback.format_exc()
    oom = "OutOfMemory" in name or "out of memory" in text.lower()
    first = text.strip().splitlines()[0][:160] if text.strip() else ""
    # wrapped errors (Inductor's SubprocException...) say little in their first line: add the innermost error
    inner = [m.group(0)[:160] for m in re.finditer(r"(?m)^[\w.]*(?:Error|Exception)\b[^\n]*", tb)]
    detail = next((line for line in reversed(inner) if not line.startswith(name)), "")
    status = "OOM" if oom else f"error: {name}: {first}" + (f" [{detail}]" if detail and detail not in first else "")
    return {"name": variant, "status": status, "traceback": tb[-4000:]}


def _run_isolated(config_name, variant, steps, time_from, seed, progress, timeout, out_dir, callback,
                  engine="none") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        res_path = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "litespark_hf.efficiency.bench", "--_worker", res_path, "--config", config_name,
               "--variants", variant, "--steps", str(steps), "--time-from", str(time_from), "--seed", str(seed),
               "--out", out_dir, "--engine", engine] + ([] if progress else ["--no-progress"]) + (
                   ["--efficiency-callback-on", variant] if callback else [])
        try:
            # stderr passes through (the step progress bar, warnings); stdout is kept for a failure's log tail
            proc = subprocess.run(cmd, timeout=timeout, stdout=subprocess.PIPE, text=True)
        except subprocess.TimeoutExpired as exc:
            tail = (exc.stdout or b"")[-3000:] if isinstance(exc.stdout, bytes) else (exc.stdout or "")[-3000:]
            return {"name": variant, "engine": engine, "status": f"timeout after {timeout}s", "log_tail": str(tail)}
        if os.path.exists(res_path):
            with open(res_path) as fh:
                res = json.load(fh)
        else:
            low = proc.stdout.lower()
            res = {"name": variant, "engine": engine,
                   "status": "OOM" if "out of memory" in low else f"crashed (exit {proc.returncode})"}
        if res.get("status") != "ok":
            res["log_tail"] = proc.stdout[-3000:]
        return res


def _compare(results: list[dict]) -> None:
    base = next((r for r in results if r["name"] == BASELINE and r.get("status") == "ok"), None)
    for r in results:
        r["baseline"] = r["name"] == BASELINE
        if base is None or r.get("status") != "ok":
            continue
        r["speedup"] = r["tokens_per_second"] / base["tokens_per_second"]
        if r.get("joules_per_token") and base.get("joules_per_token"):
            r["energy_ratio"] = r["joules_per_token"] / base["joules_per_token"]
            r["energy_saving"] = 1.0 - r["energy_ratio"]


def format_table(result: dict) -> str:
    head = ("| variant | status | tokens/s | MFU | step (ms) | peak mem (GiB) | energy/token (J) | power (W) | "
            "speedup | energy vs sdpa | final loss |")
    lines = [head, "|" + "---|" * 11]

    def f(v, spec):
        return format(v, spec) if isinstance(v, (int, float)) else "-"

    for r in result["variants"]:
        ok = r.get("status") == "ok"
        lines.append("| " + " | ".join([
            r["name"], r.get("status", "?") if not ok else "ok",
            f(r.get("tokens_per_second"), ",.0f") if ok else "-",
            (f(r["mfu"] * 100, ".1f") + "%") if ok and r.get("mfu") is not None else "-",
            f(r.get("step_time_s_median", None) and r["step_time_s_median"] * 1e3, ".1f") if ok else "-",
            f(r.get("peak_memory_gib"), ".1f") if ok else "-",
            f(r.get("joules_per_token"), ".4g") + ("*" if ok and r.get("energy_is_estimate") else "") if ok else "-",
            f(r.get("power_w"), ".0f") if ok else "-",
            (f(r.get("speedup"), ".2f") + "x") if ok and r.get("speedup") else "-",
            (f(r.get("energy_ratio"), ".2f") + "x") if ok and r.get("energy_ratio") else "-",
            f(r.get("final_loss"), ".4f") if ok else "-",
        ]) + " |")
    if any(r.get("energy_is_estimate") for r in result["variants"]):
        lines.append("\n(*) energy estimated by CodeCarbon (no NVML counter)")
    return "\n".join(lines)


def _environment() -> dict:
    import platform

    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("transformers", "triton", "liger_kernel", "trl", "codecarbon"):
        try:
            m = __import__(mod)
            env[mod] = getattr(m, "__version__", "?")
        except Exception:  # noqa: BLE001
            env[mod] = None
    try:
        import litespark_hf

        env["litespark_hf"] = litespark_hf.__version__
    except Exception:  # noqa: BLE001
        pass
    env["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.machine()})"
    return env


def run_bench(config_name: str, variants: list[str], steps: int, time_from: int, seed: int = 0,
              out_dir: str = "benchmarks/results", isolate: bool = True, progress: bool = True,
              variant_timeout: float | None = None, tag: str | None = None,
              callback_on: tuple[str, ...] = (), engine: str = "none") -> dict:
    from .device import device_tag
    from .plot import plot_bench

    if engine not in _engines.ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose from {_engines.ENGINES}")
    os.makedirs(out_dir, exist_ok=True)
    env = _environment()
    stem = f"train_bench_{config_name}_" + (f"{engine}_" if engine != "none" else "") + device_tag() \
        + (f"_{tag}" if tag else "")
    result = {"config": {"name": config_name, **{k: v for k, v in CONFIGS[config_name].items()},
                         "steps": steps, "time_from": time_from, "seed": seed},
              "engine": engine, "engine_config": _engines.ACCELERATE_CONFIGS.get(engine),
              "device": env["device"], "environment": env, "variants": [],
              "method": "median step time over the timed steps (device sync per step); energy over the same window"}
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(variants, desc=f"train_bench {config_name}", file=sys.stderr)
        except Exception:  # noqa: BLE001
            bar = None
    for v in variants:
        if bar is not None:
            bar.set_postfix_str(v)
        t0 = time.perf_counter()
        if isolate:
            res = _run_isolated(config_name, v, steps, time_from, seed, progress, variant_timeout, out_dir,
                                v in callback_on, engine)
        else:
            try:
                res = run_variant(config_name, v, steps, time_from, seed, progress, out_dir, v in callback_on,
                                  engine=engine)
            except BaseException as exc:  # noqa: BLE001 - OOM or a broken variant must not end the run
                if isinstance(exc, KeyboardInterrupt):
                    raise
                res = _failure(v, exc)
                del exc
                gc.collect()
                try:
                    import torch

                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    torch._dynamo.reset()
                except Exception:  # noqa: BLE001
                    pass
        res["variant_wall_s"] = time.perf_counter() - t0
        result["variants"].append(res)
        _compare(result["variants"])
        with open(os.path.join(out_dir, stem + ".json"), "w") as fh:  # after every variant: partial results survive
            json.dump(result, fh, indent=2, default=str)
        try:
            plot_bench(result, os.path.join(out_dir, stem + ".png"))
        except Exception as exc:  # noqa: BLE001
            print(f"[train_bench] plot failed: {exc}", file=sys.stderr)
        print(f"[train_bench] {v}: {res.get('status')}"
              + (f", {res['tokens_per_second']:,.0f} tokens/s" if res.get("status") == "ok" else ""), flush=True)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    try:
        plot_bench(result, os.path.join(out_dir, stem + ".png"))
    except Exception as exc:  # noqa: BLE001
        print(f"[train_bench] plot failed: {exc}", file=sys.stderr)
    result["table"] = format_table(result)
    with open(os.path.join(out_dir, stem + ".json"), "w") as fh:
        json.dump(result, fh, indent=2, default=str)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="litespark-train-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default="train", choices=("train", "post"),
                   help="post: the post-training benchmark (TRL SFT/DPO; see --suite post --help)")
    p.add_argument("--config", default="llama-1b", choices=sorted(CONFIGS))
    p.add_argument("--tiny", action="store_true", help="the tiny CPU config (same as --config tiny)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated, from {', '.join(VARIANTS)} (baseline: {BASELINE})")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per variant (default 24; tiny 6)")
    p.add_argument("--time-from", type=int, default=None, help="first timed step, 1-based (default 7; tiny 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", default="none", choices=_engines.ENGINES,
                   help="train every variant under FSDP2 or DeepSpeed ZeRO-3 (as accelerate_configs/fsdp2.yaml / "
                        "deepspeed_zero3.yaml; world size 1 unless launched); output train_bench_<config>_<engine>_"
                        "<device>.json")
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON and the PNG")
    p.add_argument("--tag", default=None,
                   help="suffix of the output file names (train_bench_<config>_<device>_<tag>.json)")
    p.add_argument("--no-isolate", action="store_true", help="run the variants in this process")
    p.add_argument("--variant-timeout", type=float, default=None, help="seconds per isolated variant")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--efficiency-callback-on", default="",
                   help="comma-separated variants that also run EfficiencyCallback (cross-check; adds CodeCarbon)")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .post_bench import main as post_main, split_suite

    suite, argv = split_suite(argv)
    if suite == "post":  # the post-training benchmark (litespark_hf.efficiency.post_bench)
        return post_main(argv)
    a = build_parser().parse_args(argv)
    config = "tiny" if a.tiny else a.config
    cfg = CONFIGS[config]
    steps = a.steps or cfg.get("steps", 24)
    time_from = a.time_from or cfg.get("time_from", 7)
    if not 1 <= time_from <= steps:
        raise SystemExit(f"--time-from must be within 1..{steps}")
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if a._worker:  # child process of an isolated run
        try:
            res = run_variant(config, variants[0], steps, time_from, a.seed, not a.no_progress, a.out,
                              variants[0] in a.efficiency_callback_on.split(","), engine=a.engine)
        except BaseException as exc:  # noqa: BLE001
            res = _failure(variants[0], exc)
        with open(a._worker, "w") as fh:
            json.dump(res, fh, default=str)
        return 0
    result = run_bench(config, variants, steps, time_from, a.seed, a.out, isolate=not a.no_isolate,
                       progress=not a.no_progress, variant_timeout=a.variant_timeout, tag=a.tag,
                       callback_on=tuple(x for x in a.efficiency_callback_on.split(",") if x), engine=a.engine)
    print(f"\ntrain_bench {config} ({cfg['note']}); steps {steps}, timed {time_from}-{steps}; "
          f"engine: {a.engine}; device: {result['device']}")
    print(result["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
