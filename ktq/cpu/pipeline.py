"""`ktq cpu`: routed experts of a checkpoint -> kt-kernel AMXINT4 / AMXINT8, one expert at a time.

    checkpoint --read thread--> expert slots --Numba (all cores)--> packed slots --write thread--> sink

A fixed ring of READ_AHEAD input slots and WRITE_BEHIND output slots, allocated once, bounds the memory by a
few experts whatever the layer size, and lets reading, quantising and writing overlap (file I/O and the Numba
kernels release the GIL). Layers are committed atomically by the sink and recorded in the manifest, so a
re-run of the same command continues after the last committed layer.
"""

from __future__ import annotations

import gc
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from threading import Event

import numba
import numpy as np

from ktq.cpu.checkpoint import open_checkpoint
from ktq.cpu.experts import MoeLayer, MoeModel, ProjectionSource, find_experts
from ktq.cpu.layout import Layout
from ktq.cpu.manifest import Manifest, save_manifest
from ktq.cpu.output import finish_output, plan_output
from ktq.cpu.sinks import KtTreeSink, MergedSink, packed_slot
from ktq.errors import KtqError
from ktq.kernels import ktformat as fmt
from ktq.kernels.amx import quantize_pack_expert
from ktq.output_folder import continuing, starting_over
from ktq.progress import LayerProgress
from ktq.safetensors_io import TensorReader

READ_AHEAD = 3  # experts read before their turn to be quantised
WRITE_BEHIND = 4  # quantised experts waiting to be written


@dataclass(frozen=True)
class CpuJob:
    input_path: Path
    output: Path
    method: fmt.Method
    numa: int
    merge: bool = True
    input_type: str | None = None
    resume_layer: int | None = None
    force: bool = False  # start over an output made with other settings; start even when the disk looks too small


@dataclass
class CpuResult:
    output: Path
    method: fmt.Method
    numa: int
    form: str
    layers_converted: list[int] = field(default_factory=list)
    layers_kept: list[int] = field(default_factory=list)
    input_bytes: int = 0
    output_bytes: int = 0
    seconds: float = 0.0
    complete: bool = False  # the output was complete already: nothing was written


class _ExpertSlot:
    """One expert in flight: its three bf16 matrices, mapped from the page cache when the checkpoint stores bf16,
    else decoded into buffers this slot owns (allocated once; untouched pages cost nothing)."""

    def __init__(self, model: MoeModel) -> None:
        g = model.geometry
        self.owned = {proj: np.empty(fmt.projection_shape(proj, g.hidden, g.intermediate), np.uint16)
                      for proj in fmt.PROJECTIONS}
        self.scratch = np.empty(model.scratch_bytes, np.uint8)
        self.matrices: dict[str, np.ndarray] = {}
        self._mapped: list[ProjectionSource] = []

    def fill(self, expert: dict[str, ProjectionSource], reader: TensorReader, stop: Event) -> None:
        for proj, source in expert.items():
            if stop.is_set():
                return
            matrix = source.map(reader)
            if matrix is None:
                matrix = source.read(reader, self.owned[proj], self.scratch)
                matrix.flags.writeable = False  # one kernel signature for mapped and decoded matrices
            else:
                self._mapped.append(source)
            self.matrices[proj] = matrix

    def release(self, reader: TensorReader) -> None:
        self.matrices.clear()
        for source in self._mapped:
            source.unmap(reader)
        self._mapped.clear()


class PackedExpert:
    """One expert's kernel output, allocated once: the sinks' PackedProjection views (packed_slot: every piece's
    body and scales in one buffer) and what the kernel needs to fill them all in one call."""

    def __init__(self, layout: Layout) -> None:
        self.projections = packed_slot(layout.pieces)
        buffer = self.projections[0].body.base
        self.words, self.floats = buffer.view(np.uint32), buffer.view(np.float32)
        start = buffer.ctypes.data
        # every offset is a multiple of 4: n is a multiple of 32
        self.offsets = np.array([((p.body.ctypes.data - start) // 4, (p.scales.ctypes.data - start) // 4)
                                 for p in self.projections], np.int64)


def _quantize_expert(expert: dict[str, ProjectionSource], slot: _ExpertSlot, packed: PackedExpert,
                     method: fmt.Method, numa: int, threads: int) -> None:
    m = slot.matrices
    proj, row = quantize_pack_expert(m["gate"], m["up"], m["down"], numa, method.bits, packed.words, packed.floats,
                                     packed.offsets, threads)
    if proj >= 0:
        raise KtqError(f"{expert[fmt.PROJECTIONS[proj]].name} holds Inf or NaN in row {row}: the checkpoint is "
                       "damaged (kt-kernel's result for such rows is undefined), re-download or repair that shard")


def load_kernel(method: fmt.Method) -> None:
    """Load the quantising kernel for the argument types the pipeline passes (from Numba's cache; compiled the
    first time), on a one-tile expert."""
    side = method.align
    zeros = np.zeros((side, side), np.uint16)
    zeros.flags.writeable = False
    packed = PackedExpert(Layout("merged", method, 1, side, side, 1, (0,)))
    quantize_pack_expert(zeros, zeros, zeros, 1, method.bits, packed.words, packed.floats, packed.offsets,
                         numba.get_num_threads())


def _check_alignment(model: MoeModel, method: fmt.Method, numa: int) -> None:
    problem = fmt.alignment_problem(method, model.geometry.hidden, model.geometry.intermediate, numa)
    if problem:
        raise KtqError(problem)


def _layers_to_convert(job: CpuJob, model: MoeModel, manifest: Manifest) -> tuple[list[MoeLayer], list[int]]:
    """The layers to convert now and those kept; --resume-layer N drops N and later ones from the manifest."""
    done = manifest.layers
    if job.resume_layer is None:
        todo = [layer for layer in model.layers if layer.index not in done]
    else:
        missing = [layer.index for layer in model.layers if layer.index < job.resume_layer and layer.index not in done]
        if missing:
            raise KtqError(f"--resume-layer {job.resume_layer}: layers {missing[:5]} are not in {job.output} yet; "
                           "drop --resume-layer (ktq resumes by itself after the last finished layer)")
        todo = [layer for layer in model.layers if layer.index >= job.resume_layer]
        for layer in todo:
            done.pop(layer.index, None)
    kept = [layer.index for layer in model.layers if layer.index in done]
    return todo, kept


class _Pipeline:
    """Runs the work items (layer, expert) through read -> quantise -> write with bounded buffers."""

    def __init__(self, job: CpuJob, model: MoeModel, layout: Layout, sink, manifest: Manifest, progress: LayerProgress,
                 reader: TensorReader) -> None:
        self.job, self.model, self.layout, self.sink = job, model, layout, sink
        self.manifest, self.progress, self.reader = manifest, progress, reader
        self._stop = Event()
        self._layer_started = 0.0

    def _read(self, layer: MoeLayer, e: int, slot: _ExpertSlot) -> _ExpertSlot:
        slot.release(self.reader)  # here, not after quantising: unmapping stalls the thread that does it
        slot.fill(layer.experts[e], self.reader, self._stop)
        return slot

    def _write(self, layer: MoeLayer, e: int, packed: PackedExpert) -> None:
        if self._stop.is_set():
            return
        try:
            if e == 0:
                self._layer_started = time.perf_counter()
                self.sink.begin(layer.index)
            self.sink.write_expert(e, packed.projections)
            if e == len(layer.experts) - 1:
                self.manifest.layers[layer.index] = self.sink.commit()
                save_manifest(self.job.output, self.manifest)
                self.progress.layer_done(layer.index, len(layer.experts), layer.input_bytes,
                                         time.perf_counter() - self._layer_started)
        except BaseException:
            self._stop.set()
            raise

    def run(self, layers: list[MoeLayer]) -> None:
        # Each full pass of the cyclic garbage collector walks every object of Numba's compiler (50 ms, measured);
        # the per-expert objects of the pipeline are freed by reference counting and need no such pass.
        collecting = gc.isenabled()
        gc.disable()
        try:
            self._run(layers)
        finally:
            if collecting:
                gc.enable()

    def _run(self, layers: list[MoeLayer]) -> None:
        items = [(layer, e) for layer in layers for e in range(len(layer.experts))]
        if not items:
            return
        in_slots = [_ExpertSlot(self.model) for _ in range(min(READ_AHEAD, len(items)))]
        out_slots = [PackedExpert(self.layout) for _ in range(min(WRITE_BEHIND, len(items)))]
        threads = numba.get_num_threads()
        reads: deque[Future] = deque()
        writes: deque[Future] = deque()
        failure: BaseException | None = None
        with ThreadPoolExecutor(1, "ktq-read") as read_pool, ThreadPoolExecutor(1, "ktq-write") as write_pool:
            try:
                for i in range(len(in_slots)):
                    reads.append(read_pool.submit(self._read, *items[i], in_slots[i]))
                for i, (layer, e) in enumerate(items):
                    slot = reads.popleft().result()
                    if self._stop.is_set():  # the writer failed, the slot may be half read: report its error
                        break
                    if len(writes) == len(out_slots):
                        writes.popleft().result()  # frees the output slot this expert reuses
                    packed = out_slots[i % len(out_slots)]
                    _quantize_expert(layer.experts[e], slot, packed, self.job.method, self.job.numa, threads)
                    self.progress.advance(sum(s.input_bytes for s in layer.experts[e].values()))
                    nxt = i + len(in_slots)
                    if nxt < len(items):
                        reads.append(read_pool.submit(self._read, *items[nxt], slot))
                    writes.append(write_pool.submit(self._write, layer, e, packed))
                while writes:
                    writes.popleft().result()
            except BaseException as exc:
                failure = exc
                if isinstance(exc, Exception) and not self._stop.is_set():
                    # bad input found by the reader or the quantiser: the experts already quantised are still
                    # written, so that the layer before the bad one is committed (a re-run continues after it)
                    for future in writes:
                        if future.exception() is not None:
                            break
                self._stop.set()
                for future in (*reads, *writes):
                    future.cancel()
        for slot in in_slots:  # no view of the reader's maps may outlive the pipeline
            slot.release(self.reader)
        if failure is not None:  # both threads have stopped: remove the unit in flight
            self.sink.abort()
            raise failure


def layout_of(job: CpuJob, model: MoeModel) -> Layout:
    """What the job's output holds when it is complete."""
    g = model.geometry
    return Layout("merged" if job.merge else "kt", job.method, job.numa, g.hidden, g.intermediate, g.experts,
                  tuple(layer.index for layer in model.layers))


def convert_cpu(job: CpuJob, progress: LayerProgress) -> CpuResult:
    started = time.perf_counter()
    ckpt = open_checkpoint(job.input_path)
    model = find_experts(ckpt, job.input_type)
    _check_alignment(model, job.method, job.numa)
    if job.resume_layer is not None and job.resume_layer not in {layer.index for layer in model.layers}:
        raise KtqError(f"--resume-layer {job.resume_layer} is not a MoE layer of this model "
                       f"(MoE layers: {model.layers[0].index}..{model.layers[-1].index})")
    layout = layout_of(job, model)
    plan = plan_output(job.output, Manifest(layout, model.input_type, ckpt.fingerprint()), job.force)
    manifest = plan.manifest
    todo, kept = _layers_to_convert(job, model, manifest)  # whether they fit was checked by ktq.cpu.plan
    source = job.input_path if job.merge else None
    if plan.restarted:
        progress.note(starting_over(job.output, len(plan.remove), "--force"))
    sink = MergedSink(job.output, layout) if job.merge else KtTreeSink(job.output, layout)
    result = CpuResult(job.output, job.method, job.numa, layout.form, [layer.index for layer in todo], kept)
    result.output_bytes = manifest.output_bytes
    if plan.complete and not todo:
        result.complete = True
        return result
    result.input_bytes = sum(layer.input_bytes for layer in todo)
    with plan.writing(), TensorReader() as reader:
        for warning in model.warnings:
            progress.note(f"ktq: warning: {warning}")
        if kept:
            progress.note(continuing(job.output, len(kept), len(todo), "converted"))
        progress.start(result.layers_converted, result.input_bytes)
        _Pipeline(job, model, layout, sink, manifest, progress, reader).run(todo)
        finish_output(job.output, manifest, source)  # under the lock: a second run must not finish it meanwhile
    result.output_bytes = manifest.output_bytes
    result.seconds = time.perf_counter() - started
    return result
