"""`ktq cpu`: routed experts of a checkpoint -> kt-kernel AMXINT4 / AMXINT8, one expert at a time.

    checkpoint --read thread--> expert slots --Numba (all cores)--> packed slots --write thread--> sink

A fixed ring of READ_AHEAD input slots and WRITE_BEHIND output slots, allocated once, bounds the memory by a
few experts whatever the layer size, and lets reading, quantising and writing overlap (file I/O and the Numba
kernels release the GIL). Layers are committed atomically by the sink and recorded in the manifest, so a
re-run of the same command continues after the last committed layer.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from threading import Event

import numpy as np

from ktq.checkpoint import open_checkpoint
from ktq.errors import KtqError
from ktq.experts import MoeLayer, MoeModel, find_experts
from ktq.kernels import ktformat as fmt
from ktq.kernels.amx import quantize_pack
from ktq.layout import Layout, expert_pieces
from ktq.manifest import identity, save_manifest
from ktq.output import finish_output, plan_output
from ktq.progress import LayerProgress
from ktq.safetensors_io import TensorReader
from ktq.sinks import KtTreeSink, MergedSink, PackedProjection, packed_slot

READ_AHEAD = 3  # experts read before their turn to be quantised
WRITE_BEHIND = 2  # quantised experts waiting to be written


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


class _ExpertSlot:
    """bf16 bits of one expert's three projections, plus the byte buffer its sources decode through."""

    def __init__(self, model: MoeModel) -> None:
        g = model.geometry
        self.src = {proj: np.empty(fmt.projection_shape(proj, g.hidden, g.intermediate), np.uint16)
                    for proj in fmt.PROJECTIONS}
        self.scratch = np.empty(model.scratch_bytes, np.uint8)


def _packed_slot(model: MoeModel, method: fmt.Method, numa: int) -> list[PackedProjection]:
    g = model.geometry
    return packed_slot(expert_pieces(method, numa, g.hidden, g.intermediate))


def _quantise_expert(expert: dict, slot: _ExpertSlot, packed: list[PackedProjection], method: fmt.Method,
                     per_part: int) -> None:
    for p in packed:
        full = slot.src[p.proj]
        if p.proj == "down":  # NUMA parts split down's columns
            view, col0, row0 = full, p.part * per_part, 0
        else:  # and gate's / up's rows
            view, col0, row0 = full[p.part * per_part:(p.part + 1) * per_part], 0, p.part * per_part
        bad = quantize_pack(view, col0, p.k, method.bits, p.body, p.scales)
        if bad >= 0:
            raise KtqError(f"{expert[p.proj].name} holds Inf or NaN in row {row0 + bad}: the checkpoint is damaged "
                           "(kt-kernel's result for such rows is undefined), re-download or repair that shard")


def _check_alignment(model: MoeModel, method: fmt.Method, numa: int) -> None:
    problem = fmt.alignment_problem(method, model.geometry.hidden, model.geometry.intermediate, numa)
    if problem:
        raise KtqError(problem)


def _layers_to_convert(job: CpuJob, model: MoeModel, manifest: dict) -> tuple[list[MoeLayer], list[int]]:
    """The layers to convert now and those kept; --resume-layer N drops N and later ones from the manifest."""
    done = manifest["layers"]
    if job.resume_layer is None:
        todo = [layer for layer in model.layers if str(layer.index) not in done]
    else:
        missing = [layer.index for layer in model.layers
                   if layer.index < job.resume_layer and str(layer.index) not in done]
        if missing:
            raise KtqError(f"--resume-layer {job.resume_layer}: layers {missing[:5]} are not in {job.output} yet; "
                           "drop --resume-layer (ktq resumes by itself after the last finished layer)")
        todo = [layer for layer in model.layers if layer.index >= job.resume_layer]
        for layer in todo:
            done.pop(str(layer.index), None)
    kept = [layer.index for layer in model.layers if str(layer.index) in done]
    return todo, kept


class _Pipeline:
    """Runs the work items (layer, expert) through read -> quantise -> write with bounded buffers."""

    def __init__(self, job: CpuJob, model: MoeModel, sink, manifest: dict, progress: LayerProgress,
                 reader) -> None:
        self.job, self.model, self.sink, self.manifest, self.progress = job, model, sink, manifest, progress
        self.reader = reader
        self._stop = Event()
        self._layer_started = 0.0

    def _read(self, layer: MoeLayer, e: int, slot: _ExpertSlot) -> _ExpertSlot:
        for proj, source in layer.experts[e].items():
            if self._stop.is_set():
                break
            source.read(self.reader, slot.src[proj], slot.scratch)
        return slot

    def _write(self, layer: MoeLayer, e: int, packed: list[PackedProjection]) -> None:
        if self._stop.is_set():
            return
        try:
            if e == 0:
                self._layer_started = time.perf_counter()
                self.sink.begin(layer.index)
            self.sink.write_expert(e, packed)
            if e == len(layer.experts) - 1:
                self.manifest["layers"][str(layer.index)] = self.sink.commit()
                save_manifest(self.job.output, self.manifest)
                self.progress.layer_done(layer.index, len(layer.experts), layer.input_bytes,
                                         time.perf_counter() - self._layer_started)
        except BaseException:
            self._stop.set()
            raise

    def run(self, layers: list[MoeLayer]) -> None:
        items = [(layer, e) for layer in layers for e in range(len(layer.experts))]
        if not items:
            return
        in_slots = [_ExpertSlot(self.model) for _ in range(min(READ_AHEAD, len(items)))]
        out_slots = [_packed_slot(self.model, self.job.method, self.job.numa)
                     for _ in range(min(WRITE_BEHIND, len(items)))]
        per_part = self.model.geometry.intermediate // self.job.numa
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
                    _quantise_expert(layer.experts[e], slot, packed, self.job.method, per_part)
                    self.progress.expert_done(sum(s.input_bytes for s in layer.experts[e].values()))
                    nxt = i + len(in_slots)
                    if nxt < len(items):
                        reads.append(read_pool.submit(self._read, *items[nxt], slot))
                    writes.append(write_pool.submit(self._write, layer, e, packed))
                while writes:
                    writes.popleft().result()
            except BaseException as exc:
                failure = exc
                self._stop.set()
                for future in (*reads, *writes):
                    future.cancel()
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
    plan = plan_output(job.output, identity(layout, model.input_type, ckpt.fingerprint()), layout, job.force)
    manifest = plan.manifest
    todo, kept = _layers_to_convert(job, model, manifest)  # whether they fit was checked by ktq.plan
    source = job.input_path if job.merge else None
    if plan.restarted:
        progress.note(f"starting {job.output} over (--force): deleting the {len(plan.remove)} files and folders "
                      "ktq wrote there with other settings")
    sink = MergedSink(job.output, layout) if job.merge else KtTreeSink(job.output, layout)
    result = CpuResult(job.output, job.method, job.numa, layout.form, [layer.index for layer in todo], kept)
    result.input_bytes = sum(layer.input_bytes for layer in todo)
    with plan.writing(), TensorReader() as reader:
        for warning in model.warnings:
            progress.note(f"ktq: warning: {warning}")
        if kept:
            progress.note(f"continuing {job.output}: {len(kept)} layers already converted, {len(todo)} to go")
        progress.start(len(todo), sum(len(layer.experts) for layer in todo), result.input_bytes)
        _Pipeline(job, model, sink, manifest, progress, reader).run(todo)
    finish_output(job.output, layout, manifest, source)
    result.output_bytes = sum(record["bytes"] for record in manifest["layers"].values())
    result.seconds = time.perf_counter() - started
    return result
