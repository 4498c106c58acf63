"""SAT versions of the MLP and attention modules, applied by swapping an instance's class (as `litespark_hf.apply`).

The mixin is put in front of the module's *current* class (stock or already Litespark-swapped), so its dense path is
``super().forward`` (exactly what the model ran before), while ``__litespark_original__`` names the stock class, so
`litespark_hf.restore` undoes both swaps at once. Weights are shared, nothing is copied, state-dict keys are unchanged.

A module runs its SAT path only in training mode and only when the controller gave it a selection (or asked for
importance statistics); evaluation, generation (KV cache), DeepSpeed-partitioned projections and LoRA states
other than one vanilla adapter (`_lora_groups`) run the dense forward. PEFT LoRA projections run sparse: the frozen
base gathered as a plain projection, each adapter on the kept channels only (`_lora_rows`, `_lora_cols`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import litespark_kernels as lk
from litespark_kernels._dispatch import warn_once
from litespark_kernels.ops.sparse_attention_heads import head_output_norms, sparse_o, sparse_qkv
from litespark_kernels.ops.sparse_mlp import (gathered_linear, mean_abs_per_channel, sparse_gated_mlp,
                                              sparse_gated_mlp_fused, sparse_mlp)

from ..casting import _cast_of

from ..modules import GELUTanh, SiLUActivation, fused_gated_activation, original_class

_SAT_CLASSES: dict[tuple[type, type], type] = {}

# Set by `litespark_hf.graphs` while it records a decoder stack: (row weights [tokens] float32, 1 for the real tokens
# and 0 for the bucket's filler; the real-token count, a float32 scalar). The importance statistics then average over
# the real tokens only, with both tensors refilled before every replay; None (eager): over every row.
GRAPH_ROWS: tuple[torch.Tensor, torch.Tensor] | None = None


def _channel_stats(h: torch.Tensor) -> torch.Tensor:
    """An MLP's importance measurement: ``mean(|h|)`` per channel over the (real) tokens."""
    return mean_abs_per_channel(h, *(GRAPH_ROWS or ()))


def _head_stats(attn: torch.Tensor) -> torch.Tensor:
    """An attention's importance measurement: each head's mean output L2 norm over the (real) tokens."""
    return head_output_norms(attn, *(GRAPH_ROWS or ()))


def sat_class(mixin: type, current: type) -> type:
    """``SAT<current>`` = mixin + current class; ``__litespark_original__`` is the stock class."""
    key = (mixin, current)
    if key not in _SAT_CLASSES:
        stock = current.__dict__.get("__litespark_original__") or current
        cls = type(f"SAT{current.__name__}", (mixin, current),
                   {"__litespark_original__": stock, "__sat_base__": current})
        cls.__module__ = __name__
        _SAT_CLASSES[key] = cls
    return _SAT_CLASSES[key]


def is_sat_module(module: nn.Module) -> bool:
    return "__sat_base__" in type(module).__dict__


def _plain(*linears) -> bool:
    return all(type(m) is nn.Linear and not hasattr(m.weight, "ds_id") for m in linears)


_NO_ADAPTER = "no adapter"


def _lora_groups(*groups):
    """The `LoraGroup` (litespark_hf.modules.lora) of each tuple of projections when every projection is a plain
    ``nn.Linear`` without bias or a PEFT LoRA ``Linear`` in a state reproduced exactly (one active vanilla adapter,
    or its adapters disabled) on such a base, at least one adapter adding something; `_NO_ADAPTER` when no adapter
    adds anything (adapters disabled: DPO's reference pass of a LoRA model, which runs dense, as the reference model
    of a full DPO run does); else None (SAT then runs the module dense, with a warning)."""
    from ..modules.lora import lora_group

    out = []
    for linears in groups:
        g = lora_group(linears)
        if g is None or any(lin.bias is not None for lin in g.base):
            return None
        out.append(g)
    if all(t is None for g in out for t in g.terms):
        return _NO_ADAPTER
    return out


def _lora_in(x: torch.Tensor, term) -> torch.Tensor:
    """PEFT's adapter input: ``dropout(x.to(lora_A.weight.dtype))`` (the cast skipped where autocast gives the same)."""
    from ..modules.lora import _lora_input

    return term.dropout(_lora_input(x, term.lora_A.weight.dtype))


def _lora_rows(x: torch.Tensor, term, rows: torch.Tensor) -> torch.Tensor:
    """The adapter's output on the kept output rows: ``lora_B[rows](lora_A(dropout(x))) * scaling``; lora_B's
    omitted rows get exactly zero gradient."""
    a = F.linear(_lora_in(x, term), term.lora_A.weight)
    return gathered_linear(a, [term.lora_B.weight], [None], [rows]) * term.scaling


def _lora_cols(h: torch.Tensor, term, cols: torch.Tensor) -> torch.Tensor:
    """The adapter's output from the kept input columns: ``lora_B(lora_A[:, cols](dropout(h))) * scaling``; lora_A's
    omitted columns get exactly zero gradient."""
    a = gathered_linear(_lora_in(h, term), [term.lora_A.weight], [None], [cols], dim=1)
    return F.linear(a, term.lora_B.weight) * term.scaling


def _plus(base: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
    """PEFT's ``(base_layer(x) + lora).to(base_layer(x).dtype)``."""
    return base if extra is None else (base + extra).to(base.dtype)


def _gated_activation_name(act: nn.Module) -> str | None:
    if isinstance(act, (nn.SiLU, SiLUActivation)):
        return "silu"
    if isinstance(act, GELUTanh):
        return "gelu_tanh"
    return None


class LayerState:
    """Per-module SAT state: the kept units this step and the running importance of every unit."""

    def __init__(self, kind: str, units: int, layer_idx: int, n_rep: int = 1, head_dim: int = 0):
        self.kind = kind  # "mlp" or "attention"
        self.units = units  # channels (MLP) or KV groups (attention)
        self.layer_idx = layer_idx
        self.n_rep, self.head_dim = n_rep, head_dim
        self.index: torch.Tensor | None = None  # kept units (sorted), None = all
        self.index2: torch.Tensor | None = None  # MLP: rows of the packed [gate; up] for index (index, index + units)
        self.omitted: torch.Tensor | None = None  # omitted units (sorted) when index is set
        self.rows: tuple[torch.Tensor, torch.Tensor] | None = None  # attention: (q_rows, kv_rows)
        self.omitted_rows: tuple[torch.Tensor, torch.Tensor] | None = None  # attention: omitted (q_rows, kv_rows)
        self.qkv_rows: torch.Tensor | None = None  # attention: the kept rows of the concatenated [q; k; v] weight
        self.collect = False  # gather importance statistics in this step's forwards
        self.score: torch.Tensor | None = None  # running importance, float32 [units]
        self.seen: torch.Tensor | None = None  # bool [units]: score holds a measurement
        self.acc: torch.Tensor | None = None  # this step's sum of measurements [units]
        self.count: torch.Tensor | None = None  # this step's number of measurements [units]
        self.exempt = False

    def add(self, values: torch.Tensor, index: torch.Tensor | None) -> None:
        """Record one forward's measurements of the computed units."""
        if self.acc is None or self.acc.device != values.device:
            self.acc = torch.zeros(self.units, dtype=torch.float32, device=values.device)
            self.count = torch.zeros(self.units, dtype=torch.float32, device=values.device)
        if index is None:
            self.acc += values
            self.count += 1
        else:
            self.acc.index_add_(0, index, values)
            self.count.index_add_(0, index, torch.ones_like(values))

    def fold(self, ema: float) -> None:
        """Fold this step's measurements into the running importance (units not computed keep their old score)."""
        if self.acc is None:
            return
        measured = self.count > 0
        new = self.acc / self.count.clamp_min(1)
        if self.score is None or self.score.device != new.device:
            self.score = torch.zeros_like(new)
            self.seen = torch.zeros_like(measured)
        blended = torch.where(self.seen, ema * self.score + (1.0 - ema) * new, new)
        self.score = torch.where(measured, blended, self.score)
        self.seen = self.seen | measured
        self.acc = self.count = None

    @staticmethod
    def fold_many(states: list["LayerState"], ema: float) -> None:
        """`fold` for many states at once: one set of kernels per group of equal-size states on one device (the
        per-layer version costs ~10 small launches per module and step)."""
        groups: dict[tuple, list[LayerState]] = {}
        for st in states:
            if st.acc is not None:
                groups.setdefault((st.units, st.acc.device), []).append(st)
        for (units, device), sts in groups.items():
            if len(sts) == 1:
                sts[0].fold(ema)
                continue
            acc = torch.stack([st.acc for st in sts])
            count = torch.stack([st.count for st in sts])
            zeros = torch.zeros(units, dtype=torch.float32, device=device)
            unseen = torch.zeros(units, dtype=torch.bool, device=device)
            score = torch.stack([zeros if st.score is None or st.score.device != device else st.score for st in sts])
            seen = torch.stack([unseen if st.seen is None or st.seen.device != device else st.seen for st in sts])
            measured = count > 0
            new = acc / count.clamp_min(1)
            blended = torch.where(seen, ema * score + (1.0 - ema) * new, new)
            score = torch.where(measured, blended, score)
            seen = seen | measured
            for i, st in enumerate(sts):
                st.score, st.seen = score[i], seen[i]
                st.acc = st.count = None

    def kept(self) -> int:
        return self.units if self.index is None else int(self.index.numel())


class SATGatedMLP:
    """Gated MLP (Llama/Mistral/Qwen2/Qwen3) computing only the selected intermediate channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st: LayerState | None = self.__dict__.get("_sat_state")
        if st is None or not self.training or (st.index is None and not st.collect):
            return super().forward(x)
        act = _gated_activation_name(self.act_fn)
        biased = any(m.bias is not None for m in (self.gate_proj, self.up_proj, self.down_proj)
                     if isinstance(m, nn.Linear))
        plain = _plain(self.gate_proj, self.up_proj, self.down_proj)
        lora = None if plain or act is None or biased else _lora_groups((self.gate_proj, self.up_proj),
                                                                         (self.down_proj,))
        if lora is _NO_ADAPTER:
            return super().forward(x)
        if act is None or biased or (not plain and lora is None):
            warn_once("sat_mlp", "SAT needs gate/up/down that are plain nn.Linear without bias (or PEFT LoRA Linear "
                      "on such, one vanilla adapter) and a SiLU or GELU-tanh activation; this MLP runs dense")
            return super().forward(x)
        if lora is not None:
            out, h = self._sat_lora(x, st, *lora)
        elif st.index is None:  # a dense step that measures every channel
            out, h = sparse_gated_mlp(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight, None,
                                      act, return_hidden=True)
        else:  # gathered GEMMs (3 autograd nodes), from this forward's bf16 weight copies when Litespark made them
            out, h = sparse_gated_mlp_fused(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight,
                                            st.index, act, index2=st.index2, cast_gate_up=_cast_of(self, "gate_up"),
                                            cast_down=_cast_of(self, "down"))
        if st.collect:
            st.add(_channel_stats(h), st.index)
        return out

    def _sat_lora(self, x, st, gate_up, down):
        """PEFT LoRA projections over the kept channels: the frozen base rows of ``[gate; up]`` (and columns of
        down) gathered as in the plain path, plus each adapter on the kept channels only (lora_B rows of gate/up,
        lora_A columns of down). A dense refresh step calls the modules (PEFT's own forward)."""
        if st.index is None:
            h = fused_gated_activation(self.act_fn)(self.gate_proj(x), self.up_proj(x))
            return self.down_proj(h), h.detach()
        (base_g, base_u), (term_g, term_u) = gate_up.base, gate_up.terms
        (base_d,), (term_d,) = down.base, down.terms
        k = st.index.numel()
        gu = gathered_linear(x, [base_g.weight, base_u.weight], [None, None], [st.index, st.index],
                             cast=_cast_of(self, "gate_up"), rows_cat=st.index2)
        if term_g is not None or term_u is not None:
            g, u = gu.split([k, k], dim=-1)
            g = _plus(g, None if term_g is None else _lora_rows(x, term_g, st.index))
            u = _plus(u, None if term_u is None else _lora_rows(x, term_u, st.index))
            gu = torch.cat([g, u], dim=-1)
        h = fused_gated_activation(self.act_fn, packed=True)(gu)
        out = gathered_linear(h, [base_d.weight], [None], [st.index], dim=1, cast=_cast_of(self, "down"))
        return _plus(out, None if term_d is None else _lora_cols(h, term_d, st.index)), h.detach()


class SATGeluMLP:
    """StarCoder2's MLP (c_fc -> GELU-tanh -> c_proj, with biases) over the selected channels only."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        st: LayerState | None = self.__dict__.get("_sat_state")
        if st is None or not self.training or (st.index is None and not st.collect):
            return super().forward(hidden_states)
        if not isinstance(self.act, GELUTanh) or not _plain(self.c_fc, self.c_proj):
            warn_once("sat_gelu_mlp", "SAT needs plain nn.Linear c_fc/c_proj and GELU-tanh; this MLP runs dense")
            return super().forward(hidden_states)
        out, h = sparse_mlp(hidden_states, self.c_fc.weight, self.c_fc.bias, self.c_proj.weight, self.c_proj.bias,
                            st.index, return_hidden=True)
        if st.collect:
            st.add(_channel_stats(h), st.index)
        return F.dropout(out, p=self.residual_dropout, training=self.training)


def _eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    from transformers.models.llama.modeling_llama import eager_attention_forward

    return eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)


def _has_past(cache, layer_idx) -> bool:
    """A KV cache that already holds tokens (generation): SAT then runs dense. An empty cache, as transformers
    builds for a training forward with ``use_cache=True``, is left unfilled by the SAT path (training reads no
    cache; omitted heads have no keys/values to store)."""
    if cache is None:
        return False
    try:
        return cache.get_seq_length(layer_idx) > 0
    except Exception:  # an unknown cache type: be safe
        return True


class SATAttention:
    """Decoder attention over the selected KV groups only (q/k/v rows and o columns of those heads)."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        st: LayerState | None = self.__dict__.get("_sat_state")
        if (st is None or not self.training or (st.index is None and not st.collect)
                or _has_past(past_key_values, self.layer_idx)):
            return super().forward(hidden_states, position_embeddings=position_embeddings,
                                   attention_mask=attention_mask, past_key_values=past_key_values, **kwargs)
        plain = _plain(self.q_proj, self.k_proj, self.v_proj, self.o_proj)
        lora = None if plain else _lora_groups((self.q_proj, self.k_proj, self.v_proj), (self.o_proj,))
        if lora is _NO_ADAPTER:
            return super().forward(hidden_states, position_embeddings=position_embeddings,
                                   attention_mask=attention_mask, past_key_values=past_key_values, **kwargs)
        if not plain and lora is None:
            warn_once("sat_attention", "SAT needs q/k/v/o projections that are plain nn.Linear (or PEFT LoRA Linear "
                      "without bias on such, one vanilla adapter); this attention runs dense")
            return super().forward(hidden_states, position_embeddings=position_embeddings,
                                   attention_mask=attention_mask, past_key_values=past_key_values, **kwargs)
        q_rows, kv_rows = st.rows if st.rows is not None else (None, None)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        if lora is not None and q_rows is None:  # a dense measuring step: PEFT's own forwards
            q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        elif lora is not None:  # the kept heads: the frozen base rows in one GEMM, each adapter on its kept rows
            bases, terms = lora[0].base, lora[0].terms
            rows = [q_rows, kv_rows, kv_rows]
            qkv = gathered_linear(hidden_states, [m.weight for m in bases], [None] * 3, rows,
                                  cast=_cast_of(self, "qkv"), rows_cat=st.qkv_rows)
            parts = qkv.split([r.numel() for r in rows], dim=-1)
            q, k, v = (_plus(p, None if t is None else _lora_rows(hidden_states, t, r))
                       for p, t, r in zip(parts, terms, rows))
        elif q_rows is None:  # a dense step that measures every head
            q, k, v = sparse_qkv(hidden_states, self.q_proj, self.k_proj, self.v_proj, None, None)
        else:  # the kept heads' q/k/v as one GEMM (one autograd node), gathered from the bf16 copy when there is one
            projs = (self.q_proj, self.k_proj, self.v_proj)
            qkv = gathered_linear(hidden_states, [m.weight for m in projs], [m.bias for m in projs],
                                  [q_rows, kv_rows, kv_rows], cast=_cast_of(self, "qkv"), rows_cat=st.qkv_rows)
            q, k, v = qkv.split([q_rows.numel(), kv_rows.numel(), kv_rows.numel()], dim=-1)
        q, k = q.view(hidden_shape), k.view(hidden_shape)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = lk.apply_rope(q, k, cos, sin)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, _eager)
        sliding_window = (
            self.sliding_window if hasattr(self, "sliding_window") else getattr(self.config, "sliding_window", None)
        )
        extra = {"sliding_window": sliding_window} if sliding_window is not None else {}
        attn, attn_weights = attention_interface(
            self, q, k, v, attention_mask, dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling, **extra, **kwargs,
        )  # [batch, seq, kept heads, head_dim]
        if st.collect:
            per_head = _head_stats(attn)
            st.add(per_head.view(-1, st.n_rep).mean(1), st.index)
        attn = attn.reshape(*input_shape, -1).contiguous()
        if lora is not None and q_rows is None:
            out = self.o_proj(attn)
        elif lora is not None:
            (base_o,), (term_o,) = lora[1].base, lora[1].terms
            out = gathered_linear(attn, [base_o.weight], [None], [q_rows], dim=1, cast=_cast_of(self, "o"))
            out = _plus(out, None if term_o is None else _lora_cols(attn, term_o, q_rows))
        elif q_rows is None:
            out = sparse_o(attn, self.o_proj, None)
        else:
            out = gathered_linear(attn, [self.o_proj.weight], [self.o_proj.bias], [q_rows], dim=1,
                                  cast=_cast_of(self, "o"))
        if hasattr(self, "residual_dropout"):
            out = F.dropout(out, p=self.residual_dropout, training=self.training)
        return out, attn_weights


def base_class(module: nn.Module) -> type:
    """The class the module had before SAT (stock or Litespark-swapped)."""
    return type(module).__dict__.get("__sat_base__", type(module))


__all__ = ["LayerState", "SATAttention", "SATGatedMLP", "SATGeluMLP", "base_class", "is_sat_module", "sat_class",
           "original_class"]
