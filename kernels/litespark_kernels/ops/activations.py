"""MLP activations, fused so that the intermediate activations are not written and re-read.

- ``swiglu(gate, up) = silu(gate) * up`` (Shazeer 2020; Llama, Mistral, Qwen2, Qwen3 MLPs)
- ``geglu(gate, up) = gelu_tanh(gate) * up`` (gated GELU, tanh approximation)
- ``gelu_tanh_bias(x, bias) = gelu_tanh(x + bias)`` (non-gated MLPs with bias: StarCoder2's ``c_fc`` -> ``act``)
- ``swiglu_packed(gate_up)`` / ``geglu_packed(gate_up)``: the same on the output of ONE fused gate+up projection
  (gate = first half of the last dimension, up = second half); the backward writes one gradient for both halves,
  which feeds the fused projection's backward directly.

gelu_tanh(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as torch's ``gelu(approximate="tanh")``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._dispatch import run_triton, use_triton


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def geglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.gelu(gate, approximate="tanh") * up


def gelu_tanh_bias_reference(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.gelu(x if bias is None else x + bias, approximate="tanh")


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if use_triton("swiglu", gate, up):
        return run_triton("_activations_triton", "swiglu_triton", gate, up)
    return swiglu_reference(gate, up)


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if use_triton("geglu", gate, up):
        return run_triton("_activations_triton", "geglu_triton", gate, up)
    return geglu_reference(gate, up)


def _halves(gate_up: torch.Tensor):
    if gate_up.shape[-1] % 2:
        raise ValueError(f"a packed gate+up needs an even last dimension, got {gate_up.shape[-1]}")
    return gate_up.chunk(2, dim=-1)


def swiglu_packed(gate_up: torch.Tensor) -> torch.Tensor:
    if use_triton("swiglu", gate_up):
        return run_triton("_activations_triton", "swiglu_packed_triton", gate_up)
    return swiglu_reference(*_halves(gate_up))


def geglu_packed(gate_up: torch.Tensor) -> torch.Tensor:
    if use_triton("geglu", gate_up):
        return run_triton("_activations_triton", "geglu_packed_triton", gate_up)
    return geglu_reference(*_halves(gate_up))


def gelu_tanh_bias(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if use_triton("gelu_tanh_bias", x, bias):
        return run_triton("_activations_triton", "gelu_tanh_bias_triton", x, bias)
    return gelu_tanh_bias_reference(x, bias)
