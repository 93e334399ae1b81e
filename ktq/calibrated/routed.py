"""What the calibration pass gives the calibrated CPU experts: every token's input to one layer's experts and the
router's choice for it (RoutedInputs), and each expert's routed tokens handed to the solve device in batches
(RoutedRows)."""

from __future__ import annotations

import torch

from ktq.held_buffers import HeldBuffers


class RoutedInputs:
    """Every calibration token's input to one layer's experts and the router's choice for it, a collector of the
    engine's calibration pass. When one group holds every sample, the recorded group itself (where the engine keeps
    it for the propagation pass anyway): nothing is copied. Otherwise each group's rows are copied into host
    buffers kept across layers, pinned when a GPU computes (one copy per group, overlapping the pass; a copy per
    sample through pageable memory, then joined, had cost a DeepSeek-V3 layer ~8 s)."""

    wants_intermediates = False  # the experts' own activations come later, from the rounded gate and up

    def __init__(self, held: HeldBuffers) -> None:
        self.held = held
        self._parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._copied_from: torch.device | None = None

    def add_group(self, group, rows: slice, total: int) -> None:
        """group (ktq.gpu.streamed_experts.SampleGroup): rows `rows` of the layer's `total` calibration tokens."""
        recorded = (group.x, group.index, group.weights)
        if rows.start == 0 and rows.stop == total:
            self._parts = recorded
            return
        if self._parts is None:
            self._parts = tuple(self.held.get(name, (total, *value.shape[1:]), value.dtype)
                                for name, value in zip(("x", "ids", "weights"), recorded))
        for held, value in zip(self._parts, recorded):
            held[rows].copy_(value, non_blocking=True)
        self._copied_from = group.x.device

    def gathered(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, H], expert ids [N, K], routing weights [N, K]: where they were recorded, or on the host once every
        copy there has landed."""
        if self._copied_from is not None and self._copied_from.type == "cuda":
            torch.cuda.synchronize(self._copied_from)
        return self._parts


class RoutedRows:
    """Each expert's routed tokens and their routing weights (fp32) on the solve device, in batches of at most
    `batch` rows in token order. From inputs on the host, rows are gathered into two pinned staging buffers taken
    in turn, so that the host gathers the next batch while the last one crosses the bus (the routed rows of a
    DeepSeek-V3 layer are 8 x its tokens, ~117 GB at 512 x 2048: pageable copies had taken most of the solve)."""

    def __init__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: int, device,
                 batch: int, held: HeldBuffers) -> None:
        self.x, self.device, self.batch, self.held = x, torch.device(device), batch, held
        # sorted on the solve device (a DeepSeek-V3 layer's 8.4 M routed rows took the host 0.7 s); stable, so
        # each expert's rows stay in token order wherever it runs
        flat = ids.reshape(-1).to(self.device)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=experts)[:experts]
        starts = (torch.cumsum(counts, 0) - counts).tolist()
        self.counts = counts.tolist()  # routed rows of each expert
        self.tokens = (order // ids.shape[1]).to(x.device)  # the token of each routed row, expert after expert
        self.weights = weights.reshape(-1).to(self.device)[order].float()
        del flat, order
        # each batch's sum of squared weights, all read back at once: read batch by batch, each would wait for the
        # device and keep the host from gathering the next batch while the last one crosses the bus
        self._batches = [[(first, min(first + batch, start + count)) for first in range(start, start + count, batch)]
                         for start, count in zip(starts, self.counts)]
        spans = [span for expert in self._batches for span in expert]
        sums = torch.stack([self.weights[a:b].square().sum() for a, b in spans]).tolist() if spans else []
        self._square_sums = dict(zip(spans, sums))
        self._staged = x.device.type == "cpu" and self.device.type == "cuda"
        self._landed: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0

    def expert(self, e: int):
        """Expert e's routed tokens [n, H], routing weights [n] and the sum of their squares, in batches, on the
        solve device."""
        for first, last in self._batches[e]:
            yield self._rows(self.tokens[first:last]), self.weights[first:last], self._square_sums[first, last]

    def _rows(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self._staged:
            return self.x[tokens].to(self.device)
        turn, self._turn = self._turn, 1 - self._turn
        if self._landed[turn] is not None:
            self._landed[turn].synchronize()  # its last copy to the device is done before it is overwritten
        stage = self.held.get(f"stage {turn}", (self.batch, self.x.shape[1]), self.x.dtype)[:len(tokens)]
        torch.index_select(self.x, 0, tokens, out=stage)
        rows = stage.to(self.device, non_blocking=True)
        self._landed[turn] = torch.cuda.Event()
        self._landed[turn].record(torch.cuda.current_stream(self.device))
        return rows
