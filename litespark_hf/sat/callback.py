"""`SATCallback`: drives SAT from the Trainer (schedule by global step, frozen omitted weights, logged rates)."""

from __future__ import annotations

from transformers import TrainerCallback

from ..config import LitesparkConfig
from .core import controller, enable_sat, executed_flops_fraction, omission_rates, omitted_freezer


class SATCallback(TrainerCallback):
    """Runs SAT in a transformers/TRL Trainer.

    - ``on_train_begin``: enables SAT on the model with ``config`` if it is not enabled yet (a class swap: no
      parameter is created or moved, so it is safe after ``accelerator.prepare`` for DDP; under FSDP/ZeRO-3 the
      weights are sharded and SAT runs dense with a warning).
    - ``on_step_begin`` (once per optimizer step, before its first micro-batch): `sat_step` with the global step
      and ``state.max_steps``: schedule, importance folding, selection.
    - around ``optimizer.step()`` (``on_pre_optimizer_step`` / ``on_optimizer_step``): with
      ``sat_freeze_omitted`` the omitted weights and their optimizer state are left unchanged by the step: a
      `LitesparkAdamW` is handed the step's kept masks and skips them in its launch, any other optimizer gets them
      saved before and put back after (`omitted_freezer`).
    - ``on_log``: adds ``sat/omission_rate_mlp``, ``sat/omission_rate_heads`` (scheduled) and
      ``sat/executed_flops_fraction`` (mean over the steps since the last log, dense-refresh steps counted as 1.0).
    """

    def __init__(self, config: LitesparkConfig | dict | str | None = None, seq_len: int | None = None):
        self.config = None if config is None else LitesparkConfig.from_any(config)
        self.seq_len = seq_len
        self._freezer = None
        self._fractions: list[float] = []
        self.history: list[dict] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and controller(model) is None:
            enable_sat(model, self.config)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        ctrl = controller(model) if model is not None else None
        if ctrl is None:
            return
        ctrl.set_step(state.global_step, state.max_steps)
        frac = executed_flops_fraction(model, self.seq_len)
        self._fractions.append(frac)
        self.history.append({"step": state.global_step, **omission_rates(model), "executed_flops_fraction": frac})

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        ctrl = controller(model) if model is not None else None
        if ctrl is not None and ctrl.cfg.sat_freeze_omitted:
            self._freezer = omitted_freezer(model, optimizer)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._freezer is not None:
            self._freezer.restore()
            self._freezer = None

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        ctrl = controller(model) if model is not None else None
        if ctrl is None or logs is None:
            return
        logs["sat/omission_rate_mlp"] = ctrl.rates[0]
        logs["sat/omission_rate_heads"] = ctrl.rates[1]
        if self._fractions:
            logs["sat/executed_flops_fraction"] = sum(self._fractions) / len(self._fractions)
            self._fractions = []
