"""litespark_hf: fast, measurably frugal Hugging Face training.

``import litespark_hf`` registers the ``litespark`` attention backend (and its mask function) in transformers, so
``from_pretrained(..., attn_implementation="litespark")`` works. `apply` rewrites an existing model with all Litespark
layers; the trainer classes (``SFTConfig``/``SFTTrainer``, ``DPOConfig``/``DPOTrainer``,
``TrainingArguments``/``Trainer``) add the ``use_litespark`` flag. They import TRL lazily. `patch_trl` binds TRL's
(and transformers') trainer names to them, for unchanged scripts; ``python -m litespark_hf.run`` does it for a script.
"""

from .architectures import ARCHITECTURES, SUPPORTED_MODEL_TYPES
from .attention import ATTENTION_NAME, register
from .config import LitesparkConfig
from .optim import LitesparkAdamW
from .patching import UnsupportedArchitectureError, apply, is_applied, restore, swapped_counts
from .trl_patch import patch_trl, unpatch_trl

__version__ = "0.1.0"

register()

_TRAINER_NAMES = ("DPOConfig", "DPOTrainer", "LitesparkArguments", "SFTConfig", "SFTTrainer", "Trainer",
                  "TrainingArguments")

__all__ = [
    "ARCHITECTURES", "ATTENTION_NAME", "LitesparkAdamW", "LitesparkConfig", "SUPPORTED_MODEL_TYPES", "UnsupportedArchitectureError",
    "apply", "is_applied", "patch_trl", "register", "restore", "swapped_counts", "unpatch_trl", *_TRAINER_NAMES,
]


def __getattr__(name):
    if name in _TRAINER_NAMES:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'litespark_hf' has no attribute {name!r}")
