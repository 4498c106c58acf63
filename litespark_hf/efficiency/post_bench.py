"""Post-training benchmark: TRL's SFTTrainer and DPOTrainer with TRL's defaults, stock vs Liger vs Litespark.

``litespark-train-bench --suite post --config llama-1b`` (or ``python -m litespark_hf.efficiency.post_bench``).

Modes (``--modes``): ``sft_padded`` (TRL's default: right-padded batches), ``sft_padding_free``
(``padding_free=True``: the batch flattened into one row with ``position_ids``; ``max_length=None``, which TRL
requires without packing, the rows being within ``max_length`` already), ``sft_packing`` (``packing=True``, TRL's
default ``bfd`` strategy: blocks of ``max_length``, padding-free), ``sft_lora`` (LoRA r=16, alpha 32,
``target_modules="all-linear"``, padded), ``dpo_full`` (full fine-tuning against a frozen reference copy of the
initial model), ``dpo_lora`` (LoRA as above; the reference is the model with its adapters disabled, TRL's way).

Variants (``--variants``), side by side on the same data, model init and seed: ``stock`` (plain `trl.SFTTrainer` /
`trl.DPOTrainer`), ``liger`` (``use_liger_kernel=True``; skipped, with a note, when ``liger_kernel`` does not
import), ``litespark`` (`litespark_hf.SFTTrainer` / `DPOTrainer` with ``use_litespark=True``); on request (not in the
default list) ``litespark_compile_layers`` (``compile_layers``: each decoder layer compiled, the unpadding eager) and
``litespark_checkpoint_all`` (``checkpoint_layers="all"``: every layer recomputed under gradient checkpointing, as
before ``checkpoint_layers="auto"`` became the default; the ``litespark`` row recomputes only what memory needs) and
``litespark_eager`` (``cuda_graphs=False``: every decoder layer eager, as before the CUDA graphs of
`litespark_hf.graphs` became the default; a Litespark row's ``cuda_graphs`` counts its graphed and eager forwards and
the buckets captured).

Settings: TRL's own defaults except where a benchmark needs a value: ``bf16=True`` where CUDA is there (fp32 master
weights, bf16 autocast; fp32 on CPU), ``gradient_checkpointing=True`` (TRL's default), TRL's optimizer and schedule
(``adamw_torch_fused``, linear decay, no warmup, lr 2e-5 SFT / 1e-6 DPO, ``max_grad_norm=1``), per-device batch 4
(SFT) and 2 pairs (DPO), ``max_length`` 2048 (llama-1b / llama-3b), ``completion_only_loss=True`` (TRL's default for
prompt-completion data; the rows are pre-tokenized, for which TRL's default would be the whole sequence), DPO's
default sigmoid loss with beta 0.1. The harness sets ``max_steps``, logs once at the end (``logging_steps=steps``)
and saves nothing. Model: random init of the config's shape, fp32 weights, ``attn_implementation="sdpa"``.
Data: `litespark_hf.efficiency.post_data` (log-normal prompt and completion lengths; the JSON's
``config.length_distribution`` has the pool's median / p90 / max and its padding fraction at the batch size).

Measured per (mode, variant), over the timed steps ``--time-from`` .. ``--steps`` (1-based, included): the step times
are CUDA-event GPU times as in `litespark_hf.efficiency.bench` (the harness adds no per-step sync; note that TRL's
own metrics call ``.item()`` every step, in every variant); ``tokens_per_second`` = real tokens of the timed steps /
their summed step times, real = the ``attention_mask`` sum of a padded batch (DPO: chosen + rejected rows of the
policy forward), every position of a padding-free or packed one (the counts come from the collated batches on the
host, so counting costs nothing on the device); ``mfu`` = `flops.post_training_step_flops` summed over the timed
steps / their time / the device's dense bf16 peak (LoRA without frozen weight gradients, DPO with the reference
forward, the LM head over the scored positions, recompute not counted); ``peak_memory_gib``
(``torch.cuda.max_memory_allocated``); ``energy_per_token_j`` (NVML total-energy counter over the timed window, or
CodeCarbon's estimate without NVML, or None with ``--no-energy``); the per-step ``losses`` of every variant and
their ``loss_max_abs_diff_vs_stock``. Each (mode, variant) runs in its own subprocess by default (``--no-isolate``:
in this process): an out-of-memory or a crash is recorded and the run goes on. Prints a table; writes
``benchmarks/results/post_training_<config>_<device>.json`` and ``.png`` (``--out``: a folder, or a ``.json`` path).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from . import bench as _bench
from . import post_data
from ..checkpointing import recomputed_layers
from ..graphs import manager_of as graph_manager

__all__ = ["CONFIGS", "MODES", "VARIANTS", "BASELINE", "LORA", "main", "run_one", "run_post_bench", "format_table",
           "dataset_for", "length_distribution", "default_json_path", "split_suite"]

CONFIGS = {
    "llama-1b": dict(family="llama", model=_bench.CONFIGS["llama-1b"]["model"], max_length=2048, sft_batch=4,
                     dpo_batch=2,
                     note="Llama-3.2-1B shape (1,235.8M params), max_length 2048, SFT batch 4, DPO 2 pairs"),
    "llama-3b": dict(family="llama", model=_bench.CONFIGS["llama-3b"]["model"], max_length=2048, sft_batch=4,
                     dpo_batch=2,
                     note="Llama-3.2-3B shape (3,212.7M params), max_length 2048, SFT batch 4, DPO 2 pairs"),
    "tiny": dict(family="llama", model=_bench.CONFIGS["tiny"]["model"], max_length=64, sft_batch=4, dpo_batch=2,
                 steps=3, time_from=2, bf16=False, note="tiny Llama for CPU tests (fp32)"),
}

MODES = {
    "sft_padded": dict(kind="sft", note="TRL default: right-padded batches"),
    "sft_padding_free": dict(kind="sft", padding_free=True,
                             note="padding_free=True (one flattened row + position_ids; max_length=None)"),
    "sft_packing": dict(kind="sft", packing=True, note="packing=True (bfd: blocks of max_length, padding-free)"),
    "sft_lora": dict(kind="sft", lora=True, note="LoRA r=16 alpha 32 all-linear, padded"),
    "dpo_full": dict(kind="dpo", note="full fine-tuning, frozen reference copy"),
    "dpo_lora": dict(kind="dpo", lora=True, note="LoRA r=16 alpha 32 all-linear, reference = adapters disabled"),
}

# name -> (config overrides, module that must import)
VARIANTS = {
    "stock": ({}, None),
    "liger": ({"use_liger_kernel": True}, "liger_kernel"),
    "litespark": ({"use_litespark": True}, None),
    "litespark_compile_layers": ({"use_litespark": True, "litespark_config": '{"compile_layers": true}'}, None),
    "litespark_checkpoint_all": ({"use_litespark": True, "litespark_config": '{"checkpoint_layers": "all"}'}, None),
    "litespark_eager": ({"use_litespark": True, "litespark_config": '{"cuda_graphs": false}'}, None),
}
DEFAULT_VARIANTS = ("stock", "liger", "litespark")
BASELINE = "stock"
LORA = dict(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
SUITES = ("train", "post")
# LITESPARK_POST_AB=VAR: a paired A/B inside one run: each timed batch is trained twice in a row, the first step with
# the environment variable VAR set to "1" and the second with "0" (for switches read per call, e.g.
# LITESPARK_FAST_LAUNCH); the row's "ab" compares the two halves pair by pair (same batch, same process, adjacent
# steps), which host-time changes need on noisy hosts where separate runs differ by more than the change.
AB_ENV = "LITESPARK_POST_AB"


def split_suite(argv: list[str] | None) -> tuple[str, list[str]]:
    """``(suite, the other arguments)`` from a `litespark-train-bench` command line (``--suite post`` /
    ``--suite=post``; default ``train``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    suite, rest, i = "train", [], 0
    while i < len(args):
        a = args[i]
        if a == "--suite" and i + 1 < len(args):
            suite, i = args[i + 1], i + 2
            continue
        if a.startswith("--suite="):
            suite = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    if suite not in SUITES:
        raise SystemExit(f"unknown --suite {suite!r}; choose from {', '.join(SUITES)}")
    return suite, rest


def _device_tag() -> str:
    try:
        from .device import device_tag
    except ImportError:  # older tree without the shared helper: the same rule, reduced
        import re

        import torch

        if not torch.cuda.is_available():
            return "cpu"
        words = [w for w in re.split(r"[\s\-_/(),]+", torch.cuda.get_device_name().lower())
                 if w and w not in {"nvidia", "amd", "tesla", "geforce", "instinct", "pro"}]
        return re.sub(r"[^a-z0-9]", "", words[0]) if words else "gpu"
    return device_tag()


def default_json_path(config_name: str, out: str = "benchmarks/results", tag: str | None = None) -> str:
    """``<out>/post_training_<config>_<device>[_<tag>].json``, or ``out`` itself when it ends in ``.json``."""
    if out.endswith(".json"):
        return out
    return os.path.join(out, f"post_training_{config_name}_{_device_tag()}" + (f"_{tag}" if tag else "") + ".json")


# ----------------------------------------------------------------------------------------------------------------------
# data


def _sft_pool(cfg: dict, steps: int, seed: int) -> list[dict]:
    n = post_data.sft_pool_rows(cfg["sft_batch"], steps, cfg["max_length"])
    return post_data.sft_rows(n, cfg["max_length"], int(cfg["model"]["vocab_size"]), seed)


def _dpo_pool(cfg: dict, steps: int, seed: int) -> list[dict]:
    return post_data.dpo_rows(cfg["dpo_batch"] * steps, cfg["max_length"], int(cfg["model"]["vocab_size"]), seed)


def length_distribution(cfg: dict, steps: int, seed: int) -> dict:
    """The length distribution's parameters and the statistics of the SFT and DPO pools of a run."""
    sft = _sft_pool(cfg, steps, seed)
    dpo = _dpo_pool(cfg, steps, seed)
    b = cfg["dpo_batch"]
    seqs = []  # DPO batches in TRL's layout: the chosen rows, then the rejected rows, padded together
    for i in range(0, len(dpo) - len(dpo) % b, b):
        group = dpo[i:i + b]
        seqs += [len(r["prompt_ids"]) + len(r["chosen_ids"]) for r in group]
        seqs += [len(r["prompt_ids"]) + len(r["rejected_ids"]) for r in group]
    return {
        "spec": post_data.length_spec(cfg["max_length"]),
        "sft": {"rows": len(sft),
                "total": post_data.length_stats([len(r["input_ids"]) for r in sft], cfg["sft_batch"]),
                "prompt": post_data.length_stats([r["prompt_length"] for r in sft]),
                "completion": post_data.length_stats([r["completion_length"] for r in sft]),
                "note": "total = prompt + completion; padding fraction over consecutive rows (the sampler shuffles)"},
        "dpo": {"pairs": len(dpo),
                "sequences": post_data.length_stats(seqs, 2 * b),
                "prompt": post_data.length_stats([len(r["prompt_ids"]) for r in dpo]),
                "chosen": post_data.length_stats([len(r["chosen_ids"]) for r in dpo]),
                "rejected": post_data.length_stats([len(r["rejected_ids"]) for r in dpo]),
                "note": f"sequences = prompt + chosen and prompt + rejected; padding over batches of {b} pairs "
                        f"({2 * b} sequences)"},
    }


def replay_order(batch: int, steps: int, time_from: int, paired: bool = False) -> list[int]:
    """Row order (indices into a pool of batches of ``batch`` rows) that makes the warm-up steps replay
    the timed steps' batches: step ``i`` (0-based) trains batch ``i mod K`` of the warm-up cycle for the first
    ``time_from - 1`` steps, then the ``K = steps - time_from + 1`` timed batches once each, in order.

    Why: with variable-length data every new batch shape can pay one-time costs (Triton specialisations, cuBLAS
    heuristics, allocator growth: 1-5 s each, seen on the H200) that a long run pays once and then never again. A
    short timed window that meets a shape for the first time would charge them to throughput; replaying the timed
    batches in the warm-up measures the steady state while keeping the timed batches' length mix.

    With ``paired`` (the A/B of `LITESPARK_POST_AB`), each timed batch is trained twice in a row, so that the two
    steps of a pair see the same batch: ``(steps - time_from + 1 + 1) // 2`` distinct batches.
    """
    timed = steps - time_from + 1
    distinct = (timed + 1) // 2 if paired else timed
    timed_order = [i // 2 for i in range(timed)] if paired else list(range(timed))
    order = [(i % distinct) for i in range(time_from - 1)] + timed_order
    return [b * batch + r for b in order for r in range(batch)]


def dataset_for(cfg: dict, kind: str, steps: int, seed: int, time_from: int | None = None, packing: bool = False,
                paired: bool = False):
    """The `datasets.Dataset` a run trains on: SFT ``input_ids`` + ``completion_mask``; DPO prompt/chosen/rejected
    text for `post_data.id_tokenizer`. With ``time_from`` (and no packing, whose blocks all have one shape), the rows
    are laid out for a sequential sampler by `replay_order` (``paired``: each timed batch twice in a row)."""
    import datasets
    from datasets import Dataset

    datasets.disable_progress_bars()  # TRL's preparation maps: one bar each, per run

    replay = time_from is not None and time_from > 1 and not packing
    pool_steps = steps - time_from + 1 if replay else steps
    if replay and paired:
        pool_steps = (pool_steps + 1) // 2
    batch = cfg["sft_batch"] if kind == "sft" else cfg["dpo_batch"]
    rows = _sft_pool(cfg, pool_steps, seed) if kind == "sft" else _dpo_pool(cfg, pool_steps, seed)
    if replay:
        rows = [rows[i] for i in replay_order(batch, steps, time_from, paired=paired)]
    keys = ("input_ids", "completion_mask") if kind == "sft" else ("prompt", "chosen", "rejected")
    return Dataset.from_dict({k: [r[k] for r in rows] for k in keys})


class _BatchRecorder:
    """Wraps the trainer's data collator: the token counts of every collated batch, read on the host (CPU tensors,
    before they go to the device), in order."""

    def __init__(self, collator, kind: str):
        self.collator, self.kind, self.batches = collator, kind, []

    def __call__(self, features):
        batch = self.collator(features)
        ids = batch["input_ids"]
        if batch.get("attention_mask") is not None:  # padded: the mask's ones
            lens = [int(x) for x in batch["attention_mask"].sum(1).tolist()]
            real = sum(lens)
        else:  # padding-free / packed: one flattened row, every position a real token
            cu = batch.get("cu_seq_lens_q")
            if cu is not None:
                lens = [int(x) for x in cu.diff().tolist()]
            else:
                pos = batch["position_ids"].reshape(-1)
                starts = (pos == 0).nonzero().reshape(-1).tolist() + [pos.numel()]
                lens = [b - a for a, b in zip(starts[:-1], starts[1:])]
            real = int(ids.numel())
        if self.kind == "sft":
            head = int((batch["labels"][:, 1:] != -100).sum())
        else:  # DPO scores the completion tokens (labels = input_ids where completion_mask)
            head = int((batch["completion_mask"][:, 1:] != 0).sum())
        self.batches.append({"shape": list(ids.shape), "positions": int(ids.numel()), "real_tokens": real,
                             "seq_lens": lens, "head_tokens": head})
        return batch


# ----------------------------------------------------------------------------------------------------------------------
# one run


def run_one(config_name: str, mode: str, variant: str, steps: int, time_from: int, seed: int = 0,
            progress: bool = True, out_dir: str | None = None, energy: bool = True,
            peak_tflops: float | None = None) -> dict:
    """Train ``mode`` with ``variant`` in this process; returns the row (status "ok", or "skipped ...")."""
    cfg, m = CONFIGS[config_name], MODES[mode]
    overrides, needs = VARIANTS[variant]
    row = {"mode": mode, "variant": variant, "name": f"{mode}/{variant}", **overrides}
    if needs:
        try:
            __import__(needs)
        except Exception as exc:  # noqa: BLE001
            return {**row, "status": f"skipped ({needs} not importable: {type(exc).__name__})"}
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.trainer_callback import PrinterCallback

    from . import flops as F

    kind, lora = m["kind"], bool(m.get("lora"))
    cuda = torch.cuda.is_available()
    bf16 = cfg.get("bf16", True) and cuda
    hf_cfg = _bench._hf_config(cfg)
    work = tempfile.mkdtemp(prefix=f"post_bench_{mode}_{variant}_")
    ab_var = os.environ.get(AB_ENV) or None
    if ab_var is not None and (m.get("packing") or time_from < 2 or steps - time_from + 1 < 2):
        raise ValueError(f"{AB_ENV}={ab_var} needs replayed batches (no packing) and >= 2 timed steps after a warm-up")
    dataset = dataset_for(cfg, kind, steps, seed, time_from, packing=bool(m.get("packing")), paired=ab_var is not None)
    tokenizer = post_data.id_tokenizer(hf_cfg.vocab_size)
    meter = _bench._EnergyMeter(cuda, out_dir or work) if energy else None
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(seed)
    t_build = time.perf_counter()
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa", dtype=torch.float32)
    n_params = F.num_parameters(model)
    ref_model = None
    if kind == "dpo" and not lora:  # TRL would reload the reference from the model's path; a random init has none
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    build_s = time.perf_counter() - t_build

    litespark = bool(overrides.get("use_litespark"))
    if kind == "sft":
        if litespark:
            from litespark_hf import SFTConfig as Config, SFTTrainer as TrainerCls
        else:
            from trl import SFTConfig as Config, SFTTrainer as TrainerCls
        specific = dict(per_device_train_batch_size=cfg["sft_batch"], completion_only_loss=True,
                        packing=bool(m.get("packing")), padding_free=bool(m.get("padding_free")),
                        max_length=None if m.get("padding_free") else cfg["max_length"])
    else:
        if litespark:
            from litespark_hf import DPOConfig as Config, DPOTrainer as TrainerCls
        else:
            from trl import DPOConfig as Config, DPOTrainer as TrainerCls
        specific = dict(per_device_train_batch_size=cfg["dpo_batch"], max_length=cfg["max_length"])
    args = Config(output_dir=work, max_steps=steps, logging_steps=steps, save_strategy="no", report_to=[], bf16=bf16,
                  use_cpu=not cuda, seed=seed, data_seed=seed, disable_tqdm=True, dataloader_num_workers=0,
                  **specific, **overrides)
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(**LORA)
    timer = _bench._timer_callback(time_from, steps, cuda, progress, meter)
    callbacks = [timer]
    if os.environ.get("LITESPARK_POST_PROFILE"):  # where the step's time goes: see _profile_callback
        callbacks.append(_profile_callback(time_from, os.environ["LITESPARK_POST_PROFILE"]))
    if os.environ.get("LITESPARK_POST_CPROFILE"):  # where the step's host (Python) time goes: _cprofile_callback
        callbacks.append(_cprofile_callback(time_from, os.environ["LITESPARK_POST_CPROFILE"]))
    if os.environ.get("LITESPARK_POST_SYNCS"):  # where the host waits for the GPU: _syncs_callback
        callbacks.append(_syncs_callback(time_from, os.environ["LITESPARK_POST_SYNCS"]))
    extra = {"ref_model": ref_model} if kind == "dpo" else {}
    trainer = TrainerCls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=callbacks, **extra)
    trainer.remove_callback(PrinterCallback)
    # rows in the order dataset_for laid them out (warm-up steps replay the timed batches: see replay_order)
    trainer._get_train_sampler = lambda train_dataset=None: torch.utils.data.SequentialSampler(
        trainer.train_dataset if train_dataset is None else train_dataset)
    recorder = _BatchRecorder(trainer.data_collator, kind)
    trainer.data_collator = recorder
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    lora_params = trainable if lora else 0
    shapes = []
    training_step = trainer.training_step
    # TRL's own per-step metrics (host floats it has read already): a second check that the variants agree
    metric_keys = ("logps/chosen", "logps/rejected") if kind == "dpo" else ("entropy", "mean_token_accuracy")
    trl_metrics = {k: [] for k in metric_keys}

    ab_values = []  # LITESPARK_POST_AB: the value its variable had in each step

    def _training_step(model_, inputs, *a, **kw):  # the loss stays on the device until the end
        if ab_var is not None:  # the first step of each timed pair with the variable "1", the second with "0"
            os.environ[ab_var] = "1" if (len(shapes) - (time_from - 1)) % 2 == 0 else "0"
            ab_values.append(os.environ[ab_var])
        shapes.append(list(inputs["input_ids"].shape))
        loss = training_step(model_, inputs, *a, **kw)
        timer.record_loss(loss)
        logged = getattr(trainer, "_metrics", {}).get("train", {})
        for k in metric_keys:
            if logged.get(k):
                trl_metrics[k].append(float(logged[k][-1]))
        return loss

    trainer.training_step = _training_step
    t_train = time.perf_counter()
    try:
        with _bench.temporary_env(ab_var) if ab_var is not None else contextlib.nullcontext():
            trainer.train()
        timer.finish()
    finally:
        if meter is not None:
            meter.close()
    wall = time.perf_counter() - t_train

    batches = recorder.batches[:len(timer.times)]
    aligned = [b["shape"] for b in batches] == shapes[:len(batches)] and len(batches) == len(timer.times) == steps
    if not aligned:
        raise RuntimeError(f"collated batches {[b['shape'] for b in recorder.batches]} do not match the trained "
                           f"steps {shapes} ({len(timer.times)} steps timed)")
    lo = time_from - 1
    timed_s = timer.times[lo:]
    timed_b = batches[lo:]
    time_s = sum(timed_s)
    tokens = sum(b["real_tokens"] for b in timed_b)
    positions = sum(b["positions"] for b in timed_b)
    per_step = [F.post_training_step_flops(hf_cfg, b["seq_lens"], b["head_tokens"], num_params=n_params,
                                           lora_params=lora_params, reference_forward=kind == "dpo")
                for b in batches]
    flops_timed = sum(f["total"] for f in per_step[lo:])
    if peak_tflops is not None:
        peak, peak_src = F.peak_flops(None, peak_tflops)
    else:
        peak, peak_src = F.peak_flops(torch.cuda.get_device_name() if cuda else None)
    w = timer.window or {}
    joules = (w["e1"] - w["e0"]) if w.get("e0") is not None and w.get("e1") is not None else None
    window_s = (w["t1"] - w["t0"]) if "t1" in w else None
    swapped = {}
    if litespark:
        try:
            import litespark_hf

            swapped = litespark_hf.swapped_counts(model)
        except Exception:  # noqa: BLE001
            pass
    a = trainer.args
    row.update({
        "status": "ok", "trainer": f"{type(trainer).__module__.split('.')[0]}.{type(trainer).__name__}",
        "tokens_per_second": tokens / time_s, "mfu": F.mfu(flops_timed / time_s, peak) if peak else None,
        "step_time_ms": 1e3 * statistics.median(timed_s), "step_time_ms_mean": 1e3 * statistics.fmean(timed_s),
        "step_times_ms": [1e3 * t for t in timer.times], "timed_steps": len(timed_s),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
        "peak_memory_reserved_gib": torch.cuda.max_memory_reserved() / 2 ** 30 if cuda else None,
        "energy_per_token_j": joules / tokens if joules else None, "timed_energy_j": joules,
        "energy_source": meter.source if meter is not None else None,
        "energy_is_estimate": bool(meter is not None and meter.is_estimate),
        "power_w": joules / window_s if joules and window_s else None, "window_s": window_s,
        "losses": timer.losses, "final_loss": timer.losses[-1] if timer.losses else None,
        "loss_max_abs_diff_vs_stock": None, "trl_metrics": trl_metrics, "trl_metrics_max_abs_diff_vs_stock": None,
        "real_tokens_timed": tokens, "padded_positions_timed": positions,
        "padding_fraction_timed": 1.0 - tokens / positions if positions else None,
        "real_tokens_per_step": [b["real_tokens"] for b in batches],
        "positions_per_step": [b["positions"] for b in batches],
        "head_tokens_per_step": [b["head_tokens"] for b in batches],
        "sequences_per_step": [len(b["seq_lens"]) for b in batches],
        "flops_per_step": [f["total"] for f in per_step], "flops_timed": flops_timed,
        "flops_per_real_token": flops_timed / tokens, "model_tflops_per_second": flops_timed / time_s / 1e12,
        "peak_flops": peak, "peak_source": peak_src,
        "num_parameters": n_params, "trainable_parameters": trainable, "lora_parameters": lora_params,
        "lora_parameters_formula": F.lora_parameters(hf_cfg, LORA["r"]) if lora else 0,
        "data_rows": len(trainer.train_dataset),
        "args": {"learning_rate": a.learning_rate, "lr_scheduler_type": str(getattr(a.lr_scheduler_type, "value",
                                                                                    a.lr_scheduler_type)),
                 "warmup_steps": a.warmup_steps, "optim": str(getattr(a.optim, "value", a.optim)),
                 "weight_decay": a.weight_decay, "max_grad_norm": a.max_grad_norm, "bf16": a.bf16,
                 "gradient_checkpointing": a.gradient_checkpointing,
                 "gradient_checkpointing_kwargs": a.gradient_checkpointing_kwargs,
                 "per_device_train_batch_size": a.per_device_train_batch_size, "max_length": a.max_length,
                 **({"packing": a.packing, "packing_strategy": a.packing_strategy, "padding_free": a.padding_free,
                     "completion_only_loss": a.completion_only_loss, "loss_type": a.loss_type}
                    if kind == "sft" else {"beta": a.beta, "loss_type": list(a.loss_type),
                                           "reference": "adapters disabled" if lora else "frozen copy"}),
                 **({"lora": dict(LORA)} if lora else {})},
        "build_s": build_s, "train_wall_s": wall, "litespark_swapped": swapped,
        "checkpoint_recomputed_layers": recomputed_layers(trainer.model),  # None: no planner (stock, "all")
    })
    graphs = graph_manager(trainer.model)
    if graphs is not None:  # cuda_graphs: graphed / eager forwards (by reason), captures, buckets
        row["cuda_graphs"] = graphs.summary()
    if ab_var is not None:
        row["ab"] = _ab_summary(ab_var, ab_values, timer.times, [b["real_tokens"] for b in batches], time_from - 1)
    del trainer, model, ref_model, recorder
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def _ab_summary(var: str, values: list[str], times: list[float], tokens: list[int], lo: int) -> dict:
    """The paired A/B of `AB_ENV`: timed steps lo, lo+1 are one pair (same batch), VAR "1" then "0"."""
    on = list(zip(times[lo::2], tokens[lo::2]))  # the steps run with VAR "1" (see run_one's _training_step)
    off = list(zip(times[lo + 1::2], tokens[lo + 1::2]))
    pairs = min(len(on), len(off))
    on, off = on[:pairs], off[:pairs]
    if not pairs:
        return {"variable": var, "pairs": 0, "values": values}
    ratios = [b[0] / a[0] for a, b in zip(on, off)]
    return {
        "variable": var, "pairs": pairs, "values": values,
        "on_step_ms": 1e3 * statistics.median(t for t, _ in on),
        "off_step_ms": 1e3 * statistics.median(t for t, _ in off),
        "on_tokens_per_second": sum(n for _, n in on) / sum(t for t, _ in on),
        "off_tokens_per_second": sum(n for _, n in off) / sum(t for t, _ in off),
        "off_over_on_median": statistics.median(ratios), "off_over_on_per_pair": ratios,
        "on_faster_pairs": sum(r > 1 for r in ratios),
    }


# ----------------------------------------------------------------------------------------------------------------------
# the suite


def _window_callback(time_from: int, start, finish):
    """A TrainerCallback that calls ``start()`` (-> a handle) before step ``time_from`` and, when training ends,
    ``finish(handle, timed steps, perf_counter at the start)``."""
    from transformers import TrainerCallback

    class _Cb(TrainerCallback):
        def __init__(self):
            self.handle, self.t0, self.steps = None, None, 0

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step + 1 == time_from and self.handle is None:
                self.handle = start()
                self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if self.handle is not None:
                self.steps += 1

        def on_train_end(self, args, state, control, **kw):
            if self.handle is not None:
                finish(self.handle, max(self.steps, 1), self.t0)

    return _Cb()


def _profile_callback(time_from: int, path: str):
    """``LITESPARK_POST_PROFILE=FILE``: torch.profiler over the timed steps; FILE gets, per timed step, the wall
    time, the GPU kernel time (the sum of CUDA kernel durations) and so the idle share, and the top ops by CPU and by
    CUDA self time."""
    import torch

    def start():
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                  torch.profiler.ProfilerActivity.CUDA])
        prof.__enter__()
        return prof

    def finish(prof, n, t0):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        prof.__exit__(None, None, None)
        events = prof.key_averages()
        kernel_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")
        lines = [f"timed steps {n}: wall {1e3 * wall / n:.1f} ms/step, GPU kernels "
                 f"{kernel_us / 1e3 / n:.1f} ms/step ({100 * kernel_us / 1e6 / wall:.0f}% busy)",
                 events.table(sort_by="self_cuda_time_total", row_limit=18),
                 events.table(sort_by="self_cpu_time_total", row_limit=25)]
        with open(path, "w") as fh:
            fh.write("\n".join(lines))

    return _window_callback(time_from, start, finish)


def _cprofile_callback(time_from: int, path: str):
    """``LITESPARK_POST_CPROFILE=FILE``: cProfile over the timed steps (host time by Python function: a host-bound
    step's time is here, not in the GPU trace); FILE gets the pstats dump, FILE.txt the top functions by own time
    and by cumulative time, per timed step."""
    import cProfile
    import io
    import pstats

    def start():
        prof = cProfile.Profile()
        prof.enable()
        return prof

    def finish(prof, n, t0):
        prof.disable()
        wall = time.perf_counter() - t0
        prof.dump_stats(path)
        buf = io.StringIO()
        buf.write(f"timed steps {n}: wall {1e3 * wall / n:.1f} ms/step (cProfile on: host time inflated)\n")
        stats = pstats.Stats(prof, stream=buf)
        stats.sort_stats("tottime").print_stats(45)
        stats.sort_stats("cumulative").print_stats(70)
        with open(path + ".txt", "w") as fh:
            fh.write(buf.getvalue())

    return _window_callback(time_from, start, finish)


# aten ops after which the host waits for the device (on CUDA): a value read back (item(), bool(), int()), a result
# whose size depends on the data, a comparison returning a Python bool
_SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_consecutive",
             "unique_dim", "is_nonzero", "equal", "allclose", "repeat_interleave", "bincount", "histc")


def _sync_site(stack) -> str:
    """The innermost frame of the project, TRL, transformers, PEFT or accelerate in ``stack`` (file:line function),
    and the innermost frame overall when none."""
    keep = ("litespark_hf", "litespark_kernels", "/trl/", "/transformers/", "/peft/", "/accelerate/")
    for fr in reversed(stack):
        if any(k in fr.filename for k in keep) and "post_bench.py" not in fr.filename:
            return f"{fr.filename.split('site-packages/')[-1]}:{fr.lineno} {fr.name}"
    fr = stack[-1]
    return f"{fr.filename}:{fr.lineno} {fr.name}"


def _syncs_callback(time_from: int, path: str):
    """``LITESPARK_POST_SYNCS=FILE``: the operations that make the host wait for the GPU (`_SYNC_OPS`, and copies
    from the device to the CPU), counted per timed step by the code line that asked for them (a TorchDispatchMode on
    the training thread: forward passes and CPU backward; CUDA's backward threads are not seen). A host-bound step
    whose host waits at every such point cannot run ahead of the GPU: its GPU time adds to its host time."""
    import collections
    import traceback

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Mode(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.counts = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = func.overloadpacket.__name__
            to_cpu = False
            if name in ("_to_copy", "copy_"):
                src = args[1] if name == "copy_" else args[0]
                dst_cpu = (args[0].device.type == "cpu") if name == "copy_" else (
                    str(kwargs.get("device", src.device if torch.is_tensor(src) else "cpu")).startswith("cpu"))
                to_cpu = torch.is_tensor(src) and src.device.type not in ("cpu", "meta") and dst_cpu \
                    and not kwargs.get("non_blocking", False)
            if name in _SYNC_OPS or to_cpu:
                self.counts[(name, _sync_site(traceback.extract_stack()[:-1]))] += 1
            return func(*args, **kwargs)

    def start():
        mode = _Mode()
        mode.__enter__()
        return mode

    def finish(mode, n, t0):
        mode.__exit__(None, None, None)
        total = sum(mode.counts.values())
        lines = [f"timed steps {n}: {total / n:.1f} host-waiting operations per step (training thread)"]
        for (name, site), c in mode.counts.most_common():
            lines.append(f"{c / n:8.2f}/step  {name:22s} {site}")
        with open(path, "w") as fh:
            fh.write("\n".join(lines) + "\n")

    return _window_callback(time_from, start, finish)


def _failure(mode: str, variant: str, exc: BaseException) -> dict:
    res = _bench._failure(f"{mode}/{variant}", exc)
    return {"mode": mode, "variant": variant, **res}


def _run_isolated(config_name, mode, variant, steps, time_from, seed, progress, timeout, out_dir, energy,
                  peak_tflops) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        res_path = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "litespark_hf.efficiency.post_bench", "--_worker", res_path,
               "--config", config_name, "--modes", mode, "--variants", variant, "--steps", str(steps),
               "--time-from", str(time_from), "--seed", str(seed), "--out", out_dir]
        cmd += [] if progress else ["--no-progress"]
        cmd += [] if energy else ["--no-energy"]
        cmd += [] if peak_tflops is None else ["--peak-tflops", str(peak_tflops)]
        try:
            proc = subprocess.run(cmd, timeout=timeout, stdout=subprocess.PIPE, text=True)
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            return {"mode": mode, "variant": variant, "name": f"{mode}/{variant}",
                    "status": f"timeout after {timeout}s", "log_tail": out[-3000:]}
        if os.path.exists(res_path):
            with open(res_path) as fh:
                res = json.load(fh)
        else:
            low = proc.stdout.lower()
            res = {"mode": mode, "variant": variant, "name": f"{mode}/{variant}",
                   "status": "OOM" if "out of memory" in low else f"crashed (exit {proc.returncode})"}
        if res.get("status") != "ok":
            res["log_tail"] = proc.stdout[-3000:]
        return res


def _compare(rows: list[dict]) -> None:
    """Speedup, energy ratio and the largest per-step loss difference of every row against its mode's stock row."""
    for r in rows:
        r["baseline"] = r.get("variant") == BASELINE
        base = next((b for b in rows if b.get("mode") == r.get("mode") and b.get("variant") == BASELINE
                     and b.get("status") == "ok"), None)
        if base is None or r.get("status") != "ok":
            continue
        r["speedup_vs_stock"] = r["tokens_per_second"] / base["tokens_per_second"]
        if r.get("energy_per_token_j") and base.get("energy_per_token_j"):
            r["energy_ratio_vs_stock"] = r["energy_per_token_j"] / base["energy_per_token_j"]
        r["loss_max_abs_diff_vs_stock"] = _max_abs_diff(r.get("losses"), base.get("losses"))
        mine, theirs = r.get("trl_metrics") or {}, base.get("trl_metrics") or {}
        r["trl_metrics_max_abs_diff_vs_stock"] = {k: _max_abs_diff(v, theirs.get(k)) for k, v in mine.items()}


def _max_abs_diff(a, b) -> float | None:
    a, b = a or [], b or []
    n = min(len(a), len(b))
    return max((abs(x - y) for x, y in zip(a[:n], b[:n])), default=None)


def format_table(result: dict) -> str:
    head = ("| mode | variant | status | tokens/s | MFU | step (ms) | peak mem (GiB) | energy/token (J) | "
            "speedup | max abs loss diff vs stock | final loss |")
    lines = [head, "|" + "---|" * 11]

    def f(v, spec):
        return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"

    for r in result["rows"]:
        ok = r.get("status") == "ok"
        lines.append("| " + " | ".join([
            r.get("mode", "?"), r.get("variant", "?"), "ok" if ok else str(r.get("status", "?"))[:80],
            f(r.get("tokens_per_second"), ",.0f") if ok else "-",
            (f(r["mfu"] * 100, ".1f") + "%") if ok and r.get("mfu") is not None else "-",
            f(r.get("step_time_ms"), ".1f") if ok else "-",
            f(r.get("peak_memory_gib"), ".1f") if ok else "-",
            (f(r.get("energy_per_token_j"), ".4g") + ("*" if r.get("energy_is_estimate") else ""))
            if ok and r.get("energy_per_token_j") is not None else "-",
            (f(r.get("speedup_vs_stock"), ".2f") + "x") if ok and r.get("speedup_vs_stock") else "-",
            f(r.get("loss_max_abs_diff_vs_stock"), ".2e") if ok else "-",
            f(r.get("final_loss"), ".4f") if ok else "-",
        ]) + " |")
    if any(r.get("energy_is_estimate") and r.get("energy_per_token_j") is not None for r in result["rows"]):
        lines.append("\n(*) energy estimated by CodeCarbon (no NVML counter)")
    for r in result["rows"]:
        ab = r.get("ab") or {}
        if ab.get("pairs"):
            lines.append(
                f"A/B {ab['variable']} ({r['mode']}/{r['variant']}, {ab['pairs']} pairs): =1 "
                f"{ab['on_tokens_per_second']:,.0f} tokens/s (median step {ab['on_step_ms']:.1f} ms), =0 "
                f"{ab['off_tokens_per_second']:,.0f} ({ab['off_step_ms']:.1f} ms); step time =0 / =1 per pair: median "
                f"{ab['off_over_on_median']:.3f}, =1 faster in {ab['on_faster_pairs']} of {ab['pairs']}")
    return "\n".join(lines)


def plot_post(result: dict, path: str) -> str:
    """Grouped bars per mode (one bar per variant): tokens/s, MFU, energy per token."""
    from .plot import _figure

    rows = [r for r in result["rows"] if r.get("status") == "ok"]
    modes = list(dict.fromkeys(r["mode"] for r in result["rows"]))
    variants = list(dict.fromkeys(r["variant"] for r in rows))  # the ones with a result
    fig, axes = _figure(1, 3, (16, 4.8))
    colors = {"stock": "#888888", "liger": "#d9822b", "litespark": "#3b75af", "litespark_eager": "#9ec3e6",
              "litespark_checkpoint_all": "#5a9f68", "litespark_compile_layers": "#8e6bb8"}
    width = 0.8 / max(1, len(variants))
    panels = [("tokens_per_second", "real tokens/s", 1.0), ("mfu", "MFU (%)", 100.0),
              ("energy_per_token_j", "energy per token (J)", 1.0)]
    for ax, (key, label, scale) in zip(axes[0], panels):
        any_val = False
        for j, v in enumerate(variants):
            xs, vals = [], []
            for i, mo in enumerate(modes):
                r = next((r for r in rows if r["mode"] == mo and r["variant"] == v), None)
                val = (r.get(key) or 0.0) * scale if r else 0.0
                xs.append(i + (j - (len(variants) - 1) / 2) * width)
                vals.append(val)
            any_val = any_val or any(vals)
            ax.bar(xs, vals, width=width, label=v, color=colors.get(v))
        if not any_val:
            ax.text(0.5, 0.5, "not available", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks(range(len(modes)), modes, rotation=25, ha="right", fontsize=8)
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    title = f"post-training bench {result['config'].get('name', '')} on {result.get('device', '')}"
    skipped = sorted({f"{r.get('variant')} ({r['status'][len('skipped ('):-1]})" for r in result["rows"]
                      if str(r.get("status", "")).startswith("skipped (")})
    failed = [f"{r.get('name')}: {str(r.get('status'))[:60]}" for r in result["rows"]
              if r.get("status") != "ok" and not str(r.get("status", "")).startswith("skipped")]
    if skipped:
        title += "\nskipped: " + "; ".join(skipped)
    if failed:
        title += "\nfailed: " + "; ".join(failed)[:400]
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=110)
    return path


def _config_block(config_name: str, steps: int, time_from: int, seed: int) -> dict:
    cfg = CONFIGS[config_name]
    return {"name": config_name, **cfg, "steps": steps, "time_from": time_from, "seed": seed,
            "attn_implementation": "sdpa", "bf16": "True where CUDA is available (TRL's default), else fp32",
            "trl_defaults": "gradient_checkpointing=True, optim adamw_torch_fused, linear schedule without warmup, "
                            "lr 2e-5 (SFT) / 1e-6 (DPO), max_grad_norm 1.0, DPO sigmoid loss beta 0.1",
            "harness": "max_steps=steps, logging_steps=steps, save_strategy=no, report_to=[], dataloader workers 0",
            "modes": {k: v for k, v in MODES.items()},
            "variants": {k: {"overrides": o, "needs": n} for k, (o, n) in VARIANTS.items()},
            "lora": dict(LORA), "sft_completion_only_loss": True,
            "length_distribution": length_distribution(cfg, steps, seed)}


def run_post_bench(config_name: str, modes: list[str], variants: list[str], steps: int, time_from: int,
                   seed: int = 0, out: str = "benchmarks/results", isolate: bool = True, progress: bool = True,
                   run_timeout: float | None = None, tag: str | None = None, energy: bool = True,
                   peak_tflops: float | None = None) -> dict:
    json_path = default_json_path(config_name, out, tag)
    out_dir = os.path.dirname(json_path) or "."
    png_path = json_path[:-len(".json")] + ".png"
    os.makedirs(out_dir, exist_ok=True)
    env = _bench._environment()
    result = {"benchmark": "post_training", "config": _config_block(config_name, steps, time_from, seed),
              "device": env["device"], "device_tag": _device_tag(), "environment": env, "rows": [],
              "method": "tokens/s = real tokens of the timed steps / their summed CUDA-event step times; MFU from "
                        "flops.post_training_step_flops; energy = NVML counter over the timed window / real tokens"}
    runs = [(mo, v) for mo in modes for v in variants]
    t_all = time.perf_counter()

    def _write():
        with open(json_path, "w") as fh:  # after every run: partial results survive
            json.dump(result, fh, indent=2, default=str)
        try:
            plot_post(result, png_path)
        except Exception as exc:  # noqa: BLE001
            print(f"[post_bench] plot failed: {exc}", file=sys.stderr)

    for i, (mo, v) in enumerate(runs, 1):
        print(f"[post_bench] ({i}/{len(runs)}) {config_name} {mo}/{v} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        if isolate:
            res = _run_isolated(config_name, mo, v, steps, time_from, seed, progress, run_timeout, out_dir, energy,
                                peak_tflops)
        else:
            try:
                res = run_one(config_name, mo, v, steps, time_from, seed, progress, out_dir, energy, peak_tflops)
            except BaseException as exc:  # noqa: BLE001 - an OOM or a broken variant must not end the run
                if isinstance(exc, KeyboardInterrupt):
                    raise
                res = _failure(mo, v, exc)
                del exc
                gc.collect()
                try:
                    import torch

                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                except Exception:  # noqa: BLE001
                    pass
        res["run_wall_s"] = time.perf_counter() - t0
        result["rows"].append(res)
        _compare(result["rows"])
        _write()
        ok = res.get("status") == "ok"
        mfu = res.get("mfu")
        diff = res.get("loss_max_abs_diff_vs_stock")
        print(f"[post_bench] ({i}/{len(runs)}) {mo}/{v}: {res.get('status')}"
              + (f", {res['tokens_per_second']:,.0f} tokens/s, step {res['step_time_ms']:.1f} ms"
                 + (f", MFU {100 * mfu:.1f}%" if mfu is not None else "")
                 + (f", max |loss - stock| {diff:.2e}" if diff is not None else "") if ok else "")
              + f" [{res['run_wall_s']:.0f} s, total {time.perf_counter() - t_all:.0f} s]", flush=True)
    result["total_wall_s"] = time.perf_counter() - t_all
    result["table"] = format_table(result)
    _write()
    result["json_path"], result["png_path"] = json_path, png_path
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="litespark-train-bench --suite post", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="llama-1b", choices=sorted(CONFIGS))
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated, from {', '.join(VARIANTS)} (default {','.join(DEFAULT_VARIANTS)}; "
                        f"baseline: {BASELINE})")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 16; tiny 3)")
    p.add_argument("--time-from", type=int, default=None, help="first timed step, 1-based (default 6; tiny 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results",
                   help="folder for post_training_<config>_<device>.json/.png, or the .json path itself")
    p.add_argument("--tag", default=None, help="suffix of the output file names")
    p.add_argument("--no-isolate", action="store_true", help="run every (mode, variant) in this process")
    p.add_argument("--run-timeout", type=float, default=None, help="seconds per isolated run")
    p.add_argument("--no-progress", action="store_true", help="no per-step progress bar")
    p.add_argument("--no-energy", action="store_true", help="no energy meter (CodeCarbon is slow to start on CPU)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s per device for the MFU (default: the datasheet table; LITESPARK_PEAK_TFLOPS)")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    return p


def _names(text: str, known: dict, what: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in names if x not in known]
    if unknown or not names:
        raise SystemExit(f"unknown {what} {unknown}; choose from {list(known)}")
    return names


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    a = build_parser().parse_args(argv)
    cfg = CONFIGS[a.config]
    steps = a.steps or cfg.get("steps", 16)
    time_from = a.time_from or cfg.get("time_from", 6)
    if not 1 <= time_from <= steps:
        raise SystemExit(f"--time-from must be within 1..{steps}")
    modes = _names(a.modes, MODES, "modes")
    variants = _names(a.variants, VARIANTS, "variants")
    if a._worker:  # child process of an isolated run
        try:
            res = run_one(a.config, modes[0], variants[0], steps, time_from, a.seed, not a.no_progress, a.out,
                          not a.no_energy, a.peak_tflops)
        except BaseException as exc:  # noqa: BLE001
            res = _failure(modes[0], variants[0], exc)
        with open(a._worker, "w") as fh:
            json.dump(res, fh, default=str)
        return 0
    result = run_post_bench(a.config, modes, variants, steps, time_from, a.seed, a.out, isolate=not a.no_isolate,
                            progress=not a.no_progress, run_timeout=a.run_timeout, tag=a.tag,
                            energy=not a.no_energy, peak_tflops=a.peak_tflops)
    dist = result["config"]["length_distribution"]["sft"]["total"]
    print(f"\npost_training {a.config} ({cfg['note']}); steps {steps}, timed {time_from}-{steps}; "
          f"device: {result['device']}; SFT lengths median {dist['median']:.0f}, p90 {dist['p90']:.0f}, "
          f"max {dist['max']}; {result['total_wall_s']:.0f} s")
    print(result["table"])
    print(f"\nwrote {result['json_path']} and {result['png_path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
