"""The streaming engine: one decoder layer at a time from the source's shards through the artifacts being written.

    source shards --(one layer, next one decoded ahead on a thread)--> transformers' own decoder layer class
        (meta skeleton, the layer's weights assigned; routed experts in a StreamedExperts)
    calibration pass over every sample: each artifact's collector sees every MoE input and routing
    each artifact solves the layer and writes it, committed atomically
    propagation pass: the layer again, with the weights the first artifact wrote -> the next layer's inputs

The loop knows no artifact: each one (the GPU checkpoint, checkpoint.GpuCheckpoint; the calibrated CPU experts,
ktq.calibrated.artifact.CalibratedExperts) answers the calls of `Artifact`. The first artifact is the one the
propagation pass computes with; it solves last, so the others quantise the weights as read.

Memory: the device holds one layer, what the artifacts collect and their working sets, and (when the plan puts them
there) the calibration hidden states; the host one decoded layer ahead, whatever the model's depth. A killed run
re-run with the same command keeps every layer its artifacts committed and replays it (propagation only, from the
weights the first artifact wrote), so it ends with the same bytes as a run that was never interrupted.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

import numpy as np
import torch
from loguru import logger

from ktq.errors import KtqError
from ktq.gpu.capture import Captured, capture
from ktq.gpu.model import ModelMap
from ktq.gpu.source import SourceCheckpoint
from ktq.gpu.streamed_experts import Collector, StreamedExperts
from ktq.kernels.ktformat import PROJECTIONS


class Artifact(Protocol):
    """An output written layer by layer. `weights` are the layer's routed experts on the device (gate, up
    [E, I, H], down [E, H, I]), None for a dense layer."""

    stages: tuple[str, str]  # the names of its solve and write stages in the log and the report

    def pending(self, index: int) -> bool:
        """Decoder layer `index` is not committed yet (a resumed run keeps the rest)."""

    def routed(self, index: int) -> list[int] | None:
        """The routed calibration tokens of each expert a committed layer was written with, if recorded."""

    def collector(self, index: int, weights, act_fn) -> Collector | None:
        """What it takes from the layer's calibration pass (None: nothing)."""

    def solve(self, index: int, weights, collected: Collector | None, routed: list[int] | None,
              propagate: bool) -> None:
        """Quantise the layer (routed: the calibration tokens of each expert). With propagate, `weights` then hold
        what the layer will be written as; otherwise they are left as they are."""

    def write(self, index: int) -> None:
        """Write and commit the layer solved last."""

    def restore(self, index: int, weights) -> None:
        """A committed layer's weights as written, into `weights`: its propagation pass on resume."""


class Engine:
    def __init__(self, source: SourceCheckpoint, model: ModelMap, artifacts: list[Artifact], hidden_act: str,
                 dtype: torch.dtype, device, cache_device, world, progress) -> None:
        self.source, self.model, self.artifacts = source, model, artifacts
        self.hidden_act, self.dtype = hidden_act, dtype
        self.device, self.cache_device = torch.device(device), cache_device
        self.world, self.progress = world, progress
        self._ahead = ThreadPoolExecutor(1, thread_name_prefix="ktq-prefetch")
        self._next: tuple[int, Future] | None = None
        self.routed: dict[str, list[int]] = {}  # experts module -> routed calibration tokens of each expert
        self.layer_seconds: dict[str, dict[str, float]] = {}  # decoder layer -> stage -> seconds

    # ---- reading ----------------------------------------------------------------------------------------------

    def read(self, module: str) -> torch.Tensor | None:
        """The stored weight of parameter `module` on the device (FP8 decoded), None when the source lacks it."""
        stored = self.model.stored_as.get(module)
        return None if stored is None else self.source.read(self.source.logical[stored], self.device, self.dtype)

    def _expert_weights(self, layer: int) -> np.ndarray:
        """All experts of a decoder layer as bf16 bits [E, 3, I * H] (gate, up, down), decoded on the CPU."""
        moe_layer = self.source.experts.layers[self.source.moe_layers[layer]]
        g = self.source.experts.geometry
        out = np.empty((g.experts, 3, g.intermediate * g.hidden), np.uint16)
        scratch = np.empty(max(self.source.experts.scratch_bytes, 1), np.uint8)
        for e, expert in enumerate(moe_layer.experts):
            for p, proj in enumerate(PROJECTIONS):
                expert[proj].read(self.source.reader, out[e, p], scratch)
        return out

    def prefetch(self, layer: int) -> None:
        if layer < len(self.model.layers) and layer in self.source.moe_layers and self._next is None:
            self._next = (layer, self._ahead.submit(self._expert_weights, layer))

    def experts_on_device(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._next is None or self._next[0] != layer:
            self.prefetch(layer)
        _, future = self._next
        self._next = None
        bits = torch.from_numpy(future.result()).view(torch.bfloat16).to(self.device, self.dtype)
        g = self.source.experts.geometry
        e, i, h = g.experts, g.intermediate, g.hidden
        return bits[:, 0].view(e, i, h), bits[:, 1].view(e, i, h), bits[:, 2].view(e, h, i)

    def materialise(self, index: int):
        """Decoder layer `index` with its weights on the device, routed experts left out (on meta)."""
        from accelerate.utils import set_module_tensor_to_device

        layer, name = self.model.layers[index], self.model.layer_names[index]
        experts = self.model.experts_path[index]
        for pname, _ in list(layer.named_parameters()):
            full = f"{name}.{pname}"
            if experts is not None and full.startswith(experts + "."):
                continue
            value = self.read(full)
            if value is None:
                raise KtqError(f"{full} is missing from the checkpoint (transformers' "
                               f"{type(self.model.skeleton).__name__} has this parameter)")
            set_module_tensor_to_device(layer, pname, self.device, value=value)
        for bname, buffer in list(layer.named_buffers()):
            set_module_tensor_to_device(layer, bname, self.device, value=buffer)
        return layer

    # ---- the run ----------------------------------------------------------------------------------------------

    def run(self, dataset) -> None:
        """Every decoder layer in order (committed ones only replayed)."""
        captured = capture(self.model, self.read, self.device, self.cache_device, dataset) \
            if dataset is not None else None
        self.prefetch(self._next_moe_layer(-1))
        for index in range(len(self.model.layers)):
            self._layer(index, captured)
        self._ahead.shutdown()

    def routed_by_layer(self) -> dict[int, list[int]]:
        """The routed calibration tokens of every expert, by decoder layer index (for the placement file)."""
        return {index: self.routed[path] for index, path in enumerate(self.model.experts_path) if path in self.routed}

    def _next_moe_layer(self, after: int) -> int:
        layers = len(self.model.layers)
        return next((i for i in range(after + 1, layers) if i in self.source.moe_layers), layers)

    def forward_all(self, layer, captured: Captured, index: int, keep: bool) -> None:
        for s, hidden in enumerate(captured.hidden):
            out = layer(hidden.to(self.device), **captured.kwargs[s][index])
            out = out[0] if isinstance(out, tuple) else out
            if keep:
                captured.hidden[s] = out.to(self.cache_device)
            self.progress.step(index, "propagating" if keep else "calibrating")

    def _layer(self, index: int, captured: Captured | None) -> None:
        """One decoder layer: calibrated, solved and written where an artifact still lacks it, else only replayed
        from what the first artifact wrote."""
        is_moe = index in self.source.moe_layers
        name, path = self.model.layer_names[index], self.model.experts_path[index]
        pending = [artifact for artifact in self.artifacts if artifact.pending(index)]
        recorded = [counts for counts in (a.routed(index) for a in self.artifacts) if counts is not None]
        if is_moe and recorded:  # a committed layer: the counts it was written with (calibrating counts anew)
            self.routed[path] = recorded[0]
        propagate = captured is not None and index < len(self.model.layers) - 1
        if not (pending or propagate):
            self.progress.skip(index)
            return
        times: dict[str, float] = {}
        clock = time.perf_counter()
        weights = self.experts_on_device(index) if is_moe else None
        # on a GPU the next layer is decoded while this one calibrates; on the CPU both would share the same
        # cores, so the next layer waits until this one is solved and the host holds one decoded layer less
        if self.device.type != "cpu":
            self.prefetch(self._next_moe_layer(index))
        layer = self.materialise(index) if captured is not None else None
        experts = None
        if is_moe and layer is not None:
            experts = StreamedExperts(*weights, self.hidden_act)
            layer.set_submodule(path[len(name) + 1:], experts)
        times["read"], clock = time.perf_counter() - clock, time.perf_counter()
        collected = [None] * len(pending)
        if is_moe and pending and captured is not None:
            collected = [artifact.collector(index, weights, experts.act_fn) for artifact in pending]
            experts.calibrating([c for c in collected if c is not None])
            self.forward_all(layer, captured, index, keep=False)
            routed = experts.routed_counts()
            self.world.reduce([routed])
            self.routed[path] = routed.tolist()
            times["calibrate"], clock = time.perf_counter() - clock, time.perf_counter()
        source = self.artifacts[0]  # the weights the propagation pass computes with
        # the source solves last, so the others quantise the weights as read; each collector is dropped once used
        solves = sorted(zip(pending, collected), key=lambda pair: pair[0] is source)
        del collected
        while solves:
            artifact, statistics = solves.pop(0)
            artifact.solve(index, weights, statistics, self.routed.get(path),
                           propagate=propagate and artifact is source)
            del statistics
            times[artifact.stages[0]], clock = time.perf_counter() - clock, time.perf_counter()
        self.prefetch(self._next_moe_layer(index))
        for artifact in pending:
            artifact.write(index)
            times[artifact.stages[1]], clock = time.perf_counter() - clock, time.perf_counter()
        if is_moe and propagate and source not in pending:
            source.restore(index, weights)
        if propagate:
            self.forward_all(layer, captured, index, keep=True)
            times["propagate"] = time.perf_counter() - clock
        if layer is not None:
            layer.to_empty(device="meta")
        if experts is not None:
            experts.gate = experts.up = experts.down = None
        self.progress.layer_done(index)
        self.layer_seconds[name] = {k: round(v, 3) for k, v in times.items()}
        logger.info(f"{name}{'' if pending else ' (replayed)'}: "
                    + ", ".join(f"{k} {v:.2f} s" for k, v in times.items()))
