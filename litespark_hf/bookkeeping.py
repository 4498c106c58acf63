"""Per-step host bookkeeping of the Trainer and TRL, done once instead of on every step (`LitesparkConfig.lean_bookkeeping`).

A Litespark step on a padded 1B batch runs its GPU work in ~60-90 ms; the host then is the limit, and part of its
time is not the model at all but walks over every module or parameter that the Trainer, TRL, PEFT and accelerate
repeat on every step, with answers that do not change during training. Measured with ``LITESPARK_POST_CPROFILE``
(a 16-layer Llama, DPO with LoRA, on the CPU): PEFT's ``disable_adapter`` (TRL's reference pass) ~74 ms of profiled
host time per step (``get_model_status`` walks the model and counts its parameters), TRL's
``disable_gradient_checkpointing`` ~27 ms (``gradient_checkpointing_disable`` / ``enable``: two walks and the
input-grad hook re-registered), ``accelerator.unwrap_model`` / accelerate's ``is_peft_model`` ~20 ms (a walk for
compiled regions and two ``importlib.metadata`` lookups per call), the Trainer's ``floating_point_ops`` ~12 ms (a
parameter count) every step.

What this module does instead, with the same effect on the model:

- `step_context` (DPO's ``compute_loss``): while the step runs, TRL's ``disable_gradient_checkpointing`` turns off
  only the flags that are on, from a list of the flagged modules made once, and puts back exactly what was there
  (TRL re-enables with ``gradient_checkpointing_enable(args.gradient_checkpointing_kwargs)``, which also resets
  transformers' ``every_n_layers`` and the checkpoint function to those arguments: here they stay as they were);
  ``use_adapter(model, None)`` on a LoRA-style PEFT model disables and re-enables the adapter layers found once
  (PEFT's ``enable_adapters`` on each, its irregular-state and bias warnings kept); accelerate's ``is_peft_model``
  and ``accelerator.unwrap_model`` answer from a memo per model. Anything else (a named "ref" adapter, prompt
  learning, a tuner that overrides PEFT's enabling) takes TRL's and PEFT's own code.
- `floating_point_ops`: the Trainer's ``6 * tokens * num_parameters(exclude_embeddings=True)`` with the
  parameter count taken once; `parameters`: the model's parameter list for the fused gradient clip, listed once.
- `lean_model_calls` (the whole ``train()``, whole weights only): the Trainer's ``model.train()`` at every step is a
  no-op when every module is already training, and ``model.zero_grad()`` clears ``.grad`` from a parameter list
  made once (~13 and ~9 ms of profiled host time per step on the 16-layer LoRA model).

The memos live on the trainer and are dropped at the start of every ``train()`` (`reset`): modules swapped or
adapters added between runs are seen again.
"""

from __future__ import annotations

import contextlib
import sys
import warnings

import torch

_MEMO = "_litespark_bookkeeping"


def memo_of(trainer) -> dict:
    """The trainer's memo (what this module remembers for the current ``train()``)."""
    return trainer.__dict__.setdefault(_MEMO, {})


def reset(trainer) -> None:
    """Forget everything remembered (at the start of ``train()``)."""
    trainer.__dict__.pop(_MEMO, None)


def _remember(memo: dict, tag: str, model, build):
    """``build()`` the first time ``tag`` is asked of this very ``model`` (held in the memo, so an id reused by a
    later object is not mistaken for it), the remembered answer afterwards."""
    key = (tag, id(model))
    got = memo.get(key)
    if got is None or got[0] is not model:
        got = memo[key] = (model, build())
    return got[1]


def _flagged_modules(memo: dict, model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules that carry transformers' ``gradient_checkpointing`` flag (what ``_set_gradient_checkpointing``
    sets), found once per model."""
    return _remember(memo, "gc", model, lambda: [m for m in model.modules() if hasattr(m, "gradient_checkpointing")])


def gradient_checkpointing_off(memo: dict):
    """TRL's ``disable_gradient_checkpointing(model, kwargs)`` (checkpointing off inside, back on after), as a flag
    flip on the flagged modules that are on, restored to exactly their previous values."""

    @contextlib.contextmanager
    def disable_gradient_checkpointing(model, gradient_checkpointing_kwargs=None):
        on = [m for m in _flagged_modules(memo, model) if m.gradient_checkpointing]
        for m in on:
            m.gradient_checkpointing = False
        try:
            yield
        finally:
            for m in on:
                m.gradient_checkpointing = True

    return disable_gradient_checkpointing


def _peft_adapter_layers(memo: dict, model) -> tuple[list, list] | None:
    """(the layers PEFT's ``_enable_adapter_layers`` toggles, the ``BaseTunerLayer``s among them that its
    ``get_model_status`` reads) for a PEFT model whose ``disable_adapter`` takes the LoRA-style branch with PEFT's
    own enabling code; None where it does not (then PEFT's code runs)."""
    return _remember(memo, "adapters", model, lambda: _find_adapter_layers(model))


def _find_adapter_layers(model) -> tuple[list, list] | None:
    layers = None
    peft = sys.modules.get("peft")
    tuners = sys.modules.get("peft.tuners.tuners_utils")
    if peft is not None and tuners is not None and isinstance(model, peft.PeftModel):
        base_tuner, tuner_layer = getattr(tuners, "BaseTuner", None), getattr(tuners, "BaseTunerLayer", None)
        tuner = model.base_model
        cfg = model.peft_config.get(model.active_adapter) if isinstance(model.active_adapter, str) else None
        names = ("disable_adapter_layers", "enable_adapter_layers", "_enable_adapter_layers")
        if (base_tuner is not None and tuner_layer is not None and isinstance(tuner, base_tuner) and cfg is not None
                and not getattr(cfg, "is_prompt_learning", True) and not getattr(cfg, "is_adaption_prompt", True)
                and type(model).disable_adapter is peft.PeftModel.disable_adapter
                and all(getattr(type(tuner), n, None) is getattr(base_tuner, n, None) for n in names)):
            wrapper_types = tuple(t for t in (getattr(sys.modules.get("peft.utils"), n, None) for n in (
                "AuxiliaryTrainingWrapper", "ModulesToSaveWrapper")) if isinstance(t, type))
            toggled = [m for m in tuner.model.modules() if isinstance(m, (tuner_layer, *wrapper_types))]
            status = [m for m in toggled if isinstance(m, tuner_layer)]
            if status:
                layers = (toggled, status)
    return layers


def use_adapter_fast(memo: dict, stock_use_adapter):
    """TRL's ``use_adapter(model, adapter_name)``; with ``adapter_name=None`` (all adapters off: TRL's reference
    pass for a new adapter) PEFT's ``disable_adapter`` done on the adapter layers found once."""

    @contextlib.contextmanager
    def use_adapter(model, adapter_name):
        layers = _peft_adapter_layers(memo, model) if adapter_name is None else None
        if layers is None:
            with stock_use_adapter(model, adapter_name):
                yield
            return
        toggled, status = layers
        enabled = [not m.disable_adapters for m in status]
        if any(enabled) and not all(enabled):
            warnings.warn(
                "The model contains some adapter layers that are enabled and others that are disabled. "
                "This is most likely unintentional. After exiting the disable_adapter context, all adapters "
                "will be enabled")
        tuner = model.base_model
        for name in tuner.active_adapters:
            bias = getattr(tuner.peft_config[name], "bias", "none")
            if bias != "none":
                warnings.warn(f"Careful, disabling adapter layers with bias configured to be '{bias}' does not "
                              "produce the same output as the base model would without adaption.")
        was_disabled = model._adapters_disabled
        try:
            for m in toggled:
                m.enable_adapters(False)
            model._adapters_disabled = True
            yield
        finally:
            if any(enabled):  # PEFT: re-enabled unless every layer was disabled before
                for m in toggled:
                    m.enable_adapters(True)
            model._adapters_disabled = was_disabled

    return use_adapter


def _memoised(memo: dict, tag: str, fn):
    """``fn(model, *args)`` remembered per (model, args)."""

    def call(model, *args, **kwargs):
        key = (tag, args, tuple(sorted(kwargs.items())))
        try:
            hash(key)
        except TypeError:  # an unhashable argument: not remembered
            return fn(model, *args, **kwargs)
        return _remember(memo, key, model, lambda: fn(model, *args, **kwargs))

    return call


@contextlib.contextmanager
def _swapped(module, names: dict):
    """``module``'s globals in ``names`` replaced for the duration (those it lacks are left alone)."""
    old = {k: module.__dict__[k] for k in names if k in module.__dict__}
    module.__dict__.update({k: names[k] for k in old})
    try:
        yield
    finally:
        module.__dict__.update(old)


@contextlib.contextmanager
def _instance_attr(obj, name: str, value):
    had = name in obj.__dict__
    old = obj.__dict__.get(name)
    obj.__dict__[name] = value
    try:
        yield
    finally:
        if had:
            obj.__dict__[name] = old
        else:
            obj.__dict__.pop(name, None)


@contextlib.contextmanager
def step_context(trainer):
    """While one DPO ``compute_loss`` runs: TRL's per-step helpers replaced by the equivalents above."""
    dpo = sys.modules.get("trl.trainer.dpo_trainer")
    if dpo is None:
        yield
        return
    memo = memo_of(trainer)
    acc = getattr(trainer, "accelerator", None)
    names, unwrap = _remember(memo, "step_names", dpo, lambda: _step_replacements(memo, dpo, acc))
    with contextlib.ExitStack() as stack:
        stack.enter_context(_swapped(dpo, names))
        if unwrap is not None:
            stack.enter_context(_instance_attr(acc, "unwrap_model", unwrap))
        yield


def _step_replacements(memo: dict, dpo, acc):
    """(the TRL DPO module globals to replace, the accelerator's memoised ``unwrap_model`` or None), made once."""
    names = {"disable_gradient_checkpointing": gradient_checkpointing_off(memo)}
    if "use_adapter" in dpo.__dict__:
        names["use_adapter"] = use_adapter_fast(memo, dpo.__dict__["use_adapter"])
    if "is_peft_model" in dpo.__dict__:
        names["is_peft_model"] = _memoised(memo, "is_peft_model", dpo.__dict__["is_peft_model"])
    stock_unwrap = getattr(acc, "unwrap_model", None) if acc is not None else None
    return names, (_memoised(memo, "unwrap", stock_unwrap) if stock_unwrap is not None else None)


def parameters(trainer, model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """``list(model.parameters())``, listed once per model (the fused gradient clip reads every ``.grad``)."""
    return _remember(memo_of(trainer), "parameters", model, lambda: list(model.parameters()))


@contextlib.contextmanager
def lean_model_calls(model: torch.nn.Module, memo: dict | None = None):
    """For the duration: ``model.train()`` returns at once when every module is already in training mode (the
    Trainer calls it at the start of every training step; it would walk and set every module), and
    ``model.zero_grad()`` (after every optimizer step) clears the gradients from a parameter list made once.

    Both lists are made at the first call (inside the training loop, after accelerate's prepare) and kept in
    ``memo`` (the trainer's: the parameter list is the one `parameters` gives the fused clip) for this ``train()``; for whole weights on one process or DDP only (the caller checks: sharding engines replace the
    parameters). ``train`` takes the stock path when a module overrides ``train`` (beyond transformers'
    ``PreTrainedModel.train``, which does nothing more when the mode does not change), for ``mode=False``, or when a
    module is in eval mode; ``zero_grad(set_to_none=False)`` and a model that overrides ``zero_grad`` take it too."""
    from transformers import PreTrainedModel

    stock_train, stock_zero = model.train, model.zero_grad
    memo = {} if memo is None else memo
    plain = (torch.nn.Module.train, PreTrainedModel.train)

    def _modules():  # None when a module overrides train(): then the stock call always runs
        mods = list(model.modules())
        return mods if all(type(m).train in plain for m in mods) else None

    def train(mode: bool = True):
        mods = _remember(memo, "train_modules", model, _modules)
        if mode is True and mods is not None and all(m.training for m in mods):
            return model
        return stock_train(mode)

    def zero_grad(set_to_none: bool = True) -> None:
        if not set_to_none:
            return stock_zero(set_to_none)
        for p in _remember(memo, "parameters", model, lambda: list(model.parameters())):
            if p.grad is not None:
                p.grad = None
        return None

    with contextlib.ExitStack() as stack:
        stack.enter_context(_instance_attr(model, "train", train))
        if type(model).zero_grad is torch.nn.Module.zero_grad and not getattr(model, "_is_replica", False):
            stack.enter_context(_instance_attr(model, "zero_grad", zero_grad))
        yield


def floating_point_ops(trainer, inputs, stock):
    """The Trainer's ``floating_point_ops(inputs)`` (``stock``: its bound method, whatever formula this transformers
    version uses) with the model's ``num_parameters`` answered from a memo per arguments while it runs."""
    model = trainer.model
    counter = getattr(model, "num_parameters", None)
    if counter is None or not isinstance(model, torch.nn.Module):
        return stock(inputs)
    count = _memoised(memo_of(trainer), "num_parameters", lambda _m, *a, **k: counter(*a, **k))

    with _instance_attr(model, "num_parameters", lambda *a, **k: count(model, *a, **k)):
        return stock(inputs)
