"""`litespark-train-bench` configs for the families beyond Llama/StarCoder2 (issue #16): one ~1B shape per family.

Each entry has the same keys as `bench.CONFIGS` (family = ``config.model_type``, seq, batch,
gradient_checkpointing, model = the `AutoConfig.for_model` keyword arguments, note).
"""

from __future__ import annotations

FAMILY_CONFIGS: dict[str, dict] = {}
