"""The gated (SwiGLU / GeGLU) and GELU MLPs with fused activations and projections."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import activations as hf_activations

import litespark_kernels as lk
from litespark_kernels._dispatch import warn_once

from ..casting import projection
from ._swap import plain_linears, project
from .lora import lora_group, lora_project

GELUTanh = hf_activations.GELUTanh
SiLUActivation = getattr(hf_activations, "SiLUActivation", nn.SiLU)  # not in every transformers 5.x


def fused_gated_activation(act: nn.Module, packed: bool = False):
    """The fused kernel for a gated MLP's activation module (SiLU -> SwiGLU, GELU-tanh -> GeGLU), or None.

    ``packed``: the version taking one fused gate+up output (`litespark_kernels.swiglu_packed`).
    """
    if isinstance(act, (nn.SiLU, SiLUActivation)):
        return lk.swiglu_packed if packed else lk.swiglu
    if isinstance(act, GELUTanh):
        return lk.geglu_packed if packed else lk.geglu
    return None


class LitesparkGatedMLP:
    """``down(act(gate(x)) * up(x))`` with the activation and the product fused (SwiGLU / GeGLU).

    Plain ``nn.Linear`` projections run as one gate+up GEMM (`litespark_kernels.fused_linear`) and the packed
    activation; PEFT LoRA ones too (one GEMM for the base gate+up, the adapters added: `lora_project`) where
    `lora_group` reproduces them; other wrapped ones are called as modules, so adapters keep training.
    """

    def _fused(self):
        """(packed activation kernel, (gate_up, down) `LoraGroup`s or None for plain projections) when forward
        takes the fused path, else (None, None)."""
        packed = fused_gated_activation(self.act_fn, packed=True)
        if packed is None:
            return None, None
        if plain_linears(self.gate_proj, self.up_proj, self.down_proj):
            return packed, None
        gate_up = lora_group((self.gate_proj, self.up_proj))
        down = lora_group((self.down_proj,)) if gate_up is not None else None
        return (packed, (gate_up, down)) if down is not None else (None, None)

    def litespark_casts_input(self) -> bool:
        """True when forward feeds its input only to `fused_linear` (so a low-precision input changes nothing)."""
        packed, groups = self._fused()
        return packed is not None and (groups is None or groups[0].casts_input)

    def litespark_cast_groups(self) -> dict[str, list[nn.Linear]]:
        """The projection groups forward runs through `fused_linear` (for `cast_projection_weights`; LoRA: the
        base layers)."""
        packed, groups = self._fused()
        if packed is None:
            return {}
        if groups is None:
            return {"gate_up": [self.gate_proj, self.up_proj], "down": [self.down_proj]}
        return {"gate_up": list(groups[0].base), "down": list(groups[1].base)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed, groups = self._fused()
        if packed is not None and groups is not None:  # LoRA: the base gate and up as one GEMM, adapters added
            gate_up = lora_project(x, groups[0], **projection(self, "gate_up"))
            return lora_project(packed(gate_up), groups[1], **projection(self, "down"))
        if packed is not None:  # gate and up as one GEMM, one gradient for both
            gate_up = project(x, self.gate_proj, self.up_proj, **projection(self, "gate_up"))
            return project(packed(gate_up), self.down_proj, **projection(self, "down"))
        act = fused_gated_activation(self.act_fn)
        if act is None:
            warn_once("gated_mlp", f"activation {type(self.act_fn).__name__} has no fused kernel")
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(act(self.gate_proj(x), self.up_proj(x)))


class LitesparkGeluMLP:
    """StarCoder2's MLP: ``dropout(c_proj(gelu_tanh(c_fc(x))))`` with c_fc's bias fused into the activation."""

    def _fused_fc(self) -> bool:
        """c_fc runs through `fused_linear` with its bias fused into the GELU kernel (else: stock order)."""
        return type(self.c_fc) is nn.Linear and isinstance(self.act, GELUTanh)

    def litespark_cast_groups(self) -> dict[str, list[nn.Linear]]:
        """The projections forward runs through `fused_linear` (for `cast_projection_weights`)."""
        groups = {}
        if self._fused_fc():
            groups["c_fc"] = [self.c_fc]
        if plain_linears(self.c_proj):
            groups["c_proj"] = [self.c_proj]
        return groups

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        c_fc = self.c_fc
        if self._fused_fc():
            h = lk.gelu_tanh_bias(lk.fused_linear(hidden_states, [c_fc.weight], **projection(self, "c_fc")),
                                  c_fc.bias)
        else:  # LoRA-wrapped c_fc or another activation: stock order, nothing fused
            h = self.act(c_fc(hidden_states))
        h = project(h, self.c_proj, **projection(self, "c_proj")) if plain_linears(self.c_proj) else self.c_proj(h)
        return F.dropout(h, p=self.residual_dropout, training=self.training)
