"""The routed experts of one decoder layer while the streaming engine calibrates it.

A transformers MoE block calls its experts module as `experts(hidden_states [T, H], top_k_index [T, K],
top_k_weights [T, K])`; `StreamedExperts` takes its place, with the layer's expert weights as ktq read them.

- Calibrating, it runs every expert on every token, as llm-compressor's `moe_calibrate_all_experts` does, and
  accumulates GPTQ's Hessians with llm-compressor's own `accumulate_hessian`: the gate and up projections of all
  experts see the same input, so one Hessian serves all of them; each down projection gets its own. It counts the
  tokens the router sends to each expert, and returns zeros: the calibration pass's output is never used.
- Collecting for the calibrated CPU experts (`inputs` set), it keeps every token's input and routing
  (cpu_experts.RoutedInputs); this too returns zeros.
- Propagating, it computes what transformers' experts module computes (the routed experts only, added in expert
  order with `index_add_`; a token picks an expert at most once, so no index repeats within a call and the result is
  deterministic on a GPU too), with the weights the output checkpoint holds.
"""

from __future__ import annotations

import torch
from llmcompressor.modifiers.gptq.helpers import accumulate_hessian
from transformers.activations import ACT2FN

# accumulate_hessian dispatches on the module type: a Linear's input is [tokens, features]
_LINEAR_INPUT = torch.nn.Linear(1, 1, device="meta")


class LayerStatistics:
    """What one layer's calibration pass measures: the shared gate/up Hessian, a down Hessian per expert and the
    routed-token counts, summed over calibration samples (normalised by the sample count when solved)."""

    def __init__(self, experts: int, hidden: int, intermediate: int, device) -> None:
        self.gate_up = torch.zeros((hidden, hidden), dtype=torch.float32, device=device)
        self.down = torch.zeros((experts, intermediate, intermediate), dtype=torch.float32, device=device)
        self.samples = torch.zeros((), dtype=torch.float32, device=device)
        self.routed = torch.zeros(experts, dtype=torch.int64, device=device)

    def tensors(self) -> list[torch.Tensor]:
        """Everything summed over ranks in a distributed run."""
        return [self.gate_up, self.down, self.samples, self.routed]


class StreamedExperts(torch.nn.Module):
    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, hidden_act: str) -> None:
        super().__init__()
        self.gate, self.up, self.down = gate, up, down  # [E, I, H], [E, I, H], [E, H, I]
        self.act_fn = ACT2FN[hidden_act]
        self.statistics: LayerStatistics | None = None  # set while calibrating the GPU experts
        self.inputs = None  # a cpu_experts.RoutedInputs while calibrating the CPU experts

    @property
    def num_experts(self) -> int:
        return self.gate.shape[0]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.statistics is not None or self.inputs is not None:
            if self.statistics is not None:
                self._calibrate(hidden_states, top_k_index, self.statistics)
            if self.inputs is not None:
                self.inputs.add(hidden_states, top_k_index, top_k_weights)
            return torch.zeros_like(hidden_states)
        return self._routed(hidden_states, top_k_index, top_k_weights)

    def _calibrate(self, x: torch.Tensor, top_k_index: torch.Tensor, stats: LayerStatistics) -> None:
        counts = torch.bincount(top_k_index.reshape(-1).long(), minlength=self.num_experts)[: self.num_experts]
        stats.routed += counts.to(stats.routed.device)
        # each call adds one sample (a [tokens, features] input) to a throwaway counter: one count serves all
        accumulate_hessian(x, _LINEAR_INPUT, stats.gate_up, torch.zeros((), device=x.device))
        for e in range(self.num_experts):
            h = self.act_fn(torch.nn.functional.linear(x, self.gate[e])) * torch.nn.functional.linear(x, self.up[e])
            accumulate_hessian(h, _LINEAR_INPUT, stats.down[e], torch.zeros((), device=x.device))
        stats.samples += 1

    def _routed(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """transformers' experts forward, with each expert's tokens found by one sort instead of a search per
        expert (a search waits for the GPU every time: 256 waits per sample). Within an expert the tokens come in
        transformers' order (by top-k slot, then token), so every product has the same rows."""
        out = torch.zeros_like(x)
        tokens = top_k_index.shape[0]
        slot_major = top_k_index.t().reshape(-1)  # [K * T], slot k of token t at k * T + t
        order = torch.argsort(slot_major, stable=True)
        counts = torch.bincount(slot_major, minlength=self.num_experts)[: self.num_experts].tolist()
        start = 0
        for e, count in enumerate(counts):
            if not count:
                continue
            picked = order[start:start + count]
            start += count
            token_idx, top_k_pos = picked % tokens, picked // tokens
            current = x[token_idx]
            h = self.act_fn(torch.nn.functional.linear(current, self.gate[e])) * torch.nn.functional.linear(
                current, self.up[e])
            h = torch.nn.functional.linear(h, self.down[e]) * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, h.to(out.dtype))
        return out
