"""What the calibration pass gives the calibrated CPU experts: every token's input to one layer's experts and the
router's choice for it, gathered once the pass is over."""

from __future__ import annotations

import torch


class RoutedInputs:
    """Every calibration token's input to one layer's experts, and the router's choice for it (a collector of the
    engine's calibration pass)."""

    wants_intermediates = False  # the experts' own activations come later, from the rounded gate and up

    def __init__(self, device) -> None:
        self.device = device
        self._x: list[torch.Tensor] = []
        self._ids: list[torch.Tensor] = []
        self._weights: list[torch.Tensor] = []

    def add(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> None:
        self._x.append(x.to(self.device))
        self._ids.append(top_k_index.to(self.device, torch.int64))
        self._weights.append(top_k_weights.to(self.device, torch.float32))

    def gathered(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, H], expert ids [N, K], routing weights [N, K], once: each sample's tensors are moved into the
        joined ones and dropped, so the inputs are never held twice."""
        return tuple(_moved(parts) for parts in (self._x, self._ids, self._weights))


def _moved(parts: list[torch.Tensor]) -> torch.Tensor:
    joined = parts[0].new_empty((sum(len(p) for p in parts), *parts[0].shape[1:]))
    first = 0
    while parts:
        part = parts.pop(0)
        joined[first:first + len(part)] = part
        first += len(part)
    return joined
