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
    """

    attention: bool = field(default=True, metadata={"help": "Use the `litespark` attention backend."})
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
    allow_partial: bool = field(
        default=False,
        metadata={
            "help": "For an architecture outside the table, apply the attention backend only (with a warning) "
            "instead of raising."
        },
    )

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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
