"""Calibrated CPU experts of one MoE layer: GPTQ onto kt-kernel's grid (ktgrid) on the tokens the router sends.

In KTransformers an expert's output reaches the model scaled by its routing weight, only for the tokens routed to
it; so each expert gets its own Hessians, from its routed tokens weighted by their squared routing weights (the
error a token's output carries into the model). The gate and up projections of an expert share one Hessian (the
same inputs); its down projection's Hessian comes from the intermediate activations computed with the gate and up
projections already rounded, so the down rounding also makes up for theirs. A few hundred tokens taken as they come
(GENERIC_TOKENS, every expert's the same) are blended in at GENERIC_WEIGHT: they keep an expert that the router
rarely picks from being fitted to a handful of tokens, and give one that it never picks a Hessian at all.

The calibration pass collects each token's MoE input and routing (routed.RoutedInputs: the recorded group itself when
it holds every sample, else host buffers); experts are then solved in chunks the plan sizes to the memory the device
has spare, each one's routed tokens brought to the device in batches (routed.RoutedRows).
"""

from __future__ import annotations

import time

import torch

from ktq.calibrated.ktgrid import BLOCK, GridCodes, quantize_to_grid
from ktq.calibrated.routed import RoutedInputs, RoutedRows
from ktq.held_buffers import HeldBuffers
from ktq.precision import tf32_products

GENERIC_TOKENS = 512
GENERIC_WEIGHT = 0.2  # the least error at small calibration sizes, within 1% of the best at 64 x 256 (ablation)
DAMPENING = 0.01  # of the mean Hessian diagonal, GPTQ's own default
# The choices above plain GPTQ on the routed tokens, each switchable for benchmarks/cpu_quality.py's ablation
ROUTING_WEIGHTED = True  # tokens weighted by their squared routing weight
DOWN_AFTER_ROUNDED_GATE_UP = True  # the down Hessian from the rounded gate and up projections
ROWS_PER_BATCH = 1 << 14  # routed tokens gathered and multiplied at a time: a hot expert's are not held at once


class LayerCodes(HeldBuffers):
    """One MoE layer's codes, scales and fallback flags on the host, written chunk by chunk, the same buffers for
    every layer (pinned when they come from a GPU: 7 s of a DeepSeek-V3 layer went to pageable copies)."""

    def grid(self, name: str, experts: int, rows: int, columns: int, groups: int) -> GridCodes:
        return GridCodes(self.get(f"{name} codes", (experts, rows, columns), torch.int8),
                         self.get(f"{name} scales", (experts, rows, groups), torch.float32), groups,
                         self.get(f"{name} rounded", (experts,), torch.bool))


def _store(target: GridCodes, first: int, part: GridCodes) -> None:
    """part's codes into target's experts from `first` on, without waiting: the device's stream orders the copy
    before any later use of the memory part leaves behind."""
    stop = first + part.codes.shape[0]
    for held, value in ((target.codes, part.codes), (target.scales, part.scales), (target.rounded, part.rounded)):
        held[first:stop].copy_(value, non_blocking=True)


def stacked_bytes(experts: int, hidden: int, intermediate: int) -> int:
    """What the solve of a chunk of experts holds besides the layer's weights: per expert its gate/up Hessian (then
    its feedback factor) and ten bytes per weight of its gate and up projections (ktgrid's fp32 copy and a second
    fp32 buffer, the codes; the down solve and its Hessian need less), and four buffers of one block of columns of
    at most fp32 each (ktgrid's column loop: the block's own weights as gathered and in fp32, their steps, their
    errors); per chunk, the factorisation's temporaries (a few Hessians of one expert) and one batch of routed
    tokens on its way through."""
    return experts * expert_solve_bytes(hidden, intermediate) + chunk_solve_bytes(hidden, intermediate)


def expert_solve_bytes(hidden: int, intermediate: int) -> int:
    return 4 * hidden * hidden + 10 * 2 * hidden * intermediate + 4 * 4 * BLOCK * max(2 * intermediate, hidden)


def chunk_solve_bytes(hidden: int, intermediate: int) -> int:
    return 5 * 4 * hidden * hidden + ROWS_PER_BATCH * (10 * hidden + 16 * intermediate)


class _Hessian:
    """sum_t w_t^2 x_t x_t^T / sum_t w_t^2 (fp32) over batches of rows [T, C]; a plain mean without weights."""

    def __init__(self, columns: int, device) -> None:
        self.sum = torch.zeros((columns, columns), dtype=torch.float32, device=device)
        self.weight = 0.0

    def add(self, rows: torch.Tensor, weights: torch.Tensor | None, square_sum: float = 0.0) -> None:
        """rows [T, C] and their weights [T] with the sum of their squares (read from the device beforehand)."""
        rows = rows.float()
        if weights is None:
            self.weight += rows.shape[0]
        else:
            rows = rows * weights[:, None]
            self.weight += square_sum
        self.sum.addmm_(rows.T, rows)

    def mean(self) -> torch.Tensor:
        return self.sum.div_(max(self.weight, torch.finfo(torch.float32).tiny))


def _intermediate(tokens: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act_fn) -> torch.Tensor:
    """The down projection's input for tokens [T, H], fp32."""
    tokens = tokens.float()
    return act_fn(tokens @ gate.T) * (tokens @ up.T)


class StageClock:
    """Seconds per sub-stage of the CPU-expert solve, for the log: where a layer's time goes (on a GPU it waits for
    the device first, so each stage is charged its own kernels)."""

    def __init__(self, device) -> None:
        self.device, self.seconds = torch.device(device), {}
        self._last = self._now()

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self, stage: str) -> None:
        now = self._now()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._last
        self._last = now


def calibrate_layer(layer_experts, inputs: RoutedInputs, act_fn, bits: int, numa: int, chunk: int, host: LayerCodes,
                    clock: StageClock | None = None) -> tuple[GridCodes, GridCodes, GridCodes, list[int]]:
    """Codes of every expert of layer_experts (ktq.gpu.layer_experts.DeviceExperts: its weights handed to the solve
    device chunk by chunk, not modified) in host's buffers, valid until the next layer's call, and the
    routed-token count of each; `chunk` experts solved at a time. An expert's routed tokens are gathered twice (for
    its gate/up Hessian, then for its down Hessian once gate and up are rounded), in batches: only Hessians are held
    per chunk."""
    experts = layer_experts.experts
    x, ids, weights = inputs.gathered()
    device = layer_experts.device
    rows_of = RoutedRows(x, ids, weights, experts, device, ROWS_PER_BATCH, inputs.held)
    del ids, weights
    generic = x[:GENERIC_TOKENS].to(device)
    out = None

    def lap(stage: str) -> None:
        if clock is not None:
            clock.lap(stage)

    def routed(e: int):
        """Expert e's routed tokens, routing weights and their sum of squares, in batches of ROWS_PER_BATCH, on the
        solve device."""
        for rows, w, square_sum in rows_of.expert(e):
            yield rows, w if ROUTING_WEIGHTED else None, square_sum

    def blended(routed_hessian: _Hessian, generic_part: torch.Tensor) -> torch.Tensor:
        if routed_hessian.weight == 0:  # no token routed here: the generic tokens alone
            return generic_part.clone()
        return routed_hessian.mean().add_(generic_part, alpha=GENERIC_WEIGHT)

    def gate_up_hessians(block: range, hidden: int) -> torch.Tensor:
        hessians = torch.empty((len(block), hidden, hidden), dtype=torch.float32, device=device)
        with tf32_products():
            for j, e in enumerate(block):
                hessian = _Hessian(hidden, device)
                for rows, w, square_sum in routed(e):
                    hessian.add(rows, w, square_sum)
                hessians[j] = blended(hessian, generic_hessian)
        return hessians

    def down_hessians(block: range, rounded: torch.Tensor, inter: int) -> torch.Tensor:
        hessians = torch.empty((len(block), inter, inter), dtype=torch.float32, device=device)
        with tf32_products():
            for j, e in enumerate(block):
                g, u = rounded[j, :inter], rounded[j, inter:]
                generic_part = _Hessian(inter, device)
                generic_part.add(_intermediate(generic, g, u, act_fn), None)
                hessian = _Hessian(inter, device)
                for rows, w, square_sum in routed(e):
                    hessian.add(_intermediate(rows, g, u, act_fn), w, square_sum)
                hessians[j] = blended(hessian, generic_part.mean())
        return hessians

    with tf32_products():
        generic_hessian = _Hessian(generic.shape[1], device)
        generic_hessian.add(generic, None)
        generic_hessian = generic_hessian.mean()
    for part in layer_experts.chunks(chunk):
        block, gate_up = part.block, part.gate_up  # gate and up stacked [n, 2I, H]: they share a Hessian
        hidden, inter = part.down.shape[1:]
        if out is None:
            out = [host.grid("gate", experts, inter, hidden, 1), host.grid("up", experts, inter, hidden, 1),
                   host.grid("down", experts, hidden, inter, numa)]
        lap("read")
        hessians = gate_up_hessians(block, hidden)
        lap("gate/up hessians")
        # ktgrid turns the Hessians into their feedback factors in place
        gu = quantize_to_grid(gate_up, hessians, bits, dampening=DAMPENING)
        del hessians
        lap("gate/up solve")
        rounded = gu.dequantize(bits) if DOWN_AFTER_ROUNDED_GATE_UP else gate_up.float()
        _store(out[0], block.start, GridCodes(gu.codes[:, :inter], gu.scales[:, :inter], 1, gu.rounded))
        _store(out[1], block.start, GridCodes(gu.codes[:, inter:], gu.scales[:, inter:], 1, gu.rounded))
        del gu
        hessians = down_hessians(block, rounded, inter)
        del rounded
        lap("down hessians")
        _store(out[2], block.start, quantize_to_grid(part.down, hessians, bits, groups=numa, dampening=DAMPENING))
        del hessians, part, gate_up
        lap("down solve")
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()  # the last copies to the host have landed
    return out[0], out[1], out[2], rows_of.counts
