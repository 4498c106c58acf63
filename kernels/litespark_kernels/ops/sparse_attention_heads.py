"""Structured head skipping for attention (Sparsity-Accelerated Training), GQA-aware.

Selection unit = a whole KV group: one key/value head and the ``n_rep`` query heads that read it. Skipping whole
groups keeps grouped-query attention intact (every kept query head still has its KV head, ``n_rep`` is unchanged, so
any attention backend takes the reduced tensors as they are) and skips the k/v projections together with q and o.
(Selecting single query heads would save q/o work only while k/v stay dense; with Llama-3.2-1B's 8 KV heads the
granularity is 1/8 per layer.) For multi-head attention (``n_rep = 1``) a group is one head.

Given the kept groups ``groups`` (sorted int64), `head_rows` returns the rows of q_proj (``n_rep * head_dim`` per
group) and of k_proj / v_proj (``head_dim`` per group); o_proj uses the q rows as columns. The projections are dense
GEMMs on gathered weights (`sparse_mlp.gather_weight`: one gather into the autocast dtype, zero-filled full-size
gradient): ``[tokens, hidden] x [hidden, kept * head_dim]``, so forward and
backward do the kept fraction of the projection and attention work; omitted rows/columns get exactly zero gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .sparse_mlp import gather_weight


def head_rows(groups: torch.Tensor, n_rep: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_rows, kv_rows): weight rows of the query heads of ``groups`` and of their KV heads.

    ``groups`` is ``[k]`` (or ``[..., k]`` for several layers at once: rows ``[..., k * n_rep * head_dim]`` and
    ``[..., k * head_dim]``)."""
    d = torch.arange(head_dim, device=groups.device)
    q_heads = groups[..., :, None] * n_rep + torch.arange(n_rep, device=groups.device)  # [..., k, n_rep]
    q_rows = (q_heads[..., None] * head_dim + d).flatten(-3)
    kv_rows = (groups[..., None] * head_dim + d).flatten(-2)
    return q_rows, kv_rows


def _gather_linear(x, weight, bias, rows):
    if rows is None:
        return F.linear(x, weight, bias)
    return F.linear(x, gather_weight(weight, rows, 0), None if bias is None else gather_weight(bias, rows, 0))


def sparse_qkv(x, q_proj, k_proj, v_proj, q_rows, kv_rows):
    """q, k, v of the kept heads (``None`` rows: all heads); the projections are ``nn.Linear`` modules."""
    q = _gather_linear(x, q_proj.weight, q_proj.bias, q_rows)
    k = _gather_linear(x, k_proj.weight, k_proj.bias, kv_rows)
    v = _gather_linear(x, v_proj.weight, v_proj.bias, kv_rows)
    return q, k, v


def sparse_o(attn: torch.Tensor, o_proj, q_rows) -> torch.Tensor:
    """Output projection over the kept heads' columns; o_proj's bias is added once, in full."""
    if q_rows is None:
        return F.linear(attn, o_proj.weight, o_proj.bias)
    return F.linear(attn, gather_weight(o_proj.weight, q_rows, 1), o_proj.bias)


def head_output_norms(attn: torch.Tensor, row_weights: torch.Tensor | None = None,
                      count: torch.Tensor | None = None) -> torch.Tensor:
    """Mean L2 norm of each head's output over all tokens: ``attn [batch, seq, heads, head_dim] -> [heads]`` fp32.
    ``row_weights`` / ``count``: over the tokens weighted 1 only (as `sparse_mlp.mean_abs_per_channel`)."""
    norms = torch.linalg.vector_norm(attn.detach(), dim=-1, dtype=torch.float32).reshape(-1, attn.shape[-2])
    if row_weights is None:
        return norms.mean(0)
    return (norms * row_weights[:norms.shape[0], None]).sum(0) / count
