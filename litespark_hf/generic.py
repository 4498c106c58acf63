"""The generic path: Litespark layers for a decoder-only causal LM outside the architecture table.

`litespark_hf.apply` takes this path for a model type that `litespark_hf.architectures` does not list (unless
``allow_partial=True``, which keeps the attention backend alone, or ``generic=False``). It recognises modules by their
structure, checks each recognised class against its own stock forward on the model's own configuration, and swaps
only what passes:

- RMSNorm-like modules (a 1-D ``weight``, no bias, no children, an eps attribute ``variance_epsilon`` or ``eps``)
  in one of the three conventions the norm kernel computes: Llama's ``weight * x_hat.to(dtype)`` (`GenericRMSNorm`),
  Gemma's ``x_hat * (1 + weight)`` in fp32 (`GenericOffsetRMSNorm`) or the weight applied before the rounding
  (``(weight * x_hat).to(dtype)``, OLMo / Helium: `GenericWeightFirstRMSNorm`). The first that passes is taken; a
  LayerNorm (mean subtracted) passes none and stays stock.
- Gated MLPs: exactly ``gate_proj`` / ``up_proj`` / ``down_proj`` (``nn.Linear`` without bias, or PEFT LoRA layers
  over one) and an ``act_fn`` with a fused kernel (SiLU -> SwiGLU, GELU-tanh -> GeGLU): `LitesparkGatedMLP`.
- Llama-structured attention (``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj``, ``position_embeddings`` in its
  forward): `LitesparkLayerWindowAttention` (the window is the module's ``sliding_window``) or, failing that,
  `LitesparkConfigWindowAttention` (``config.sliding_window``). The RoPE kernel is transformers' ``rotate_half``
  convention, so an interleaved rotary (Cohere, Helium, GLM) fails the check and stays stock.
- Pre-norm decoder layers with exactly ``input_layernorm`` / ``self_attn`` / ``post_attention_layernorm`` / ``mlp``
  whose post-attention norm was swapped for a Llama- or Gemma-convention norm: `LitesparkDecoderLayer` (the
  attention's residual add fused into that norm). The MLP's residual add is not handed on to the next layer's norm
  (the table's families do that): that hand-off assumes the model's forward passes each layer's output, untouched,
  to the next layer, which a per-module check cannot see.

The check (`_check_class`): the module is cloned onto the CPU in float32 with random weights of its own shapes (the
model's weights are never read or copied; buffers such as a rotary ``inv_freq`` are), once stock and once swapped,
and both are run on the same random input - attention and decoder layers with the model's own rotary embedding's
``position_embeddings`` - forward and backward, in training mode, with the same random state (so a dropout stock
draws and Litespark does not shows). Outputs, the input's and every parameter's gradient must agree within relative
error 1e-5; norms are also run on a bfloat16 input with float32 weights, where the output dtype must match stock's
(that separates Llama's rounding from the weight-first one). Attention functions are not compared by their output
only: a recording attention function takes the place of the backend in both runs and every argument the module hands
it (q, k, v, scaling, dropout, sliding_window, softcap, sinks, ...) must be equal, so a feature stock passes and the
Litespark module would drop (Gemma2's soft-cap, GPT-OSS's sinks, a window wider than the probe) fails the check
instead of being lost. A class is checked once per kind of layer it is used in (its instances grouped by their
scalar attributes and ``config.layer_types[layer_idx]``), and swapped only if every group passes.

Left stock, always: the causal-LM head and its loss (logit scalings and soft-caps are the model forward's own), the
embedding, the model forward; padded batches stay padded (no `litespark_hf.unpadding`, which assumes every op but
attention is token-wise). The ``litespark`` attention backend itself honours or refuses what it is passed (soft-cap
and sinks on its PyTorch reference, masks that are not plain causal from transformers, anything else an error).
`apply` warns once per model type and plan, listing what was swapped and what was left stock and why.
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from litespark_kernels import _dispatch

from .architectures import SWAP_KINDS
from .attention import _INERT_KWARGS
from .modules import (
    LitesparkConfigWindowAttention, LitesparkDecoderLayer, LitesparkGatedMLP, LitesparkLayerWindowAttention,
    LitesparkRMSNorm, fused_gated_activation, link_norm_consumers, original_class, swapped_class,
)
from .modules.families import LitesparkOlmoRMSNorm
from .modules.gemma import LitesparkGemmaRMSNorm

TOLERANCE = 1e-5  # relative error (norm of the difference / norm of stock) of outputs and gradients
PROBE_ATTENTION = "litespark_generic_probe"  # the recording attention function the checks run under
_PROBE_SEQ = 7


def _eps(module: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        value = module.__dict__.get(name)
        if isinstance(value, float) and not isinstance(value, bool):
            return value
    return None


class GenericRMSNorm(LitesparkRMSNorm):
    """A model's own RMSNorm in Llama's convention (``weight * x_hat.to(dtype)``), eps ``variance_epsilon`` or
    ``eps``."""

    def _litespark_eps(self) -> float:
        return _eps(self)


class GenericOffsetRMSNorm(LitesparkGemmaRMSNorm):
    """A model's own RMSNorm in Gemma's convention (``x_hat * (1 + weight)`` in fp32)."""

    def _litespark_eps(self) -> float:
        return _eps(self)


class GenericWeightFirstRMSNorm(LitesparkOlmoRMSNorm):
    """A model's own RMSNorm with the weight applied before the rounding (``(weight * x_hat).to(dtype)``)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        from litespark_kernels import rms_norm

        dtype = hidden_states.dtype
        x = hidden_states if dtype == torch.float32 else hidden_states.float()
        return rms_norm(x, self.weight, _eps(self), out_dtype=dtype)


# candidates per module role, tried in order: (swap kind, mixin)
_NORMS = (("rms_norm", GenericRMSNorm), ("gemma_rms_norm", GenericOffsetRMSNorm),
          ("olmo_rms_norm", GenericWeightFirstRMSNorm))
_MLPS = (("gated_mlp", LitesparkGatedMLP),)
_ATTENTIONS = (("attention_layer_window", LitesparkLayerWindowAttention),
               ("attention_config_window", LitesparkConfigWindowAttention))
_DECODERS = (("decoder_layer", LitesparkDecoderLayer),)
_MIXIN_KIND = {mixin: kind for group in (_NORMS, _MLPS, _ATTENTIONS, _DECODERS) for kind, mixin in group}


@dataclass
class GenericPlan:
    """What the generic path swaps in one model: ``swaps`` (stock class -> (swap kind, mixin)), each checked against
    its stock forward, and ``left`` (class name -> why it stays stock)."""

    model_type: str
    swaps: dict = field(default_factory=dict)
    left: dict = field(default_factory=dict)

    def report(self) -> dict:
        return {"swapped": {cls.__name__: kind for cls, (kind, _) in self.swaps.items()}, "left_stock": dict(self.left)}

    def warning(self) -> str:
        swapped = ", ".join(f"{cls.__name__} -> {kind}" for cls, (kind, _) in self.swaps.items())
        left = "; ".join(f"{name} ({why})" for name, why in self.left.items())
        return (f"litespark: model type {self.model_type!r} is not in the architecture table; generic path: the "
                f"litespark attention backend, and, each checked against its stock forward on this model's config: "
                f"{swapped}. Left stock: {left}. Padded batches stay padded; the loss is the stock one.")


_WARNED: set = set()


def warn_once(plan: GenericPlan) -> None:
    key = (plan.model_type, tuple(sorted(plan.report()["swapped"].items())), tuple(plan.left.items()))
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(plan.warning(), stacklevel=3)


def not_a_decoder_lm(model: nn.Module) -> str | None:
    """Why ``model`` (unwrapped) is not a decoder-only causal LM the generic path can take, or None."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = getattr(model, "config", None)
    name = type(model).__name__
    if config is None:
        return f"{name} has no transformers config"
    if getattr(config, "is_encoder_decoder", False):
        return f"{name} is an encoder-decoder model, not a decoder-only causal LM"
    causal = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        causal.update(value if isinstance(value, (tuple, list)) else (value,))
    if name not in causal and not name.endswith("ForCausalLM"):
        return f"{name} is not a decoder-only causal LM (an AutoModelForCausalLM class)"
    return None


# ------------------------------------------------------------------------------------------------ recognition
def _linear_like(m) -> bool:
    """``nn.Linear`` without bias, or a PEFT LoRA layer over one."""
    base = m if type(m) is nn.Linear else getattr(m, "base_layer", None)
    return type(base) is nn.Linear and base.bias is None


def _params(m: nn.Module) -> dict:
    return {n: p for n, p in m._parameters.items() if p is not None}


def _children(m: nn.Module) -> dict:
    return {n: c for n, c in m._modules.items() if c is not None}


def _takes_position_embeddings(cls: type) -> bool:
    try:
        return "position_embeddings" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False


def _role(m: nn.Module) -> tuple[str | None, str | None]:
    """(role, None) for a module of a recognised structure, (None, why not) for a near miss, (None, None) else."""
    params, children, name = _params(m), _children(m), type(m).__name__
    weight = params.get("weight")
    if weight is not None and weight.dim() == 1 and len(params) == 1 and not children and _eps(m) is not None:
        return "norm", None
    if {"gate_proj", "up_proj", "down_proj"} <= set(children):
        if set(children) != {"gate_proj", "up_proj", "down_proj", "act_fn"} or params:
            return None, "a gated MLP with other parts than gate_proj/up_proj/down_proj/act_fn"
        if not all(_linear_like(children[n]) for n in ("gate_proj", "up_proj", "down_proj")):
            return None, "gated MLP projections that are not nn.Linear without bias"
        if fused_gated_activation(children["act_fn"]) is None:
            return None, f"activation {type(children['act_fn']).__name__} has no fused kernel (SiLU, GELU-tanh)"
        return "mlp", None
    if {"q_proj", "k_proj", "v_proj", "o_proj"} <= set(children):
        if not all(isinstance(getattr(m, a, None), (int, float)) for a in ("head_dim", "scaling")) \
                or not hasattr(m, "config") or not _takes_position_embeddings(type(m)):
            return None, "attention without Llama's head_dim/scaling/position_embeddings"
        return "attention", None
    if {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"} <= set(children):
        if set(children) != {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"} or params:
            return None, "a decoder layer with more than input/post-attention norms, attention and MLP"
        if not _takes_position_embeddings(type(m)):
            return None, "a decoder layer without position_embeddings"
        return "decoder", None
    for suffix, what in (("MLP", "not a gated MLP (gate_proj/up_proj/down_proj, act_fn)"),
                         ("Attention", "not an attention with q_proj/k_proj/v_proj/o_proj"),
                         ("DecoderLayer", "not a pre-norm decoder layer (input_layernorm, self_attn, "
                                          "post_attention_layernorm, mlp)"),
                         ("Norm", "not an RMSNorm-like module (one 1-D weight, an eps)")):
        if name.endswith(suffix):
            return None, what
    return None, None


def _group_key(m: nn.Module) -> tuple:
    """What may make instances of one class behave differently: scalar attributes of the module and its children,
    their class names, and the layer's type in ``config.layer_types``."""
    key = []
    for name, sub in m.named_modules():
        key.append((name, type(sub).__name__))
        for attr, value in sorted(sub.__dict__.items()):
            if attr in ("layer_idx", "training") or attr.startswith("_"):
                continue
            if value is None or isinstance(value, (bool, int, float, str)):
                key.append((name, attr, value))
        key.append((name, "shapes", tuple(tuple(p.shape) for p in sub._parameters.values() if p is not None)))
        layer_idx = sub.__dict__.get("layer_idx")
        layer_types = getattr(getattr(sub, "config", None), "layer_types", None)
        if isinstance(layer_idx, int) and isinstance(layer_types, (list, tuple)) and layer_idx < len(layer_types):
            key.append((name, "layer_type", layer_types[layer_idx]))
    return tuple(key)


# ------------------------------------------------------------------------------------------------ the check
_RECORDS: list | None = None


def _recording_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The probes' attention function: records every argument, returns plain causal attention (the window, soft-cap,
    sinks and dropout are compared as arguments, not applied)."""
    if _RECORDS is not None:
        _RECORDS.append({"query": query, "key": key, "value": value, "attention_mask": attention_mask,
                         "dropout": dropout, "scaling": scaling, **kwargs})
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1)
    v = value.repeat_interleave(groups, dim=1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, k.transpose(-1, -2)) * scale
    q_len, k_len = scores.shape[-2:]
    causal = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    return torch.matmul(probs, v).transpose(1, 2).contiguous(), None


def _draw(name: str, p: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    shape = tuple(p.shape)
    x = torch.randn(shape, generator=g)
    if len(shape) >= 2:
        return x * shape[-1] ** -0.5
    return 1.0 + 0.3 * x if name.endswith("weight") else 0.3 * x


def _probe_clone(module: nn.Module, seed: int, config) -> nn.Module:
    """A CPU float32 copy of ``module`` with random parameters of its shapes (drawn from ``seed``: two clones with the
    same seed have the same weights), its buffers copied, no hooks, and ``config`` in place of the model's config."""
    g = torch.Generator().manual_seed(seed)
    model_config = getattr(module, "config", None)

    def clone(m: nn.Module) -> nn.Module:
        c = copy.copy(m)
        for attr in list(c.__dict__):
            if attr.startswith("_litespark"):
                del c.__dict__[attr]
            elif "hooks" in attr and isinstance(c.__dict__[attr], dict):
                c.__dict__[attr] = OrderedDict()
            elif model_config is not None and c.__dict__[attr] is model_config:
                c.__dict__[attr] = config
        c._parameters = {n: None if p is None else nn.Parameter(_draw(n, p, g)) for n, p in m._parameters.items()}
        c._buffers = {n: None if b is None else b.detach().to("cpu", torch.float32 if b.is_floating_point() else b.dtype)
                      .clone() for n, b in m._buffers.items()}
        c._modules = {n: None if s is None else clone(s) for n, s in m._modules.items()}
        c.training = True
        return c

    return clone(module)


def _swap_tree(module: nn.Module, swaps: dict) -> None:
    for m in module.modules():
        entry = swaps.get(type(m))
        if entry is not None and original_class(m) is None:
            m.__class__ = swapped_class(entry[1], type(m))


def _tensors(out, path="out") -> list:
    """(path, tensor or None) leaves of a module's output, for comparing two outputs' structure and values."""
    if isinstance(out, torch.Tensor) or out is None:
        return [(path, out)]
    if isinstance(out, dict):
        return [leaf for k, v in out.items() for leaf in _tensors(v, f"{path}.{k}")]
    if isinstance(out, (tuple, list)):
        return [leaf for i, v in enumerate(out) for leaf in _tensors(v, f"{path}[{i}]")]
    return [(path, ("value", out))]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30)).item()


def _differ(a, b, what: str, tol: float) -> str | None:
    if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
        return f"{what}: a tensor on one side only"
    if isinstance(a, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"{what}: {tuple(b.shape)} {b.dtype} instead of {tuple(a.shape)} {a.dtype}"
        if a.is_floating_point():
            err = _rel_err(b, a)
            return f"{what} differs (relative error {err:.1e})" if not err <= tol else None
        return None if torch.equal(a, b) else f"{what} differs"
    if isinstance(a, float) and isinstance(b, float):
        return None if math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0) else f"{what}: {b} instead of {a}"
    return None if a == b else f"{what}: {b!r} instead of {a!r}"


def _run(module: nn.Module, inputs: dict, call_seed: int):
    """Forward (in training mode, from a fixed random state) and backward with a fixed random cotangent; returns
    (output leaves, gradients by name, attention-function records). ``inputs``: keyword arguments; the key ``""``
    is passed positionally (norms and MLPs name their input differently)."""
    global _RECORDS
    leaves = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    args = (inputs[""],) if "" in inputs else ()
    kwargs = {k: v for k, v in inputs.items() if k != ""}
    _RECORDS = []
    try:
        torch.manual_seed(call_seed)
        out = module(*args, **kwargs)
        records = _RECORDS
    finally:
        _RECORDS = None
    outs = _tensors(out)
    g = torch.Generator().manual_seed(call_seed + 1)
    loss = 0.0
    for _, t in outs:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad:
            loss = loss + (t.float() * torch.randn(t.shape, generator=g)).sum()
    named = {**{f"input {k}": v for k, v in leaves.items()}, **dict(module.named_parameters())}
    grads = {}
    if isinstance(loss, torch.Tensor):
        got = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
        grads = {n: (torch.zeros_like(p) if gr is None else gr) for (n, p), gr in zip(named.items(), got)}
    return outs, grads, records


def _compare_runs(stock, lit, tol: float) -> str | None:
    (outs_a, grads_a, rec_a), (outs_b, grads_b, rec_b) = stock, lit
    if [p for p, _ in outs_a] != [p for p, _ in outs_b]:
        return "the outputs have another structure"
    for (path, a), (_, b) in zip(outs_a, outs_b):
        if (why := _differ(a, b, f"output {path}", tol)) is not None:
            return why
    if set(grads_a) != set(grads_b):
        return "other parameters"
    for name, a in grads_a.items():
        if (why := _differ(a, grads_b[name], f"gradient of {name}", tol)) is not None:
            return why
    if len(rec_a) != len(rec_b):
        return f"{len(rec_b)} attention calls instead of {len(rec_a)}"
    for call_a, call_b in zip(rec_a, rec_b):
        a = {k: v for k, v in call_a.items() if v is not None and k not in _INERT_KWARGS}
        b = {k: v for k, v in call_b.items() if v is not None and k not in _INERT_KWARGS}
        if set(a) != set(b):
            return (f"the attention function gets {sorted(set(b) - set(a)) or 'no'} extra and misses "
                    f"{sorted(set(a) - set(b)) or 'no'} arguments")
        for k in a:
            if (why := _differ(a[k], b[k], f"attention argument {k}", tol)) is not None:
                return why
    return None


class _Probe:
    """Runs the checks of one model: the probe config (recording attention function), the rotary embedding."""

    def __init__(self, base: nn.Module):
        from transformers import AttentionInterface

        AttentionInterface.register(PROBE_ATTENTION, _recording_attention)
        self.config = copy.deepcopy(base.config)
        self.config._attn_implementation = PROBE_ATTENTION
        self.rotary = next((m for n, m in base.named_modules() if n.split(".")[-1] == "rotary_emb"), None)
        self.model_config = base.config

    def _x(self, width: int, seed: int, dtype=torch.float32, scaled=False) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(2, _PROBE_SEQ, width, generator=g)
        if scaled:  # rows of very different magnitudes, so that eps matters
            x = x * torch.logspace(-4, 1, _PROBE_SEQ)[None, :, None]
        return x.to(dtype).requires_grad_(True)

    def _position_inputs(self, width: int, seed: int) -> dict:
        if self.rotary is None:
            raise _ProbeError("no rotary_emb module to make position embeddings")
        rotary = _probe_clone(self.rotary, 0, self.config)
        positions = torch.stack([torch.arange(_PROBE_SEQ), torch.arange(5, 5 + _PROBE_SEQ)])
        x = self._x(width, seed)
        with torch.no_grad():
            cos, sin = rotary(x, positions)
        return dict(hidden_states=x, position_embeddings=(cos, sin), attention_mask=None, position_ids=positions)

    def check(self, module: nn.Module, role: str, mixin: type, swaps: dict) -> str | None:
        """None if ``module`` swapped for ``mixin`` (children swapped as ``swaps``) equals its stock forward."""
        seed = 1234
        stock = _probe_clone(module, seed, self.config)
        lit = _probe_clone(module, seed, self.config)
        _swap_tree(lit, swaps)
        lit.__class__ = swapped_class(mixin, type(lit))
        if role == "decoder" and not isinstance(lit.post_attention_layernorm, LitesparkRMSNorm):
            return "its post-attention norm is not swapped for a Llama- or Gemma-convention norm (no fused add)"
        if role == "norm":
            width = module.weight.shape[0]
            cases = [{"": self._x(width, 1)}, {"": self._x(width, 2, scaled=True)}]
        elif role == "mlp":
            cases = [{"": self._x(module.gate_proj.in_features, 1)}]
        elif role == "attention":
            cases = [self._position_inputs(module.q_proj.in_features, 1)]
        else:
            cases = [self._position_inputs(module.input_layernorm.weight.shape[0], 1)]
        for inputs in cases:
            runs = []
            for m in (stock, lit):
                fresh = {k: (v.detach().clone().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
                         for k, v in inputs.items()}
                runs.append(_run(m, fresh, seed))
            if (why := _compare_runs(*runs, TOLERANCE)) is not None:
                return why
        if role == "norm":  # the rounding convention: a bf16 input with fp32 weights
            x = self._x(module.weight.shape[0], 3).detach().to(torch.bfloat16)
            with torch.no_grad():
                a, b = stock(x), lit(x)
            if (why := _differ(a, b, "bf16 output", 1e-2)) is not None:
                return why
        return None


class _ProbeError(Exception):
    pass


def _check_class(probe: _Probe, cls: type, instances: list, role: str, candidates, swaps: dict):
    """(kind, mixin) of the first candidate that matches stock on every group of ``instances``, or (None, why)."""
    groups = {}
    for m in instances:
        groups.setdefault(_group_key(m), m)
    why = None
    for kind, mixin in candidates:
        why = None
        for module in groups.values():
            try:
                why = probe.check(module, role, mixin, swaps)
            except _ProbeError as exc:
                return None, str(exc)
            except Exception as exc:  # noqa: BLE001 - a forward the check cannot run: leave the class stock
                why = f"the check could not run ({type(exc).__name__}: {str(exc)[:120]})"
            if why is not None:
                break
        if why is None:
            return (kind, mixin), None
    return None, f"check failed: {why}"


def plan(base: nn.Module, cfg) -> tuple[GenericPlan | None, str]:
    """The generic plan for ``base`` (an unwrapped model outside the table) under ``cfg`` (a `LitesparkConfig`):
    (plan, "") when something can be swapped, else (None, why not)."""
    problem = not_a_decoder_lm(base)
    if problem is not None:
        return None, problem
    result = GenericPlan(model_type=getattr(base.config, "model_type", "?"))
    instances: dict[type, list] = {}
    roles: dict[type, str] = {}
    for m in base.modules():
        orig = original_class(m)
        if orig is not None:  # applied before: keep what was swapped then
            mixin = type(m).__mro__[1]
            if mixin in _MIXIN_KIND:
                result.swaps.setdefault(orig, (_MIXIN_KIND[mixin], mixin))
            continue
        role, why = _role(m)
        cls = type(m)
        if role is not None:
            roles[cls] = role
            instances.setdefault(cls, []).append(m)
        elif why is not None and cls.__name__ not in result.left:
            result.left[cls.__name__] = why
    candidates = {"norm": _NORMS, "mlp": _MLPS, "attention": _ATTENTIONS, "decoder": _DECODERS}
    if instances:
        saved_warned = set(_dispatch._WARNED)
        with torch.random.fork_rng(devices=[]), torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                probe = _Probe(base)
                for role in ("norm", "mlp", "attention", "decoder"):  # children before the layers that hold them
                    for cls, ms in instances.items():
                        if roles[cls] != role:
                            continue
                        allowed = [(k, mx) for k, mx in candidates[role] if getattr(cfg, SWAP_KINDS[k][0])]
                        if not allowed:
                            result.left[cls.__name__] = f"switched off ({SWAP_KINDS[candidates[role][0][0]][0]}=False)"
                            continue
                        entry, why = _check_class(probe, cls, ms, role, allowed, result.swaps)
                        if entry is not None:
                            result.swaps[cls] = entry
                        else:
                            result.left[cls.__name__] = why
            finally:
                _dispatch._WARNED.clear()
                _dispatch._WARNED.update(saved_warned)
    lm = type(base)
    result.left.setdefault(lm.__name__, "LM head and loss: the model's own forward (its logit scalings, soft-caps)")
    if not result.swaps:
        left = "; ".join(f"{n}: {w}" for n, w in result.left.items())
        return None, f"the generic path found no module it can swap ({left})."
    return result, ""


def swap(base: nn.Module, generic_plan: GenericPlan) -> dict[str, int]:
    """Swap the classes of ``generic_plan`` in ``base`` (in place, as `apply` does for the table's families);
    returns the swap counts by kind."""
    counts: dict[str, int] = {}
    for m in base.modules():
        entry = generic_plan.swaps.get(type(m))
        if entry is None or original_class(m) is not None:
            continue
        m.__class__ = swapped_class(entry[1], type(m))
        counts[entry[0]] = counts.get(entry[0], 0) + 1
    for layer in base.modules():
        if isinstance(layer, LitesparkDecoderLayer):
            link_norm_consumers(layer)  # the norms of a swapped (checked) layer feed only its attention and MLP
    return counts
