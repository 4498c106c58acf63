"""The input embedding tied to a Litespark LM head."""

from __future__ import annotations

import torch

import litespark_kernels as lk


class LitesparkEmbedding:
    """Input embedding tied to a Litespark LM head: in a fused-loss training forward its weight gradient is added
    into the loss's weight gradient in place instead of being built as a second dense matrix and summed
    (`litespark_kernels.tied_embedding`). Every other call is the stock lookup."""

    def _tied_slot(self) -> lk.TiedGrad | None:
        """This forward's `TiedGrad` when the lookup takes the tied path, else None (the stock lookup)."""
        slot = self.__dict__.get("_litespark_tied")
        if (slot is None or not torch.is_grad_enabled() or not self.weight.requires_grad or self.max_norm is not None
                or self.scale_grad_by_freq or self.sparse or torch.compiler.is_compiling()):
            return None
        return slot

    def forward(self, input):
        slot = self._tied_slot()
        if slot is None:
            return super().forward(input)
        return lk.tied_embedding(input, self.weight, self.padding_idx, slot)
