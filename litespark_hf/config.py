"""What Litespark swaps in a model: one dataclass, shared by `apply`, the trainers' flag and the recipes."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LitesparkConfig:
    """Options of `litespark_hf.apply` (and of `use_litespark=True` through `litespark_config=`).

    Every switch defaults to on; turn one off to keep the stock module for that part.

    Model types outside the architecture table: by default (``generic=True``) a decoder-only causal LM takes the
    generic path (`litespark_hf.generic`: the attention backend and the modules recognised by structure and checked
    against their stock forward; a warning lists what was swapped and what was left stock), so that a new
    Llama-like family is sped up where it is safe and otherwise runs stock, never differently. ``allow_partial=True``
    keeps its meaning (the attention backend alone); a model that is not a decoder-only causal LM, or in which the
    generic path finds nothing to swap, gets `UnsupportedArchitectureError` (one line, naming the table).
    """

    attention: bool = field(default=True, metadata={"help": "Use the `litespark` attention backend."})
    attention_cudnn: bool = field(
        default=False,
        metadata={
            "help": "With the litespark attention backend (attention=True): plain causal attention calls (full-length "
            "rows: no padding, packing, sliding window, soft-cap or dropout; head dim 64 or 128; bf16/fp16) run "
            "torch's cuDNN SDPA instead of the litespark Triton "
            "kernel, on Hopper or newer GPUs (elsewhere the kernel runs, with a one-time warning). Padded, packed "
            "and windowed calls keep the kernel. Chosen from shapes and arguments only (no host sync)."
        },
    )
    rope: bool = field(default=True, metadata={"help": "Apply rotary embeddings with the Litespark RoPE kernel."})
    norms: bool = field(default=True, metadata={"help": "Swap RMSNorm / LayerNorm modules for Litespark kernels."})
    mlp: bool = field(default=True, metadata={"help": "Swap MLPs for the fused-activation Litespark MLP."})
    fused_cross_entropy: bool = field(
        default=True,
        metadata={
            "help": "Compute the training loss with the fused linear cross-entropy (no full logits). Skipped when "
            "TRL already patched the model's forward with its own fused LM head (SFT/DPO)."
        },
    )
    fused_grad_clip: bool = field(
        default=True,
        metadata={
            "help": "Trainers only: fold gradient-norm clipping (max_grad_norm) into torch's fused Adam/AdamW step "
            "(the clip factor becomes the optimizer's grad_scale) instead of a separate pass over all gradients. "
            "Used on one device or DDP without a GradScaler and with LitesparkAdamW or a fused torch Adam/AdamW, "
            "and under FSDP2 with LitesparkAdamW (the norm from the local shards, one all-reduce); "
            "otherwise the Trainer clips as usual."
        },
    )
    fused_optimizer: bool = field(
        default=True,
        metadata={
            "help": "Trainers only: replace torch's AdamW (optim adamw_torch / adamw_torch_fused) by LitesparkAdamW: "
            "the same update in one Triton launch per parameter group, which also writes next forward's bf16/fp16 "
            "copy of each fused projection weight (so the forward casts nothing) and leaves the gradients unwritten. "
            "Used for fp32 weights on one CUDA device or DDP, and under FSDP2 (on each process's local shards, "
            "without the bf16 copy; not with FSDP2 CPU offload); FSDP1 and DeepSpeed keep the Trainer's optimizer."
        },
    )
    sync_free_nan_filter: bool = field(
        default=True,
        metadata={
            "help": "Trainers only: apply logging_nan_inf_filter (a non-finite step loss is replaced by the running "
            "average) on the GPU with torch.where instead of the Trainer's host check, which waits for the "
            "backward to finish on every step. Same logged values."
        },
    )
    non_blocking_batches: bool = field(
        default=True,
        metadata={
            "help": "Trainers only, on CUDA with dataloader_pin_memory (the default): copy each batch to the GPU "
            "with non_blocking=True (accelerate's dataloader option) instead of a copy that first waits for all "
            "queued GPU work, so the host can prepare the next step while the GPU finishes this one."
        },
    )
    lean_bookkeeping: bool = field(
        default=True,
        metadata={
            "help": "Trainers only: the per-step bookkeeping of the Trainer and TRL whose answers do not change "
            "during training done once (DPO's reference pass: checkpointing flags, PEFT's adapter disabling, "
            "is_peft_model / unwrap_model; the Trainer's FLOP count; the gradient clip's parameter list) instead of "
            "walking every module on every step (litespark_hf.bookkeeping). Same model state and values."
        },
    )
    unpad: bool = field(
        default=True,
        metadata={
            "help": "Padded batches (a 2-D attention_mask with padding, no KV cache) run the decoder stack on their "
            "real tokens only, packed into one row with one document per original row, and the output is scattered "
            "back to the padded shape: a padded batch costs what the packed one does. Same values at every real "
            "token; pad positions get zero hidden states. Needs the litespark attention backend."
        },
    )
    fp8: bool = field(
        default=False,
        metadata={
            "help": "Run the decoder's projection GEMMs (q/k/v, o, gate/up, down; a LoRA layer's frozen base) in "
            "float8: e4m3 inputs and weights, e5m2 output gradients, one dynamic scale per tensor "
            "(litespark_kernels.ops.fp8). Master weights, optimizer, LM head, embeddings, norms, attention, MoE "
            "experts and LoRA adapters are unchanged. Needs bf16/fp16 autocast and a GPU with float8 GEMMs "
            "(compute capability 8.9+: H100, H200, L4, RTX 40xx); a projection that cannot take it (feature "
            "count not a multiple of 16, another device) runs in bf16 with a one-time warning."
        },
    )
    compile_layers: bool = field(
        default=False,
        metadata={
            "help": "Compile each decoder layer on its own with torch.compile (dynamic shapes; backend "
            "LITESPARK_COMPILE_BACKEND, default inductor), the Litespark kernels traced as custom ops. The "
            "unpadding of padded batches, the LM head and loss, and the optimizer stay eager, so padded "
            "post-training batches still run on their real tokens (a whole-model torch_compile turns the "
            "unpadding off). Each layer is then one compiled call instead of ~10 autograd Functions' Python "
            "(twice under gradient checkpointing): for steps bound by the host (post-training, small batches). "
            "Not with torch_compile, FSDP or DeepSpeed (the trainers refuse). The first steps compile. Measured "
            "slower than eager Litespark on an H200 (TRL SFT/DPO, 1B: 0.82-0.85x), so not recommended yet."
        },
    )
    cuda_graphs: bool = field(
        default=True,
        metadata={
            "help": "Training forwards of one packed row (padded batches after unpad, padding-free and packed "
            "batches) replay the whole decoder stack, forward and backward, from CUDA graphs captured once per "
            "length bucket (the row padded to 1/8 of its power of two with filler tokens that change nothing): two "
            "launches a step instead of thousands, for post-training steps bound by the host. Only where the graphs "
            "stand for the eager layers exactly (CUDA, Litespark decoder layers without hooks, no recomputed layers, "
            "no dropout, SAT or float8, weights whole on one device); every other forward runs eagerly. Each new "
            "bucket costs a capture (~3 steps' time) and its activations live in one pool shared by all buckets. "
            "Buckets per octave: LITESPARK_GRAPH_BUCKETS (default 8). Off: the layers always run eagerly. Not with "
            "compile_layers (compiled layers keep their own path). See litespark_hf.graphs."
        },
    )
    fsdp2_forward_prefetch: bool = field(
        default=True,
        metadata={
            "help": "Trainers under FSDP2 (fully_shard, accelerate's per-decoder-layer units): each Litespark decoder "
            "layer's unit issues the next layer's all-gather right after its own (FSDPModule."
            "set_modules_to_forward_prefetch), instead of when the host reaches the next layer. The gathers then "
            "overlap the layer's compute even where the host runs only just ahead of the GPU. One more unit's "
            "gathered weights live at a time. Same values either way. Layers with a prefetch list of their own are "
            "left as they are. No effect without FSDP2."
        },
    )
    zero3_layer_units: bool = field(
        default=True,
        metadata={
            "help": "Under DeepSpeed ZeRO-3: each Litespark decoder layer is one DeepSpeed leaf module, so its "
            "weights are gathered (and prefetched, released, their gradients reduced) once per layer call instead "
            "of once per projection, norm and sub-module (~12 hooked modules per Llama layer; FSDP2's per-layer units "
            "do the same). Cuts DeepSpeed's per-module hook work, which bounds ZeRO-3 steps at small world sizes; "
            "a layer's whole weights are then live at once (~60M parameters for Llama-3.2-1B). Must be set before "
            "deepspeed.initialize (the trainers and recipes apply Litespark before it); layers already hooked by "
            "DeepSpeed are left as they are, and so is a layer whose input needs no gradient (the first one when the "
            "embedding is frozen, as under LoRA: DeepSpeed's leaf hook would fire before its weight gradients). Same "
            "values either way. No effect without ZeRO-3."
        },
    )
    checkpoint_layers: str = field(
        default="auto",
        metadata={
            "help": "Under gradient checkpointing (TRL's default), how many decoder layers the backward recomputes: "
            "'auto' as few as this GPU's memory needs (estimated before each training forward from the memory free "
            "and an upper bound of what a layer saves per token; the first layers stay checkpointed, the last ones "
            "keep their activations; CUDA, one process, weights on one device, no FSDP/DeepSpeed shards, no "
            "torch.compile), "
            "'all' every layer (transformers' behaviour), or a number N (the first N layers). Same losses and "
            "gradients either way; fewer recomputed layers, less time. Nothing changes without checkpointing."
        },
    )
    allow_partial: bool = field(
        default=False,
        metadata={
            "help": "For an architecture outside the table, apply the attention backend only (with a warning) "
            "instead of raising (or of the generic path: this wins over `generic`)."
        },
    )
    generic: bool = field(
        default=True,
        metadata={
            "help": "For a decoder-only causal LM outside the table (allow_partial off): the generic path "
            "(litespark_hf.generic) - the attention backend plus the RMSNorms, gated MLPs, Llama-structured attention "
            "and pre-norm decoder layers it recognises by structure, each checked once against its stock forward on "
            "the model's own config before it is swapped; a one-time warning lists what was swapped and what was "
            "left stock. False, or a model where it finds nothing to swap or that is no decoder-only causal LM: "
            "UnsupportedArchitectureError."
        },
    )

    # Sparsity-Accelerated Training (litespark_hf.sat; Ma et al. 2024, arXiv 2406.01392). Off by default.
    sat_omission_rate_mlp: float = field(
        default=0.0,
        metadata={"help": "SAT: fraction of each MLP's intermediate channels left out of forward and backward at the "
                  "start of training (0 = dense). The schedule lowers it to 0."},
    )
    sat_omission_rate_heads: float = field(
        default=0.0,
        metadata={"help": "SAT: fraction of each attention layer's KV groups (a KV head and its query heads) left "
                  "out at the start of training (0 = dense)."},
    )
    sat_schedule: str = field(
        default="ladder",
        metadata={"help": "SAT omission-rate schedule: 'ladder' (LORS: the rate drops in sat_ladder_steps equal "
                  "rungs and is 0 for the last sat_dense_fraction of training) or 'constant' (same rate throughout)."},
    )
    sat_ladder_steps: int = field(
        default=4, metadata={"help": "SAT ladder: number of rungs (rates r, r(n-1)/n, ..., r/n) before the dense end."}
    )
    sat_dense_fraction: float = field(
        default=0.25, metadata={"help": "SAT ladder: fraction of the training steps, at the end, that run dense."}
    )
    sat_metric: str = field(
        default="activation_magnitude",
        metadata={"help": "SAT importance metric: 'activation_magnitude' (MLP channel: mean |act(gate)*up| over "
                  "tokens; KV group: mean L2 norm of its heads' outputs) or 'random' (uniform, an ablation)."},
    )
    sat_selection: str = field(
        default="topk",
        metadata={"help": "SAT selection of the kept channels/groups: 'topk' by importance, or 'sample' "
                  "(without replacement, probability proportional to importance)."},
    )
    sat_exempt_layers: str = field(
        default="0,-1",
        metadata={"help": "SAT: comma-separated decoder-layer indices that always run dense (negative counts from "
                  "the end; '' = none)."},
    )
    sat_refresh_interval: int = field(
        default=20,
        metadata={"help": "SAT: every this many optimizer steps (and at the first) one step runs dense to refresh "
                  "the importance of all channels/heads; 0 = only the first."},
    )
    sat_ema: float = field(
        default=0.9, metadata={"help": "SAT: decay of the running importance (score = ema*old + (1-ema)*new)."}
    )
    sat_freeze_omitted: bool = field(
        default=True,
        metadata={"help": "SAT: omitted weights and their optimizer state (e.g. Adam moments) are left bit-for-bit "
                  "unchanged by the optimizer step; False lets the optimizer see their zero gradients (AdamW then "
                  "still moves them by momentum and weight decay)."},
    )
    sat_seed: int = field(default=0, metadata={"help": "SAT: seed of the 'sample' selection / 'random' metric."})

    @classmethod
    def from_any(cls, value: "LitesparkConfig | dict | str | None") -> "LitesparkConfig":
        """Build from a config, a dict, a JSON string, or None (defaults). Unknown keys raise a ValueError."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            value = json.loads(value) if value.strip() else {}
        if not isinstance(value, dict):
            raise TypeError(f"litespark_config must be a LitesparkConfig, a dict or a JSON string, not {type(value)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown litespark_config keys {unknown}; known keys: {sorted(known)}")
        return cls(**value)

    def __post_init__(self):
        from .checkpointing import parse_mode

        for f in dataclasses.fields(self):  # a switch given as a string or a number is an error, not truthy
            value = getattr(self, f.name)
            if f.type in ("bool", bool) and not isinstance(value, bool):
                raise ValueError(f"litespark_config {f.name!r} must be true or false, got {value!r}")

        parse_mode(self.checkpoint_layers)  # a bad value is an error here, not at the first forward
        if isinstance(self.checkpoint_layers, int):
            self.checkpoint_layers = str(self.checkpoint_layers)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
