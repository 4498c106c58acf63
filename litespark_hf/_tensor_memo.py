"""One value remembered for one tensor while it stays that tensor, unchanged.

The forward's bookkeeping that saves host syncs (the collator's token count of a mask, the positions Litespark made
itself, the segment ids of a forward's ``position_ids``) must never apply to another tensor, or to the same tensor
after an in-place change. `TensorMemo` holds a weak reference to the tensor and its version counter at the time of
`put`; `holds` is true only for that very object with that version.
"""

from __future__ import annotations

import weakref

import torch


class TensorMemo:
    def __init__(self) -> None:
        self._ref = None
        self._version = -1
        self.value = None

    def put(self, t: torch.Tensor, value=None) -> None:
        self._ref, self._version, self.value = weakref.ref(t), t._version, value

    def holds(self, t) -> bool:
        """``t`` is the tensor of the last `put`, unchanged since."""
        own = self._ref() if self._ref is not None else None
        return own is not None and own is t and own._version == self._version

    def get(self, t, default=None):
        """The value of the last `put` if `holds` (``t``), else ``default``."""
        return self.value if self.holds(t) else default
