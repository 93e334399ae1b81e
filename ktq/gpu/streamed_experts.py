"""The routed experts of one decoder layer while the streaming engine runs it.

A transformers MoE block calls its experts module as `experts(hidden_states [T, H], top_k_index [T, K],
top_k_weights [T, K])`; `StreamedExperts` takes its place and computes nothing itself:

- recording, it keeps each sample's input to the experts and the router's choice in a `SampleGroup` (on the
  device, for a group of samples at a time) and returns zeros: the layer's output is not used then;
- injecting, it returns the experts' output for the sample, computed for the whole group beforehand
  (`routed_output`): the layer then composes it with its residual and shared experts exactly as transformers does.

The experts' products are batched over `SAMPLES_PER_PRODUCT` samples at a time, a constant: every product has the
same rows whatever the memory plan (chunk of experts, group of samples), so the output does not depend on it.
"""

from __future__ import annotations

from typing import Protocol

import torch
from transformers.activations import ACT2FN

from ktq.errors import KtqError

SAMPLES_PER_PRODUCT = 16  # samples whose tokens one expert product takes (a few tens of thousands of rows)


class Collector(Protocol):
    """What an artifact takes from the calibration pass."""

    wants_intermediates: bool  # intermediates of every expert on every token (the all-experts forward)

    def add_group(self, group: "SampleGroup", rows: slice, total: int) -> None:
        """A recorded group of samples: their inputs to the layer's experts, the router's choice and weights, rows
        `rows` of the layer's `total` calibration tokens."""

    def add_intermediate(self, expert: int, h: torch.Tensor) -> None:
        """Expert `expert`'s down-projection input [rows, I] on a batch of every token (wants_intermediates)."""


class SampleGroup:
    """The experts' inputs of a group of calibration samples on the device, sample after sample: x [N, H], the
    router's choice [N, K] and weights [N, K]."""

    def __init__(self, lengths: list[int], hidden: int, dtype: torch.dtype, device) -> None:
        self.offsets = [0]
        for length in lengths:
            self.offsets.append(self.offsets[-1] + length)
        self.x = torch.empty((self.offsets[-1], hidden), dtype=dtype, device=device)
        self.index: torch.Tensor | None = None
        self.weights: torch.Tensor | None = None
        self.recorded = 0

    @property
    def samples(self) -> int:
        return len(self.offsets) - 1

    def rows(self, sample: int) -> slice:
        return slice(self.offsets[sample], self.offsets[sample + 1])

    def add(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> None:
        if self.recorded == self.samples or x.shape[0] != self.offsets[self.recorded + 1] - self.offsets[self.recorded]:
            raise KtqError(f"the experts were called with {x.shape[0]} tokens where the sample has "
                           f"{self.offsets[min(self.recorded + 1, self.samples)] - self.offsets[self.recorded]}: "
                           "ktq gpu cannot calibrate this MoE block (its experts must see each token once)")
        rows = self.rows(self.recorded)
        if self.index is None:  # the router's own dtypes: the products scale by its weights as transformers does
            self.index = torch.empty((len(self.x), top_k_index.shape[1]), dtype=torch.int64, device=self.x.device)
            self.weights = torch.empty((len(self.x), top_k_weights.shape[1]), dtype=top_k_weights.dtype,
                                       device=self.x.device)
        self.x[rows] = x
        self.index[rows] = top_k_index
        self.weights[rows] = top_k_weights
        self.recorded += 1

    def batches(self) -> list[tuple[slice, range]]:
        """The rows of SAMPLES_PER_PRODUCT samples at a time, and those samples."""
        return [(slice(self.offsets[first], self.offsets[min(first + SAMPLES_PER_PRODUCT, self.samples)]),
                 range(first, min(first + SAMPLES_PER_PRODUCT, self.samples)))
                for first in range(0, self.samples, SAMPLES_PER_PRODUCT)]

    def routed(self, experts: int) -> torch.Tensor:
        """Tokens routed to each expert [E] (int64)."""
        return torch.bincount(self.index.reshape(-1), minlength=experts)[:experts]


def intermediate(x: torch.Tensor, gate_up: torch.Tensor, act_fn) -> torch.Tensor:
    """An expert's down-projection input for tokens x [rows, H]: act(x gate^T) * (x up^T), gate_up [2I, H]."""
    both = torch.nn.functional.linear(x, gate_up)
    inter = gate_up.shape[0] // 2
    return act_fn(both[:, :inter]) * both[:, inter:]


class RoutedOutput:
    """The experts' output for a group, accumulated chunk of experts after chunk: each token's routed experts in
    expert order (a token picks an expert at most once, so index_add_ never sums two rows into one within a call,
    and the result is deterministic on a GPU too), scaled by the routing weights, in the model dtype."""

    def __init__(self, group: SampleGroup, experts: int, act_fn) -> None:
        self.group, self.act_fn = group, act_fn
        self.out = torch.zeros_like(group.x)
        self._batches = []
        for rows, _ in group.batches():
            top_k = group.index[rows]
            tokens = top_k.shape[0]
            slot_major = top_k.t().reshape(-1)  # [K * T], slot k of token t at k * T + t: transformers' order
            order = torch.argsort(slot_major, stable=True)
            counts = torch.bincount(slot_major, minlength=experts)[:experts].tolist()
            starts = [0]
            for count in counts:
                starts.append(starts[-1] + count)
            self._batches.append((rows, tokens, order, starts))

    def add(self, block: range, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        """The routed tokens of experts `block` (weights gate_up [c, 2I, H], down [c, H, I] on the device)."""
        x, weights = self.group.x, self.group.weights
        for rows, tokens, order, starts in self._batches:
            for j, e in enumerate(block):
                if starts[e] == starts[e + 1]:
                    continue
                picked = order[starts[e]:starts[e + 1]]
                token, slot = picked % tokens + rows.start, picked // tokens
                h = intermediate(x[token], gate_up[j], self.act_fn)
                h = torch.nn.functional.linear(h, down[j]) * weights[token, slot, None]
                self.out.index_add_(0, token, h.to(self.out.dtype))


class StreamedExperts(torch.nn.Module):
    def __init__(self, hidden_act: str) -> None:
        super().__init__()
        self.act_fn = ACT2FN[hidden_act]
        self.recording: SampleGroup | None = None  # set while the layer's samples are recorded
        self.injected: torch.Tensor | None = None  # the next call's output

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.recording is not None:
            self.recording.add(hidden_states, top_k_index, top_k_weights)
            return torch.zeros_like(hidden_states)
        out, self.injected = self.injected, None
        if out is None or out.shape != hidden_states.shape:
            raise RuntimeError("the experts were called without their output computed for this sample")
        return out
