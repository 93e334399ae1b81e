"""Calibrated CPU experts of one MoE layer: GPTQ onto kt-kernel's grid (ktgrid) on the tokens the router sends.

In KTransformers an expert's output reaches the model scaled by its routing weight, only for the tokens routed to
it; so each expert gets its own Hessians, from its routed tokens weighted by their squared routing weights (the
error a token's output carries into the model). The gate and up projections of an expert share one Hessian (the
same inputs); its down projection's Hessian comes from the intermediate activations computed with the gate and up
projections already rounded, so the down rounding also makes up for theirs. A few hundred tokens taken as they come
(GENERIC_TOKENS, every expert's the same) are blended in at GENERIC_WEIGHT: they keep an expert that the router
rarely picks from being fitted to a handful of tokens, and give one that it never picks a Hessian at all.

The calibration pass collects each sample's MoE inputs and routing (`RoutedInputs`, on the device the plan puts the
hidden states on); experts are then solved in chunks sized to CPU_SOLVE_BYTES.
"""

from __future__ import annotations

import torch

from ktq.gpu.ktgrid import GridCodes, quantize_to_grid

GENERIC_TOKENS = 512
GENERIC_WEIGHT = 0.05
DAMPENING = 0.01  # of the mean Hessian diagonal, GPTQ's own default
# The choices above plain GPTQ on the routed tokens, each switchable for benchmarks/cpu_quality.py's ablation
ROUTING_WEIGHTED = True  # tokens weighted by their squared routing weight
DOWN_AFTER_ROUNDED_GATE_UP = True  # the down Hessian from the rounded gate and up projections
CPU_SOLVE_BYTES = 8 << 30  # Hessians and their factors of one chunk of experts (fp32): 12 DeepSeek-V3 experts


class RoutedInputs:
    """Every calibration token's input to one layer's experts, and the router's choice for it."""

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
        """x [N, H], expert ids [N, K], routing weights [N, K]."""
        return torch.cat(self._x), torch.cat(self._ids), torch.cat(self._weights)


def stacked_bytes(experts: int, hidden: int, intermediate: int) -> int:
    """What the solve of one chunk of experts holds besides the weights: three copies of each Hessian (the
    accumulated one, its reordering and the factor) for gate/up and for down."""
    return 3 * 4 * experts * (hidden * hidden + intermediate * intermediate)


def chunk_size(experts: int, hidden: int, intermediate: int) -> int:
    return max(1, min(experts, CPU_SOLVE_BYTES // stacked_bytes(1, hidden, intermediate)))


def _hessian(rows: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """sum_t w_t^2 x_t x_t^T / sum_t w_t^2 (fp32) of rows [T, C]; plain mean without weights."""
    rows = rows.float()
    if weights is None:
        return rows.T @ rows / max(rows.shape[0], 1)
    scaled = rows * weights[:, None]
    return scaled.T @ scaled / weights.square().sum().clamp_min(torch.finfo(torch.float32).tiny)


def _intermediate(tokens: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act_fn) -> torch.Tensor:
    """The down projection's input for tokens [T, H], fp32."""
    tokens = tokens.float()
    return act_fn(tokens @ gate.T) * (tokens @ up.T)


def calibrate_layer(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, inputs: RoutedInputs, act_fn,
                    bits: int, numa: int) -> tuple[GridCodes, GridCodes, GridCodes, list[int]]:
    """Codes of every expert (gate, up [E, I, H], down [E, H, I] on the solve device, not modified) and the
    routed-token count of each."""
    experts, inter, hidden = gate.shape
    device = gate.device
    x, ids, weights = inputs.gathered()
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=experts)[:experts]
    starts = torch.cumsum(counts, 0) - counts
    k = ids.shape[1]
    generic = x[:GENERIC_TOKENS].to(device, torch.float32)
    generic_hessian = _hessian(generic, None)
    results: list[list[GridCodes]] = [[], [], []]
    step = chunk_size(experts, hidden, inter)
    for first in range(0, experts, step):
        block = range(first, min(first + step, experts))
        routed = []
        for e in block:
            picked = order[starts[e]:starts[e] + counts[e]]
            routed.append((x[picked // k].to(device),
                           weights.reshape(-1)[picked].to(device) if ROUTING_WEIGHTED else None))
        gu_hessians = torch.stack([_hessian(rows, w) + GENERIC_WEIGHT * generic_hessian if len(rows) else
                                   generic_hessian.clone() for rows, w in routed])
        gu = quantize_to_grid(torch.cat([gate[first:block.stop], up[first:block.stop]], dim=1), gu_hessians, bits,
                              dampening=DAMPENING)
        del gu_hessians
        rounded = gu.dequantize(bits) if DOWN_AFTER_ROUNDED_GATE_UP else \
            torch.cat([gate[first:block.stop], up[first:block.stop]], dim=1).float()
        down_hessians = []
        for j, (rows, w) in enumerate(routed):
            g, u = rounded[j, :inter], rounded[j, inter:]
            generic_part = _hessian(_intermediate(generic, g, u, act_fn), None)
            down_hessians.append(_hessian(_intermediate(rows, g, u, act_fn), w) + GENERIC_WEIGHT * generic_part
                                 if len(rows) else generic_part)
        del rounded
        d = quantize_to_grid(down[first:block.stop], torch.stack(down_hessians), bits, groups=numa,
                             dampening=DAMPENING)
        results[0].append(GridCodes(gu.codes[:, :inter], gu.scales[:, :inter], 1, gu.rounded))
        results[1].append(GridCodes(gu.codes[:, inter:], gu.scales[:, inter:], 1, gu.rounded))
        results[2].append(d)
    joined = [GridCodes(torch.cat([g.codes for g in parts]), torch.cat([g.scales for g in parts]), parts[0].groups,
                        torch.cat([g.rounded for g in parts])) for parts in results]
    return joined[0], joined[1], joined[2], counts.tolist()
