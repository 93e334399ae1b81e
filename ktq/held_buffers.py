"""Host tensors kept by name across layers and reused while their shape and dtype stay the same. Pinned when a GPU
copies to or from them: a copy through pageable memory crawls (1.6 GB/s measured on an H200), a pinned one runs at
the bus's speed and can overlap the computation; and allocated once, since pinning is slow too."""

from __future__ import annotations

import torch


class HeldBuffers:
    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self._held: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The buffer `name` of that shape and dtype, the one held before when they match."""
        held = self._held.get(name)
        if held is None or held.shape != shape or held.dtype != dtype:
            self._held.pop(name, None)  # its memory goes before the new one is taken
            held = self._held[name] = torch.empty(shape, dtype=dtype, pin_memory=self.pin)
        return held
