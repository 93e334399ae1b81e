"""The routed experts of one decoder layer while the streaming engine calibrates it.

A transformers MoE block calls its experts module as `experts(hidden_states [T, H], top_k_index [T, K],
top_k_weights [T, K])`; `StreamedExperts` takes its place, with the layer's expert weights as ktq read them.

- Calibrating, it counts the tokens the router sends to each expert and hands every call's input and routing to
  the collectors of the artifacts being written (the GPU checkpoint's Hessians, the calibrated CPU experts' routed
  inputs), and returns zeros: the calibration pass's output is never used.
- Propagating, it computes what transformers' experts module computes (the routed experts only, added in expert
  order with `index_add_`; a token picks an expert at most once, so no index repeats within a call and the result is
  deterministic on a GPU too), with the weights the output checkpoint holds.
"""

from __future__ import annotations

from typing import Protocol

import torch
from transformers.activations import ACT2FN


class Collector(Protocol):
    """What an artifact takes from the calibration pass: every sample's input to the layer's experts [T, H], the
    router's choice [T, K] and its weights [T, K]."""

    def add(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> None: ...


class StreamedExperts(torch.nn.Module):
    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, hidden_act: str) -> None:
        super().__init__()
        self.gate, self.up, self.down = gate, up, down  # [E, I, H], [E, I, H], [E, H, I]
        self.act_fn = ACT2FN[hidden_act]
        self.collectors: list[Collector] | None = None  # set while calibrating
        self.routed: torch.Tensor | None = None  # tokens routed to each expert over the calibration pass

    @property
    def num_experts(self) -> int:
        return self.gate.shape[0]

    def calibrating(self, collectors: list[Collector]) -> None:
        """From now on every call feeds `collectors` and counts the routed tokens, until routed_counts()."""
        self.collectors = collectors
        self.routed = torch.zeros(self.num_experts, dtype=torch.int64, device=self.gate.device)

    def routed_counts(self) -> torch.Tensor:
        """The tokens routed to each expert since calibrating(); back to computing the experts' output."""
        routed, self.routed, self.collectors = self.routed, None, None
        return routed

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.collectors is not None:
            counts = torch.bincount(top_k_index.reshape(-1).long(), minlength=self.num_experts)[: self.num_experts]
            self.routed += counts.to(self.routed.device)
            for collector in self.collectors:
                collector.add(hidden_states, top_k_index, top_k_weights)
            return torch.zeros_like(hidden_states)
        return self._routed(hidden_states, top_k_index, top_k_weights)

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
