"""Litespark's kernels: each op has a PyTorch reference (``<op>_reference``) and a dispatcher (``<op>``) that runs
the Triton kernel on CUDA tensors and the reference elsewhere, warning once when it falls back.

Imported as ``litespark_kernels`` (the source folder is ``kernels/``; a top-level package named ``kernels`` would
shadow Hugging Face's ``kernels`` package).
"""

from .ops.activations import geglu, geglu_packed, gelu_tanh_bias, swiglu, swiglu_packed
from .ops.attention import attention, attention_reference, attention_sdpa
from .ops.embedding import TiedGrad, tied_embedding
from .ops.grouped_linear import grouped_linear, grouped_linear_reference
from .ops.fused_linear_cross_entropy import (
    LabelCount, count_labels, fused_linear_cross_entropy, fused_linear_cross_entropy_reference, shifted_labels,
)
from .ops.layer_norm import layer_norm, layer_norm_reference
from .ops.linear import cast_weights, fused_linear, fused_linear_reference
from .ops.rms_norm import add_rms_norm, rms_norm, rms_norm_reference
from .ops.rope import apply_rope, apply_rope_reference

__all__ = [
    "LabelCount", "add_rms_norm", "apply_rope", "apply_rope_reference", "attention", "attention_reference",
    "attention_sdpa", "cast_weights", "count_labels", "fused_linear", "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_reference", "fused_linear_reference", "gelu_tanh_bias", "grouped_linear",
    "grouped_linear_reference", "geglu", "geglu_packed",
    "layer_norm", "layer_norm_reference", "rms_norm", "rms_norm_reference", "shifted_labels", "swiglu",
    "swiglu_packed", "TiedGrad", "tied_embedding",
]
