"""`LitesparkConfig.checkpoint_layers`: under gradient checkpointing, recompute only as many decoder layers as the
device's memory needs.

Gradient checkpointing (TRL's default) saves each decoder layer's input and runs the layer's forward a second time
in the backward. That costs a third more GEMM work and, in the host-bound post-training steps, a second pass of every
layer's Python and launches; it also turns off the fusions that cross a layer boundary (the residual add into the
next norm). Litespark's layers keep far less than stock (fused projections, no [tokens, vocab] logits), so on a large
GPU the activations of every layer fit where the user asked for checkpointing to fit the stock model.

``"auto"`` (the default): before each training forward (grad enabled, the model in training mode, checkpointing on
in every decoder layer as transformers sets it) the number of layers that keep their activations is chosen from the
memory this process may use on the device and an upper bound of what one layer saves per token
(`activation_bytes_per_token`); the first layers stay checkpointed, the last ``k`` do not (contiguous, so the fused
residual-norm add runs between them). The estimate (`plan`) counts what is allocated now, the parameter gradients and
(before the first optimizer step) AdamW's two states still to come, one chunk of the loss's logits, the layer being
recomputed and a margin; when nothing fits it is the user's checkpointing as it was. Only on CUDA, in one process,
outside ``torch.compile``; elsewhere checkpointing is untouched. The weights may be whole on one device or sharded by
FSDP2 (DTensors) or DeepSpeed ZeRO-3 at world size 1: the estimate then counts the local shards, the gathered units
(`ENGINE_UNITS`) and the engine's gradient buffers, which ZeRO-3 allocates before the first forward and so are counted
twice there (on the safe side). With several processes each would plan on its own batch (see `_distributed`).
``"all"``: transformers' behaviour (every layer recomputed). An integer ``n``: exactly the first ``n`` layers
recomputed, no memory estimate.

Values are unchanged: a layer's recomputation reproduces its forward, so losses and gradients are the same with any
split (tests/test_checkpointing.py, fp32).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn

from .model_utils import decoder_layers

logger = logging.getLogger(__name__)

_STATE = "_litespark_checkpointing"
BUDGET_FRACTION = 0.9  # of the device's memory, less what other processes hold
MARGIN_BYTES = 2 << 30  # allocator fragmentation, workspaces, the optimizer step's temporaries
SAFETY = 1.25  # on top of the per-token bound
# Under FSDP2 / ZeRO-3: a unit's gathered compute-dtype weights, the next unit's prefetched ones and the unit's
# fp32 gradient before its reduce-scatter are live on top of the shards, in layer-weight-copy units (4 = 2 + 2 x 2 B).
ENGINE_UNITS = 4
PLANNED_DEVICE_TYPES = ("cuda",)  # where "auto" plans (tests add "cpu" with a fake `device_memory`)


def parse_mode(value) -> str | int:
    """``"auto"``, ``"all"`` or a non-negative integer (a string of digits is taken as one); anything else is an
    error naming the accepted values."""
    if isinstance(value, bool):
        raise ValueError(f"checkpoint_layers must be 'auto', 'all' or a number of layers, got {value!r}")
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("auto", "all"):
            return v
        if v.isdigit():
            return int(v)
    raise ValueError(f"checkpoint_layers must be 'auto', 'all' or a number of layers, got {value!r}")


def activation_bytes_per_token(hf_config, compute_bytes: int = 2, residual_bytes: int = 4) -> int | None:
    """An upper bound of the bytes one Litespark decoder layer keeps for its backward, per token, without
    checkpointing (None when the config lacks the sizes it needs).

    Counted generously for every family the table covers: the layer's input and its residual sum (``residual_bytes``,
    fp32 under autocast over fp32 weights), four norm outputs with their statistics, q/k/v before and after RoPE and
    their norms, the attention output and its log-sum-exp, the gate/up product and the activation (for MoE: per routed
    expert and the shared one, plus the router's logits); then x `SAFETY`. The copy of the layer's weights its
    projections save is per layer, not per token (`layer_weight_bytes`). tests/test_checkpointing.py checks the two
    against what the layers actually save."""
    h = getattr(hf_config, "hidden_size", None)
    nh = getattr(hf_config, "num_attention_heads", None)
    if not h or not nh:
        return None
    hd = getattr(hf_config, "head_dim", None) or h // nh
    nkv = getattr(hf_config, "num_key_value_heads", None) or nh
    q, kv = nh * hd, nkv * hd
    inter = getattr(hf_config, "intermediate_size", None) or 4 * h
    experts = getattr(hf_config, "num_experts_per_tok", None)
    if experts:
        moe_inter = getattr(hf_config, "moe_intermediate_size", None) or inter
        shared = getattr(hf_config, "shared_expert_intermediate_size", None) or 0
        n_experts = getattr(hf_config, "num_local_experts", None) or getattr(hf_config, "num_experts", None) or 0
        inter = experts * moe_inter + shared
        router = 4 * n_experts
    else:
        router = 0
    c, r = compute_bytes, residual_bytes
    total = (2 * r * h  # input, residual sum
             + 4 * (c * h + 4)  # norm outputs and their 1/rms
             + 2 * c * (q + 2 * kv) + c * (q + kv)  # q/k/v before and after RoPE, q/k norms
             + c * q + 4 * nh  # attention output, log-sum-exp
             + 3 * c * inter + 4 * inter // max(1, hd)  # gate/up product, activation (and any per-chunk stats)
             + router)
    return int(total * SAFETY)


def plan(n_layers: int, tokens: int, per_token_layer: int, base_bytes: int, budget_bytes: int,
         boundary_bytes_per_token: int, per_layer_bytes: int = 0) -> int:
    """How many of ``n_layers`` decoder layers must stay checkpointed for a step of ``tokens`` tokens to fit in
    ``budget_bytes``: a layer left unchecked keeps ``per_token_layer`` bytes a token plus ``per_layer_bytes`` (the
    compute-dtype copy of its weights that its projections save), a checkpointed one its input
    (``boundary_bytes_per_token``); one more layer's worth is live during its recomputation, and ``base_bytes`` is
    everything else (allocated now and to come)."""
    if tokens <= 0 or per_token_layer <= 0:
        return n_layers
    gain = tokens * (per_token_layer - boundary_bytes_per_token) + per_layer_bytes
    room = (budget_bytes - base_bytes - tokens * (n_layers * boundary_bytes_per_token + per_token_layer)
            - per_layer_bytes)
    if room <= 0 or gain <= 0:
        return n_layers
    keep = min(n_layers, room // gain)
    return n_layers - int(keep)


def activation_estimate(n_layers: int, unchecked: int, tokens: int, per_token_layer: int,
                        boundary_bytes_per_token: int, per_layer_bytes: int = 0) -> int:
    """The activation bytes `plan` reckons with when ``unchecked`` of ``n_layers`` layers keep their activations: those
    layers' activations and weight copies, the checkpointed layers' inputs, and one layer's worth live while the
    backward recomputes or differentiates it."""
    return (tokens * ((n_layers - unchecked) * boundary_bytes_per_token + (unchecked + 1) * per_token_layer)
            + (unchecked + 1) * per_layer_bytes)


def _full_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The whole parameter's shape: a DTensor's global shape, a DeepSpeed ZeRO-3 parameter's ``ds_shape`` (its data
    is empty while it is partitioned)."""
    return tuple(getattr(p, "ds_shape", None) or p.shape)


def _local_numel(p: torch.Tensor) -> int:
    """The elements this process holds of ``p``: a DTensor's local shard, a ZeRO-3 parameter's partition."""
    if hasattr(p, "to_local"):
        return p.to_local().numel()
    if hasattr(p, "ds_id"):
        part = getattr(p, "ds_tensor", None)
        return part.numel() if part is not None else int(getattr(p, "ds_numel", 0))
    return p.numel()


def layer_weight_bytes(layer: nn.Module, compute_bytes: int = 2) -> int:
    """The compute-dtype copy of a decoder layer's matrices (every parameter of two or more dimensions) that its
    projections save for the backward when they cast per call (`litespark_hf.casting`: no whole-model cast buffer
    under checkpointing). Whole sizes, also for sharded parameters (the projections save the gathered weights)."""
    return compute_bytes * sum(math.prod(s) for s in map(_full_shape, layer.parameters()) if len(s) >= 2)


def _tokens(args, kwargs) -> int:
    for name in ("input_ids", "inputs_embeds"):
        t = kwargs.get(name)
        if t is not None:
            return int(t.shape[0] * t.shape[1]) if t.dim() >= 2 else int(t.numel())
    if args and torch.is_tensor(args[0]) and args[0].dim() >= 2:
        return int(args[0].shape[0] * args[0].shape[1])
    return 0


def _distributed() -> bool:
    """Several processes: each would plan on its own batch, so their graphs could differ from step to step (DDP's
    static graph, ranks out of step); "auto" keeps the user's checkpointing there (not measured on several GPUs)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def device_memory(device: torch.device) -> tuple[int, int, int]:
    """(total, held outside this process's torch allocator, allocated by it) bytes on the CUDA ``device``."""
    free, total = torch.cuda.mem_get_info(device)
    reserved = torch.cuda.memory_reserved(device)
    allocated = torch.cuda.memory_allocated(device)
    return int(total), max(0, int(total - free - reserved)), int(allocated)


class _Planner:
    """The forward pre-hook of `install`: sets each decoder layer's ``gradient_checkpointing`` flag before a
    training forward."""

    def __init__(self, base: nn.Module, mode: str | int):
        self.base = base
        self.mode = mode
        self.layers = decoder_layers(base)
        self.user_flags: list[bool] | None = None  # the flags transformers set, while we hold them
        self.first_allocated: int | None = None
        self.recomputed: int | None = None  # layers recomputed by the last plan
        self.set_flags: list[bool] | None = None  # the flags this planner last set
        self.estimate: int | None = None  # bytes the last "auto" plan expects the step to need at most
        self._sizes_cache: tuple[int, int, int] | None = None
        self._placement_cache: str | None = None

    def _flags(self) -> list[bool]:
        return [bool(getattr(m, "gradient_checkpointing", False)) for m in self.layers]

    def _checkpointing_on(self, flags: list[bool]) -> bool:
        """Whether transformers has checkpointing on in every decoder layer. Flags that differ from the ones this
        planner last set were set by someone else (gradient_checkpointing_enable / _disable): they are the user's
        choice again."""
        if self.user_flags is not None and flags == self.set_flags:
            return True
        self.user_flags = None
        return bool(flags) and all(flags)

    def _placement(self) -> str:
        """``"whole"`` (every weight a plain tensor), ``"sharded"`` (FSDP2 DTensors or DeepSpeed ZeRO-3 partitions
        among them) or ``"other"`` (not all on one planned (CUDA) device): read at the first training
        forward (after accelerate's prepare), fixed from then on."""
        if self._placement_cache is None:
            from litespark_kernels.ops.linear import _plain_tensor

            params = list(self.base.parameters())
            sharded = not all(_plain_tensor(p) for p in params)  # FSDP2 DTensors or ZeRO-3 partitions
            devices = {p.device for p in params}
            one_cuda = len(devices) == 1 and next(iter(devices)).type in PLANNED_DEVICE_TYPES
            self._placement_cache = ("other" if not (one_cuda and params)
                                     else "sharded" if sharded else "whole")
        return self._placement_cache

    def _sizes(self) -> tuple[int, int, int]:
        """(gradient bytes, trainable parameters, one layer's weight-copy bytes) of this process: fixed once training
        starts. Sharded: the local shards, with fp32 gradients (FSDP2's reduce dtype, ZeRO-3's accumulation)."""
        if self._sizes_cache is None:
            ps = [p for p in self.base.parameters() if p.requires_grad]
            sharded = self._placement() == "sharded"
            grads = sum(_local_numel(p) * (max(4, p.dtype.itemsize) if sharded else p.element_size()) for p in ps)
            self._sizes_cache = (grads, sum(_local_numel(p) for p in ps), layer_weight_bytes(self.layers[-1]))
        return self._sizes_cache

    def recompute_count(self, tokens: int) -> int:
        n = len(self.layers)
        if isinstance(self.mode, int):  # ("all" installs no planner)
            return min(n, self.mode)
        cfg = getattr(self.base, "config", None)
        per_token = activation_bytes_per_token(cfg) if cfg is not None else None
        placement = self._placement()
        if per_token is None or placement == "other" or _distributed():
            return n
        device = next(self.base.parameters()).device
        total, others, allocated = device_memory(device)
        if self.first_allocated is None:
            self.first_allocated = allocated
        grad_bytes, n_trainable, weights = self._sizes()
        optimizer_to_come = max(0, 8 * n_trainable - (allocated - self.first_allocated))  # AdamW's two fp32 states
        vocab = getattr(cfg, "vocab_size", 0) or 0
        loss_bytes = min(tokens, 4096) * vocab * 4 * 2  # one chunk of fp32 logits and their gradient
        engine = ENGINE_UNITS * weights if placement == "sharded" else 0
        base = allocated + grad_bytes + optimizer_to_come + loss_bytes + engine + MARGIN_BYTES
        budget = int(BUDGET_FRACTION * total) - others
        boundary = 4 * cfg.hidden_size
        recomputed = plan(n, tokens, per_token, base, budget, boundary, weights)
        # what this step is expected to need at most (the GPU test holds the measured peak to it)
        self.estimate = base + activation_estimate(n, n - recomputed, tokens, per_token, boundary, weights)
        return recomputed

    def __call__(self, module, args, kwargs):
        if not (module.training and torch.is_grad_enabled()) or torch.compiler.is_compiling():
            return None
        flags = self._flags()
        if not self._checkpointing_on(flags):
            return None
        if self.user_flags is None:
            self.user_flags = flags
        n = self.recompute_count(_tokens(args, kwargs))
        self.set_flags = [i < n for i in range(len(self.layers))]
        for layer, flag in zip(self.layers, self.set_flags):
            layer.gradient_checkpointing = flag
        if n != self.recomputed:
            msg = (f"litespark: gradient checkpointing recomputes {n} of {len(self.layers)} decoder layers "
                   f"(checkpoint_layers={self.mode!r})")
            if self.recomputed is None and n < len(self.layers):
                logger.warning(msg)
            else:
                logger.info(msg)
            self.recomputed = n
        return None

    def restore(self) -> None:
        """Give the layers back the flags transformers set (unless someone set others since this planner did)."""
        if self.user_flags is not None and self._flags() == self.set_flags:
            for layer, flag in zip(self.layers, self.user_flags):
                layer.gradient_checkpointing = flag
        self.user_flags = None


def install(stack: nn.Module, base: nn.Module, mode) -> None:
    """Register the planner on ``stack`` (the decoder stack the model's forward runs; ``base`` the causal LM whose
    config and parameters it reads), replacing a previous one; ``"all"`` removes it."""
    uninstall(base)
    mode = parse_mode(mode)
    if mode == "all":
        return
    planner = _Planner(base, mode)
    handle = stack.register_forward_pre_hook(planner, with_kwargs=True)
    base.__dict__[_STATE] = (planner, handle)


def uninstall(base: nn.Module) -> None:
    """Remove the planner and give the layers back the flags transformers set."""
    state = base.__dict__.pop(_STATE, None)
    if state is not None:
        planner, handle = state
        handle.remove()
        planner.restore()


def recomputed_layers(model: nn.Module) -> int | None:
    """How many decoder layers the last training forward recomputed (None before one, or without the planner)."""
    from .model_utils import unwrap_model

    state = unwrap_model(model).__dict__.get(_STATE)
    return None if state is None else state[0].recomputed
