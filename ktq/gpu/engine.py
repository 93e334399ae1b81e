"""The streaming engine: one decoder layer at a time from the source's shards through the artifacts being written.

    source shards --(the next layer's experts read on a thread)--> transformers' own decoder layer class
        (meta skeleton, the layer's weights assigned; routed experts replaced by a StreamedExperts)
    calibration pass, a group of samples at a time: each sample's input to the experts recorded (each artifact's
        collector sees it), then every expert on every token of the group, chunk of experts after chunk
    each artifact solves the layer chunk by chunk and writes it, committed atomically
    propagation pass, a group at a time: the experts' output for the group's routed tokens with the weights the
        first artifact wrote, chunk after chunk, then the layer once more per sample with that output -> the next
        layer's inputs

The loop knows no artifact: each one (the GPU checkpoint, checkpoint.GpuCheckpoint; the calibrated CPU experts,
ktq.calibrated.artifact.CalibratedExperts) answers the calls of `Artifact`. The first artifact is the one the
propagation pass computes with.

Memory: the plan sizes the chunk of experts on the device (the whole layer when it fits) and the group of samples
whose inputs the device holds; every product takes the same rows whatever the two are (streamed_experts), so the
output does not depend on them. The host holds the calibration hidden states when the device cannot, and one layer
of experts read ahead. A killed run re-run with the same command keeps every layer its artifacts committed and
replays it (propagation only, from the weights the first artifact wrote), so it ends with the same bytes as a run
that was never interrupted.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

import torch
from loguru import logger

from ktq.errors import KtqError
from ktq.gpu.budget import Sizes, round_group
from ktq.gpu.capture import Captured, capture
from ktq.gpu.layer_experts import Chunk, DeviceExperts, HostBuffers, HostExperts, read_host_experts
from ktq.gpu.model import ModelMap
from ktq.gpu.source import SourceCheckpoint
from ktq.gpu.streamed_experts import (
    Collector,
    RoutedOutput,
    SampleGroup,
    StreamedExperts,
    intermediate,
)


class Artifact(Protocol):
    """An output written layer by layer; `experts` hands a MoE layer's routed experts to the device in chunks
    (layer_experts.DeviceExperts), None for a dense layer."""

    stages: tuple[str, str]  # the names of its solve and write stages in the log and the report

    def prepare(self) -> None:
        """Work for before the first layer, done on a thread while the samples are captured (compiling kernels)."""

    def pending(self, index: int) -> bool:
        """Decoder layer `index` is not committed yet (a resumed run keeps the rest)."""

    def routed(self, index: int) -> list[int] | None:
        """The routed calibration tokens of each expert a committed layer was written with, if recorded."""

    def collector(self, index: int, act_fn) -> Collector | None:
        """What it takes from the layer's calibration pass (None: nothing)."""

    def solve(self, index: int, experts: DeviceExperts | None, collected: Collector | None,
              routed: list[int] | None) -> None:
        """Quantise the layer (routed: the calibration tokens of each expert); the experts are not modified."""

    def write(self, index: int) -> None:
        """Write and commit the layer solved last (on a GPU, on a thread while the next layer is read and
        calibrated: the artifact's state for it stays as it is until its next solve)."""

    def written(self, index: int, chunk: Chunk) -> None:
        """Replace the chunk's experts, in place, by what the layer is written with (just solved, or committed
        earlier): the propagation pass computes with them."""


class Engine:
    def __init__(self, source: SourceCheckpoint, model: ModelMap, artifacts: list[Artifact], hidden_act: str,
                 dtype: torch.dtype, device, cache_device, sizes: Sizes, world, progress) -> None:
        self.source, self.model, self.artifacts = source, model, artifacts
        self.hidden_act, self.dtype, self.sizes = hidden_act, dtype, sizes
        self.device, self.cache_device = torch.device(device), cache_device
        self.world, self.progress = world, progress
        self._buffers = HostBuffers(pin=self.device.type == "cuda")
        self._ahead = ThreadPoolExecutor(1, thread_name_prefix="ktq-prefetch")
        self._next: tuple[int, Future] | None = None
        # on a GPU a layer is written while the next one computes; on the CPU both would share the same cores
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="ktq-write") if self.device.type == "cuda" else None
        self._writing: Future | None = None
        self.routed: dict[str, list[int]] = {}  # experts module -> routed calibration tokens of each expert
        self.layer_seconds: dict[str, dict[str, float]] = {}  # decoder layer -> stage -> seconds

    # ---- reading ----------------------------------------------------------------------------------------------

    def read(self, module: str) -> torch.Tensor | None:
        """The stored weight of parameter `module` on the device (FP8 decoded), None when the source lacks it."""
        stored = self.model.stored_as.get(module)
        return None if stored is None else self.source.read(self.source.logical[stored], self.device, self.dtype)

    def prefetch(self, layer: int) -> None:
        if layer < len(self.model.layers) and layer in self.source.moe_layers and self._next is None:
            self._next = (layer, self._ahead.submit(read_host_experts, self.source, layer, self._buffers))

    def host_experts(self, layer: int) -> HostExperts:
        if self._next is None or self._next[0] != layer:
            self.prefetch(layer)
        _, future = self._next
        self._next = None
        return future.result()

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
        preparing = self._ahead.submit(lambda: [artifact.prepare() for artifact in self.artifacts])
        captured = capture(self.model, self.read, self.device, self.cache_device, dataset) \
            if dataset is not None else None
        preparing.result()
        self.prefetch(self._next_moe_layer(-1))
        try:
            for index in range(len(self.model.layers)):
                self._layer(index, captured)
        finally:
            self._ahead.shutdown()
            if self._writer is not None:
                self._writer.shutdown()
        self._wait_for_writes()

    def _wait_for_writes(self) -> float:
        """Seconds waited for the layer being written (its errors raised here)."""
        start = time.perf_counter()
        if self._writing is not None:
            writing, self._writing = self._writing, None
            writing.result()
        return time.perf_counter() - start

    def _write(self, index: int, pending: list[Artifact]) -> dict[str, float]:
        """Each pending artifact's layer written: the seconds each took."""
        times = {}
        for artifact in pending:
            start = time.perf_counter()
            artifact.write(index)
            times[artifact.stages[1]] = time.perf_counter() - start
        return times

    def _write_behind(self, index: int, pending: list[Artifact]) -> None:
        """_write on the writer thread, its times logged: they overlap the next stages, whose times hold them."""
        times = self._write(index, pending)
        logger.info(f"{self.model.layer_names[index]} written behind: "
                    + ", ".join(f"{k} {v:.2f} s" for k, v in times.items()))

    def routed_by_layer(self) -> dict[int, list[int]]:
        """The routed calibration tokens of every expert, by decoder layer index (for the placement file)."""
        return {index: self.routed[path] for index, path in enumerate(self.model.experts_path) if path in self.routed}

    def _next_moe_layer(self, after: int) -> int:
        layers = len(self.model.layers)
        return next((i for i in range(after + 1, layers) if i in self.source.moe_layers), layers)

    def _groups(self, samples: int) -> list[range]:
        """The samples in groups of the plan's size, as the plan counts them (round_group): all of them in one
        when it holds them all, else a whole number of SAMPLES_PER_PRODUCT each."""
        size = round_group(samples, self.sizes.sample_group)
        return [range(first, min(first + size, samples)) for first in range(0, samples, size)]

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
        host = self.host_experts(index) if is_moe else None
        # on a GPU the next layer is read while this one computes; on the CPU both would share the same cores,
        # so the next layer waits until this one is solved and the host holds one layer less meanwhile
        if self.device.type != "cpu":
            self.prefetch(self._next_moe_layer(index))
        layer = self.materialise(index) if captured is not None else None
        streamed = experts = None
        if is_moe:
            experts = DeviceExperts(host, self.sizes.expert_chunk, self.device, self.dtype)
            if layer is not None:
                streamed = StreamedExperts(self.hidden_act)
                layer.set_submodule(path[len(name) + 1:], streamed)
        times["read"], clock = time.perf_counter() - clock, time.perf_counter()
        collected = [None] * len(pending)
        kept = None  # the calibration's recorded inputs, when one group holds every sample
        if is_moe and pending and captured is not None:
            collected = [artifact.collector(index, streamed.act_fn) for artifact in pending]
            kept = self._calibrate(index, layer, streamed, experts, captured,
                                   [c for c in collected if c is not None], path)
            times["calibrate"], clock = time.perf_counter() - clock, time.perf_counter()
        if self._writing is not None:  # the artifacts' state for the last layer is free once it is written
            times["write wait"], clock = self._wait_for_writes(), time.perf_counter()
        # each collector is dropped once its artifact has solved
        solves = list(zip(pending, collected))
        del collected
        while solves:
            artifact, statistics = solves.pop(0)
            artifact.solve(index, experts, statistics, self.routed.get(path))
            del statistics
            times[artifact.stages[0]], clock = time.perf_counter() - clock, time.perf_counter()
        self.prefetch(self._next_moe_layer(index))
        if self._writer is None:
            times.update(self._write(index, pending))
            clock = time.perf_counter()
        elif pending:
            self._writing = self._writer.submit(self._write_behind, index, pending)
        if propagate:
            if is_moe:
                source = self.artifacts[0]
                experts.replace(lambda chunk: source.written(index, chunk))
                self._propagate_moe(index, layer, streamed, experts, captured, kept)
            else:
                self._propagate_dense(index, layer, captured)
            times["propagate"] = time.perf_counter() - clock
        del kept, experts
        if layer is not None:
            layer.to_empty(device="meta")
        if host is not None:
            if self.device.type == "cuda":  # the last copies out of the host buffers have landed before their reuse
                torch.cuda.synchronize(self.device)
            self._buffers.give_back(host.held)
        self.progress.layer_done(index)
        self.layer_seconds[name] = {k: round(v, 3) for k, v in times.items()}
        logger.info(f"{name}{'' if pending else ' (replayed)'}: " + ", ".join(f"{k} {v:.2f} s"
                                                                            for k, v in times.items()))

    # ---- the two passes ---------------------------------------------------------------------------------------

    def _record(self, index: int, layer, streamed: StreamedExperts, captured: Captured, samples: range,
                calibrating: bool) -> SampleGroup:
        """The layer run on `samples`, their inputs to the experts and the router's choices kept on the device."""
        lengths = [captured.hidden[s].shape[-2] for s in samples]
        group = SampleGroup(lengths, captured.hidden[samples[0]].shape[-1], self.dtype, self.device)
        streamed.recording = group
        for s in samples:
            layer(captured.hidden[s].to(self.device, non_blocking=True), **captured.kwargs[s][index])
            if calibrating:
                self.progress.step(index, "calibrating")
        streamed.recording = None
        if group.recorded != len(samples):
            raise KtqError(f"{self.model.layer_names[index]}'s experts were called {group.recorded} times for "
                           f"{len(samples)} samples: ktq gpu cannot calibrate this MoE block")
        return group

    def _calibrate(self, index: int, layer, streamed: StreamedExperts, experts: DeviceExperts, captured: Captured,
                   collectors: list[Collector], path: str) -> SampleGroup | None:
        """The calibration pass: every group of samples recorded, then (for the collectors that want them) every
        expert's intermediates on every token, chunk after chunk; the routed tokens of each expert counted. Returns
        the recorded group when there is only one (the propagation pass reuses it)."""
        wanting = [c for c in collectors if c.wants_intermediates]
        groups = self._groups(len(captured.hidden))
        first_row = [0]
        for hidden in captured.hidden:
            first_row.append(first_row[-1] + hidden.shape[-2])
        routed = torch.zeros(experts.experts, dtype=torch.int64, device=self.device)
        group = None
        for samples in groups:
            group = self._record(index, layer, streamed, captured, samples, calibrating=True)
            for collector in collectors:
                collector.add_group(group, slice(first_row[samples.start], first_row[samples.stop]), first_row[-1])
            routed += group.routed(experts.experts)
            if wanting:
                for chunk in experts.chunks():
                    for rows, batch in group.batches():
                        x = group.x[rows]
                        for j, e in enumerate(chunk.block):
                            h = intermediate(x, chunk.gate_up[j], streamed.act_fn)
                            for s in batch:  # accumulated sample by sample, as llm-compressor does
                                sample = group.rows(s)
                                for collector in wanting:
                                    collector.add_intermediate(e, h[sample.start - rows.start:sample.stop - rows.start])
        self.world.reduce([routed])
        self.routed[path] = routed.tolist()
        return group if len(groups) == 1 else None

    def _propagate_moe(self, index: int, layer, streamed: StreamedExperts, experts: DeviceExperts,
                       captured: Captured, kept: SampleGroup | None) -> None:
        """Each group's experts' output from the written weights, then each sample through the layer with it."""
        for samples in self._groups(len(captured.hidden)):
            group = kept or self._record(index, layer, streamed, captured, samples, calibrating=False)
            output = RoutedOutput(group, experts.experts, streamed.act_fn)
            for chunk in experts.chunks():
                output.add(chunk.block, chunk.gate_up, chunk.down)
            for local, s in enumerate(samples):
                streamed.injected = output.out[group.rows(local)]
                self._forward(layer, captured, index, s)
            del output, group

    def _propagate_dense(self, index: int, layer, captured: Captured) -> None:
        for s in range(len(captured.hidden)):
            self._forward(layer, captured, index, s)

    def _forward(self, layer, captured: Captured, index: int, s: int) -> None:
        held = captured.hidden[s]
        out = layer(held.to(self.device, non_blocking=True), **captured.kwargs[s][index])
        out = out[0] if isinstance(out, tuple) else out
        self.progress.step(index, "propagating")
        if held.device == out.device:
            captured.hidden[s] = out
        else:  # into the sample's pinned host memory, behind the computation on the same stream
            held.copy_(out, non_blocking=True)
