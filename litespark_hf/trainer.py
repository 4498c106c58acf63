"""One flag for the transformers Trainer and TRL's SFT and DPO trainers: ``use_litespark=True``.

Drop-in subclasses: change ``from trl import SFTConfig, SFTTrainer`` to ``from litespark_hf import SFTConfig,
SFTTrainer`` and pass ``use_litespark=True`` (``--use_litespark`` on a TrlParser/HfArgumentParser command line).

Where the rewrite happens: at the start of ``train()`` (and on every ``model_init`` result), exactly where
transformers applies ``use_liger_kernel``: after the model is built (and PEFT-wrapped by TRL), before gradient
checkpointing is enabled and before ``accelerator.prepare``, so FSDP and DeepSpeed wrap the rewritten model.
When ``litespark_config`` sets a SAT omission rate, SAT is enabled on the model and a `SATCallback` is added.

A config of this module with ``use_litespark=True`` handed to a stock trainer (``trl.SFTTrainer``, ...) is honoured
too, for the model layers only (`_install_stock_trainer_hook`, with a warning). `litespark_hf.patch_trl` and the
``litespark-run`` launcher (`litespark_hf.run`) put these classes in place of TRL's for unchanged scripts.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass, field

import torch

# The stock classes, from the modules that define them: `litespark_hf.patch_trl` rebinds the public names
# (``trl.SFTTrainer``, ``transformers.Trainer``, ...) to the subclasses below, never these modules' own attributes,
# so the bases stay the stock classes even when this module is imported (or reloaded) after patching.
from transformers.trainer import Trainer as _StockTrainer
from transformers.training_args import TrainingArguments as _StockTrainingArguments
from trl.trainer.dpo_config import DPOConfig as _StockDPOConfig
from trl.trainer.dpo_trainer import DPOTrainer as _StockDPOTrainer
from trl.trainer.sft_config import SFTConfig as _StockSFTConfig
from trl.trainer.sft_trainer import SFTTrainer as _StockSFTTrainer

from . import bookkeeping, unpadding
from .config import LitesparkConfig
from .optim import LitesparkAdamW
from .patching import apply
from .sat import SATCallback
from .sat import is_enabled as sat_is_enabled


@dataclass
class LitesparkArguments:
    """The flag added to every argument class of this module."""

    use_litespark: bool = field(
        default=False,
        metadata={
            "help": "Train with Litespark layers: the `litespark` attention backend, fused norms, RoPE, MLP "
            "activations and (outside TRL's own fused LM head) the fused linear cross-entropy."
        },
    )
    litespark_config: str | None = field(
        default=None,
        metadata={
            "help": "LitesparkConfig options as a JSON object (or a dict in a YAML config), e.g. "
            '\'{"fused_cross_entropy": false}\'. Unknown keys are an error.'
        },
    )

    def __post_init__(self):
        super().__post_init__()
        # Fail at argument parsing, not at train(), on a bad litespark_config.
        LitesparkConfig.from_any(self.litespark_config)
        if self.use_litespark:  # so that a stock Trainer / TRL trainer given this config honours it too
            _install_stock_trainer_hook()


def _trainer_litespark_config(trainer) -> LitesparkConfig:
    """``trainer.args.litespark_config`` parsed (once per value)."""
    raw = trainer.args.litespark_config
    cached = trainer.__dict__.get("_litespark_cfg")
    if cached is None or cached[0] is not raw:
        cached = trainer.__dict__["_litespark_cfg"] = (raw, LitesparkConfig.from_any(raw))
    return cached[1]


def _apply_to_trainer_model(trainer, model, sat: bool = True):
    """`apply` on one of the trainer's models (and the SAT callback), when ``args.use_litespark`` is set."""
    if model is None or not getattr(trainer.args, "use_litespark", False):
        return model
    target = _deepspeed_module(model)
    if target is not model:  # TRL's DPO hands a ZeRO-3 reference model to DeepSpeed in __init__, before train()
        _apply_to_trainer_model(trainer, target, sat)
        return model
    cfg = _trainer_litespark_config(trainer)
    if cfg.compile_layers:
        _check_compile_layers(trainer)
    if not sat:  # a frozen reference model never runs sparse
        cfg = LitesparkConfig.from_any({**cfg.to_dict(), "sat_omission_rate_mlp": 0.0,
                                        "sat_omission_rate_heads": 0.0})
    apply(model, cfg)
    if sat and sat_is_enabled(model) and not any(
        isinstance(cb, SATCallback) for cb in trainer.callback_handler.callbacks
    ):
        # First in line, so that reporting callbacks (TensorBoard, W&B) see the sat/* keys it adds to the logs.
        trainer.callback_handler.callbacks.insert(0, SATCallback(cfg))
    return model


def _check_compile_layers(trainer) -> None:
    """`LitesparkConfig.compile_layers` is for one device or DDP, without the Trainer's whole-model compile."""
    args = trainer.args
    if getattr(args, "torch_compile", False):
        raise ValueError("litespark_config compile_layers=True compiles each decoder layer; torch_compile=True "
                         "compiles the whole model as well: use one of them")
    if getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False) \
            or getattr(args, "fsdp", None) or getattr(args, "deepspeed", None):
        raise ValueError("litespark_config compile_layers=True is not supported under FSDP or DeepSpeed (their "
                         "per-layer hooks would be traced); drop it for sharded training")


def _deepspeed_module(model):
    """The module inside a ``deepspeed.DeepSpeedEngine`` (``.module``), else ``model``."""
    return model.module if type(model).__name__ == "DeepSpeedEngine" and hasattr(model, "module") else model


_STOCK_WARNED: set[type] = set()


def _stock_trainer_applies(trainer) -> bool:
    """A trainer that is not one of ours was given a litespark_hf config with ``use_litespark=True``."""
    return not isinstance(trainer, LitesparkTrainerMixin) and isinstance(trainer.args, LitesparkArguments) \
        and trainer.args.use_litespark


def _install_stock_trainer_hook() -> None:
    """Make ``transformers.Trainer.train`` / ``call_model_init`` (so every stock trainer: TRL's SFT, DPO, ...)
    apply Litespark's model layers when their ``args`` is a litespark_hf config with ``use_litespark=True``.

    Installed once, the first time such a config is made; a no-op for every other trainer and config (including
    this module's trainers, which do it themselves). Only the model-side rewrite happens there: the trainer-side
    features need this module's classes, which a one-time warning says."""
    if getattr(_StockTrainer.train, "_litespark_hook", False):
        return
    stock_train, stock_model_init = _StockTrainer.train, _StockTrainer.call_model_init

    @functools.wraps(stock_train)
    def train(self, *args, **kwargs):
        if _stock_trainer_applies(self):
            _apply_to_trainer_model(self, self.model)
            ref_model = getattr(self, "ref_model", None)  # DPO with a separate reference model
            if ref_model is not None:
                _apply_to_trainer_model(self, ref_model, sat=False)
            if type(self) not in _STOCK_WARNED:
                _STOCK_WARNED.add(type(self))
                warnings.warn(
                    f"use_litespark=True on a stock {type(self).__name__}: the Litespark model layers are applied "
                    "at the start of train(), but the trainer-side features (fused_optimizer, fused_grad_clip, "
                    "sync_free_nan_filter, non_blocking_batches, lean_bookkeeping) need litespark_hf's trainer classes "
                    "(litespark_hf.SFTTrainer, DPOTrainer, Trainer) or litespark_hf.patch_trl() before the trainer "
                    "is imported.", UserWarning, stacklevel=2,
                )
        return stock_train(self, *args, **kwargs)

    @functools.wraps(stock_model_init)
    def call_model_init(self, *args, **kwargs):
        model = stock_model_init(self, *args, **kwargs)
        return _apply_to_trainer_model(self, model) if _stock_trainer_applies(self) else model

    train._litespark_hook = call_model_init._litespark_hook = True
    _StockTrainer.train, _StockTrainer.call_model_init = train, call_model_init


def _clear_stale_fsdp_groups(module, args):
    """Forward pre-hook on an FSDP2 root: forget group forwards that an earlier forward left unfinished.

    ``fully_shard([final_norm, embed_tokens, lm_head])`` (accelerate's FSDP2 layout for the embedding and the head, tied
    or not) keeps a set of the group's modules still to run. TRL's fused LM head (SFT, DPO) reads ``lm_head.weight`` and
    never calls ``lm_head``, so the set keeps ``lm_head`` after every forward. torch before pytorch/pytorch#180428
    (2.11; 2.13 has it) clears it only at the end of a backward and fires the group's pre-forward hook (the unshard)
    only when it is empty: after an evaluation forward, anything that reshards the group outside a forward/backward (a
    checkpoint save: the state-dict hook reshards every unit) leaves the next forward with the sharded DTensor weights
    ("aten.embedding.default got mixed torch.Tensor and DTensor"). Since that change torch finishes such groups in the
    root's post-forward itself; there the set is already empty here and this does nothing. At the root's pre-forward no
    forward of the model is under way, so anything left in a set is stale.
    """
    get_state = getattr(module, "_get_fsdp_state", None)
    ctx = getattr(get_state(), "_state_ctx", None) if get_state is not None else None
    if ctx is None or getattr(ctx, "iter_forward_root", None) is not None:
        return None  # not lazily initialised yet (nothing can be stale), or inside a forward
    for state in getattr(ctx, "all_states", ()):
        pending = getattr(state, "_modules_to_run_forward", None)
        if pending:
            pending.clear()
    return None


def _guard_fsdp2_root(model) -> None:
    """Install `_clear_stale_fsdp_groups` (once) on ``model`` when it is an FSDP2 (``fully_shard``) root."""
    model = getattr(model, "_orig_mod", model)  # torch.compile
    if model is None or "_litespark_fsdp_guard" in model.__dict__:
        return
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return
    if isinstance(model, FSDPModule):
        # prepend: before FSDP's own root pre-forward hook (which marks the forward as under way)
        model.__dict__["_litespark_fsdp_guard"] = model.register_forward_pre_hook(
            _clear_stale_fsdp_groups, prepend=True)


def _sharded_grad_norm(grads: list) -> torch.Tensor | None:
    """The 2-norm of FSDP2's sharded gradients over the whole model, from each process's local shards: the local
    sum of squares, summed over the mesh's process group (one all-reduce of one scalar). The same number that
    ``torch.nn.utils.clip_grad_norm_`` computes through DTensor dispatch, as a plain replicated tensor. None (the
    caller then clips as usual) unless every gradient is a DTensor sharded (``Shard``) on one 1-D mesh: a replicated
    placement (HSDP, tensor parallelism) would count its elements once per process."""
    from torch.distributed.tensor import DTensor, Shard

    mesh = None
    for g in grads:
        if not isinstance(g, DTensor) or g.device_mesh.ndim != 1 or not isinstance(g.placements[0], Shard):
            return None
        if mesh is None:
            mesh = g.device_mesh
        elif g.device_mesh is not mesh and g.device_mesh != mesh:
            return None
    local = [g._local_tensor for g in grads if g._local_tensor.numel()]
    if local:
        norm = torch.nn.utils.get_total_norm(local, 2.0, False, None).float()
    else:  # this process holds no element of any gradient
        norm = torch.zeros((), dtype=torch.float32, device=grads[0]._local_tensor.device)
    if mesh.size() == 1:  # one process: the local norm is the norm (no square, reduce and root)
        return norm
    sq = norm.square()
    torch.distributed.all_reduce(sq, group=mesh.get_group())
    return sq.sqrt()


# Accelerator device types on which the Trainer hands FSDP2's sharded weights to `LitesparkAdamW` (the kernel runs
# on CUDA; tests/fsdp2_cpu_worker.py adds "cpu" to drive the whole accelerate path on gloo, through the reference).
_FSDP2_ADAMW_DEVICES = ("cuda",)


class LitesparkTrainerMixin:
    """Applies `litespark_hf.apply` when ``args.use_litespark`` is set; mixed into the trainers below."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        # Every training and evaluation forward of the Trainer, TRL's SFT and DPO goes through here, after
        # accelerate wrapped the model (with use_litespark or not: the FSDP2 fix concerns the stock model too).
        _guard_fsdp2_root(model)
        if isinstance(self, _StockDPOTrainer) and self._litespark_lean():
            with bookkeeping.step_context(self):
                return super().compute_loss(model, inputs, *args, **kwargs)
        return super().compute_loss(model, inputs, *args, **kwargs)

    def _litespark_lean(self) -> bool:
        """`LitesparkConfig.lean_bookkeeping` is on for this run."""
        return getattr(self.args, "use_litespark", False) and self._litespark_config().lean_bookkeeping

    def floating_point_ops(self, inputs):
        if self._litespark_lean():
            return bookkeeping.floating_point_ops(self, inputs, super().floating_point_ops)
        return super().floating_point_ops(inputs)

    def _litespark_config(self) -> LitesparkConfig:
        """``args.litespark_config`` parsed (once per value)."""
        return _trainer_litespark_config(self)

    def _apply_litespark(self, model, sat: bool = True):
        return _apply_to_trainer_model(self, model, sat)

    def _litespark_full_weights(self) -> bool:
        """One process or DDP (every process holds whole weights and runs its own optimizer step); not FSDP or
        DeepSpeed, which shard the weights and own the step."""
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU) \
            and not getattr(self, "is_deepspeed_enabled", False) and not getattr(self, "is_fsdp_enabled", False)

    def _clip_grad_norm(self, model):
        folded = self._litespark_folded_clip(model)
        return folded if folded is not None else super()._clip_grad_norm(model)

    def _litespark_folded_clip(self, model):
        """Gradient clipping folded into the fused Adam/AdamW step (`LitesparkConfig.fused_grad_clip`).

        The Trainer's clip is a norm over all gradients, then a pass that multiplies every gradient by
        min(1, max_norm / (norm + 1e-6)). Here the norm is the same (`torch.nn.utils.get_total_norm`) and the factor
        is handed to the optimizer as ``grad_scale``: it divides each gradient by it as it reads it (torch's fused
        kernel then stores the clipped gradient; `LitesparkAdamW` does not write gradients), which saves a pass over
        every gradient per step (under FSDP2 also the per-tensor DTensor dispatch of torch's clip). Returns the pre-clip
        norm like the Trainer's clip, or None where it does not apply.
        """
        if not getattr(self.args, "use_litespark", False):
            return None
        if not self._litespark_config().fused_grad_clip:
            return None
        if getattr(self.accelerator, "scaler", None) is not None:
            return None
        fsdp2 = self._litespark_fsdp2()
        if not fsdp2 and not self._litespark_full_weights():
            return None
        opt = getattr(self.optimizer, "optimizer", self.optimizer)  # inside accelerate's AcceleratedOptimizer
        if fsdp2 and not isinstance(opt, LitesparkAdamW):  # torch's fused AdamW on DTensors: the Trainer's clip
            return None
        if not isinstance(opt, LitesparkAdamW) and (not isinstance(opt, (torch.optim.Adam, torch.optim.AdamW))
                                                    or not all(g.get("fused") for g in opt.param_groups)):
            return None
        from litespark_kernels._dispatch import _is_dtensor

        if fsdp2:  # FSDP2 swaps module parameters between sharded and gathered ones: list them afresh
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            total = _sharded_grad_norm(grads) if grads else None
            if total is None:
                return None
        else:
            params = bookkeeping.parameters(self, model) if self._litespark_lean() else model.parameters()
            grads = [p.grad for p in params if p.grad is not None]
            if not grads or any(_is_dtensor(g) for g in grads):
                return None
            total = torch.nn.utils.get_total_norm(grads, 2.0, False, None)
        coef = torch.clamp(self.args.max_grad_norm / (total.float() + 1e-6), max=1.0)
        opt.grad_scale = coef.reciprocal()
        if not opt.__dict__.get("_litespark_clip_hook"):
            opt.register_step_post_hook(lambda o, args, kwargs: o.__dict__.pop("grad_scale", None))
            opt.__dict__["_litespark_clip_hook"] = True
        return total

    def create_optimizer(self, *args, **kwargs):
        made_here = self.optimizer is None
        optimizer = super().create_optimizer(*args, **kwargs)
        if made_here and getattr(self.args, "use_litespark", False) and self._litespark_config().fused_optimizer:
            swapped = self._litespark_adamw(optimizer)
            if swapped is not None:
                self.optimizer = optimizer = swapped
        return optimizer

    def _litespark_fsdp2(self) -> bool:
        """The Trainer runs accelerate's FSDP2 (``fully_shard``), without DeepSpeed and without FSDP2's CPU offload
        (whose shards, on the CPU, the kernel does not take)."""
        if not getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False):
            return False
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        if plugin is None or getattr(plugin, "fsdp_version", 1) != 2:
            return False
        try:
            from torch.distributed.fsdp import CPUOffloadPolicy
        except ImportError:  # pragma: no cover - torch without FSDP2
            return False
        return not isinstance(getattr(plugin, "cpu_offload", None), CPUOffloadPolicy)

    def _litespark_adamw(self, optimizer):
        """`LitesparkAdamW` in place of the Trainer's torch AdamW (`LitesparkConfig.fused_optimizer`), or None.

        Only for exactly ``torch.optim.AdamW`` without amsgrad/maximize/capturable/differentiable and fp32 trainable
        weights, on one process or DDP (every weight on one CUDA device) or under FSDP2: there the Trainer creates the
        optimizer before ``accelerator.prepare`` shards the model, and accelerate then points the optimizer's
        ``param_groups`` at the sharded DTensor weights (``fsdp2_switch_optimizer_parameters``), which
        `LitesparkAdamW` steps on their local shards; the weights may be plain fp32 tensors (on the CPU or the meta
        device until prepare moves them) or fp32 DTensors, on a CUDA accelerator. No low-precision copies under
        FSDP2; the gradient clip is folded into the step there too (`_sharded_grad_norm`). Never for FSDP1 or
        DeepSpeed (which own the step).
        """
        if type(optimizer) is not torch.optim.AdamW:
            return None
        fsdp2 = self._litespark_fsdp2()
        if not fsdp2 and not self._litespark_full_weights():
            return None
        groups = optimizer.param_groups
        if any(g.get("amsgrad") or g.get("maximize") or g.get("capturable") or g.get("differentiable")
               or isinstance(g.get("lr"), torch.Tensor) for g in groups):
            return None
        params = [p for g in groups for p in g["params"]]
        from litespark_kernels._dispatch import _is_dtensor

        if not params or any(p.dtype != torch.float32 for p in params):
            return None
        keys = ("params", "lr", "betas", "eps", "weight_decay")
        new_groups = [{k: g[k] for k in keys if k in g} for g in groups]
        d = optimizer.defaults
        hyper = dict(lr=d["lr"], betas=d["betas"], eps=d["eps"], weight_decay=d["weight_decay"])
        if fsdp2:
            if self.accelerator.device.type not in _FSDP2_ADAMW_DEVICES \
                    or any(_is_dtensor(p) and p.device.type != self.accelerator.device.type for p in params):
                return None
            return LitesparkAdamW(new_groups, **hyper)
        if any(not p.is_cuda or _is_dtensor(p) for p in params) or len({p.device for p in params}) != 1:
            return None
        from .patching import unwrap_model

        dtype = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None
        return LitesparkAdamW(new_groups, **hyper, model=unwrap_model(self.model), shadow_dtype=dtype)

    def call_model_init(self, trial=None):
        return self._apply_litespark(super().call_model_init(trial))

    def train(self, *args, **kwargs):
        bookkeeping.reset(self)
        self._apply_litespark(self.model)
        ref_model = getattr(self, "ref_model", None)  # DPO with a separate reference model
        if ref_model is not None:
            self._apply_litespark(ref_model, sat=False)
        on = getattr(self.args, "use_litespark", False)
        own_filter = on and self.args.logging_nan_inf_filter and self._litespark_config().sync_free_nan_filter
        # A blocking copy of each batch to the GPU waits for everything queued (the previous step's backward and
        # optimizer) first; from pinned memory a non-blocking copy is safe and lets the host run ahead.
        loader = getattr(getattr(self, "accelerator", None), "dataloader_config", None)
        async_batches = (on and loader is not None and not loader.non_blocking and self.args.dataloader_pin_memory
                         and torch.cuda.is_available() and self._litespark_config().non_blocking_batches)
        if async_batches:
            loader.non_blocking = True
        if own_filter:
            # The Trainer's filter (``isnan(loss) or isinf(loss)`` on the host) waits for every backward to finish;
            # training_step below applies the same rule on the GPU.
            self.__dict__["_litespark_nan_filter"] = True
            self.args.logging_nan_inf_filter = False
        lean = contextlib.nullcontext()
        if on and self._litespark_lean() and self._litespark_full_weights() and isinstance(self.model,
                                                                                             torch.nn.Module):
            lean = bookkeeping.lean_model_calls(self.model, bookkeeping.memo_of(self))
        try:  # all put back when train() returns
            with lean:
                return super().train(*args, **kwargs)
        finally:
            if own_filter:
                self.__dict__.pop("_litespark_nan_filter", None)
                self.args.logging_nan_inf_filter = True
            if async_batches:
                loader.non_blocking = False

    def get_train_dataloader(self, *args, **kwargs):
        if not self._litespark_counts_tokens():
            return super().get_train_dataloader(*args, **kwargs)
        collator = self.data_collator
        self.data_collator = unpadding.TokenCountingCollator(collator)
        try:
            return super().get_train_dataloader(*args, **kwargs)
        finally:
            self.data_collator = collator

    def _litespark_counts_tokens(self) -> bool:
        """The training batches carry their real-token count from the collator (`unpadding.TokenCountingCollator`),
        so the unpadding of a padded batch needs no host sync: with ``use_litespark``, the backend and ``unpad`` on,
        and batches each process collates itself (not accelerate's dispatching of one process's batches)."""
        if not getattr(self.args, "use_litespark", False) or self.data_collator is None:
            return False
        cfg = self._litespark_config()
        if not (cfg.attention and cfg.unpad):
            return False
        dispatch = getattr(getattr(self.accelerator, "dataloader_config", None), "dispatch_batches", None)
        iterable = isinstance(getattr(self, "train_dataset", None), torch.utils.data.IterableDataset)
        return not (dispatch or (dispatch is None and iterable and self.accelerator.num_processes > 1))

    def training_step(self, model, inputs, *args, **kwargs):
        unpadding.pop_token_count(inputs)  # from TokenCountingCollator: noted for this batch's attention mask
        if self.__dict__.get("_litespark_prefetch_model") is not model:  # once per prepared model
            self.__dict__["_litespark_prefetch_model"] = model
            if getattr(self.args, "use_litespark", False) and self._litespark_config().fsdp2_forward_prefetch \
                    and self._litespark_fsdp2():
                from .sharding import set_fsdp2_forward_prefetch

                set_fsdp2_forward_prefetch(model)
        loss = super().training_step(model, inputs, *args, **kwargs)
        if not self.__dict__.get("_litespark_nan_filter"):
            return loss
        running, last = getattr(self, "_tr_loss", None), getattr(self, "_globalstep_last_logged", None)
        if not isinstance(running, torch.Tensor) or last is None or not isinstance(loss, torch.Tensor):
            # a transformers version without these loop attributes: give the check back to the Trainer
            self.__dict__.pop("_litespark_nan_filter", None)
            self.args.logging_nan_inf_filter = True
            return loss
        # what the Trainer adds for a non-finite loss: the average of the losses since the last log
        fallback = running / (1 + self.state.global_step - last)
        return torch.where(torch.isfinite(loss), loss, fallback.to(loss.dtype))


@dataclass
class TrainingArguments(LitesparkArguments, _StockTrainingArguments):
    """transformers.TrainingArguments + ``use_litespark`` / ``litespark_config``."""


@dataclass
class SFTConfig(LitesparkArguments, _StockSFTConfig):
    """trl.SFTConfig + ``use_litespark`` / ``litespark_config``."""


@dataclass
class DPOConfig(LitesparkArguments, _StockDPOConfig):
    """trl.DPOConfig + ``use_litespark`` / ``litespark_config``."""


class Trainer(LitesparkTrainerMixin, _StockTrainer):
    """transformers.Trainer that honours ``use_litespark``."""


class SFTTrainer(LitesparkTrainerMixin, _StockSFTTrainer):
    """trl.SFTTrainer that honours ``use_litespark``."""


class DPOTrainer(LitesparkTrainerMixin, _StockDPOTrainer):
    """trl.DPOTrainer that honours ``use_litespark``."""


# Each class of this module and the stock class it stands in for (`litespark_hf.patch_trl`).
STOCK_CLASSES: dict[str, type] = {
    "TrainingArguments": _StockTrainingArguments, "SFTConfig": _StockSFTConfig, "DPOConfig": _StockDPOConfig,
    "Trainer": _StockTrainer, "SFTTrainer": _StockSFTTrainer, "DPOTrainer": _StockDPOTrainer,
}
