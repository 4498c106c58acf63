"""SAT on top of Litespark (issue #19): the dense reference of every comparison is Litespark without SAT.

Modes (``--modes``, default ``pretrain,sft``):

- ``pretrain``: `litespark_hf.efficiency.bench.run_variant` on the Llama-3.2-1B shape (seq 2048, batch 4, bf16
  autocast over fp32 weights, ``use_litespark=True``: `litespark_hf.apply` + `LitesparkAdamW` + the fused grad clip,
  exactly the train bench's ``litespark`` variant), once without SAT (the reference, ``variant="litespark"``) and
  once per SAT row: the same Litespark model with SAT on top at ``rate_mlp = rate_heads`` in ``--rates`` (0.25, 0.5)
  x ``sat_freeze_omitted`` True (the default) / False, constant schedule, no exempt layers, importance measured once
  (``sat_refresh_interval=0``: step 1 is the dense measurement, outside the timed window). The stock model (HF
  ``sdpa``, torch fused AdamW) runs too, labelled ``variant="stock"``; it is not the reference. Each run builds the
  model afresh from the same seed and trains ``--steps`` steps on the same random tokens; the timed window is
  ``--time-from`` .. ``--steps``. ``step_ms`` = median CUDA-event step time (the bench's measure; the SAT selection
  runs in the `SATCallback` just before the step's begin event), ``step_ms_window`` = the synced wall time of the
  timed window / its steps (includes everything between steps, the selection too); ``speedup`` and
  ``speedup_window`` are against the ``litespark`` row of the same run. ``executed_flops_fraction`` (mean over the
  timed steps) and the MFUs use `litespark_hf.sat.executed_flops_per_token` (``6 N + 12 L d T``, omitted weights and
  heads left out for ``mfu_executed``). ``gpu_ms_fwd_bwd_opt`` splits the step with CUDA events (forward incl. the
  loss | backward | optimizer incl. the freeze), ``gpu_ms_between_steps`` is the GPU time between a step's end and
  the next one's begin (data, SAT selection). ``--profile``: one more short run of SAT 0.5/0.5 with freeze whose
  last step is profiled (torch.profiler, selection included): ``profile_sat_step_<device>.txt``.
- ``sft``: TRL's SFTTrainer through `litespark_hf.SFTTrainer` (``use_litespark=True``; TRL's defaults as in the
  post-training bench: gradient checkpointing, adamw_torch_fused, lr 2e-5 linear, batch 4, max_length 2048,
  completion-only loss, right-padded batches that Litespark unpads) on the post-training bench's long-tailed data
  (`post_bench.dataset_for`: log-normal prompt/completion lengths; ``--sft-pool-batches`` distinct batches, cycled
  over ``--sft-steps`` steps), dense Litespark vs Litespark + SAT with the ladder schedule (LORS,
  `litespark_hf.sat.schedule`: ``sat_ladder_steps`` rungs r, 3r/4, r/2, r/4 over the first 75% of the steps, dense
  for the last 25%) at ``--sft-rate`` on MLP and heads, the SAT defaults otherwise (freeze, exempt layers 0 and -1,
  a dense importance refresh every 20 steps). Same model init, data order and seed. ``--sft-passes 2`` (the GPU
  default) runs both first for ``--sft-pool-batches`` steps (a priming pass that pays the one-time costs of each
  batch shape and of each rung's GEMM shapes) and reports the second pass; the priming pass's times are kept in
  ``prime``. Reported: ``total_train_s`` (synced wall time from the first step's begin to the last step's end),
  ``step_time_sum_s``, ``train_wall_s`` (``trainer.train()``), ``tokens_per_second`` (real tokens / total_train_s),
  ``heldout_loss`` (``trainer.evaluate()`` at the end on ``--sft-eval-rows`` held-out rows of the same
  distribution, another seed), ``executed_flops_fraction`` (over the run, each step weighted by its
  dense-equivalent FLOPs, `flops.post_training_step_flops`; the dense refreshes and the dense end count 1.0; the
  MFUs: those FLOPs, dense or times the step's SAT fraction, / total_train_s / peak) and ``time_ratio_vs_dense``
  (total_train_s / the dense row's). The data's content ids are uniform random (post_data), so the held-out loss
  cannot go below ``heldout_loss_floor`` = ln(content ids): it is a does-not-diverge check; the quality comparison
  is benchmarks/sat_sft_quality.py (CPU, learnable data). Expected from SAT's FLOPs count on the 1B shape: constant
  0.25 / 0.5 executes 0.80 / 0.60 of the dense FLOPs; the default ladder at 0.5 over 96 steps (exempt 0,-1,
  refresh 20) 0.85 on average, so its time ratio cannot reach 0.70 (see ``--sft-sat-config``).

Run on the device machine (one GPU; ``bash benchmarks/gpu_run.sh sat OUT``):
    PYTHONPATH=$PWD/kernels:$PWD python benchmarks/bench_sat.py --out $OUT --profile
``--smoke``: a tiny Llama on the CPU, few steps, no MLP microbenchmark (tests/test_bench_sat.py). Prints a table and
writes bench_sat_<device>.json (``e2e``: the rows of both modes; ``mlp_micro``: forward + backward of one gated MLP
at the selected channels, CUDA only) and .png to ``--out``, the JSON after every row.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
import traceback

import torch

# ----------------------------------------------------------------------------------------------------------------------
# MLP microbenchmark (CUDA)


def mlp_micro(tokens=8192, hidden=2048, inter=8192, rates=(0.0, 0.25, 0.5)):
    import triton.testing

    from litespark_kernels.ops.sparse_mlp import sparse_gated_mlp, sparse_gated_mlp_fused

    torch.manual_seed(0)
    dev = "cuda"
    x = torch.randn(tokens, hidden, device=dev, dtype=torch.bfloat16, requires_grad=True)
    wg = (torch.randn(inter, hidden, device=dev) * 0.02).bfloat16().requires_grad_()
    wu = (torch.randn(inter, hidden, device=dev) * 0.02).bfloat16().requires_grad_()
    wd = (torch.randn(hidden, inter, device=dev) * 0.02).bfloat16().requires_grad_()
    go = torch.randn(tokens, hidden, device=dev, dtype=torch.bfloat16)
    rows = []
    base = None
    for rate in rates:
        keep = inter - int(round(rate * inter))
        index = None if rate == 0 else torch.randperm(inter, device=dev)[:keep].sort().values

        def step():
            out = sparse_gated_mlp(x, wg, wu, wd, index)
            out.backward(go)

        def stock():
            out = torch.nn.functional.linear(
                torch.nn.functional.silu(torch.nn.functional.linear(x, wg)) * torch.nn.functional.linear(x, wu), wd)
            out.backward(go)

        ms = triton.testing.do_bench(step, warmup=50, rep=300, grad_to_none=[x, wg, wu, wd])
        if rate == 0:
            stock_ms = triton.testing.do_bench(stock, warmup=50, rep=300, grad_to_none=[x, wg, wu, wd])
            rows.append({"rate": 0.0, "variant": "stock MLP (silu*up)", "ms": stock_ms, "speedup": 1.0,
                         "ideal": 1.0, "tflops": 6 * 3 * tokens * hidden * inter / stock_ms / 1e9})
            base = stock_ms
        k = inter - int(round(rate * inter))
        rows.append({"rate": rate, "variant": "SAT sparse_gated_mlp", "ms": ms, "speedup": base / ms,
                     "ideal": 1 / (1 - rate), "tflops": 6 * 3 * tokens * hidden * k / ms / 1e9})
        if index is not None:  # the gathered-GEMM version SATGatedMLP runs (packed gate+up GEMM, fp32 weight gradients)

            def fused():
                out, _ = sparse_gated_mlp_fused(x, wg, wu, wd, index)
                out.backward(go)

            ms = triton.testing.do_bench(fused, warmup=50, rep=300, grad_to_none=[x, wg, wu, wd])
            rows.append({"rate": rate, "variant": "SAT sparse_gated_mlp_fused", "ms": ms, "speedup": base / ms,
                         "ideal": 1 / (1 - rate), "tflops": 6 * 3 * tokens * hidden * k / ms / 1e9})
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# callbacks


class _NoEnergy:
    """Stand-in for the bench's energy meter (CodeCarbon is slow to start on a CPU): no reading."""

    source, is_estimate = None, False

    def __init__(self, *a, **kw):
        pass

    def read(self):
        return None

    def close(self):
        pass


def _step_probe(seq_len_of_step, cuda: bool, phases: bool):
    """A `TrainerCallback` that records, per optimizer step, SAT's (executed, dense) FLOPs per token at the step's
    selection (read after the `SATCallback` selected) and the scheduled rates; with ``phases`` also CUDA events at
    the step's begin, the end of the model's forward, before and after the optimizer step, and the step's end."""
    from transformers import TrainerCallback

    from litespark_hf.sat import executed_flops_per_token, omission_rates

    class Probe(TrainerCallback):
        def __init__(self):
            self.flops, self.rates, self.events = [], [], []
            self._hook = None

        def _mark(self, key):
            if phases and cuda and self.events:
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                self.events[-1][key] = ev

        def on_train_begin(self, args, state, control, model=None, **kw):
            if phases and cuda and model is not None:
                self._hook = model.register_forward_hook(lambda *a: self._mark("fwd"))

        def on_step_begin(self, args, state, control, model=None, **kw):
            self.flops.append(executed_flops_per_token(model, seq_len_of_step(state.global_step)))
            self.rates.append(omission_rates(model))
            self.events.append({})
            self._mark("begin")

        def on_pre_optimizer_step(self, args, state, control, **kw):
            self._mark("pre_opt")

        def on_optimizer_step(self, args, state, control, **kw):
            self._mark("opt")

        def on_step_end(self, args, state, control, **kw):
            self._mark("end")

        def on_train_end(self, args, state, control, **kw):
            if self._hook is not None:
                self._hook.remove()
                self._hook = None

        def phase_ms(self, lo: int, hi: int):
            """Medians over steps lo..hi-1 (0-based): [fwd, bwd, opt] and the gap after each step; None on CPU."""
            if not (phases and cuda):
                return None, None
            torch.cuda.synchronize()
            split, gaps = [], []
            evs = self.events
            for i in range(lo, min(hi, len(evs))):
                e = evs[i]
                if all(k in e for k in ("begin", "fwd", "pre_opt", "opt")):
                    split.append([e["begin"].elapsed_time(e["fwd"]), e["fwd"].elapsed_time(e["pre_opt"]),
                                  e["pre_opt"].elapsed_time(e["opt"])])
                if i + 1 < len(evs) and "end" in e and "begin" in evs[i + 1]:
                    gaps.append(e["end"].elapsed_time(evs[i + 1]["begin"]))
            return ([statistics.median(c) for c in zip(*split)] if split else None,
                    statistics.median(gaps) if gaps else None)

    return Probe()


def _profile_callback(step: int, path: str):
    """torch.profiler over optimizer step ``step`` (1-based), from the previous step's end (so the data and the SAT
    selection are in) to its end; writes the GPU-busy share and the top ops by device and by CPU time."""
    from transformers import TrainerCallback

    class Prof(TrainerCallback):
        def __init__(self):
            self.prof, self.t0 = None, None

        def on_step_end(self, args, state, control, **kw):
            cuda = torch.cuda.is_available()
            if state.global_step == step - 1 and self.prof is None:
                if cuda:
                    torch.cuda.synchronize()
                acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
                self.prof = torch.profiler.profile(activities=acts)
                self.prof.__enter__()
                self.t0 = time.perf_counter()
            elif state.global_step == step and self.prof is not None:
                if cuda:
                    torch.cuda.synchronize()
                wall = time.perf_counter() - self.t0
                self.prof.__exit__(None, None, None)
                ka = self.prof.key_averages()
                kernel_us = sum(getattr(e, "self_device_time_total", 0) for e in ka
                                if getattr(getattr(e, "device_type", None), "name", "") == "CUDA")
                lines = [f"SAT step {step} (data and selection included): wall {1e3 * wall:.1f} ms"
                         + (f", GPU kernels {kernel_us / 1e3:.1f} ms ({100 * kernel_us / 1e6 / max(wall, 1e-9):.0f}% "
                            "busy)" if cuda else "")]
                for key in (("self_device_time_total", "self_cuda_time_total") if cuda else ()):
                    try:
                        lines.append(ka.table(sort_by=key, row_limit=40, max_name_column_width=70))
                        break
                    except Exception as exc:  # noqa: BLE001 - the key's name moved between torch versions
                        lines.append(f"[{key}: {exc}]")
                lines.append(ka.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70))
                with open(path, "w") as fh:
                    fh.write("\n".join(lines) + "\n")
                self.prof = None

    return Prof()


# ----------------------------------------------------------------------------------------------------------------------
# pre-training rows


def _sat_config(rate: float, freeze: bool, schedule: str, exempt: str | None = "", refresh: int | None = 0) -> dict:
    cfg = {"sat_omission_rate_mlp": rate, "sat_omission_rate_heads": rate, "sat_schedule": schedule,
           "sat_freeze_omitted": freeze}
    if exempt is not None:
        cfg["sat_exempt_layers"] = exempt
    if refresh is not None:
        cfg["sat_refresh_interval"] = refresh
    return cfg


def _register_variant(name: str, sat_cfg: dict | None) -> None:
    """A train-bench variant: ``litespark`` plus ``litespark_config`` with the SAT settings."""
    from litespark_hf.efficiency import bench as B

    over = {"use_litespark": True}
    if sat_cfg:
        over["litespark_config"] = json.dumps(sat_cfg)
    B.VARIANTS[name] = ("sdpa", over, None)


def _failed_row(base: dict, exc: BaseException) -> dict:
    text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    oom = "out of memory" in str(exc).lower() or "OutOfMemory" in type(exc).__name__
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {**base, "status": "OOM" if oom else f"error: {type(exc).__name__}: {text}",
            "traceback": traceback.format_exc()[-4000:]}


def pretrain_rows(a, peak, emit) -> list[dict]:
    from litespark_hf.efficiency import bench as B

    cfg = B.CONFIGS[a.config]
    seq, batch = cfg["seq"], cfg["batch"]
    cuda = torch.cuda.is_available()
    specs = [("stock", None, "sdpa"), ("litespark", None, None)]
    for r in a.rates:
        for freeze in (True, False):
            specs.append((f"litespark+sat {r:g}/{r:g}" + ("" if freeze else " no-freeze"),
                          _sat_config(r, freeze, "constant", a.exempt_layers, 0), None))
    rows = []
    for name, sat_cfg, builtin in specs:
        vname = builtin or "bench_sat_" + re.sub(r"[^A-Za-z0-9.]+", "_", name)  # also a temp-dir prefix
        if builtin is None:
            _register_variant(vname, sat_cfg)
        base = {"mode": "pretrain", "variant": "stock" if builtin == "sdpa" else
                ("litespark" if sat_cfg is None else "litespark+sat"), "name": name,
                "reference": builtin is None and sat_cfg is None,
                "rate_mlp": sat_cfg["sat_omission_rate_mlp"] if sat_cfg else 0.0,
                "rate_heads": sat_cfg["sat_omission_rate_heads"] if sat_cfg else 0.0,
                "freeze": sat_cfg["sat_freeze_omitted"] if sat_cfg else None,
                "schedule": "constant" if sat_cfg else None,
                "sat_exempt_layers": sat_cfg.get("sat_exempt_layers") if sat_cfg else None,
                "sat_refresh_interval": sat_cfg.get("sat_refresh_interval") if sat_cfg else None}
        probe = _step_probe(lambda step: seq, cuda, phases=True)
        t0 = time.perf_counter()
        try:
            res = B.run_variant(a.config, vname, a.steps, a.time_from, a.seed, progress=False, out_dir=a.out,
                                callbacks=[probe])
        except BaseException as exc:  # noqa: BLE001 - an OOM or a broken row must not end the run
            if isinstance(exc, KeyboardInterrupt):
                raise
            rows.append(_failed_row(base, exc))
            emit(rows)
            continue
        lo = a.time_from - 1
        timed = res["step_times_s"][lo:]
        fl = probe.flops[lo:a.steps] or probe.flops
        executed = statistics.fmean(e for e, _ in fl)
        dense = statistics.fmean(d for _, d in fl)
        med = statistics.median(timed)
        tps = batch * seq / med
        win = res.get("window_s")
        split, gap = probe.phase_ms(lo, a.steps)
        rows.append({**base, "status": res.get("status", "ok"),
                     "step_ms": 1e3 * med, "step_ms_window": 1e3 * win / len(timed) if win else None,
                     "tokens_per_second": tps, "tokens_per_second_window": res.get("tokens_per_second_window"),
                     "executed_flops_fraction": executed / dense, "executed_flops_per_token": executed,
                     "dense_flops_per_token": dense,
                     "mfu_executed": executed * tps / peak if peak else None,
                     "mfu_dense_equivalent": dense * tps / peak if peak else None,
                     "gpu_ms_fwd_bwd_opt": split, "gpu_ms_between_steps": gap,
                     "omission_rates_timed": probe.rates[lo] if len(probe.rates) > lo else None,
                     "step_times_ms": [1e3 * t for t in res["step_times_s"]], "timed_steps": len(timed),
                     "losses": res.get("losses"), "final_loss": res.get("final_loss"),
                     "peak_memory_gib": res.get("peak_memory_gib"), "joules_per_token": res.get("joules_per_token"),
                     "bench_flops_per_token": res.get("flops_per_token"),
                     "litespark_swapped": res.get("litespark_swapped"),
                     "run_wall_s": time.perf_counter() - t0})
        _pretrain_speedups(rows)
        emit(rows)
    if a.profile:  # one more short SAT run whose last step is profiled (out of the timed rows)
        from litespark_hf.efficiency.device import device_tag

        r = max(a.rates)
        _register_variant("bench_sat_profile", _sat_config(r, True, "constant", a.exempt_layers, 0))
        path = os.path.join(a.out, f"profile_sat_step_{device_tag()}.txt")
        steps = min(a.steps, 5)
        try:
            B.run_variant(a.config, "bench_sat_profile", steps, 1, a.seed, progress=False, out_dir=a.out,
                          callbacks=[_profile_callback(steps, path)])
            print(f"[bench_sat] profile of SAT {r:g}/{r:g} (freeze) step {steps} written to {path}", flush=True)
        except BaseException as exc:  # noqa: BLE001
            if isinstance(exc, KeyboardInterrupt):
                raise
            print(f"[bench_sat] profile failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    return rows


def _pretrain_speedups(rows: list[dict]) -> None:
    ref = next((r for r in rows if r["mode"] == "pretrain" and r.get("reference") and r.get("status") == "ok"), None)
    stock = next((r for r in rows if r["mode"] == "pretrain" and r["variant"] == "stock"
                  and r.get("status") == "ok"), None)
    for r in rows:
        if r["mode"] != "pretrain" or r.get("status") != "ok":
            continue
        r["speedup"] = ref["step_ms"] / r["step_ms"] if ref else None
        r["speedup_window"] = (ref["step_ms_window"] / r["step_ms_window"]
                               if ref and ref.get("step_ms_window") and r.get("step_ms_window") else None)
        r["speedup_vs_stock"] = stock["step_ms"] / r["step_ms"] if stock else None


# ----------------------------------------------------------------------------------------------------------------------
# SFT rows


def _sft_once(a, pcfg: dict, sat_cfg: dict | None, steps: int, pool_batches: int, eval_ds, peak) -> dict:
    """One TRL SFT run (litespark_hf.SFTTrainer, use_litespark) on the post-bench data; returns the measurements."""
    from transformers import AutoModelForCausalLM
    from transformers.trainer_callback import PrinterCallback

    from litespark_hf import SFTConfig, SFTTrainer
    from litespark_hf.efficiency import bench as B
    from litespark_hf.efficiency import flops as F
    from litespark_hf.efficiency import post_bench as PB
    from litespark_hf.efficiency import post_data

    cuda = torch.cuda.is_available()
    bf16 = pcfg.get("bf16", True) and cuda
    hf_cfg = B._hf_config(pcfg)
    batch = pcfg["sft_batch"]
    # steps batches: the pool's pool_batches distinct batches, the first steps - pool_batches cycling over them
    dataset = PB.dataset_for(pcfg, "sft", steps, a.seed, time_from=steps - pool_batches + 1)
    lengths = [len(x) for x in dataset["input_ids"]]
    mean_len = statistics.fmean(lengths)
    tokenizer = post_data.id_tokenizer(hf_cfg.vocab_size)
    work = tempfile.mkdtemp(prefix="bench_sat_sft_")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(a.seed)
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa", dtype=torch.float32)
    n_params = F.num_parameters(model)
    extra = {"litespark_config": json.dumps(sat_cfg)} if sat_cfg else {}
    args = SFTConfig(output_dir=work, max_steps=steps, logging_steps=steps, save_strategy="no", report_to=[],
                     bf16=bf16, use_cpu=not cuda, seed=a.seed, data_seed=a.seed, disable_tqdm=True,
                     dataloader_num_workers=0, per_device_train_batch_size=batch, per_device_eval_batch_size=batch,
                     completion_only_loss=True, max_length=pcfg["max_length"], eval_strategy="no",
                     use_litespark=True, **extra)
    timer = B._timer_callback(1, steps, cuda, False, None)  # window = every step: the total training time
    probe = _step_probe(lambda step: mean_len, cuda, phases=False)
    peft_config = None
    if getattr(a, "sft_lora", False):  # the post bench's adapters (rank 16 on every projection), base frozen
        from peft import LoraConfig

        peft_config = LoraConfig(**PB.LORA)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=eval_ds,
                         processing_class=tokenizer, callbacks=[timer, probe], peft_config=peft_config)
    trainer.remove_callback(PrinterCallback)
    trainer._get_train_sampler = lambda train_dataset=None: torch.utils.data.SequentialSampler(
        trainer.train_dataset if train_dataset is None else train_dataset)
    recorder = PB._BatchRecorder(trainer.data_collator, "sft")
    trainer.data_collator = recorder
    training_step = trainer.training_step

    def _training_step(*x, **kw):  # the loss stays on the device until the end
        loss = training_step(*x, **kw)
        timer.record_loss(loss)
        return loss

    trainer.training_step = _training_step
    t0 = time.perf_counter()
    trainer.train()
    timer.finish()
    wall = time.perf_counter() - t0
    trainer.data_collator = recorder.collator  # evaluation batches are not counted
    heldout = trainer.evaluate()
    batches = recorder.batches[:steps]
    w = timer.window or {}
    total = (w["t1"] - w["t0"]) if "t1" in w else sum(timer.times)
    tokens = sum(b["real_tokens"] for b in batches)
    step_flops = [F.post_training_step_flops(hf_cfg, b["seq_lens"], b["head_tokens"], num_params=n_params)["total"]
                  for b in batches]
    fracs = [e / d for e, d in probe.flops[:len(batches)]]
    executed = sum(f * x for f, x in zip(step_flops, fracs))
    row = {"status": "ok", "steps": steps, "distinct_batches": pool_batches, "total_train_s": total,
           "step_time_sum_s": sum(timer.times), "train_wall_s": wall,
           "step_ms": 1e3 * statistics.median(timer.times), "tokens_per_second": tokens / total,
           "real_tokens": tokens, "padded_positions": sum(b["positions"] for b in batches),
           "executed_flops_fraction": executed / sum(step_flops) if step_flops else 1.0,  # weighted by step FLOPs
           "executed_flops_fraction_step_mean": statistics.fmean(fracs) if fracs else 1.0,
           "mfu_executed": executed / total / peak if peak else None,
           "mfu_dense_equivalent": sum(step_flops) / total / peak if peak else None,
           "heldout_loss": heldout.get("eval_loss"), "heldout_rows": len(eval_ds),
           "heldout_loss_floor": math.log(hf_cfg.vocab_size - post_data.FIRST_CONTENT_ID),
           "losses": timer.losses, "final_loss": timer.losses[-1] if timer.losses else None,
           "rates_mlp_per_step": [r["mlp"] for r in probe.rates], "mean_row_length": mean_len,
           "peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
           "step_times_ms": [1e3 * t for t in timer.times], "num_parameters": n_params}
    del trainer, model, recorder
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def sft_rows(a, peak, emit, rows: list[dict]) -> list[dict]:
    from datasets import Dataset

    from litespark_hf.efficiency import post_bench as PB
    from litespark_hf.efficiency import post_data

    pcfg = PB.CONFIGS[a.sft_config]
    held = post_data.sft_rows(a.sft_eval_rows, pcfg["max_length"], int(pcfg["model"]["vocab_size"]), a.seed + 1)
    eval_ds = Dataset.from_dict({k: [r[k] for r in held] for k in ("input_ids", "completion_mask")})
    pool_batches = min(a.sft_pool_batches, a.sft_steps)
    sat_cfg = {"sat_omission_rate_mlp": a.sft_rate, "sat_omission_rate_heads": a.sft_rate, "sat_schedule": "ladder"}
    if a.sft_exempt_layers is not None:
        sat_cfg["sat_exempt_layers"] = a.sft_exempt_layers
    sat_cfg.update(json.loads(a.sft_sat_config) if a.sft_sat_config else {})
    specs = [("litespark", None), ("litespark+sat", sat_cfg)]
    if a.sft_sat_graphs:  # the same SAT run with its sparse layers in the CUDA graphs (LITESPARK_SAT_GRAPHS=1)
        specs.append(("litespark+sat_graphs", sat_cfg))
    prime = {}
    if a.sft_passes > 1:  # priming pass: every batch shape and every rung once, not reported as the result
        for name, cfg in specs:
            try:
                with _sat_graphs_env(name):
                    p = _sft_once(a, pcfg, cfg, pool_batches, pool_batches, eval_ds, peak)
                prime[name] = {k: p[k] for k in ("total_train_s", "step_time_sum_s", "train_wall_s", "steps")}
            except BaseException as exc:  # noqa: BLE001
                if isinstance(exc, KeyboardInterrupt):
                    raise
                prime[name] = {"status": f"error: {type(exc).__name__}: {str(exc)[:200]}"}
            print(f"[bench_sat] sft prime {name}: {prime[name]}", flush=True)
    for name, cfg in specs:
        base = {"mode": "sft", "variant": name, "name": name + (f" ladder {a.sft_rate:g}" if cfg else ""),
                "lora": bool(a.sft_lora),
                "reference": cfg is None, "rate_mlp": cfg["sat_omission_rate_mlp"] if cfg else 0.0,
                "rate_heads": cfg["sat_omission_rate_heads"] if cfg else 0.0,
                "freeze": cfg.get("sat_freeze_omitted", True) if cfg else None,
                "schedule": cfg["sat_schedule"] if cfg else None, "sat_config": cfg, "prime": prime.get(name)}
        t0 = time.perf_counter()
        try:
            with _sat_graphs_env(name):
                res = _sft_once(a, pcfg, cfg, a.sft_steps, pool_batches, eval_ds, peak)
        except BaseException as exc:  # noqa: BLE001
            if isinstance(exc, KeyboardInterrupt):
                raise
            rows.append(_failed_row(base, exc))
            emit(rows)
            continue
        rows.append({**base, **res, "run_wall_s": time.perf_counter() - t0})
        _sft_ratios(rows)
        emit(rows)
    return rows


@contextlib.contextmanager
def _sat_graphs_env(name: str):
    """``LITESPARK_SAT_GRAPHS=1`` for the ``*_graphs`` SFT runs, its previous value back afterwards."""
    old = os.environ.get("LITESPARK_SAT_GRAPHS")
    os.environ["LITESPARK_SAT_GRAPHS"] = "1" if name.endswith("_graphs") else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LITESPARK_SAT_GRAPHS", None)
        else:
            os.environ["LITESPARK_SAT_GRAPHS"] = old


def _sft_ratios(rows: list[dict]) -> None:
    ref = next((r for r in rows if r["mode"] == "sft" and r.get("reference") and r.get("status") == "ok"), None)
    for r in rows:
        if r["mode"] != "sft" or r.get("status") != "ok":
            continue
        r["time_ratio_vs_dense"] = r["total_train_s"] / ref["total_train_s"] if ref else None
        r["speedup"] = ref["total_train_s"] / r["total_train_s"] if ref else None
        r["heldout_loss_minus_dense"] = r["heldout_loss"] - ref["heldout_loss"] if ref and \
            r.get("heldout_loss") is not None and ref.get("heldout_loss") is not None else None


# ----------------------------------------------------------------------------------------------------------------------
# report


def _f(v, spec, scale=1.0):
    return format(v * scale, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def targets(rows: list[dict]) -> dict:
    """Issue #19's targets, read off the rows: the pre-training step at rate 0.5/0.5 with the default freeze >= 1.45x
    dense Litespark; the SFT ladder run's total training time <= 0.70x dense (held-out losses side by side)."""
    pre = next((r for r in rows if r["mode"] == "pretrain" and r["variant"] == "litespark+sat" and r.get("freeze")
                and r["rate_mlp"] == 0.5 and r["rate_heads"] == 0.5 and r.get("status") == "ok"), None)
    sft = {r["variant"]: r for r in rows if r["mode"] == "sft" and r.get("status") == "ok"}
    sat = sft.get("litespark+sat")
    out = {"pretrain_step_speedup_0.5_freeze": pre.get("speedup") if pre else None,
           "pretrain_target": 1.45,
           "sft_time_ratio": sat.get("time_ratio_vs_dense") if sat else None, "sft_target": 0.70,
           "sft_heldout_loss_dense": sft["litespark"].get("heldout_loss") if "litespark" in sft else None,
           "sft_heldout_loss_sat": sat.get("heldout_loss") if sat else None,
           "sft_executed_flops_fraction_sat": sat.get("executed_flops_fraction") if sat else None}
    out["pretrain_met"] = None if out["pretrain_step_speedup_0.5_freeze"] is None else \
        out["pretrain_step_speedup_0.5_freeze"] >= out["pretrain_target"]
    out["sft_time_met"] = None if out["sft_time_ratio"] is None else out["sft_time_ratio"] <= out["sft_target"]
    return out


def format_table(rows: list[dict]) -> str:
    head = ("| mode | variant | rate mlp/heads | freeze | schedule | status | step ms | tokens/s | exec FLOPs | "
            "MFU exec | MFU dense-eq | speedup | total s | held-out loss | time vs dense |")
    lines = [head, "|" + "---|" * 15]
    for r in rows:
        ok = r.get("status") == "ok"
        lines.append("| " + " | ".join([
            r["mode"], r["variant"], f"{r['rate_mlp']:g}/{r['rate_heads']:g}",
            "-" if r.get("freeze") is None else str(r["freeze"]), r.get("schedule") or "-",
            "ok" if ok else str(r.get("status"))[:60],
            _f(r.get("step_ms"), ".1f"), _f(r.get("tokens_per_second"), ",.0f"),
            _f(r.get("executed_flops_fraction"), ".3f"), _f(r.get("mfu_executed"), ".1f", 100),
            _f(r.get("mfu_dense_equivalent"), ".1f", 100),
            (_f(r.get("speedup"), ".2f") + "x") if r.get("speedup") else "-",
            _f(r.get("total_train_s"), ".1f"), _f(r.get("heldout_loss"), ".4f"),
            _f(r.get("time_ratio_vs_dense"), ".3f"),
        ]) + " |")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    micro = [r for r in result.get("mlp_micro") or [] if r["variant"].startswith("SAT")]
    pre = [r for r in result["e2e"] if r["mode"] == "pretrain" and r.get("status") == "ok"]
    sft = [r for r in result["e2e"] if r["mode"] == "sft" and r.get("status") == "ok"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    if micro:
        axes[0].plot([r["rate"] for r in micro], [r["speedup"] for r in micro], "o-", label="measured")
        axes[0].plot([r["rate"] for r in micro], [r["ideal"] for r in micro], "k--", label="1/(1-rate)")
        axes[0].legend()
    else:
        axes[0].text(0.5, 0.5, "no MLP microbenchmark (CUDA only)", ha="center", va="center",
                     transform=axes[0].transAxes)
    axes[0].set(xlabel="MLP omission rate", ylabel="speedup vs stock MLP", title="MLP fwd+bwd")
    colors = {"stock": "#888888", "litespark": "#3b75af", "litespark+sat": "#4a7"}
    axes[1].barh([r["name"] for r in pre], [r.get("speedup") or 0 for r in pre],
                 color=[colors.get(r["variant"]) for r in pre])
    axes[1].axvline(1.0, color="k", lw=0.8)
    axes[1].axvline(1.45, color="r", ls="--", lw=0.8, label="target 1.45x")
    axes[1].set(xlabel="step speedup vs dense Litespark", title="pre-training step (constant rate)")
    axes[1].invert_yaxis()
    axes[1].legend(fontsize=8)
    if sft:
        names = [r["variant"] for r in sft]
        axes[2].bar(names, [r["total_train_s"] for r in sft], color=[colors.get(n) for n in names])
        for i, r in enumerate(sft):
            axes[2].text(i, r["total_train_s"], f"{r['total_train_s']:.1f} s\nheld-out {r['heldout_loss']:.3f}",
                         ha="center", va="bottom", fontsize=8)
        axes[2].set(ylabel="total training time (s)", title=f"TRL SFT, ladder SAT, {sft[0]['steps']} steps")
    else:
        axes[2].text(0.5, 0.5, "no SFT rows", ha="center", va="center", transform=axes[2].transAxes)
    fig.suptitle(f"SAT on Litespark, {result['config']['pretrain']['note']} ({result['device']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default="pretrain,sft", help="comma-separated: pretrain, sft")
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    p.add_argument("--steps", type=int, default=None, help="pre-training steps per row (default 14; smoke 4)")
    p.add_argument("--time-from", type=int, default=None, help="first timed pre-training step, 1-based (default 5)")
    p.add_argument("--rates", default="0.25,0.5", help="SAT omission rates of the pre-training rows (MLP = heads)")
    p.add_argument("--exempt-layers", default="", help="sat_exempt_layers of the pre-training rows (default none)")
    p.add_argument("--sft-steps", type=int, default=None, help="SFT optimizer steps per run (default 96; smoke 8)")
    p.add_argument("--sft-pool-batches", type=int, default=None,
                   help="distinct SFT batches, cycled over the steps (default 24; smoke 4)")
    p.add_argument("--sft-passes", type=int, default=None, help="2: a priming pass first (default 2 on CUDA, else 1)")
    p.add_argument("--sft-rate", type=float, default=0.5, help="initial ladder omission rate (MLP and heads)")
    p.add_argument("--sft-exempt-layers", default=None,
                   help="sat_exempt_layers of the SFT SAT run (default: SAT's default, 0,-1; smoke: none, the tiny "
                        "model has 2 layers)")
    p.add_argument("--sft-sat-config", default=None,
                   help='more SAT settings of the SFT SAT run, JSON (e.g. \'{"sat_dense_fraction": 0.1}\')')
    p.add_argument("--sft-lora", action="store_true",
                   help="the SFT runs with LoRA adapters (the post bench's: rank 16 on every projection), dense and SAT")
    p.add_argument("--sft-sat-graphs", action="store_true",
                   help="also an SFT run of SAT inside the CUDA graphs (LITESPARK_SAT_GRAPHS=1; experimental)")
    p.add_argument("--sft-eval-rows", type=int, default=None, help="held-out rows (default 64; smoke 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s for the MFU (default: the datasheet table; none on a CPU)")
    p.add_argument("--profile", action="store_true", help="torch.profiler table of one SAT step")
    p.add_argument("--skip-micro", action="store_true", help="no MLP microbenchmark")
    p.add_argument("--smoke", action="store_true", help="tiny Llama, few steps, CPU-sized: a test of the harness")
    p.add_argument("--no-energy", action="store_true", help="no energy meter in the pre-training rows")
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    a = build_parser().parse_args(argv)
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    if not modes or any(m not in ("pretrain", "sft") for m in modes):
        raise SystemExit(f"--modes: choose from pretrain, sft (got {a.modes!r})")
    cuda = torch.cuda.is_available()
    a.config = "tiny" if a.smoke else "llama-1b"
    a.sft_config = "tiny" if a.smoke else "llama-1b"
    a.steps = a.steps or (4 if a.smoke else 14)
    a.time_from = a.time_from or (3 if a.smoke else 5)
    if not 2 <= a.time_from <= a.steps:
        raise SystemExit(f"--time-from must be within 2..{a.steps} (step 1 is SAT's dense importance measurement)")
    a.rates = [float(x) for x in a.rates.split(",") if x.strip()]
    a.sft_steps = a.sft_steps or (8 if a.smoke else 96)
    a.sft_pool_batches = a.sft_pool_batches or (4 if a.smoke else 24)
    a.sft_passes = a.sft_passes or (2 if cuda and not a.smoke else 1)
    a.sft_eval_rows = a.sft_eval_rows or (8 if a.smoke else 64)
    if a.smoke and a.sft_exempt_layers is None:
        a.sft_exempt_layers = ""
    os.makedirs(a.out, exist_ok=True)

    import warnings

    warnings.filterwarnings("ignore", message=".*SAT.*")
    from litespark_hf.efficiency import bench as B
    from litespark_hf.efficiency import flops as F
    from litespark_hf.efficiency import post_bench as PB
    from litespark_hf.efficiency.device import device_tag

    if a.no_energy or not cuda:
        B._EnergyMeter = _NoEnergy  # CodeCarbon takes seconds to start on a CPU and is not what is measured here
    dev = torch.cuda.get_device_name() if cuda else "CPU"
    peak, peak_src = F.peak_flops(dev if cuda else None, a.peak_tflops)
    stem = os.path.join(a.out, f"bench_sat_{device_tag(dev) if cuda else 'cpu'}")
    result = {
        "benchmark": "bench_sat", "device": dev, "device_tag": device_tag(dev) if cuda else "cpu",
        "environment": B._environment(), "torch": torch.__version__, "smoke": a.smoke,
        "peak_flops": peak, "peak_source": peak_src,
        "config": {
            "pretrain": {"name": a.config, **B.CONFIGS[a.config], "steps": a.steps, "time_from": a.time_from,
                         "rates": a.rates, "exempt_layers": a.exempt_layers, "refresh_interval": 0,
                         "schedule": "constant", "reference": "litespark (use_litespark=True, LitesparkAdamW)"},
            "sft": {"name": a.sft_config, **PB.CONFIGS[a.sft_config], "steps": a.sft_steps,
                    "distinct_batches": min(a.sft_pool_batches, a.sft_steps), "passes": a.sft_passes,
                    "rate": a.sft_rate, "schedule": "ladder", "eval_rows": a.sft_eval_rows,
                    "length_distribution": PB.length_distribution(PB.CONFIGS[a.sft_config],
                                                                  min(a.sft_pool_batches, a.sft_steps), a.seed)
                    if "sft" in modes else None},
            "seed": a.seed, "modes": modes,
        },
        "mlp_micro": [], "e2e": [],
        "method": "pretrain: bench.run_variant rows (median CUDA-event step over the timed window), speedup vs the "
                  "litespark row; sft: litespark_hf.SFTTrainer on post_bench.dataset_for data, total_train_s = "
                  "synced wall from the first step's begin to the last step's end, held-out loss by "
                  "trainer.evaluate(); MFU on executed FLOPs (SAT's count) and dense-equivalent FLOPs",
    }
    t_all = time.perf_counter()

    def emit(rows):
        result["e2e"] = rows
        result["total_wall_s"] = time.perf_counter() - t_all
        with open(stem + ".json", "w") as fh:
            json.dump(result, fh, indent=1, default=str)
        r = rows[-1] if rows else None
        if r is not None:
            print(f"[bench_sat] {r['mode']} {r['name']}: {r.get('status')}"
                  + (f", step {r['step_ms']:.1f} ms, {r['tokens_per_second']:,.0f} tok/s, exec FLOPs "
                     f"{r['executed_flops_fraction']:.3f}" if r.get("status") == "ok" else "")
                  + (f", held-out loss {r['heldout_loss']:.4f}, total {r['total_train_s']:.1f} s"
                     if r.get("status") == "ok" and r["mode"] == "sft" else "")
                  + f" [{time.perf_counter() - t_all:.0f} s]", flush=True)

    if cuda and not a.skip_micro and not a.smoke:
        try:
            result["mlp_micro"] = mlp_micro()
        except Exception as exc:  # noqa: BLE001
            print(f"[bench_sat] MLP microbenchmark failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        for r in result["mlp_micro"]:
            print(f"[bench_sat] micro {r['variant']:26s} rate {r['rate']:.2f}: {r['ms']:.3f} ms, "
                  f"{r['speedup']:.2f}x (ideal {r['ideal']:.2f}x)", flush=True)
    rows: list[dict] = []
    if "pretrain" in modes:
        rows = pretrain_rows(a, peak, emit)
    if "sft" in modes:
        rows = sft_rows(a, peak, emit, rows)
    result["e2e"] = rows
    result["targets"] = targets(rows)
    result["table"] = format_table(rows)
    result["total_wall_s"] = time.perf_counter() - t_all
    with open(stem + ".json", "w") as fh:
        json.dump(result, fh, indent=1, default=str)
    try:
        plot(result, stem + ".png")
    except Exception as exc:  # noqa: BLE001
        print(f"[bench_sat] plot failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    pc = result["config"]["pretrain"]
    print(f"\nSAT on Litespark: {pc['note']}, bf16 autocast + fp32 weights where CUDA is; {dev}; "
          f"pretrain {a.steps} steps ({a.time_from}-{a.steps} timed); SFT {a.sft_steps} steps, "
          f"{a.sft_passes} pass(es); {result['total_wall_s']:.0f} s")
    print(result["table"])
    print("targets: " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                                    for k, v in result["targets"].items()}))
    print(f"\nwrote {stem}.json and {stem}.png")
    return 0 if rows and all(r.get("status") == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
