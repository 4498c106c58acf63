"""Sparsity-Accelerated Training (SAT; Ma et al., ACL 2024 Findings, arXiv 2406.01392), designed from the paper's idea.

Each optimizer step, per decoder layer, an importance score picks the MLP intermediate channels and the attention KV
groups to keep; the others are left out of the forward *and* backward computation (real structured skipping:
gathered weight rows/columns, smaller GEMMs; `litespark_kernels.ops.sparse_mlp` / `sparse_attention_heads`). A ladder
schedule (LORS) lowers the omission rate in steps so training ends dense.

Use::

    from litespark_hf.sat import enable_sat, SATCallback
    enable_sat(model, sat_omission_rate_mlp=0.5, sat_omission_rate_heads=0.25)   # after litespark_hf.apply, if used
    trainer = Trainer(..., callbacks=[SATCallback()])

Custom loop: ``sat_step(model, step, max_steps)`` before each optimizer step's first forward, and
``with frozen_omitted(model, optimizer): optimizer.step()``. FLOPs actually executed:
``executed_flops_fraction(model, seq_len)`` / ``executed_flops_per_token(model, seq_len)``.
"""

from .callback import SATCallback
from .core import (
    SATController,
    controller,
    disable_sat,
    enable_sat,
    executed_flops_fraction,
    executed_flops_per_token,
    frozen_omitted,
    is_enabled,
    omission_rates,
    sat_step,
)
from .schedule import scheduled_rate

__all__ = [
    "SATCallback", "SATController", "controller", "disable_sat", "enable_sat", "executed_flops_fraction",
    "executed_flops_per_token", "frozen_omitted", "is_enabled", "omission_rates", "sat_step", "scheduled_rate",
]
