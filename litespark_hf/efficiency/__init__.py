"""Efficiency you can see: tokens/s, step time, MFU, peak memory and energy/CO2 of a training run.

- `EfficiencyCallback`: a ``TrainerCallback`` for any transformers/TRL trainer; logs, ``efficiency.json``,
  ``efficiency.png`` and the model card's Efficiency section + ``co2_eq_emissions`` metadata.
- `track_efficiency(trainer)`: attaches it first in line (so TensorBoard/W&B get the keys) and keeps the card's
  section through ``create_model_card``.
- `flops`: the ``6N + 12 L d T`` formula and the peak-FLOPs table; `energy`: CodeCarbon (offline) and NVML.
- `bench`: the side-by-side training benchmark (``litespark-train-bench``, ``benchmarks/train_bench.py``).
"""

from .callback import EfficiencyCallback, load_baseline, move_first, track_efficiency
from .card import update_model_card
from .flops import (PEAK_BF16_TFLOPS, attention_flops_coefficient, flops_per_token, mfu, model_shape, num_parameters,
                    num_parameters_from_config, peak_flops)

__all__ = [
    "EfficiencyCallback", "PEAK_BF16_TFLOPS", "attention_flops_coefficient", "flops_per_token", "load_baseline",
    "mfu", "model_shape", "move_first", "num_parameters", "num_parameters_from_config", "peak_flops",
    "track_efficiency", "update_model_card",
]
