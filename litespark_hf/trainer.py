"""One flag for the transformers Trainer and TRL's SFT and DPO trainers: ``use_litespark=True``.

Drop-in subclasses: change ``from trl import SFTConfig, SFTTrainer`` to ``from litespark_hf import SFTConfig,
SFTTrainer`` and pass ``use_litespark=True`` (``--use_litespark`` on a TrlParser/HfArgumentParser command line).

Where the rewrite happens: at the start of ``train()`` (and on every ``model_init`` result), exactly where
transformers applies ``use_liger_kernel``: after the model is built (and PEFT-wrapped by TRL), before gradient
checkpointing is enabled and before ``accelerator.prepare``, so FSDP and DeepSpeed wrap the rewritten model.
When ``litespark_config`` sets a SAT omission rate, SAT is enabled on the model and a `SATCallback` is added.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import transformers
import trl

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


class LitesparkTrainerMixin:
    """Applies `litespark_hf.apply` when ``args.use_litespark`` is set; mixed into the trainers below."""

    def _litespark_config(self) -> LitesparkConfig:
        """``args.litespark_config`` parsed (once per value)."""
        raw = self.args.litespark_config
        cached = self.__dict__.get("_litespark_cfg")
        if cached is None or cached[0] is not raw:
            cached = self.__dict__["_litespark_cfg"] = (raw, LitesparkConfig.from_any(raw))
        return cached[1]

    def _apply_litespark(self, model, sat: bool = True):
        if model is None or not getattr(self.args, "use_litespark", False):
            return model
        cfg = self._litespark_config()
        if not sat:  # a frozen reference model never runs sparse
            cfg = LitesparkConfig.from_any({**cfg.to_dict(), "sat_omission_rate_mlp": 0.0,
                                            "sat_omission_rate_heads": 0.0})
        apply(model, cfg)
        if sat and sat_is_enabled(model) and not any(
            isinstance(cb, SATCallback) for cb in self.callback_handler.callbacks
        ):
            # First in line, so that reporting callbacks (TensorBoard, W&B) see the sat/* keys it adds to the logs.
            self.callback_handler.callbacks.insert(0, SATCallback(cfg))
        return model

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
        every gradient per step. Returns the pre-clip norm like the Trainer's clip, or None where it does not apply.
        """
        if not getattr(self.args, "use_litespark", False):
            return None
        if not self._litespark_config().fused_grad_clip:
            return None
        if not self._litespark_full_weights() or getattr(self.accelerator, "scaler", None) is not None:
            return None
        opt = getattr(self.optimizer, "optimizer", self.optimizer)  # inside accelerate's AcceleratedOptimizer
        if not isinstance(opt, LitesparkAdamW) and (not isinstance(opt, (torch.optim.Adam, torch.optim.AdamW))
                                                    or not all(g.get("fused") for g in opt.param_groups)):
            return None
        from litespark_kernels._dispatch import _is_dtensor

        grads = [p.grad for p in model.parameters() if p.grad is not None]
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

    def _litespark_adamw(self, optimizer):
        """`LitesparkAdamW` in place of the Trainer's torch AdamW (`LitesparkConfig.fused_optimizer`), or None.

        Only for exactly ``torch.optim.AdamW`` without amsgrad/maximize/capturable/differentiable, fp32 trainable
        weights on one CUDA device, on one process or DDP (FSDP and DeepSpeed shard the weights and own the step).
        """
        if type(optimizer) is not torch.optim.AdamW or not self._litespark_full_weights():
            return None
        groups = optimizer.param_groups
        if any(g.get("amsgrad") or g.get("maximize") or g.get("capturable") or g.get("differentiable")
               or isinstance(g.get("lr"), torch.Tensor) for g in groups):
            return None
        params = [p for g in groups for p in g["params"]]
        from litespark_kernels._dispatch import _is_dtensor

        if not params or any(p.dtype != torch.float32 or not p.is_cuda or _is_dtensor(p) for p in params) \
                or len({p.device for p in params}) != 1:
            return None
        from .patching import unwrap_model

        dtype = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None
        keys = ("params", "lr", "betas", "eps", "weight_decay")
        new_groups = [{k: g[k] for k in keys if k in g} for g in groups]
        d = optimizer.defaults
        return LitesparkAdamW(new_groups, lr=d["lr"], betas=d["betas"], eps=d["eps"],
                              weight_decay=d["weight_decay"], model=unwrap_model(self.model), shadow_dtype=dtype)

    def call_model_init(self, trial=None):
        return self._apply_litespark(super().call_model_init(trial))

    def train(self, *args, **kwargs):
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
        try:  # both put back when train() returns
            return super().train(*args, **kwargs)
        finally:
            if own_filter:
                self.__dict__.pop("_litespark_nan_filter", None)
                self.args.logging_nan_inf_filter = True
            if async_batches:
                loader.non_blocking = False

    def training_step(self, model, inputs, *args, **kwargs):
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
class TrainingArguments(LitesparkArguments, transformers.TrainingArguments):
    """transformers.TrainingArguments + ``use_litespark`` / ``litespark_config``."""


@dataclass
class SFTConfig(LitesparkArguments, trl.SFTConfig):
    """trl.SFTConfig + ``use_litespark`` / ``litespark_config``."""


@dataclass
class DPOConfig(LitesparkArguments, trl.DPOConfig):
    """trl.DPOConfig + ``use_litespark`` / ``litespark_config``."""


class Trainer(LitesparkTrainerMixin, transformers.Trainer):
    """transformers.Trainer that honours ``use_litespark``."""


class SFTTrainer(LitesparkTrainerMixin, trl.SFTTrainer):
    """trl.SFTTrainer that honours ``use_litespark``."""


class DPOTrainer(LitesparkTrainerMixin, trl.DPOTrainer):
    """trl.DPOTrainer that honours ``use_litespark``."""
