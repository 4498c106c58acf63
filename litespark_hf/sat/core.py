"""SAT controller: enabling SAT on a model, choosing the kept channels/heads each optimizer step, freezing the
omitted weights in the optimizer step (inside `LitesparkAdamW`'s launch, from kept masks; around any other
optimizer's step, by save and restore), and counting the FLOPs actually executed."""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn as nn

from litespark_kernels.ops.sparse_attention_heads import head_rows

from ..config import LitesparkConfig
from ..model_utils import decoder_layers, unwrap_model
from ..optim import LitesparkAdamW
from .modules import LayerState, SATAttention, SATGatedMLP, SATGeluMLP, base_class, is_sat_module, sat_class
from .schedule import scheduled_rate

_STATE_ATTR = "_litespark_sat"
METRICS = ("activation_magnitude", "random")
SELECTIONS = ("topk", "sample")


def _parse_exempt(spec, n_layers: int) -> set[int]:
    if spec is None or spec == "":
        return set()
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = set()
    for item in items:
        item = str(item).strip()
        if item:
            i = int(item)
            out.add(i % n_layers if -n_layers <= i < n_layers else i)
    return out


class SATController:
    """Holds the SAT configuration and the per-module states of one model."""

    def __init__(self, cfg: LitesparkConfig, mlps: list[nn.Module], attns: list[nn.Module], n_layers: int):
        if cfg.sat_metric not in METRICS:
            raise ValueError(f"unknown sat_metric {cfg.sat_metric!r}; known: {METRICS}")
        if cfg.sat_selection not in SELECTIONS:
            raise ValueError(f"unknown sat_selection {cfg.sat_selection!r}; known: {SELECTIONS}")
        for r in (cfg.sat_omission_rate_mlp, cfg.sat_omission_rate_heads):
            if not 0.0 <= r < 1.0:
                raise ValueError(f"SAT omission rates must be in [0, 1), got {r}")
        self.cfg = cfg
        self.mlps, self.attns, self.n_layers = mlps, attns, n_layers
        self.step: int | None = None
        self.rates = (0.0, 0.0)
        self.refresh = False
        self.last_refresh: int | None = None
        self._generators: dict[torch.device, torch.Generator] = {}
        self.seq_len: int | None = None
        # persistent selection and accumulator tensors, one set per group of modules and kept count (`_slot`)
        self._slots: dict[tuple, dict[str, torch.Tensor]] = {}

    @property
    def modules(self) -> list[nn.Module]:
        return self.mlps + self.attns

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            g = torch.Generator(device=device)
            g.manual_seed(self.cfg.sat_seed)
            self._generators[device] = g
        return self._generators[device]

    def set_step(self, step: int, max_steps: int | None = None) -> tuple[float, float]:
        """Start optimizer step ``step``: fold the last step's statistics, compute the rates, pick the kept units.

        Call once per optimizer step, before its first forward (all micro-batches of a step use one selection).
        Returns the (MLP, heads) omission rates of the schedule at this step.
        """
        cfg = self.cfg
        LayerState.fold_many([m._sat_state for m in self.modules], cfg.sat_ema)
        kw = dict(schedule=cfg.sat_schedule, ladder_steps=cfg.sat_ladder_steps, dense_fraction=cfg.sat_dense_fraction)
        r_mlp = scheduled_rate(cfg.sat_omission_rate_mlp, step, max_steps, **kw)
        r_heads = scheduled_rate(cfg.sat_omission_rate_heads, step, max_steps, **kw)
        self.step, self.rates = step, (r_mlp, r_heads)
        sparse = r_mlp > 0 or r_heads > 0
        needs_stats = sparse and cfg.sat_metric == "activation_magnitude"
        self.refresh = needs_stats and (
            self.last_refresh is None
            or (cfg.sat_refresh_interval > 0 and step - self.last_refresh >= cfg.sat_refresh_interval)
        )
        if self.refresh:
            self.last_refresh = step
        self._select_all([(m, r_mlp) for m in self.mlps] + [(m, r_heads) for m in self.attns])
        return self.rates

    def _select_all(self, items: list[tuple[nn.Module, float]]) -> None:
        """Pick the kept and omitted units of every module, batched: modules of equal shape on one device share one
        stacked score tensor, one sort and one `head_rows` (a handful of kernel launches per step instead of ~10 per
        module), and nothing waits on the GPU (the counts are known on the host; no ``nonzero``/``.item()``)."""
        groups: dict[tuple, list[tuple[LayerState, nn.Module]]] = {}
        for module, rate in items:
            st = module._sat_state
            st.index = st.index2 = st.omitted = st.rows = st.omitted_rows = st.qkv_rows = None
            st.acc = st.count = None
            keep = max(1, st.units - int(round(rate * st.units)))
            active = (not st.exempt) and rate > 0 and keep < st.units
            st.collect = active and (self.refresh or self.cfg.sat_metric != "random")
            if not active or self.refresh:  # inactive, or a dense step that measures every unit
                continue
            device = next(module.parameters()).device
            groups.setdefault((st.kind, st.units, keep, st.n_rep, st.head_dim, device), []).append((st, module))
        for (kind, units, keep, n_rep, head_dim, device), members in groups.items():
            n = len(members)
            if self.cfg.sat_metric == "random":
                keys = torch.rand(n, units, generator=self._generator(device), device=device)
            else:
                ones = torch.ones(units, device=device)
                score = torch.stack([ones if st.score is None else st.score.to(device) for st, _ in members])
                if self.cfg.sat_selection == "sample":  # Gumbel top-k = sampling without replacement ~ importance
                    u = torch.rand(n, units, generator=self._generator(device), device=device).clamp_(1e-20, 1.0)
                    keys = score.clamp_min(1e-30).log() - torch.log(-torch.log(u))
                else:
                    keys = score
            order = torch.argsort(keys, dim=1, descending=True, stable=True)
            kept = order[:, :keep].sort(dim=1).values
            omitted = order[:, keep:].sort(dim=1).values
            if kind == "attention":
                q_rows, kv_rows = head_rows(kept, n_rep, head_dim)
                q_om, kv_om = head_rows(omitted, n_rep, head_dim)
                n_q, n_kv = units * n_rep * head_dim, units * head_dim  # rows of q_proj, of k_proj (= v_proj)
                qkv_rows = torch.cat([q_rows, kv_rows + n_q, kv_rows + n_q + n_kv], dim=1)
                made = dict(kept=kept, omitted=omitted, q_rows=q_rows, kv_rows=kv_rows, q_om=q_om, kv_om=kv_om,
                            qkv_rows=qkv_rows)
            else:  # rows of the packed [gate; up] weight (`sparse_gated_mlp_fused`)
                kept2 = torch.cat([kept, kept + units], dim=1)
                made = dict(kept=kept, omitted=omitted, kept2=kept2)
            slot = self._slot(("select", kind, units, keep, n_rep, head_dim, device,
                               tuple(id(st) for st, _ in members)), made)
            kept, omitted = slot["kept"], slot["omitted"]
            if kind == "attention":
                q_rows, kv_rows, q_om, kv_om = slot["q_rows"], slot["kv_rows"], slot["q_om"], slot["kv_om"]
                qkv_rows = slot["qkv_rows"]
            else:
                kept2 = slot["kept2"]
            for i, (st, _) in enumerate(members):
                st.index, st.omitted = kept[i], omitted[i]
                if kind != "attention":
                    st.index2 = kept2[i]
                if kind == "attention":
                    st.rows, st.omitted_rows = (q_rows[i], kv_rows[i]), (q_om[i], kv_om[i])
                    st.qkv_rows = qkv_rows[i]
        # this step's importance accumulators: one zero-filled buffer per group of equal-size collecting modules
        acc_groups: dict[tuple, list[LayerState]] = {}
        for module, _ in items:
            st = module._sat_state
            if st.collect:
                acc_groups.setdefault((st.units, next(module.parameters()).device), []).append(st)
        for (units, device), sts in acc_groups.items():
            key = ("acc", units, device, tuple(id(st) for st in sts))
            buf = self._slots.get(key, {}).get("acc")
            if buf is None:
                buf = self._slots.setdefault(key, {})["acc"] = torch.zeros(2, len(sts), units, dtype=torch.float32,
                                                                           device=device)
            else:
                buf.zero_()
            for i, st in enumerate(sts):
                st.acc, st.count = buf[0, i], buf[1, i]

    def _slot(self, key: tuple, made: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The persistent tensors of one selection group (``key``: kind, sizes, kept count, device, members), holding
        this step's values ``made``: the first time ``made`` itself, later copied into the same memory. So each
        module's selection (``index``, ``rows``, ...) and accumulators sit at the same addresses from step to step
        while the kept count stays the same, which is what a replayed CUDA graph reads (`litespark_hf.graphs`); the
        eager path reads the same values either way."""
        slot = self._slots.get(key)
        if slot is None or any(slot[k].shape != v.shape for k, v in made.items()):
            self._slots[key] = made
            return made
        with torch.no_grad():
            for k, v in made.items():
                slot[k].copy_(v)
        return slot

    # ------------------------------------------------------------------ FLOPs
    def flops_per_token(self, model: nn.Module, seq_len: int | None = None) -> tuple[float, float]:
        """(executed, dense) training FLOPs per token: 6 per parameter (forward + backward) plus the attention
        scores' 12 * d_attn * T per layer, with the omitted parameters and heads of this step left out."""
        seq_len = self.seq_len if seq_len is None else seq_len
        seq_len = seq_len or 0
        n_params = sum(p.numel() for p in unwrap_model(model).parameters())
        dense = 6.0 * n_params
        executed = dense
        for m in self.mlps:
            st = m._sat_state
            frac = 1.0 - st.kept() / st.units
            executed -= 6.0 * frac * _mlp_channel_params(m) * st.units
        for m in self.attns:
            st = m._sat_state
            frac = 1.0 - st.kept() / st.units
            proj = sum(p.numel() for name in ("q_proj", "k_proj", "v_proj", "o_proj")
                       for p in getattr(m, name).parameters())
            if getattr(m.o_proj, "bias", None) is not None:
                proj -= m.o_proj.bias.numel()  # o_proj's bias is always added in full
            d_attn = m.q_proj.weight.shape[0]
            dense += 12.0 * d_attn * seq_len
            executed += 12.0 * d_attn * seq_len * (1.0 - frac) - 6.0 * frac * proj
        return executed, dense


def _mlp_channel_params(mlp: nn.Module) -> int:
    """Parameters per intermediate channel (rows of gate/up/fc incl. bias, columns of down/proj)."""
    if hasattr(mlp, "gate_proj"):
        total = mlp.gate_proj.weight.shape[1] + mlp.up_proj.weight.shape[1] + mlp.down_proj.weight.shape[0]
        return total
    total = mlp.c_fc.weight.shape[1] + mlp.c_proj.weight.shape[0]
    return total + (1 if mlp.c_fc.bias is not None else 0)


# Model types whose attention forward `SATAttention`'s sparse path reproduces exactly (separate q/k/v/o, per-head
# q/k norms if any, RoPE on every layer, the configured backend with the layer's window and scaling). Others (no-RoPE
# layers, whole-projection q/k norms, soft-capping, fused qkv_proj, ...) keep their attention dense under SAT.
SAT_ATTENTION_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "starcoder2", "ministral", "granite"})


def enable_sat(model: nn.Module, config: LitesparkConfig | dict | str | None = None, **overrides) -> nn.Module:
    """Enable SAT on a transformers causal LM (optionally PEFT-wrapped or already `litespark_hf.apply`-ed), in place.

    Swaps each decoder layer's MLP and attention class for its SAT version (in front of the current class, so the
    dense path is unchanged and `litespark_hf.restore` undoes it), and attaches a controller. Nothing is skipped until
    a step is started with `sat_step` (the `SATCallback` does it each optimizer step). Calling it again replaces the
    configuration and keeps the classes. Order with `apply`: call `apply` first (then the dense path is Litespark's).
    """
    cfg = LitesparkConfig.from_any(config)
    if overrides:
        cfg = LitesparkConfig.from_any({**cfg.to_dict(), **overrides})
    base = unwrap_model(model)
    layers = decoder_layers(base)
    if not layers:
        raise ValueError(f"SAT found no decoder layers (modules with self_attn and mlp) in {type(base).__name__}")
    exempt = _parse_exempt(cfg.sat_exempt_layers, len(layers))
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    sparse_attention = model_type in SAT_ATTENTION_MODEL_TYPES
    if not sparse_attention and cfg.sat_omission_rate_heads > 0:
        warnings.warn(f"SAT: the attention of model type {model_type!r} stays dense (SAT's sparse attention "
                      f"reproduces the attention of {', '.join(sorted(SAT_ATTENTION_MODEL_TYPES))} only); "
                      f"sat_omission_rate_heads is not applied, the MLPs still run sparse", stacklevel=2)
    mlps, attns = [], []
    for i, layer in enumerate(layers):
        mlp, attn = layer.mlp, layer.self_attn
        if hasattr(mlp, "gate_proj") and hasattr(mlp, "down_proj"):
            mixin, units = SATGatedMLP, mlp.gate_proj.weight.shape[0]
        elif hasattr(mlp, "c_fc") and hasattr(mlp, "c_proj"):
            mixin, units = SATGeluMLP, mlp.c_fc.weight.shape[0]
        else:
            mixin = None
        if mixin is not None:
            if not is_sat_module(mlp):
                mlp.__class__ = sat_class(mixin, type(mlp))
            old = mlp.__dict__.get("_sat_state")
            st = LayerState("mlp", units, i)
            if old is not None and old.units == units:
                st.score, st.seen = old.score, old.seen
            st.exempt = i in exempt
            mlp._sat_state = st
            mlps.append(mlp)
        if sparse_attention and all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim")):
            head_dim = attn.head_dim
            n_kv = attn.k_proj.weight.shape[0] // head_dim
            n_rep = attn.q_proj.weight.shape[0] // head_dim // n_kv
            if not is_sat_module(attn):
                attn.__class__ = sat_class(SATAttention, type(attn))
            old = attn.__dict__.get("_sat_state")
            st = LayerState("attention", n_kv, i, n_rep=n_rep, head_dim=head_dim)
            if old is not None and old.units == n_kv:
                st.score, st.seen = old.score, old.seen
            st.exempt = i in exempt
            attn._sat_state = st
            attns.append(attn)
    base.__dict__[_STATE_ATTR] = SATController(cfg, mlps, attns, len(layers))
    return model


def disable_sat(model: nn.Module) -> nn.Module:
    """Undo `enable_sat`: the modules get back the class they had before it (Litespark or stock)."""
    base = unwrap_model(model)
    for m in base.modules():
        if is_sat_module(m):
            m.__class__ = base_class(m)
        m.__dict__.pop("_sat_state", None)
    base.__dict__.pop(_STATE_ATTR, None)
    return model


def controller(model: nn.Module) -> SATController | None:
    """The model's SAT controller, or None when SAT is not enabled."""
    return unwrap_model(model).__dict__.get(_STATE_ATTR)


def is_enabled(model: nn.Module) -> bool:
    return controller(model) is not None


def sat_step(model: nn.Module, step: int, max_steps: int | None = None) -> tuple[float, float]:
    """Start optimizer step ``step`` of ``max_steps`` (custom loops; the `SATCallback` calls it for the Trainer)."""
    ctrl = controller(model)
    if ctrl is None:
        return (0.0, 0.0)
    return ctrl.set_step(step, max_steps)


def omission_rates(model: nn.Module) -> dict[str, float]:
    """Scheduled rates of the current step and the fractions actually omitted (exempt layers and dense-refresh
    steps omit nothing)."""
    ctrl = controller(model)
    if ctrl is None:
        return {"mlp": 0.0, "heads": 0.0, "mlp_omitted": 0.0, "heads_omitted": 0.0}

    def omitted(mods):
        total = sum(m._sat_state.units for m in mods)
        return 0.0 if not total else 1.0 - sum(m._sat_state.kept() for m in mods) / total

    return {"mlp": ctrl.rates[0], "heads": ctrl.rates[1], "mlp_omitted": omitted(ctrl.mlps),
            "heads_omitted": omitted(ctrl.attns), "dense_refresh": float(ctrl.refresh)}


def executed_flops_per_token(model: nn.Module, seq_len: int | None = None) -> tuple[float, float]:
    """(executed, dense-equivalent) training FLOPs per token at the current selection.

    Convention of the project's MFU: ``6 * N + 12 * L * d_attn * T`` for the dense model (N all parameters, tied
    embeddings once; T = ``seq_len``, or 0 to leave the attention scores out); the executed count subtracts
    6 FLOPs per omitted parameter and the omitted heads' share of the attention scores. Without SAT both are dense.
    """
    ctrl = controller(model)
    if ctrl is None:
        base = unwrap_model(model)
        n = sum(p.numel() for p in base.parameters())
        dense = 6.0 * n
        if seq_len:
            for layer in decoder_layers(base):
                q = getattr(layer.self_attn, "q_proj", None)
                if q is not None:
                    dense += 12.0 * q.weight.shape[0] * seq_len
        return dense, dense
    return ctrl.flops_per_token(model, seq_len)


def executed_flops_fraction(model: nn.Module, seq_len: int | None = None) -> float:
    """Executed / dense-equivalent training FLOPs per token at the current selection (1.0 without SAT)."""
    executed, dense = executed_flops_per_token(model, seq_len)
    return executed / dense if dense else 1.0


# ---------------------------------------------------------------------- optimizer
def _adapter_slices(cuts) -> list:
    """(param, dim, what) of the PEFT LoRA adapters a selection cuts: ``cuts`` is (projection, dim, what) for each
    projection (dim 0: output rows cut -> its lora_B's rows; dim 1: input columns cut -> its lora_A's columns).
    Only projections SAT's LoRA path computes (`litespark_hf.sat.modules._lora_groups`) have them."""
    from ..modules.lora import lora_group

    out = []
    for proj, dim, what in cuts:
        if type(proj) is nn.Linear:
            continue
        group = lora_group([proj])
        term = None if group is None else group.terms[0]
        if term is not None:
            out.append((term.lora_B.weight, 0, what) if dim == 0 else (term.lora_A.weight, 1, what))
    return out


def _module_slices(m: nn.Module, kind: str, units, q_rows=None, kv_rows=None) -> list:
    """(param, dim, what) for the weights of one SAT module that a selection cuts: ``what`` is the omitted indices
    or the keep mask, over the MLP's channels (``units``) or the attention's query / KV rows. PEFT LoRA projections
    add their adapters' cut rows (lora_B) and columns (lora_A); their frozen base weights are listed too (an
    optimizer skips weights without gradients)."""
    if kind == "mlp":
        if hasattr(m, "gate_proj"):
            cuts = [(m.gate_proj, 0, units), (m.up_proj, 0, units), (m.down_proj, 1, units)]
            return [(p.weight, d, w) for p, d, w in cuts] + _adapter_slices(cuts)
        out = [(m.c_fc.weight, 0, units), (m.c_proj.weight, 1, units)]
        if m.c_fc.bias is not None:
            out.append((m.c_fc.bias, 0, units))
        return out
    cuts = [(m.q_proj, 0, q_rows), (m.k_proj, 0, kv_rows), (m.v_proj, 0, kv_rows), (m.o_proj, 1, q_rows)]
    out = [(p.weight, d, w) for p, d, w in cuts]
    for proj, rows in ((m.q_proj, q_rows), (m.k_proj, kv_rows), (m.v_proj, kv_rows)):
        if proj.bias is not None:
            out.append((proj.bias, 0, rows))
    return out + _adapter_slices(cuts)


def _cut_modules(ctrl: SATController) -> list[nn.Module]:
    out = []
    for m in ctrl.modules:
        st = m._sat_state
        if st.index is not None and st.omitted is not None and st.omitted.numel() > 0:
            out.append(m)
    return out


def _omitted_slices(ctrl: SATController):
    """(param, dim, omitted index) for every weight the current selection leaves out (indices computed at selection
    time, on the GPU: no host sync here)."""
    out = []
    for m in _cut_modules(ctrl):
        st = m._sat_state
        if st.kind == "mlp":
            out += _module_slices(m, "mlp", st.omitted)
        else:
            out += _module_slices(m, "attention", None, *st.omitted_rows)
    return out


def _kept_masks(ctrl: SATController):
    """(param, dim, keep mask) for the same weights as `_omitted_slices`: bool vectors over the rows (dim 0) or
    columns (dim 1), False where the selection omits. Built on the device from the omitted indices, batched like
    the selection (modules of equal shape share one scatter), with no host sync."""
    groups: dict[tuple, list[nn.Module]] = {}
    for m in _cut_modules(ctrl):
        st = m._sat_state
        key = (st.kind, st.units, st.omitted.numel(), st.n_rep, st.head_dim, st.omitted.device)
        groups.setdefault(key, []).append(m)
    out = []
    for (kind, units, _, n_rep, head_dim, device), mods in groups.items():
        n = len(mods)
        omitted = torch.stack([m._sat_state.omitted for m in mods])
        keep = torch.ones(n, units, dtype=torch.bool, device=device).scatter_(1, omitted, False)
        if kind == "mlp":
            for i, m in enumerate(mods):
                out += _module_slices(m, "mlp", keep[i])
            continue
        # KV group g owns query rows [g * n_rep * head_dim, (g + 1) * n_rep * head_dim) and KV rows
        # [g * head_dim, (g + 1) * head_dim) (the layout of `head_rows`)
        q = keep[:, :, None].expand(n, units, n_rep * head_dim).reshape(n, -1)
        kv = keep[:, :, None].expand(n, units, head_dim).reshape(n, -1)
        for i, m in enumerate(mods):
            out += _module_slices(m, "attention", None, q[i], kv[i])
    return out


class OmittedFreezer:
    """Snapshot of the omitted weights and their optimizer state, put back after the optimizer step.

    Per tensor one ``index_select`` before and one ``index_copy_`` after the step, with the omitted indices computed
    at selection time (no host sync, so the copies queue behind the backward). Only tensors the optimizer will
    actually change are saved: a parameter without a gradient is skipped by torch optimizers, and a parameter with
    no state yet (first step) has no moments to protect. This is the path of every optimizer but `LitesparkAdamW`,
    which freezes in its own launch (`StepFreezer`; `omitted_freezer` picks).
    """

    def __init__(self, model: nn.Module, optimizer):
        self.saved = []
        ctrl = controller(model)
        if ctrl is None or optimizer is None:
            return
        opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
        state = getattr(opt, "state", {})
        with torch.no_grad():
            for p, dim, om in _omitted_slices(ctrl):
                if p.grad is None:
                    continue  # torch optimizers leave a parameter without a gradient untouched
                if om.device != p.device:
                    om = om.to(p.device)
                entries = [(p, p.index_select(dim, om))]
                for value in state.get(p, {}).values():
                    if torch.is_tensor(value) and value.shape == p.shape:
                        entries.append((value, value.index_select(dim, om)))
                self.saved.append((dim, om, entries))

    def restore(self) -> None:
        with torch.no_grad():
            for dim, om, entries in self.saved:
                for tensor, values in entries:
                    tensor.index_copy_(dim, om, values)
        self.saved = []


class StepFreezer:
    """The omitted weights frozen inside `LitesparkAdamW`'s step: the kept masks (`_kept_masks`) are handed to
    `LitesparkAdamW.set_frozen` before the step, whose one launch neither reads nor writes the omitted rows/columns
    of the weights, their moments and their low-precision copies (no snapshot, no copy back). Same result, bit for
    bit, as an `OmittedFreezer` around the same optimizer. `restore` withdraws masks a skipped step (e.g. an fp16
    overflow) did not consume, so they cannot leak into a later step."""

    def __init__(self, model: nn.Module, optimizer: LitesparkAdamW):
        self.optimizer = optimizer
        ctrl = controller(model)
        entries = _kept_masks(ctrl) if ctrl is not None else []
        optimizer.set_frozen({p: (dim, keep) for p, dim, keep in entries} if entries else None)

    def restore(self) -> None:
        self.optimizer.set_frozen(None)


def omitted_freezer(model: nn.Module, optimizer) -> OmittedFreezer | StepFreezer:
    """Build before ``optimizer.step()``, call ``.restore()`` after it: the omitted weights and their optimizer
    state are left unchanged by the step. `LitesparkAdamW` (also inside accelerate's ``AcceleratedOptimizer``)
    takes the kept masks into its step (`StepFreezer`); any other optimizer gets the save-and-restore
    `OmittedFreezer`."""
    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    if isinstance(opt, LitesparkAdamW):
        return StepFreezer(model, opt)
    return OmittedFreezer(model, optimizer)


@contextlib.contextmanager
def frozen_omitted(model: nn.Module, optimizer):
    """``with frozen_omitted(model, opt): opt.step()``: omitted weights and their optimizer state stay unchanged.

    With SAT the omitted weights' gradients are exactly zero; a stateful optimizer would still move them (AdamW:
    momentum and decoupled weight decay) and decay their moments. Inside this context the step runs as usual and
    the omitted rows/columns of each parameter and of its same-shaped optimizer state tensors (Adam's exp_avg,
    exp_avg_sq) are left as they were: `LitesparkAdamW` skips them inside its step (kept masks), other optimizers
    get them put back afterwards. Scalar state (Adam's per-tensor step count) still advances.
    """
    freezer = omitted_freezer(model, optimizer)
    try:
        yield
    finally:
        freezer.restore()


def record_seq_len(model: nn.Module, seq_len: int) -> None:
    ctrl = controller(model)
    if ctrl is not None:
        ctrl.seq_len = int(seq_len)


