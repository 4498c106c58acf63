"""PEFT LoRA projections fused into the Litespark projection groups (q/k/v, gate/up, o, down).

PEFT's ``lora.Linear`` computes ``base_layer(x) + lora_B(lora_A(dropout(x.to(lora_A.dtype)))) * scaling`` (cast
back to the base output's dtype), one module at a time: q, k and v make three base GEMMs. When every projection of
a group is a plain ``nn.Linear`` or a LoRA ``Linear`` in a state reproduced here exactly (`lora_group`),
`lora_project` computes the same thing with the group's frozen base weights as ONE `fused_linear` GEMM (no weight
gradient for frozen weights), the adapters' A's as one more GEMM when no dropout is drawn (else each projection's
own dropout module, in PEFT's order, so the masks are the same draws, and its own A), each B, and the sum written
in PEFT's dtype. PEFT's modules, parameters and state dicts stay as they are; anything else (several active
adapters, merged adapters, DoRA and the other LoRA variants, LoRA biases, hooks, a quantised or sharded base, ...)
makes `lora_group` answer None, and the caller calls the modules.
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn

import litespark_kernels as lk
from litespark_kernels._dispatch import autocast_dtype
from litespark_kernels.ops.linear import _plain_tensor
from litespark_kernels.ops.lora_linear import lora_linear

from .decoder import _hookless


def _lora_linear_class() -> type | None:
    """PEFT's ``lora.Linear`` if peft is imported (no module can be one otherwise: peft is never imported here)."""
    layer = sys.modules.get("peft.tuners.lora.layer")
    return getattr(layer, "Linear", None)


def _untouched(module: nn.Module) -> bool:
    """Nothing a module call would run besides ``forward``: no hooks (forward, backward, global), no instance
    ``forward`` (accelerate's device hooks replace it)."""
    return (_hookless(module) and not module._backward_hooks and not module._backward_pre_hooks
            and not nn.modules.module._global_backward_hooks and not nn.modules.module._global_backward_pre_hooks
            and "forward" not in module.__dict__)


def _plain_linear(m: nn.Module, bias: bool = True) -> bool:
    return (type(m) is nn.Linear and _untouched(m) and _plain_tensor(m.weight)
            and (m.bias is None if not bias else _plain_tensor(m.bias)))


class LoraTerm:
    """One projection's adapter: ``lora_B(lora_A(dropout(x))) * scaling``."""

    __slots__ = ("lora_A", "lora_B", "dropout", "scaling", "no_dropout")

    def __init__(self, lora_A: nn.Linear, lora_B: nn.Linear, dropout: nn.Module, scaling):
        self.lora_A, self.lora_B, self.dropout, self.scaling = lora_A, lora_B, dropout, scaling
        # nn.Identity (lora_dropout=0), or nn.Dropout outside training (returns its input, draws nothing)
        self.no_dropout = type(dropout) is nn.Identity or not dropout.training


class LoraGroup:
    """Projections reading one input: ``base`` (the plain ``nn.Linear`` of each: itself, or the LoRA base layer)
    and ``terms`` (each one's `LoraTerm`, None for a plain projection or one whose adapters add nothing)."""

    __slots__ = ("base", "terms", "sizes")

    def __init__(self, base: tuple[nn.Linear, ...], terms: tuple[LoraTerm | None, ...]):
        self.base, self.terms = base, terms
        self.sizes = [lin.out_features for lin in base]

    @property
    def casts_input(self) -> bool:
        """True when the input reaches only `fused_linear` (no dropout multiplies it in its own dtype), so a norm
        may hand it over in the autocast dtype (see `LitesparkRMSNorm`)."""
        return all(t is None or t.no_dropout for t in self.terms)


_FALLBACK = object()


def _member(m: nn.Module, lora_cls: type | None):
    """(base Linear, `LoraTerm` or None) when ``m(x)`` is reproduced exactly, else `_FALLBACK`."""
    if type(m) is nn.Linear:
        return (m, None) if _plain_linear(m) else _FALLBACK
    if lora_cls is None or type(m) is not lora_cls or not _untouched(m):
        return _FALLBACK
    base = m.base_layer
    if not _plain_linear(base) or m.fan_in_fan_out or m._caches:
        return _FALLBACK
    if m.disable_adapters:  # PEFT: base_layer(x) (after unmerging merged adapters: a side effect, left to PEFT)
        return _FALLBACK if m.merged else (base, None)
    if m.merged:  # base_layer(x) on weights PEFT edited through .data (unseen by version counters): left to PEFT
        return _FALLBACK
    active = [a for a in m.active_adapters if a in m.lora_A]
    if not active:  # PEFT skips adapters this layer lacks: base_layer(x)
        return base, None
    if len(active) > 1 or not getattr(m, "cast_input_dtype_enabled", True):
        return _FALLBACK
    name = active[0]
    if (m.use_dora.get(name, False) or m.lora_bias.get(name, False) or name in m.lora_variant
            or name in m.lora_magnitude_vector):
        return _FALLBACK
    lora_A, lora_B, dropout = m.lora_A[name], m.lora_B[name], m.lora_dropout[name]
    if not (_plain_linear(lora_A, bias=False) and _plain_linear(lora_B, bias=False)
            and type(dropout) in (nn.Identity, nn.Dropout) and _untouched(dropout)):
        return _FALLBACK
    return base, LoraTerm(lora_A, lora_B, dropout, m.scaling[name])


def lora_group(linears) -> LoraGroup | None:
    """The `LoraGroup` of projections that read one input (plain ``nn.Linear`` or PEFT LoRA ``Linear``), or None
    when one of them is in a state `lora_project` does not reproduce (the caller calls the modules then).

    A LoRA projection is reproduced when its base layer is a plain ``nn.Linear`` and either its adapters are
    disabled (and not merged: PEFT computes ``base_layer(x)``), or exactly one active adapter of this layer is
    unmerged vanilla LoRA: no DoRA / other ``lora_variant``, no LoRA bias, plain ``nn.Linear`` A and B, an
    ``nn.Identity`` or ``nn.Dropout`` dropout, input casting enabled, no ``fan_in_fan_out``, no ad hoc ``_caches``,
    no hooks on any of these modules (PEFT's mixed-batch ``adapter_names`` arrive through forward pre-hooks), and
    unsharded weights.
    """
    lora_cls = _lora_linear_class()
    base, terms = [], []
    for m in linears:
        got = _member(m, lora_cls)
        if got is _FALLBACK:
            return None
        base.append(got[0])
        terms.append(got[1])
    return LoraGroup(tuple(base), tuple(terms))


def fused_bases(linears) -> list[nn.Linear] | None:
    """The Linears whose weights the fused path reads in one GEMM (for the cast groups): the projections
    themselves when plain, their base layers in a `LoraGroup`, None when they are called as modules."""
    if all(type(m) is nn.Linear for m in linears):
        return list(linears)
    group = lora_group(linears)
    return None if group is None else list(group.base)


def _lora_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """PEFT's ``x.to(lora_A.weight.dtype)``, skipped under autocast where the GEMM's cast to the autocast dtype
    then gives the same values (a widening to fp32, or a cast to the autocast dtype itself)."""
    if x.dtype == dtype:
        return x
    cast_to = autocast_dtype(x.device.type)
    if cast_to is not None and (dtype == cast_to or (dtype == torch.float32 and x.dtype in (
            torch.float16, torch.bfloat16))):
        return x
    return x.to(dtype)


def _adapter_outputs(x: torch.Tensor, terms) -> list[torch.Tensor | None]:
    """Each term's ``lora_B(lora_A(dropout(x))) * scaling`` (None where there is none), in PEFT's order."""
    live = [t for t in terms if t is not None]
    if not live:
        return [None] * len(terms)
    a_dtypes = {t.lora_A.weight.dtype for t in live}
    if len(a_dtypes) == 1 and all(t.no_dropout for t in live):  # every A reads the same input: one GEMM
        a = lk.fused_linear(_lora_input(x, a_dtypes.pop()), [t.lora_A.weight for t in live])
        hidden = a.split([t.lora_A.out_features for t in live], dim=-1) if len(live) > 1 else (a,)
    else:  # each projection's own dropout mask (drawn in module order, as PEFT does) and its own A
        hidden = [lk.fused_linear(t.dropout(x.to(t.lora_A.weight.dtype)), [t.lora_A.weight]) for t in live]
    outs = iter(lk.fused_linear(h, [t.lora_B.weight]) * t.scaling for h, t in zip(hidden, live))
    return [None if t is None else next(outs) for t in terms]


def _one_node(x: torch.Tensor, group: LoraGroup, cast: torch.Tensor | None) -> torch.Tensor | None:
    """The group and its adapters as one autograd node (`litespark_kernels.ops.lora_linear`: four GEMMs forward,
    five backward, instead of ~3-5 nodes per adapter), or None where that does not hold PEFT's semantics or does
    not apply: a dropout mask to draw, a trainable base weight, adapters in another dtype than the computation
    outside autocast (PEFT computes them in theirs), or tracing by torch.compile (the custom ops path)."""
    live = [(i, t) for i, t in enumerate(group.terms) if t is not None]
    if not live or torch.compiler.is_compiling() or not all(t.no_dropout for _, t in live):
        return None
    for lin in group.base:
        if lin.weight.requires_grad or (lin.bias is not None and lin.bias.requires_grad):
            return None
    a_ws = [t.lora_A.weight for _, t in live]
    b_ws = [t.lora_B.weight for _, t in live]
    if autocast_dtype(x.device.type) is None:
        cdt = torch.promote_types(x.dtype, group.base[0].weight.dtype)
        if any(w.dtype != cdt for w in (*a_ws, *b_ws)) or x.dtype != cdt:
            return None
    return lora_linear(x, [lin.weight for lin in group.base], [lin.bias for lin in group.base], a_ws, b_ws,
                       [t.scaling for _, t in live], [i for i, _ in live], cast)


def lora_project(x: torch.Tensor, group: LoraGroup, cast: torch.Tensor | None = None, split: bool = False,
                 fp8: bool = False):
    """Every projection of ``group`` applied to ``x``, as PEFT computes it: concatenated along the last dimension
    (like `project`), or the list of outputs with ``split``.

    ``cast``: the base weights already cast for this forward (`cast_projection_weights`), or None; ``fp8``: the base
    GEMM in float8 (the adapters' small GEMMs stay in the compute dtype).
    """
    if not fp8:
        out = _one_node(x, group, cast)
        if out is not None:
            return out.split(group.sizes, dim=-1) if split else out
    base = lk.fused_linear(x, [lin.weight for lin in group.base], [lin.bias for lin in group.base], cast, fp8=fp8)
    if all(t is None for t in group.terms):  # no adapter adds anything (disabled: TRL DPO's reference pass)
        return list(base.split(group.sizes, dim=-1)) if split else base
    parts = base.split(group.sizes, dim=-1) if len(group.sizes) > 1 else (base,)
    # PEFT: ``(base_layer(x) + lora).to(base_layer(x).dtype)``
    outs = [p if d is None else (p + d).to(p.dtype) for p, d in zip(parts, _adapter_outputs(x, group.terms))]
    if split:
        return outs
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
