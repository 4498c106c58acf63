"""`EfficiencyCallback`: tokens/s, step time, MFU, peak memory and energy/CO2 for any transformers/TRL Trainer.

How tokens are counted: a forward pre-hook on the trained model (registered at ``on_train_begin``, removed at the
end) reads the batch the Trainer passes to ``model(**inputs)`` and counts, on the device and without a host sync,

- with a 2-D ``attention_mask``: its ones (padding excluded), per row ``n_i``;
- else with ``position_ids`` (padding-free / packed batches, which carry no mask): every position, and the
  attention span ``sum n_i^2`` from ``sum(2 p + 1)`` over the positions ``p`` (one document of n tokens gives n^2);
- else: every token of ``input_ids`` / ``inputs_embeds``.

Only forwards that train are counted (``module.training`` and grad enabled): DPO's reference pass, evaluation and
generation are not. Nothing waits for the GPU per step: at ``on_step_end`` the counters are copied to pinned
memory behind a CUDA event, and a step's time is the GPU time between events recorded at ``on_step_begin`` and
``on_step_end``; they are read when logging (one wait) and summed over ranks there. Should the hook see nothing (a
trainer that bypasses ``model.__call__``), the Trainer's own ``state.num_input_tokens_seen`` is used when it is on.

Logged (prefix ``efficiency/``, per logging interval): ``tokens_per_second``, ``step_time_s``, ``mfu``,
``peak_memory_gib``, ``power_w``, ``energy_kwh``, ``tokens_seen``; at the end the totals with ``emissions_g``
and ``tokens_per_kwh``. The Trainer hands ``logs`` to the callbacks in order: for TensorBoard/W&B to get these keys
the callback must come before the reporting callbacks, which `track_efficiency` (and ``Trainer(callbacks=[...])``
followed by `move_first`) arranges; ``state.log_history`` gets them either way.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
import warnings
from typing import Any

import torch
from transformers import TrainerCallback

from . import flops as _flops
from .energy import CodeCarbonMeter

__all__ = ["EfficiencyCallback", "track_efficiency", "move_first", "load_baseline"]

GIB = 1024 ** 3
FORMULA = ("FLOPs/token = 6*N + 12*L*d*T (PaLM app. B / nanoGPT; N = all parameters, tied embeddings once; "
           "L layers; d = heads*head_dim; T = attended sequence length, non-causal; attention summed exactly over "
           "each batch's real sequence lengths; recomputation not counted)")


def _count_tokens(args, kwargs):
    """(tokens, sum of squared sequence lengths) of one forward's inputs: a pair of ints when the shapes tell, else
    an int64 tensor on the inputs' device (never a host-to-device copy: a blocking one would wait for the GPU)."""
    def pick(name, index):
        v = kwargs.get(name)
        if v is None and len(args) > index and isinstance(args[index], torch.Tensor):
            v = args[index]
        return v

    ids = pick("input_ids", 0)
    ref = ids if isinstance(ids, torch.Tensor) else kwargs.get("inputs_embeds")
    if not isinstance(ref, torch.Tensor):
        return None
    mask = pick("attention_mask", 1)
    pos = kwargs.get("position_ids")
    if isinstance(ids, torch.Tensor):
        rows, cols = (ids.shape[0], ids.shape[-1]) if ids.dim() >= 2 else (1, ids.shape[0])
    else:
        rows, cols = ref.shape[0], ref.shape[1]
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        n = mask.to(torch.int64).sum(-1)
        return torch.stack([n.sum(), (n * n).sum()])
    if isinstance(pos, torch.Tensor):
        p = pos.to(torch.int64)
        if p.dim() == 3:  # multimodal rope: [3, batch, seq]
            p = p[0]
        span = (2 * p + 1).sum()
        return torch.stack([torch.full_like(span, p.numel()), span])
    return (rows * cols, rows * cols * cols)


def load_baseline(baseline) -> dict | None:
    """A baseline run: an ``efficiency.json`` path/dict, a train_bench result, or ``{"tokens_per_second": ...,
    "joules_per_token": ..., "name": ...}``. Returns ``{"name", "tokens_per_second", "joules_per_token"}``."""
    if baseline is None:
        return None
    if isinstance(baseline, (str, os.PathLike)):
        path = os.fspath(baseline)
        if os.path.isdir(path):
            path = os.path.join(path, "efficiency.json")
        with open(path) as fh:
            data = json.load(fh)
        data.setdefault("name", path)
    else:
        data = dict(baseline)
    if "training" in data:  # an efficiency.json
        tr, en = data["training"], data.get("energy") or {}
        return {"name": data.get("name", "baseline"),
                "tokens_per_second": tr.get("tokens_per_second_steady") or tr.get("tokens_per_second"),
                "joules_per_token": en.get("joules_per_token")}
    return {"name": data.get("name", "baseline"), "tokens_per_second": data.get("tokens_per_second"),
            "joules_per_token": data.get("joules_per_token")}


class EfficiencyCallback(TrainerCallback):
    """Throughput, MFU, memory and energy for a Trainer (transformers, TRL), into logs, JSON, a plot and the card.

    Args:
        track_energy: run CodeCarbon's ``OfflineEmissionsTracker`` (one per node, on local rank 0).
        country_iso_code: 3-letter country of the machine for the carbon intensity (default
            ``LITESPARK_COUNTRY_ISO_CODE`` or "USA"); ``region``: a US state / Canadian province, optional.
        peak_tflops: dense peak TFLOP/s per device for the MFU (default: ``LITESPARK_PEAK_TFLOPS``, else the table in
            `litespark_hf.efficiency.flops` matched on the CUDA device name).
        baseline: a baseline run (see `load_baseline`) for the speed/energy gain in the JSON and the card.
        training_type: for the card's ``co2_eq_emissions`` (default "pre-training"/"fine-tuning" guessed from the
            model's name_or_path).
        write_json / write_plot / write_model_card: what to write in ``output_dir`` on the main process.
        warmup_steps: steps left out of the ``*_steady`` figures (compilation, autotuning, allocator warm-up).
        measure_power_secs: CodeCarbon's sampling interval.
    """

    def __init__(self, *, track_energy: bool = True, country_iso_code: str | None = None, region: str | None = None,
                 peak_tflops: float | None = None, baseline=None, training_type: str | None = None,
                 write_json: bool = True, write_plot: bool = True, write_model_card: bool = True,
                 warmup_steps: int = 2, measure_power_secs: float = 5.0, log_prefix: str = "efficiency/",
                 json_name: str = "efficiency.json", plot_name: str = "efficiency.png"):
        self.track_energy = track_energy
        self.country_iso_code = country_iso_code
        self.region = region
        self.peak_tflops = peak_tflops
        self.baseline = load_baseline(baseline)
        self.training_type = training_type
        self.write_json, self.write_plot, self.write_model_card = write_json, write_plot, write_model_card
        self.warmup_steps = warmup_steps
        self.measure_power_secs = measure_power_secs
        self.prefix = log_prefix
        self.json_name, self.plot_name = json_name, plot_name
        self.report: dict | None = None
        self._reset()

    # -- state --------------------------------------------------------------------------------------------------
    def _reset(self):
        self._sat = False
        self._hook = None
        self._acc: torch.Tensor | None = None  # device counters (masks, position_ids)
        self._host_acc = (0, 0)  # counts known from the shapes
        self._acc_read = (0, 0)
        self._steps: list[dict] = []
        self._pending: list[dict] = []
        self._step_t0: float | None = None
        self._begin_ev = None
        self._log_cursor = 0
        self._t_train0 = None
        self._t_last_log = None
        self._energy_last = None
        self._timeline: list[dict] = []
        self._meter: CodeCarbonMeter | None = None
        self._finalized = False
        self._tokens_total = 0
        self._trainer_tokens0 = 0
        self._model_info: dict = {}
        self._device_name = None
        self._cuda = False

    # -- distributed helpers ------------------------------------------------------------------------------------
    @staticmethod
    def _dist():
        try:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                return dist
        except Exception:  # noqa: BLE001
            pass
        return None

    def _reduce(self, values: list[float], op: str = "sum") -> list[float]:
        dist = self._dist()
        if dist is None:
            return list(values)
        try:
            backend = str(dist.get_backend())
            dev = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
            t = torch.tensor(values, dtype=torch.float64, device=dev)
            dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
            return t.tolist()
        except Exception as exc:  # noqa: BLE001
            warnings.warn(f"litespark_hf.efficiency: all-reduce failed ({exc}); reporting this process only",
                          RuntimeWarning, stacklevel=2)
            return list(values)

    # -- hook ---------------------------------------------------------------------------------------------------
    def _make_hook(self):
        cb = self

        @torch.compiler.disable
        def hook(module, args, kwargs):
            if not (module.training and torch.is_grad_enabled()):
                return None
            try:
                counts = _count_tokens(args, kwargs)
            except Exception:  # noqa: BLE001 - counting must never break a forward
                counts = None
            if isinstance(counts, tuple):  # known on the host
                cb._host_acc = (cb._host_acc[0] + counts[0], cb._host_acc[1] + counts[1])
            elif counts is not None:
                cb._acc = counts if cb._acc is None or cb._acc.device != counts.device else cb._acc + counts
            return None

        return hook

    def _drain(self, wait: bool) -> None:
        """Turn pending steps into figures: all of them (``wait``: one wait for the last step's GPU work, at logging
        time), or only those whose GPU work has finished (no waiting)."""
        if wait and self._pending and self._pending[-1]["end_ev"] is not None:
            self._pending[-1]["end_ev"].synchronize()  # the last step's end: every earlier one has finished too
        while self._pending:
            p = self._pending[0]
            if not wait and p["end_ev"] is not None and not p["end_ev"].query():
                return
            self._pending.pop(0)
            counts, (h_tokens, h_sumsq) = p["counts"], p["host_counts"]
            tokens, sumsq = (int(v) for v in counts.tolist()) if counts is not None else (0, 0)
            tokens, sumsq = tokens + h_tokens, sumsq + h_sumsq  # running totals
            if p["end_ev"] is not None:  # GPU time from the step's start to its end, as the stream ran them
                elapsed = p["begin_ev"].elapsed_time(p["end_ev"]) / 1e3
            else:
                elapsed = p["end"] - p["t0"]
            self._steps.append({"step": p["step"], "time": elapsed, "end": p["end"],
                                "tokens": tokens - self._acc_read[0], "sumsq": sumsq - self._acc_read[1],
                                "executed_fraction": p["executed_fraction"]})
            self._acc_read = (tokens, sumsq)

    # -- events -------------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._reset()
        self._cuda = torch.cuda.is_available() and str(getattr(args, "device", "cpu")).startswith("cuda")
        if model is not None:
            self._hook = model.register_forward_pre_hook(self._make_hook(), with_kwargs=True)
            self._model_info = self._describe_model(model)
        if self._cuda:
            torch.cuda.reset_peak_memory_stats()
            self._device_name = torch.cuda.get_device_name()
        self._peak, self._peak_source = _flops.peak_flops(self._device_name, self.peak_tflops) if self._cuda or \
            self.peak_tflops or os.environ.get("LITESPARK_PEAK_TFLOPS") else (None, "CPU: no peak table entry "
                                                                              "(set LITESPARK_PEAK_TFLOPS)")
        self._trainer_tokens0 = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        if self.track_energy and state.is_local_process_zero:
            self._meter = CodeCarbonMeter(args.output_dir, self.country_iso_code, self.region,
                                          self.measure_power_secs)
            self._safe(self._meter.start, "energy tracker start")
            self._energy_last = self._energy_sample()
        self._t_train0 = self._t_last_log = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_t0 = time.perf_counter()
        if self._cuda:
            self._begin_ev = torch.cuda.Event(enable_timing=True)
            self._begin_ev.record()

    def on_step_end(self, args, state, control, **kwargs):
        # Nothing here waits for the GPU: a wait per step would drain its queue, and the host could not prepare the
        # next step while the GPU finishes this one. The step's end is a CUDA event and its token counters are
        # copied to pinned memory behind it; both are read once the GPU got there (at the latest when logging).
        frac = self._executed_fraction(kwargs.get("model"))
        now = time.perf_counter()
        t0 = self._step_t0 if self._step_t0 is not None else now
        acc, counts, end_ev = self._acc, None, None
        if acc is not None and acc.device.type == "cuda":
            counts = torch.empty(acc.shape, dtype=acc.dtype, pin_memory=True).copy_(acc, non_blocking=True)
        elif acc is not None:
            counts = acc.to("cpu", copy=True)
        if self._cuda and self._begin_ev is not None:
            end_ev = torch.cuda.Event(enable_timing=True)
            end_ev.record()
        self._pending.append({"step": state.global_step, "t0": t0, "end": now, "begin_ev": self._begin_ev,
                              "end_ev": end_ev, "counts": counts, "host_counts": self._host_acc,
                              "executed_fraction": frac})
        self._step_t0 = self._begin_ev = None
        if len(self._pending) > 64:  # a long logging interval: take in what has finished, without waiting
            self._drain(wait=False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or self._t_train0 is None or self._finalized:
            return
        final = "train_runtime" in logs
        interval = self._interval(args, state)
        if interval is not None:
            entries = {f"{self.prefix}{k}": v for k, v in interval.items() if v is not None and k != "step"}
            logs.update(entries)
            self._merge_history(state, entries)
        if final:
            self._finalize(args, state, kwargs.get("model"))
            entries = {f"{self.prefix}{k}": v for k, v in self._summary_logs().items() if v is not None}
            logs.update(entries)
            self._merge_history(state, entries)

    def on_save(self, args, state, control, **kwargs):
        # TRL rewrites output_dir/README.md at every checkpoint save (before on_save): put the section back.
        if not state.is_world_process_zero or not self.write_model_card:
            return
        readme = os.path.join(args.output_dir, "README.md")
        if os.path.exists(readme):
            report = self.report or self._partial_report(args, state)
            self._safe(lambda: self._write_card(args.output_dir, report), "model card update")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self._t_train0 is None:
            return
        if not self._finalized:
            self._finalize(args, state, model)
        if state.is_world_process_zero and self.report is not None:
            self._write_outputs(args.output_dir, self.report)

    # -- computations -------------------------------------------------------------------------------------------
    def _describe_model(self, model) -> dict:
        from ..patching import unwrap_model

        base = unwrap_model(model)
        config = getattr(base, "config", None)
        info: dict[str, Any] = {"num_parameters": _flops.num_active_parameters(base)}
        if config is not None:
            try:
                layers, d = _flops.model_shape(config)
                info.update(model_type=getattr(config, "model_type", None), layers=layers, attention_width=d,
                            name_or_path=getattr(config, "_name_or_path", "") or "")
            except Exception:  # noqa: BLE001
                pass
        return info

    def _executed_fraction(self, model) -> float:
        """Share of the dense FLOPs this step executed: < 1 only under Sparsity-Accelerated Training."""
        if model is None:
            return 1.0
        from ..sat import executed_flops_fraction, is_enabled

        if not is_enabled(model):
            return 1.0
        self._sat = True
        return float(executed_flops_fraction(model))

    def _executed_ratio(self, steps) -> float:
        """FLOPs executed / dense FLOPs over ``steps`` (local to this process)."""
        dense = executed = 0.0
        for s in steps:
            fl = self._flops_of(s["tokens"], s["sumsq"]) or 0.0
            dense += fl
            executed += fl * s.get("executed_fraction", 1.0)
        return executed / dense if dense > 0 else 1.0

    def _flops_of(self, tokens: float, sumsq: float) -> float | None:
        info = self._model_info
        if "layers" not in info:
            return None
        return 6.0 * info["num_parameters"] * tokens + 12.0 * info["layers"] * info["attention_width"] * sumsq

    def _peak_memory(self) -> tuple[float | None, float | None]:
        if not self._cuda:
            return None, None
        return torch.cuda.max_memory_allocated() / GIB, torch.cuda.max_memory_reserved() / GIB

    def _energy_sample(self) -> dict | None:
        return self._safe(self._meter.sample, "energy sampling") if self._meter is not None else None

    def _interval(self, args, state) -> dict | None:
        self._drain(wait=True)
        steps = self._steps[self._log_cursor:]
        self._log_cursor = len(self._steps)
        now = time.perf_counter()
        dt = now - self._t_last_log
        self._t_last_log = now
        tokens = sum(s["tokens"] for s in steps)
        sumsq = sum(s["sumsq"] for s in steps)
        mem, _ = self._peak_memory()
        e = self._energy_sample()
        e_kwh = e["total"] if e else 0.0
        e_prev = self._energy_last["total"] if (e and self._energy_last) else e_kwh
        # all ranks reach on_log together: one collective for the sums, one for the maxima
        tokens, sumsq, e_kwh, d_kwh, have_e = self._reduce(
            [tokens, sumsq, e_kwh, e_kwh - e_prev, 1.0 if e else 0.0])
        mem_max, dt_max = self._reduce([mem or 0.0, dt], op="max")
        if e:
            self._energy_last = e
        if not steps and tokens == 0:
            return None
        self._tokens_total += int(tokens)
        world = max(1, args.world_size)
        fl = self._flops_of(tokens, sumsq)
        out = {
            "step": state.global_step,
            "tokens_per_second": tokens / dt_max if dt_max > 0 else None,
            "step_time_s": statistics.fmean(s["time"] for s in steps) if steps else None,
            "mfu": _flops.mfu(fl / dt_max, self._peak, world) if (fl and dt_max > 0) else None,
            "peak_memory_gib": mem_max if self._cuda else None,
            "power_w": d_kwh * 3.6e6 / dt_max if (have_e and dt_max > 0) else None,
            "energy_kwh": e_kwh if have_e else None,
            "tokens_seen": self._tokens_total,
        }
        if self._sat:  # Sparsity-Accelerated Training: MFU on the FLOPs actually executed, dense-equivalent beside it
            ratio = self._reduce([self._executed_ratio(steps)], op="max")[0]
            out["mfu_dense_equivalent"] = out["mfu"]
            out["executed_flops_fraction"] = ratio
            out["mfu"] = out["mfu"] * ratio if out["mfu"] is not None else None
        self._timeline.append(out)
        return out

    @staticmethod
    def _merge_history(state, entries):
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(entries)

    def _precision(self, args) -> str:
        if getattr(args, "bf16", False):
            return "bf16 mixed precision (fp32 master weights)"
        if getattr(args, "fp16", False):
            return "fp16 mixed precision (fp32 master weights)"
        return "fp32" if not getattr(args, "tf32", False) else "fp32 (TF32 matmuls)"

    def _hardware(self, args) -> dict:
        world = max(1, args.world_size)
        if self._cuda:
            accel = self._device_name
            used = f"{world} x {accel}"
        else:
            accel = None
            used = f"{world} x CPU ({platform.processor() or platform.machine()})"
        nodes = max(1, world // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", world) or world)))
        return {"accelerator": accel, "num_devices": world, "num_nodes": nodes, "hardware_used": used,
                "peak_flops_per_device": self._peak, "peak_source": self._peak_source}

    def _partial_report(self, args, state) -> dict:
        """A report from the figures so far (for a checkpoint's card before the run ends)."""
        tl = [t for t in self._timeline if t.get("tokens_per_second")]
        rep = self._base_report(args, state)
        if tl:
            rep["training"]["tokens_per_second"] = tl[-1]["tokens_per_second"]
            rep["training"]["mfu"] = tl[-1]["mfu"]
            rep["training"]["peak_memory_gib"] = tl[-1]["peak_memory_gib"]
        rep["training"]["tokens_seen"] = self._tokens_total
        rep["partial"] = True
        return rep

    def _base_report(self, args, state) -> dict:
        info = self._model_info
        name = info.get("name_or_path") or ""
        training_type = self.training_type or ("fine-tuning" if name and not os.path.isdir(name) else "pre-training")
        return {
            "tool": "litespark_hf.efficiency.EfficiencyCallback",
            "model": {**info, "flops_formula": FORMULA},
            "hardware": self._hardware(args),
            "precision": self._precision(args),
            "training_type": training_type,
            "training": {"global_steps": state.global_step},
            "energy": None,
            "baseline": self.baseline,
            "gain": None,
            "timeline": self._timeline,
        }

    def _finalize(self, args, state, model=None):
        self._finalized = True
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        # figures of the steps not yet logged
        self._drain(wait=True)
        if self._log_cursor < len(self._steps) or self._timeline == []:
            self._interval(args, state)
        total_time = time.perf_counter() - self._t_train0
        steps = self._steps
        steady = steps[self.warmup_steps:] if len(steps) > self.warmup_steps else steps
        loc_tok = sum(s["tokens"] for s in steps)
        loc_sumsq = sum(s["sumsq"] for s in steps)
        st_tok = sum(s["tokens"] for s in steady)
        st_sumsq = sum(s["sumsq"] for s in steady)
        st_time = sum(s["time"] for s in steady)
        med = statistics.median(s["time"] for s in steps) if steps else None
        tok, sumsq, st_tok, st_sumsq = self._reduce([loc_tok, loc_sumsq, st_tok, st_sumsq])
        st_time, total_time_max = self._reduce([st_time, total_time], op="max")
        source = "forward pre-hook (attention_mask / position_ids)"
        if tok == 0:
            trainer_tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0) - self._trainer_tokens0
            if trainer_tokens > 0:
                tok, source = trainer_tokens, "Trainer num_input_tokens_seen"
                sumsq = 0
            else:
                source = "unavailable (no forward seen)"
        world = max(1, args.world_size)
        tps = tok / total_time_max if total_time_max > 0 and tok else None
        tps_steady = st_tok / st_time if st_time > 0 and st_tok else tps
        fl_all = self._flops_of(tok, sumsq)
        fl_st = self._flops_of(st_tok, st_sumsq)
        mem, reserved = self._peak_memory()
        mem, reserved = self._reduce([mem or 0.0, reserved or 0.0], op="max")
        rep = self._base_report(args, state)
        rep["training"].update({
            "tokens_seen": int(tok), "token_counting": source, "train_time_s": total_time_max,
            "tokens_per_second": tps, "tokens_per_second_steady": tps_steady,
            "tokens_per_second_per_device": (tps_steady / world) if tps_steady else None,
            "step_time_s_median": med, "steady_steps": len(steady), "warmup_steps_excluded": len(steps) - len(steady),
            "mfu": _flops.mfu(fl_all / total_time_max, self._peak, world) if fl_all and total_time_max > 0 else None,
            "mfu_steady": _flops.mfu(fl_st / st_time, self._peak, world) if fl_st and st_time > 0 else None,
            "flops_per_token": (fl_all / tok) if fl_all and tok else None,
            "peak_memory_gib": mem if self._cuda else None,
            "peak_memory_reserved_gib": reserved if self._cuda else None,
        })
        if self._sat:
            t = rep["training"]
            ratio = self._reduce([self._executed_ratio(steps)], op="max")[0]
            ratio_st = self._reduce([self._executed_ratio(steady)], op="max")[0]
            t["mfu_dense_equivalent"], t["mfu_steady_dense_equivalent"] = t["mfu"], t["mfu_steady"]
            t["mfu"] = t["mfu"] * ratio if t["mfu"] is not None else None
            t["mfu_steady"] = t["mfu_steady"] * ratio_st if t["mfu_steady"] is not None else None
            t["executed_flops_fraction"] = ratio
            t["mfu_note"] = ("Sparsity-Accelerated Training: mfu counts the FLOPs actually executed; "
                             "mfu_dense_equivalent counts the dense model's FLOPs for the same tokens")
        rep["energy"] = self._finalize_energy(tok)
        rep["gain"] = self._gain(rep)
        self.report = rep

    def _finalize_energy(self, tokens) -> dict | None:
        meter = self._meter
        final = self._safe(meter.stop, "energy tracker stop") if meter is not None else None
        keys = ["energy_kwh", "gpu_kwh", "cpu_kwh", "ram_kwh", "emissions_kg"]
        local = [final[k] for k in keys] if final else [0.0] * len(keys)
        is_leader = 1.0 if meter is not None else 0.0
        ok = 1.0 if final else 0.0
        measured_gpu = 1.0 if (final and meter.measured["gpu"]) else 0.0
        measured_cpu = 1.0 if (final and meter.measured["cpu"]) else 0.0
        summed = self._reduce(local + [is_leader, ok, measured_gpu, measured_cpu])
        vals = dict(zip(keys, summed[: len(keys)]))
        leaders, oks, m_gpu, m_cpu = summed[len(keys):]
        if not self.track_energy:
            return None
        if oks == 0:
            err = meter.failed if meter is not None and meter.failed else "no tracker result"
            return {"error": err, "source": "CodeCarbon OfflineEmissionsTracker"}
        try:
            import codecarbon

            cc_version = codecarbon.__version__
        except Exception:  # noqa: BLE001
            cc_version = "?"
        kwh = vals["energy_kwh"]
        out = {
            "source": f"CodeCarbon {cc_version} OfflineEmissionsTracker (machine mode, one per node)",
            "energy_kwh": kwh, "gpu_kwh": vals["gpu_kwh"], "cpu_kwh": vals["cpu_kwh"], "ram_kwh": vals["ram_kwh"],
            "emissions_g": vals["emissions_kg"] * 1000.0,
            "tokens_per_kwh": tokens / kwh if kwh > 0 else None,
            "joules_per_token": kwh * 3.6e6 / tokens if tokens else None,
            "nodes_reporting": int(oks), "nodes": int(leaders),
            "measured": {"gpu": m_gpu == oks, "cpu": m_cpu == oks, "ram": False},
            "is_estimate": (m_gpu + m_cpu) == 0,
        }
        if final:
            out.update(country_iso_code=final["country_iso_code"], country_name=final["country_name"],
                       region=final["region"], gpu_power_w=final["gpu_power_w"], cpu_power_w=final["cpu_power_w"],
                       ram_power_w=final["ram_power_w"], duration_s=final["duration_s"])
            out["hardware_seen"] = meter.hardware
        else:  # main process is not a node leader (cannot happen with the usual launchers)
            out.update(country_iso_code=(self.country_iso_code or os.environ.get("LITESPARK_COUNTRY_ISO_CODE")
                                         or "USA").upper(), country_name=None, region=self.region)
        out["note"] = ("estimate: no NVML or RAPL counter on this machine (CodeCarbon's CPU TDP x load and RAM "
                       "models)" if out["is_estimate"] else
                       "GPU from NVML counters" + (", CPU from RAPL" if out["measured"]["cpu"] else
                                                   ", CPU and RAM estimated by CodeCarbon's models"))
        return out

    def _gain(self, rep) -> dict | None:
        b = self.baseline
        if not b:
            return None
        tps = rep["training"].get("tokens_per_second_steady") or rep["training"].get("tokens_per_second")
        jpt = (rep.get("energy") or {}).get("joules_per_token")
        gain = {"baseline": b.get("name")}
        if tps and b.get("tokens_per_second"):
            gain["speedup"] = tps / b["tokens_per_second"]
        if jpt and b.get("joules_per_token"):
            gain["energy_per_token_ratio"] = jpt / b["joules_per_token"]
        return gain

    def _summary_logs(self) -> dict:
        r = self.report or {}
        tr, en = r.get("training", {}), r.get("energy") or {}
        return {"train_tokens_per_second": tr.get("tokens_per_second_steady"), "train_mfu": tr.get("mfu_steady"),
                "train_tokens_seen": tr.get("tokens_seen"), "train_peak_memory_gib": tr.get("peak_memory_gib"),
                "energy_kwh_total": en.get("energy_kwh"), "emissions_g": en.get("emissions_g"),
                "tokens_per_kwh": en.get("tokens_per_kwh")}

    # -- outputs ------------------------------------------------------------------------------------------------
    @staticmethod
    def _safe(fn, what):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001
            warnings.warn(f"litespark_hf.efficiency: {what} failed ({type(exc).__name__}: {exc})", RuntimeWarning,
                          stacklevel=2)
            return None

    def _write_card(self, output_dir, report):
        from .card import update_model_card

        update_model_card(output_dir, report)

    def _write_outputs(self, output_dir, report):
        os.makedirs(output_dir, exist_ok=True)
        if self.write_json:
            self._safe(lambda: _dump_json(os.path.join(output_dir, self.json_name), report), "efficiency.json")
        if self.write_plot:
            from .plot import plot_timeline

            self._safe(lambda: plot_timeline(report, os.path.join(output_dir, self.plot_name)), "efficiency plot")
        if self.write_model_card:
            self._safe(lambda: self._write_card(output_dir, report), "model card")


def _clean(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _dump_json(path, report):
    with open(path, "w") as fh:
        json.dump(_clean(report), fh, indent=2, default=str)


def move_first(trainer, callback) -> None:
    """Put ``callback`` first in the trainer's list, so the reporting callbacks (TensorBoard, W&B) see its keys."""
    cbs = trainer.callback_handler.callbacks
    if callback in cbs:
        cbs.remove(callback)
    cbs.insert(0, callback)


def track_efficiency(trainer, callback: EfficiencyCallback | None = None, **kwargs) -> EfficiencyCallback:
    """Attach an `EfficiencyCallback` to ``trainer`` (first in line, for the loggers) and keep the model card's
    Efficiency section through ``trainer.create_model_card`` (TRL and ``push_to_hub`` regenerate the card)."""
    cb = callback or EfficiencyCallback(**kwargs)
    move_first(trainer, cb)
    original = getattr(trainer, "create_model_card", None)
    if callable(original) and not getattr(original, "_litespark_wrapped", False):
        def create_model_card(*args, **kw):
            result = original(*args, **kw)
            if cb.write_model_card and trainer.is_world_process_zero():
                readme = os.path.join(trainer.args.output_dir, "README.md")
                report = cb.report or (cb._partial_report(trainer.args, trainer.state) if cb._t_train0 else None)
                if report is not None and os.path.exists(readme):
                    cb._safe(lambda: cb._write_card(trainer.args.output_dir, report), "model card update")
            return result

        create_model_card._litespark_wrapped = True
        trainer.create_model_card = create_model_card
    return cb
