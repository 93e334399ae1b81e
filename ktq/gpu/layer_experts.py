"""One MoE layer's routed experts on their way to the device: read on the host a layer ahead (on a thread), then
handed to the device in chunks of experts the plan sizes, the whole layer at once when it fits.

On the host a layer is held as the engine reads it: bf16 bits [E, 3, I * H] (gate, up, down, through ktq.cpu's
decoders, every layout and storage kind), or, for block-scaled FP8 sources, the stored FP8 bytes and their block
scales, decoded on the device as each chunk arrives (half the host memory, and no CPU decode). The host buffers are
allocated once and reused by every layer, pinned when a GPU reads them: copies from pinned memory run at the bus's
speed and can overlap the computation. On a GPU the next chunk is copied and decoded on a second stream while the
current one computes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ktq.gpu.source import decode_fp8
from ktq.held_buffers import HeldBuffers
from ktq.kernels.ktformat import PROJECTIONS


@dataclass
class Chunk:
    """Experts `block` of a layer on the device: gate and up stacked [c, 2I, H] (gate rows first), down [c, H, I]."""

    block: range
    gate_up: torch.Tensor
    down: torch.Tensor

    def projections(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views of gate [c, I, H], up [c, I, H] and down [c, H, I] (writing into them writes into the chunk)."""
        inter = self.gate_up.shape[1] // 2
        return self.gate_up[:, :inter], self.gate_up[:, inter:], self.down


class HostBuffers:
    """The host memory layers are read into, allocated once (pinned for a GPU) and reused by every layer: a ring of
    two, one for the layer being computed, one for the layer read ahead."""

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self._free = [HeldBuffers(pin), HeldBuffers(pin)]

    def take(self) -> HeldBuffers:
        return self._free.pop() if self._free else HeldBuffers(self.pin)

    def give_back(self, held: HeldBuffers) -> None:
        self._free.append(held)


@dataclass
class HostExperts:
    """A layer's experts on the host: `bits` (bf16 bits [E, 3, I * H]) or `fp8` (bytes [E, 3, I * H]) with
    `scales` (fp32 [E, 3, blocks]) and the FP8 block shape; `held` goes back to the HostBuffers when done."""

    layer: int
    experts: int
    intermediate: int
    hidden: int
    held: HeldBuffers
    bits: torch.Tensor | None = None
    fp8: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    block: tuple[int, int] | None = None

    @property
    def shapes(self) -> tuple[tuple[int, int], ...]:
        i, h = self.intermediate, self.hidden
        return (i, h), (i, h), (h, i)


def read_host_experts(source, layer: int, buffers: HostBuffers) -> HostExperts:
    """Decoder layer `layer`'s experts read from the source's shards into host buffers."""
    moe_layer = source.experts.layers[source.moe_layers[layer]]
    g = source.experts.geometry
    held = buffers.take()
    found = HostExperts(layer, g.experts, g.intermediate, g.hidden, held)
    size = g.intermediate * g.hidden
    if all(expert[proj].fp8 is not None for expert in moe_layer.experts for proj in PROJECTIONS):
        first = moe_layer.experts[0][PROJECTIONS[0]].fp8
        found.block = first[2]
        blocks = max(expert[proj].fp8[1].numel for expert in moe_layer.experts for proj in PROJECTIONS)
        found.fp8 = held.get("fp8", (g.experts, 3, size), torch.uint8)
        found.scales = held.get("scales", (g.experts, 3, blocks), torch.float32)
        raw, scales = found.fp8.numpy(), found.scales.numpy()
        for e, expert in enumerate(moe_layer.experts):
            for p, proj in enumerate(PROJECTIONS):
                weight, scale_inv, _ = expert[proj].fp8
                source.reader.read_into(weight, raw[e, p])
                stored = source.reader.read(scale_inv).reshape(-1)
                # bf16 scales widen exactly to fp32 (their bits shifted up), as ktq.cpu's decoder widens them
                scales[e, p, :stored.size] = (stored.view(np.uint16).astype(np.uint32) << 16).view(np.float32) \
                    if scale_inv.dtype == "BF16" else stored.view(np.float32)
        return found
    found.bits = held.get("bits", (g.experts, 3, size), torch.int16)
    bits = found.bits.numpy().view(np.uint16)
    scratch = np.empty(max(source.experts.scratch_bytes, 1), np.uint8)
    for e, expert in enumerate(moe_layer.experts):
        for p, proj in enumerate(PROJECTIONS):
            expert[proj].read(source.reader, bits[e, p], scratch)
    return found


class DeviceExperts:
    """A layer's experts handed to the device `chunk` experts at a time (the whole layer, kept, when chunk covers
    it). `replace(transform)` makes every chunk handed out from then on hold the layer as written: transform(chunk)
    rewrites it in place, once per chunk on the device."""

    def __init__(self, host: HostExperts, chunk: int, device, dtype: torch.dtype) -> None:
        self.host, self.chunk, self.device, self.dtype = host, max(1, min(chunk, host.experts)), device, dtype
        self.resident = self.chunk == host.experts
        self._kept: Chunk | None = None
        self._transform: Callable[[Chunk], None] | None = None
        self._stream = torch.cuda.Stream(device) if self.device.type == "cuda" else None

    @property
    def experts(self) -> int:
        return self.host.experts

    def replace(self, transform: Callable[[Chunk], None]) -> None:
        self._transform = transform
        if self._kept is not None:
            transform(self._kept)

    def chunks(self, size: int | None = None) -> Iterator[Chunk]:
        """The layer's experts, `size` at a time (the plan's chunk by default; a consumer that solves a fixed
        number of experts together asks for that many)."""
        size = size or self.chunk
        blocks = [range(first, min(first + size, self.experts)) for first in range(0, self.experts, size)]
        if self.resident:
            if self._kept is None:
                self._kept = self._load(range(self.experts))
            for block in blocks:
                yield Chunk(block, self._kept.gate_up[block.start:block.stop], self._kept.down[block.start:block.stop])
            return
        ahead = self._start(blocks[0])
        for i in range(len(blocks)):
            current = self._finish(ahead)
            ahead = self._start(blocks[i + 1]) if i + 1 < len(blocks) else None
            yield current
            del current

    def _load(self, block: range) -> Chunk:
        return self._finish(self._start(block))

    def _start(self, block: range):
        """Begin copying (and decoding) a chunk; on a GPU on the side stream, so it overlaps the computation."""
        if self._stream is None:
            return self._decoded(block), None
        with torch.cuda.stream(self._stream):
            chunk = self._decoded(block)
            ready = torch.cuda.Event()
            ready.record(self._stream)
        return chunk, ready

    def _finish(self, started) -> Chunk:
        chunk, ready = started
        if ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(ready)
            for tensor in (chunk.gate_up, chunk.down):
                tensor.record_stream(current)  # made on the side stream, used on this one
        if self._transform is not None:
            self._transform(chunk)
        return chunk

    def _decoded(self, block: range) -> Chunk:
        host, c = self.host, len(block)
        i, h = host.intermediate, host.hidden
        if host.bits is not None:
            bits = host.bits[block.start:block.stop].to(self.device, non_blocking=True).view(torch.bfloat16)
            weights = bits.to(self.dtype)
        else:
            raw = host.fp8[block.start:block.stop].to(self.device, non_blocking=True).view(torch.float8_e4m3fn)
            scales = host.scales[block.start:block.stop].to(self.device, non_blocking=True)
            weights = torch.empty((c, 3, i * h), dtype=self.dtype, device=self.device)
            for j in range(c):
                for p, (rows, cols) in enumerate(host.shapes):
                    count = -(-rows // host.block[0]) * -(-cols // host.block[1])
                    grid = scales[j, p, :count].view(-(-rows // host.block[0]), -(-cols // host.block[1]))
                    weights[j, p] = decode_fp8(raw[j, p].view(rows, cols), grid, host.block).reshape(-1)
        return Chunk(block, weights[:, :2].reshape(c, 2 * i, h), weights[:, 2].view(c, h, i))
