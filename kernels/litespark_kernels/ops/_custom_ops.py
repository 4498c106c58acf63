"""The Triton kernels as ``torch.library`` custom ops (namespace ``litespark``), for ``torch.compile`` only.

Eager calls keep the autograd Functions of the ``_<op>_triton`` modules: a custom op costs dispatcher time on every
call, and the eager training step is host-bound. While Dynamo traces (``torch.compiler.is_compiling()``), the op
entry points (`litespark_kernels._dispatch.run_triton`, `litespark_kernels.ops.linear.fused_linear`) call the
functions of ``COMPILED`` below instead, so a compiled region runs through the kernels without a graph break.

Each op is a forward custom op and a backward custom op whose bodies call the same launchers the autograd Function
calls (same numbers), a fake implementation of each (the output shapes, dtypes and strides the launchers produce),
and ``register_autograd`` wiring the forward to the backward. No op mutates its inputs or returns one of them (or a
view of one): where a Function saves a tensor it made from an input (a cast, a concatenation), the forward op
returns it as an extra output, empty (numel 0) when it would be the input itself, and the input is saved instead.

Not here, on purpose:
- the fused loss's backward is a scale of the gradients its forward computed (``grad * grad_output``), written as
  plain torch ops in its ``register_autograd`` backward (Inductor fuses it; an opaque op would add nothing);
- ``tied_embedding`` (its hand-over slot is Python state; `LitesparkEmbedding` takes the stock lookup while
  compiling), ``grouped_linear`` (torch ATen ops with their own autograd, traced as they are) and the optimizer
  (outside the compiled model) keep their eager paths; ``label_count`` (a host copy behind a CUDA event) is not
  passed to the compiled loss, which counts the labels itself (one host read inside the op).

Imported on the first compiled call (`litespark_kernels._dispatch.run_triton`), not with the package.
"""

import importlib
import inspect
import math
from typing import Optional

import torch

from .._dispatch import as_rows

Tensor = torch.Tensor

_TAGS = {}
if "tags" in inspect.signature(torch.library.custom_op).parameters and hasattr(torch.Tag, "needs_exact_strides"):
    # Inductor passes the inputs with the strides seen while tracing (the default of recent torch, made explicit):
    # the kernels' output layouts (RoPE's, attention's gradients) follow their inputs' strides.
    _TAGS = {"tags": (torch.Tag.needs_exact_strides,)}


def _op(name: str):
    return torch.library.custom_op(f"litespark::{name}", mutates_args=(), **_TAGS)


_MODULES: dict = {}


def _mod(name: str):
    """``litespark_kernels.ops.<name>`` (the Triton modules are imported when an op first runs). For the op bodies
    and fakes only: Dynamo does not trace ``importlib`` (a graph break), so the traced entry points below use
    ``from . import`` statements instead."""
    mod = _MODULES.get(name)
    if mod is None:
        mod = _MODULES[name] = importlib.import_module(f"litespark_kernels.ops.{name}")
    return mod


def _none(t: Tensor) -> Tensor:
    """An empty placeholder output (custom ops return no None tensors)."""
    return t.new_empty((0,))


def _rows(t: Tensor) -> int:
    return math.prod(t.shape[:-1])


def _opt(x):
    return None if x is None else float(x)


# ---------------------------------------------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------------------------------------------


def _rms_out_dtype(in_dtype, weight_dtype, out_dtype, offset):
    if out_dtype is not None:
        return out_dtype
    if offset is not None:
        return in_dtype
    return torch.promote_types(weight_dtype, in_dtype)


@_op("rms_norm_fwd")
def rms_norm_fwd(x: Tensor, weight: Tensor, eps: float, out_dtype: Optional[torch.dtype],
                 offset: Optional[float]) -> tuple[Tensor, Tensor]:
    m = _mod("_rms_norm_triton")
    m._check(x, weight)
    y, _, rstd = m.rms_norm_forward(as_rows(x), None, weight.contiguous(), eps, out_dtype=out_dtype, offset=offset)
    return y.view(x.shape), rstd


@rms_norm_fwd.register_fake
def _(x, weight, eps, out_dtype, offset):
    dt = _rms_out_dtype(x.dtype, weight.dtype, out_dtype, offset)
    return x.new_empty(x.shape, dtype=dt), x.new_empty((_rows(x),), dtype=torch.float32)


@_op("rms_norm_bwd")
def rms_norm_bwd(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor,
                 offset: Optional[float]) -> tuple[Tensor, Tensor]:
    m = _mod("_rms_norm_triton")
    dx, dw = m.rms_norm_backward(as_rows(dy), None, as_rows(x), weight.contiguous(), rstd, offset=offset)
    return dx.view(x.shape), dw


@rms_norm_bwd.register_fake
def _(dy, x, weight, rstd, offset):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _rms_setup(ctx, inputs, output):
    x, weight, _eps, _out_dtype, offset = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.offset = offset


def _rms_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = rms_norm_bwd(dy, x, weight, rstd, ctx.offset)
    return dx, (dw if ctx.needs_input_grad[1] else None), None, None, None


rms_norm_fwd.register_autograd(_rms_backward, setup_context=_rms_setup)


def rms_norm(x, weight, eps=1e-6, out_dtype=None, offset=None):
    return rms_norm_fwd(x, weight, float(eps), out_dtype, _opt(offset))[0]


# ---------------------------------------------------------------------------------------------------------------
# Residual add + RMSNorm
# ---------------------------------------------------------------------------------------------------------------


@_op("add_rms_norm_fwd")
def add_rms_norm_fwd(x: Tensor, residual: Tensor, weight: Tensor, eps: float, out_dtype: Optional[torch.dtype],
                     offset: Optional[float]) -> tuple[Tensor, Tensor, Tensor]:
    m = _mod("_rms_norm_triton")
    m._check(x, weight)
    if residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} differs from x shape {tuple(x.shape)}")
    y, s, rstd = m.rms_norm_forward(as_rows(x), as_rows(residual), weight.contiguous(), eps, out_dtype=out_dtype,
                                    offset=offset)
    return y.view(x.shape), s.view(x.shape), rstd


@add_rms_norm_fwd.register_fake
def _(x, residual, weight, eps, out_dtype, offset):
    s_dtype = torch.promote_types(x.dtype, residual.dtype)
    dt = _rms_out_dtype(s_dtype, weight.dtype, out_dtype, offset)
    return (x.new_empty(x.shape, dtype=dt), x.new_empty(x.shape, dtype=s_dtype),
            x.new_empty((_rows(x),), dtype=torch.float32))


@_op("add_rms_norm_bwd")
def add_rms_norm_bwd(dy: Tensor, ds: Optional[Tensor], s: Tensor, weight: Tensor, rstd: Tensor,
                     dx2_dtype: Optional[torch.dtype], offset: Optional[float]) -> tuple[Tensor, Tensor, Tensor]:
    """(d(sum) [s.shape] in s.dtype, dweight, d(sum) rounded once to ``dx2_dtype`` or an empty placeholder)."""
    m = _mod("_rms_norm_triton")
    out = m.rms_norm_backward(as_rows(dy), None if ds is None else as_rows(ds), as_rows(s), weight.contiguous(),
                              rstd, dx2_dtype=dx2_dtype, offset=offset)
    dx2 = out[2].view(s.shape) if dx2_dtype is not None else _none(s)
    return out[0].view(s.shape), out[1], dx2


@add_rms_norm_bwd.register_fake
def _(dy, ds, s, weight, rstd, dx2_dtype, offset):
    dx2 = s.new_empty(s.shape, dtype=dx2_dtype) if dx2_dtype is not None else _none(s)
    return s.new_empty(s.shape), weight.new_empty(weight.shape), dx2


def _add_rms_setup(ctx, inputs, output):
    x, residual, weight, _eps, _out_dtype, offset = inputs
    ctx.save_for_backward(output[1], weight, output[2])
    ctx.dtypes = (x.dtype, residual.dtype)
    ctx.offset = offset


def _add_rms_backward(ctx, dy, ds, _drstd):
    # AddRMSNormFunction.backward, with the kernel launch behind the backward op
    s, weight, rstd = ctx.saved_tensors
    x_dtype, r_dtype = ctx.dtypes
    need = ctx.needs_input_grad
    dw = None
    if dy is None:  # only the sum was used downstream
        dsum = ds if ds is not None else torch.zeros_like(s)
        if need[2]:
            dw = torch.zeros_like(weight)
    else:
        two = need[0] and need[1] and x_dtype != s.dtype and r_dtype == s.dtype
        dsum, dw_, dx2 = add_rms_norm_bwd(dy, ds, s, weight, rstd, x_dtype if two else None, ctx.offset)
        dw = dw_ if need[2] else None
        if two:
            return dx2, dsum, dw, None, None, None
    dx = dsum.to(x_dtype) if need[0] else None
    dr = dsum.to(r_dtype) if need[1] else None
    return dx, dr, dw, None, None, None


add_rms_norm_fwd.register_autograd(_add_rms_backward, setup_context=_add_rms_setup)


def add_rms_norm(x, residual, weight, eps=1e-6, out_dtype=None, offset=None):
    y, s, _ = add_rms_norm_fwd(x, residual, weight, float(eps), out_dtype, _opt(offset))
    return y, s


# ---------------------------------------------------------------------------------------------------------------
# LayerNorm
# ---------------------------------------------------------------------------------------------------------------


def _ln_check(x, weight, bias):
    n = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != n or (bias is not None and tuple(bias.shape) != (n,)):
        raise ValueError(f"weight/bias shapes do not match hidden size {n}")


@_op("layer_norm_fwd")
def layer_norm_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor, Tensor]:
    _ln_check(x, weight, bias)
    y, mean, rstd = _mod("_layer_norm_triton").layer_norm_forward(
        as_rows(x), weight.contiguous(), None if bias is None else bias.contiguous(), eps)
    return y.view(x.shape), mean, rstd


@layer_norm_fwd.register_fake
def _(x, weight, bias, eps):
    r = _rows(x)
    return x.new_empty(x.shape), x.new_empty((r,), dtype=torch.float32), x.new_empty((r,), dtype=torch.float32)


@_op("layer_norm_bwd")
def layer_norm_bwd(dy: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor,
                   has_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight fp32 sums, dbias fp32 sums or an empty placeholder)."""
    dx, dw, db = _mod("_layer_norm_triton").layer_norm_backward(as_rows(dy), as_rows(x), weight.contiguous(),
                                                                 has_bias, mean, rstd)
    return dx.view(x.shape), dw, (db if has_bias else _none(dw))


@layer_norm_bwd.register_fake
def _(dy, x, weight, mean, rstd, has_bias):
    n = x.shape[-1]
    dw = x.new_empty((n,), dtype=torch.float32)
    return x.new_empty(x.shape), dw, (x.new_empty((n,), dtype=torch.float32) if has_bias else _none(dw))


def _ln_setup(ctx, inputs, output):
    x, weight, bias, _eps = inputs
    ctx.save_for_backward(x, weight, output[1], output[2])
    ctx.bias_dtype = None if bias is None else bias.dtype


def _ln_backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    has_bias = ctx.bias_dtype is not None
    dx, dw, db = layer_norm_bwd(dy, x, weight, mean, rstd, has_bias)
    dw = dw.to(weight.dtype) if ctx.needs_input_grad[1] else None
    db = db.to(ctx.bias_dtype) if has_bias and ctx.needs_input_grad[2] else None
    return dx, dw, db, None


layer_norm_fwd.register_autograd(_ln_backward, setup_context=_ln_setup)


def layer_norm(x, weight, bias, eps=1e-5):
    return layer_norm_fwd(x, weight, bias, float(eps))[0]


# ---------------------------------------------------------------------------------------------------------------
# RoPE
# ---------------------------------------------------------------------------------------------------------------


@_op("rope_fwd")
def rope_fwd(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    return _mod("_rope_triton").rope_launch(q, k, cos, sin, backward=False)


@rope_fwd.register_fake
def _(q, k, cos, sin):
    m = _mod("_rope_triton")  # the launcher's own output layout rule (`_out_like`)
    return m._out_like(q), m._out_like(k)


@_op("rope_bwd")
def rope_bwd(dq: Tensor, dk: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    return _mod("_rope_triton").rope_launch(dq, dk, cos, sin, backward=True)


@rope_bwd.register_fake
def _(dq, dk, cos, sin):
    m = _mod("_rope_triton")
    return m._out_like(dq), m._out_like(dk)


def _rope_setup(ctx, inputs, output):
    q, k, cos, sin = inputs
    ctx.save_for_backward(cos, sin)
    ctx.q_shape, ctx.k_shape = q.shape, k.shape


def _rope_backward(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    if dq is None or dk is None:  # one output unused (as RopeFunction)
        ref = dq if dq is not None else dk
        if dq is None:
            dq = ref.new_zeros(ctx.q_shape)
        if dk is None:
            dk = ref.new_zeros(ctx.k_shape)
    gq, gk = rope_bwd(dq, dk, cos, sin)
    return gq, gk, None, None


rope_fwd.register_autograd(_rope_backward, setup_context=_rope_setup)


def apply_rope(q, k, cos, sin):
    return rope_fwd(q, k, cos, sin)


# ---------------------------------------------------------------------------------------------------------------
# Gated activations (SwiGLU / GeGLU), separate and packed, and GELU-tanh + bias
# ---------------------------------------------------------------------------------------------------------------


@_op("glu_fwd")
def glu_fwd(gate: Tensor, up: Tensor, act: int) -> Tensor:
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    return _mod("_activations_triton").glu_forward(as_rows(gate), as_rows(up), act).view(gate.shape)


@glu_fwd.register_fake
def _(gate, up, act):
    return gate.new_empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype))


@_op("glu_bwd")
def glu_bwd(dy: Tensor, gate: Tensor, up: Tensor, act: int) -> tuple[Tensor, Tensor]:
    dg, du = _mod("_activations_triton").glu_backward(as_rows(dy), as_rows(gate), as_rows(up), act)
    return dg.view(gate.shape), du.view(gate.shape)


@glu_bwd.register_fake
def _(dy, gate, up, act):
    return gate.new_empty(gate.shape), up.new_empty(gate.shape)


def _glu_setup(ctx, inputs, output):
    gate, up, act = inputs
    ctx.save_for_backward(gate, up)
    ctx.act = act


def _glu_backward(ctx, dy):
    gate, up = ctx.saved_tensors
    dg, du = glu_bwd(dy, gate, up, ctx.act)
    return dg, du, None


glu_fwd.register_autograd(_glu_backward, setup_context=_glu_setup)


def _packed_half(gu: Tensor) -> int:
    if gu.shape[-1] % 2:
        raise ValueError(f"a packed gate+up needs an even last dimension, got {gu.shape[-1]}")
    return gu.shape[-1] // 2


@_op("glu_packed_fwd")
def glu_packed_fwd(gate_up: Tensor, act: int) -> Tensor:
    half = _packed_half(gate_up)
    gu2 = as_rows(gate_up)
    y = _mod("_activations_triton").glu_forward(gu2[:, :half], gu2[:, half:], act)
    return y.view(*gate_up.shape[:-1], half)


@glu_packed_fwd.register_fake
def _(gate_up, act):
    return gate_up.new_empty((*gate_up.shape[:-1], _packed_half(gate_up)))


@_op("glu_packed_bwd")
def glu_packed_bwd(dy: Tensor, gate_up: Tensor, act: int) -> Tensor:
    gu2 = as_rows(gate_up)
    half = gu2.shape[1] // 2
    d = torch.empty(gu2.shape, dtype=gu2.dtype, device=gu2.device)
    _mod("_activations_triton").glu_backward(as_rows(dy), gu2[:, :half], gu2[:, half:], act,
                                             out=(d[:, :half], d[:, half:]))
    return d.view(gate_up.shape)


@glu_packed_bwd.register_fake
def _(dy, gate_up, act):
    return gate_up.new_empty(gate_up.shape)


def _glu_packed_setup(ctx, inputs, output):
    gate_up, act = inputs
    ctx.save_for_backward(gate_up)
    ctx.act = act


def _glu_packed_backward(ctx, dy):
    (gate_up,) = ctx.saved_tensors
    return glu_packed_bwd(dy, gate_up, ctx.act), None


glu_packed_fwd.register_autograd(_glu_packed_backward, setup_context=_glu_packed_setup)


@_op("gelu_tanh_bias_fwd")
def gelu_tanh_bias_fwd(x: Tensor, bias: Optional[Tensor]) -> Tensor:
    if bias is not None:
        if tuple(bias.shape) != (x.shape[-1],):
            raise ValueError(f"bias of shape {tuple(bias.shape)} does not match last dimension {x.shape[-1]}")
        bias = bias.contiguous()
    return _mod("_activations_triton").gelu_bias_forward(as_rows(x), bias).view(x.shape)


@gelu_tanh_bias_fwd.register_fake
def _(x, bias):
    dt = x.dtype if bias is None else torch.promote_types(x.dtype, bias.dtype)
    return x.new_empty(x.shape, dtype=dt)


@_op("gelu_tanh_bias_bwd")
def gelu_tanh_bias_bwd(dy: Tensor, x: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(dx, dbias fp32 sums or an empty placeholder)."""
    b = None if bias is None else bias.contiguous()
    dx, db = _mod("_activations_triton").gelu_bias_backward(as_rows(dy), as_rows(x), b)
    return dx.view(x.shape), (db if db is not None else _none(dx))


@gelu_tanh_bias_bwd.register_fake
def _(dy, x, bias):
    db = x.new_empty((x.shape[-1],), dtype=torch.float32) if bias is not None else _none(x)
    return x.new_empty(x.shape), db


def _gelu_setup(ctx, inputs, output):
    x, bias = inputs
    ctx.save_for_backward(x, bias)


def _gelu_backward(ctx, dy):
    x, bias = ctx.saved_tensors
    dx, db = gelu_tanh_bias_bwd(dy, x, bias)
    db = db.to(bias.dtype) if bias is not None and ctx.needs_input_grad[1] else None
    return dx, db


gelu_tanh_bias_fwd.register_autograd(_gelu_backward, setup_context=_gelu_setup)


def _act(name: str) -> int:
    from . import _activations_triton as m

    return m.SILU if name == "silu" else m.GELU_TANH


def swiglu(gate, up):
    return glu_fwd(gate, up, _act("silu"))


def geglu(gate, up):
    return glu_fwd(gate, up, _act("gelu"))


def swiglu_packed(gate_up):
    return glu_packed_fwd(gate_up, _act("silu"))


def geglu_packed(gate_up):
    return glu_packed_fwd(gate_up, _act("gelu"))


def gelu_tanh_bias(x, bias):
    return gelu_tanh_bias_fwd(x, bias)


# ---------------------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------------------


def _unit_last(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@_op("attention_fwd")
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, q_segment_ids: Optional[Tensor],
                  kv_segment_ids: Optional[Tensor], sliding_window: Optional[int],
                  softcap: Optional[float]) -> tuple[Tensor, Tensor]:
    """(out [B, Sq, Hq, D], base-2 log-sum-exp [B, Hq, Sq] fp32), as `TritonAttention.forward`."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    segs = None if q_segment_ids is None else (q_segment_ids, kv_segment_ids)
    return _mod("_attention_triton").attention_forward(q, k, v, scale, causal, segs, sliding_window, softcap)


@attention_fwd.register_fake
def _(q, k, v, scale, causal, q_segment_ids, kv_segment_ids, sliding_window, softcap):
    B, Hq, Sq, D = q.shape
    return q.new_empty((B, Sq, Hq, D)), q.new_empty((B, Hq, Sq), dtype=torch.float32)


@_op("attention_bwd")
def attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float, causal: bool,
                  q_segment_ids: Optional[Tensor], kv_segment_ids: Optional[Tensor], sliding_window: Optional[int],
                  softcap: Optional[float]) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    segs = None if q_segment_ids is None else (q_segment_ids, kv_segment_ids)
    return _mod("_attention_triton").attention_backward(do, q, k, v, out, lse, scale, causal, segs, sliding_window,
                                                        softcap)


@attention_bwd.register_fake
def _(do, q, k, v, out, lse, scale, causal, q_segment_ids, kv_segment_ids, sliding_window, softcap):
    # the launcher's ``empty_like`` of q, k, v (after the unit-last-dimension copy): their strides
    return (torch.empty_like(_unit_last(q)), torch.empty_like(_unit_last(k)), torch.empty_like(_unit_last(v)))


def _attn_setup(ctx, inputs, output):
    q, k, v, scale, causal, q_seg, kv_seg, window, softcap = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, q_seg, kv_seg)
    ctx.args = (scale, causal, window, softcap)


def _attn_backward(ctx, do, _dlse):
    q, k, v, out, lse, q_seg, kv_seg = ctx.saved_tensors
    scale, causal, window, softcap = ctx.args
    dq, dk, dv = attention_bwd(do, q, k, v, out, lse, scale, causal, q_seg, kv_seg, window, softcap)
    return dq, dk, dv, None, None, None, None, None, None


attention_fwd.register_autograd(_attn_backward, setup_context=_attn_setup)


def attention(q, k, v, *, scale=None, causal=True, q_segment_ids=None, kv_segment_ids=None, sliding_window=None,
              dropout_p=0.0, softcap=None):
    """`attention_triton`'s argument handling, then the custom op (dropout: its traceable fallbacks)."""
    from .attention import _check_softcap, attention_reference, attention_sdpa

    _check_softcap(softcap)
    if dropout_p > 0.0:
        if softcap is None:
            return attention_sdpa(q, k, v, scale=scale, causal=causal, q_segment_ids=q_segment_ids,
                                  kv_segment_ids=kv_segment_ids, sliding_window=sliding_window, dropout_p=dropout_p)
        return attention_reference(q, k, v, scale=scale, causal=causal, q_segment_ids=q_segment_ids,
                                   kv_segment_ids=kv_segment_ids, sliding_window=sliding_window,
                                   dropout_p=dropout_p, softcap=softcap)
    from ._attention_triton import kernel_arguments

    scale, q_segment_ids, kv_segment_ids, sliding_window = kernel_arguments(
        q, k, v, scale, q_segment_ids, kv_segment_ids, sliding_window)
    return attention_fwd(q, k, v, scale, bool(causal), q_segment_ids, kv_segment_ids, sliding_window,
                         _opt(softcap))[0]


# ---------------------------------------------------------------------------------------------------------------
# Fused projections (`fused_linear`: several weights reading one input as one GEMM)
# ---------------------------------------------------------------------------------------------------------------


@_op("fused_linear_fwd")
def fused_linear_fwd(x: Tensor, weights: list[Tensor], biases: list[Tensor], has_bias: list[bool],
                     cast: Optional[Tensor], cdt: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(y [..., sum(out)] in ``cdt``, x cast to ``cdt`` as [M, in] or an empty placeholder when x already has that
    dtype, the [sum(out), in] weight in ``cdt`` or an empty placeholder when it is ``cast`` or the only weight
    itself). `_FusedLinear.forward`'s code; ``cast``: only when it fits (checked by `fused_linear`).

    ``biases``: the biases there are, ``has_bias``: which weight has one (a ``Tensor?[]`` input could not be given
    gradients)."""
    biases = _full_biases(biases, has_bias)
    w0 = weights[0]
    sizes = [w.shape[0] for w in weights]
    k = w0.shape[1]
    n_out = sum(sizes)
    fresh_w = True
    if cast is not None:
        w, fresh_w = cast, False
    elif len(weights) == 1:
        w = w0 if w0.dtype == cdt else w0.to(cdt)
        fresh_w = w0.dtype != cdt
    else:
        w = torch.empty((n_out, k), dtype=cdt, device=x.device)
        torch.cat(weights, out=w)
    from .linear import project_2d

    fresh_x = x.dtype != cdt
    x2, y = project_2d(x, w, biases, sizes, cdt)
    return y.view(*x.shape[:-1], n_out), (x2 if fresh_x else _none(y)), (w if fresh_w else _none(y))


def _full_biases(biases, has_bias) -> list:
    """The bias of each weight, None where it has none."""
    given = iter(biases)
    return [next(given) if h else None for h in has_bias]


def _fused_linear_saves(x, weights, cast, cdt) -> tuple[bool, bool]:
    """Whether the forward op returns its cast x and its weight (True) or they are inputs (False)."""
    return x.dtype != cdt, cast is None and (len(weights) > 1 or weights[0].dtype != cdt)


@fused_linear_fwd.register_fake
def _(x, weights, biases, has_bias, cast, cdt):
    k = weights[0].shape[1]
    n_out = sum(w.shape[0] for w in weights)
    fresh_x, fresh_w = _fused_linear_saves(x, weights, cast, cdt)
    y = x.new_empty((*x.shape[:-1], n_out), dtype=cdt)
    x2 = x.new_empty((_rows(x), k), dtype=cdt) if fresh_x else _none(y)
    w = x.new_empty((n_out, k), dtype=cdt) if fresh_w else _none(y)
    return y, x2, w


@_op("fused_linear_bwd")
def fused_linear_bwd(dy: Tensor, x2: Tensor, w: Tensor, x_dtype: torch.dtype, w_grad_dtype: torch.dtype,
                     need_x: bool, need_w: bool, need_b: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx [M, in] in ``x_dtype``, dweight [sum(out), in] in ``w_grad_dtype``, dbias fp32 [sum(out)]), each an empty
    placeholder when not needed: `_FusedLinear.backward`'s GEMMs (the split per weight is the caller's)."""
    mm = _mod("linear")._mm
    dy2 = dy.reshape(-1, dy.shape[-1]).to(w.dtype)
    dx = mm(dy2, w, x_dtype) if need_x else _none(dy2)
    dw = mm(dy2.t(), x2, w_grad_dtype) if need_w else _none(dy2)
    db = dy2.sum(0, dtype=torch.float32) if need_b else _none(dy2)
    return dx, dw, db


@fused_linear_bwd.register_fake
def _(dy, x2, w, x_dtype, w_grad_dtype, need_x, need_w, need_b):
    n_out, k = w.shape
    m = _rows(dy)
    dx = dy.new_empty((m, k), dtype=x_dtype) if need_x else _none(dy)
    dw = dy.new_empty((n_out, k), dtype=w_grad_dtype) if need_w else _none(dy)
    db = dy.new_empty((n_out,), dtype=torch.float32) if need_b else _none(dy)
    return dx, dw, db


def _fl_setup(ctx, inputs, output):
    x, weights, biases, has_bias, cast, cdt = inputs
    biases = _full_biases(biases, has_bias)
    fresh_x, fresh_w = _fused_linear_saves(x, weights, cast, cdt)
    x2 = output[1] if fresh_x else x
    w = output[2] if fresh_w else (cast if cast is not None else weights[0])
    ctx.save_for_backward(x2, w)
    ctx.meta = (x.shape, x.dtype, [wi.shape[0] for wi in weights], [wi.dtype for wi in weights],
                [bi.dtype if bi is not None else None for bi in biases])


def _fl_backward(ctx, dy, _dx2, _dw):
    x2, w = ctx.saved_tensors
    x_shape, x_dtype, sizes, w_dtypes, b_dtypes = ctx.meta
    n = len(sizes)
    x2 = x2.reshape(-1, w.shape[1])
    need = ctx.needs_input_grad
    need_x = bool(need[0])
    # a list input's gradient flags: per element where torch gives them, else one flag for the whole list
    need_w = list(need[1]) if isinstance(need[1], (list, tuple)) else [bool(need[1])] * n
    present = [i for i, bd in enumerate(b_dtypes) if bd is not None]
    need_given = list(need[2]) if isinstance(need[2], (list, tuple)) else [bool(need[2])] * len(present)
    need_b = [False] * n
    for i, nb in zip(present, need_given):
        need_b[i] = bool(nb)
    dtypes = {d for d, nw in zip(w_dtypes, need_w) if nw}
    gdt = dtypes.pop() if len(dtypes) == 1 else torch.float32
    dx, dw, db = fused_linear_bwd(dy, x2, w, x_dtype, gdt, need_x, any(need_w), any(need_b))
    dws, dbs = [None] * n, [None] * n
    r = 0
    for i, rows in enumerate(sizes):
        if need_w[i]:
            dws[i] = dw[r:r + rows] if dw.dtype == w_dtypes[i] else dw[r:r + rows].to(w_dtypes[i])
        if need_b[i]:
            dbs[i] = db[r:r + rows].to(b_dtypes[i])
        r += rows
    return (dx.view(x_shape) if need_x else None), dws, [dbs[i] for i in present], None, None, None


fused_linear_fwd.register_autograd(_fl_backward, setup_context=_fl_setup)


def fused_linear(x, weights, biases, cast):
    """`_FusedLinear.apply(x, n, cast, *weights, *biases)` through the custom op (checks done by the caller)."""
    from .linear import _compute_dtype

    cdt = _compute_dtype(x, weights[0])
    k = weights[0].shape[1]
    n_out = sum(w.shape[0] for w in weights)
    if cast is not None and not (cast.dtype == cdt and tuple(cast.shape) == (n_out, k)):
        cast = None
    has_bias = [b is not None for b in biases]
    return fused_linear_fwd(x, list(weights), [b for b in biases if b is not None], has_bias, cast, cdt)[0]


# ---------------------------------------------------------------------------------------------------------------
# Fused linear cross-entropy
# ---------------------------------------------------------------------------------------------------------------


@_op("fused_linear_cross_entropy_fwd")
def fused_linear_cross_entropy_fwd(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, ignore_index: int,
    num_items: Optional[Tensor], num_items_value: Optional[float], compute_dtype: torch.dtype,
    weight_cast: Optional[Tensor], softcap: Optional[float], need_gh: bool, need_gw: bool, need_gb: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, grad_hidden, grad_weight, grad_bias): `_FusedLinearCrossEntropy.forward`, the gradients not yet scaled
    by the loss's incoming gradient (each an empty placeholder when not needed)."""
    m = _mod("_fused_linear_cross_entropy_triton")
    h2d = hidden.reshape(-1, hidden.shape[-1]).to(compute_dtype)
    w = weight_cast if weight_cast is not None else weight.to(compute_dtype)
    b = bias.to(compute_dtype) if bias is not None else None
    n_items = num_items if num_items is not None else num_items_value
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        loss, gh, gw, gb = m._flce_compute(h2d, w, b, target, ignore_index, n_items, need_gh, need_gw, need_gb,
                                           softcap=softcap)
    gh = gh.view(hidden.shape).to(hidden.dtype) if gh is not None else _none(loss)
    gw = (gw if gw.dtype == weight.dtype else gw.to(weight.dtype)) if gw is not None else _none(loss)
    gb = (gb if gb.dtype == bias.dtype else gb.to(bias.dtype)) if gb is not None else _none(loss)
    return loss, gh, gw, gb


@fused_linear_cross_entropy_fwd.register_fake
def _(hidden, weight, bias, target, ignore_index, num_items, num_items_value, compute_dtype, weight_cast, softcap,
      need_gh, need_gw, need_gb):
    loss = hidden.new_empty((), dtype=torch.float32)
    if num_items is not None:  # losses.sum() / num_items: that division's dtype and shape
        loss = loss / num_items.to(hidden.device)
    gh = hidden.new_empty(hidden.shape) if need_gh else _none(loss)
    gw = weight.new_empty(weight.shape) if need_gw else _none(loss)
    gb = bias.new_empty(bias.shape) if need_gb else _none(loss)
    return loss, gh, gw, gb


def _flce_setup(ctx, inputs, output):
    ctx.save_for_backward(*output[1:])


def _flce_backward(ctx, dloss, _dgh, _dgw, _dgb):
    gh, gw, gb = ctx.saved_tensors
    need = ctx.needs_input_grad
    g = dloss.reshape(1).to(torch.float32)

    def scaled(t):  # as `_scale_unless_one`: the product in fp32, rounded once
        return t * g if t.dtype == torch.float32 else (t.to(torch.float32) * g).to(t.dtype)

    return ((scaled(gh) if need[0] else None), (scaled(gw) if need[1] else None), (scaled(gb) if need[2] else None),
            None, None, None, None, None, None, None, None, None, None)


fused_linear_cross_entropy_fwd.register_autograd(_flce_backward, setup_context=_flce_setup)


def fused_linear_cross_entropy(hidden, weight, labels=None, *, bias=None, shift_labels=None, ignore_index=-100,
                               num_items_in_batch=None, label_count=None, tied_grad=None, weight_cast=None,
                               softcap=None, _options=None):
    """`fused_linear_cross_entropy_triton`'s argument handling, then the custom op. ``label_count`` and
    ``tied_grad`` are not used (see the module docstring); ``_options`` (tests, tuning) takes the eager Function."""
    if _options:  # tuning and tests: the autograd Function, called eagerly (a graph break)
        from .._dispatch import _eager_call

        return _eager_call("_fused_linear_cross_entropy_triton", "fused_linear_cross_entropy_triton", hidden, weight,
                           labels, bias=bias, shift_labels=shift_labels, ignore_index=ignore_index,
                           num_items_in_batch=num_items_in_batch, label_count=label_count, tied_grad=tied_grad,
                           weight_cast=weight_cast, softcap=softcap, _options=_options)
    from ._fused_linear_cross_entropy_triton import loss_arguments

    target, softcap = loss_arguments(hidden, weight, labels, shift_labels, ignore_index, softcap)
    from .._dispatch import autocast_dtype

    compute_dtype = autocast_dtype(hidden.device.type) or hidden.dtype
    if weight_cast is not None and (weight_cast.dtype != compute_dtype or weight_cast.shape != weight.shape
                                    or weight_cast.device != weight.device):
        weight_cast = None
    grad = torch.is_grad_enabled()
    need_gh = grad and hidden.requires_grad
    need_gw = grad and weight.requires_grad
    need_gb = grad and bias is not None and bias.requires_grad
    if torch.is_tensor(num_items_in_batch):
        items, value = num_items_in_batch, None
    else:
        items, value = None, (None if num_items_in_batch is None else float(num_items_in_batch))
    return fused_linear_cross_entropy_fwd(hidden, weight, bias, target, int(ignore_index), items, value,
                                          compute_dtype, weight_cast, softcap, need_gh, need_gw, need_gb)[0]


# ---------------------------------------------------------------------------------------------------------------
# What `run_triton` calls while compiling: (Triton module, entry point) -> the custom-op version
# ---------------------------------------------------------------------------------------------------------------

COMPILED = {
    ("_rms_norm_triton", "rms_norm_triton"): rms_norm,
    ("_rms_norm_triton", "add_rms_norm_triton"): add_rms_norm,
    ("_layer_norm_triton", "layer_norm_triton"): layer_norm,
    ("_rope_triton", "apply_rope_triton"): apply_rope,
    ("_activations_triton", "swiglu_triton"): swiglu,
    ("_activations_triton", "geglu_triton"): geglu,
    ("_activations_triton", "swiglu_packed_triton"): swiglu_packed,
    ("_activations_triton", "geglu_packed_triton"): geglu_packed,
    ("_activations_triton", "gelu_tanh_bias_triton"): gelu_tanh_bias,
    ("_attention_triton", "attention_triton"): attention,
    ("_fused_linear_cross_entropy_triton", "fused_linear_cross_entropy_triton"): fused_linear_cross_entropy,
}
