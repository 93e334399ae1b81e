"""`ktq cpu`: routed experts of a checkpoint -> kt-kernel AMXINT4 / AMXINT8, one expert at a time.

    checkpoint --read thread--> expert slots --Numba (all cores)--> packed slots --write thread--> sink

A fixed ring of READ_AHEAD input slots and WRITE_BEHIND output slots, allocated once, bounds the memory by a
few experts whatever the layer size, and lets reading, quantising and writing overlap (file I/O and the Numba
kernels release the GIL). Layers are committed atomically by the sink and recorded in the manifest, so a
re-run of the same command continues after the last committed layer.
"""

from __future__ import annotations

import shutil
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from threading import Event

import numpy as np

from ktq import __version__
from ktq.checkpoint import Checkpoint, open_checkpoint
from ktq.errors import KtqError
from ktq.experts import MoeLayer, MoeModel, find_experts
from ktq.kernels import ktformat as fmt
from ktq.kernels.amx import quantize_pack
from ktq.manifest import FORMAT, identity_mismatch, load_manifest, save_manifest, write_json_atomic
from ktq.progress import LayerProgress, gb
from ktq.safetensors_io import TensorReader
from ktq.sinks import PARTIAL_SUFFIX, KtTreeSink, MergedSink, PackedProjection

READ_AHEAD = 3  # experts read before their turn to be quantised
WRITE_BEHIND = 2  # quantised experts waiting to be written

# Files of the source folder that serving needs beside the weights (merged form only, as the reference tool).
AUX_PATTERNS = ("config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
                "added_tokens.json", "vocab.*", "merges.txt", "*.tiktoken", "chat_template*")


@dataclass(frozen=True)
class CpuJob:
    input_path: Path
    output: Path
    method: fmt.Method
    numa: int
    merge: bool = True
    input_type: str | None = None
    resume_layer: int | None = None


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
    slot = []
    for proj in fmt.PROJECTIONS:
        n, k = fmt.projection_shape(proj, g.hidden, g.intermediate // numa)
        for part in range(numa):
            slot.append(PackedProjection(proj, part, n, k, np.empty(method.body_bytes(n, k), np.uint8),
                                         np.empty(n, np.float32)))
    return slot


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


def _identity(job: CpuJob, ckpt: Checkpoint, model: MoeModel, form: str) -> dict:
    g = model.geometry
    return {"format": FORMAT, "form": form, "method": job.method.name, "kt_method": job.method.kt_method,
            "numa": job.numa, "hidden": g.hidden, "intermediate": g.intermediate, "experts": g.experts,
            "input_type": model.input_type, "input_fingerprint": ckpt.fingerprint(),
            "moe_layers": [layer.index for layer in model.layers]}


def _record_intact(out: Path, record: dict) -> bool:
    path = out / record["path"]
    if path.is_file():
        return path.stat().st_size == record["bytes"]
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*.kt")) == record["bytes"]
    return False


def _prepare_output(job: CpuJob, identity: dict) -> tuple[dict, bool]:
    """The manifest to continue from (fresh or resumed) and whether this run created the folder."""
    out = job.output
    if out.exists() and not out.is_dir():
        raise KtqError(f"--output {out} is a file, not a folder")
    existing = load_manifest(out) if out.is_dir() else None
    created = not out.exists()
    if existing is None:
        if out.is_dir() and any(out.iterdir()):
            names = ", ".join(sorted(p.name for p in out.iterdir())[:3])
            raise KtqError(f"--output {out} already holds files ktq did not write ({names}, ...): "
                           "choose a new or empty folder")
        manifest = {**identity, "ktq_version": __version__, "complete": False, "layers": {}}
    else:
        mismatch = identity_mismatch(existing, identity)
        if mismatch:
            raise KtqError(f"--output {out} holds a ktq conversion with other settings ({mismatch}); "
                           "choose another --output or delete that folder")
        manifest = {**existing, **identity, "ktq_version": __version__, "complete": False}
        manifest["layers"] = {k: r for k, r in existing.get("layers", {}).items() if _record_intact(out, r)}
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f"*{PARTIAL_SUFFIX}"):
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    for stale in out.glob(f".*{PARTIAL_SUFFIX}"):
        stale.unlink()
    save_manifest(out, manifest)
    return manifest, created


def _layers_to_convert(job: CpuJob, model: MoeModel, manifest: dict) -> tuple[list[MoeLayer], list[int]]:
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


def _check_disk(out: Path, needed: int) -> None:
    free = shutil.disk_usage(out).free
    if needed > free:
        raise KtqError(f"the output needs {gb(needed)} more on the disk of {out}, which has {gb(free)} free; "
                       "free some space or choose another --output")


def layer_output_bytes(model: MoeModel, method: fmt.Method, numa: int) -> int:
    g = model.geometry
    return g.experts * numa * fmt.part_bytes(method, g.hidden, g.intermediate // numa)


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


def index_document(sink: MergedSink, model: MoeModel) -> dict:
    """model.safetensors.index.json of a merged output: every tensor's shard, and their total size."""
    weight_map: dict[str, str] = {}
    total = 0
    for layer in model.layers:
        shard = sink.shard_name(layer.index)
        for name, _, _, nbytes in sink.tensor_entries(layer.index):
            weight_map[name] = shard
            total += nbytes
    metadata = {"total_size": total, "ktq_version": __version__, "kt_method": sink.method.kt_method,
                "numa": sink.numa}
    return {"metadata": metadata, "weight_map": weight_map}


def aux_files(source: Path) -> list[Path]:
    """The source's files that a merged output carries beside the weights."""
    return [path for pattern in AUX_PATTERNS for path in source.glob(pattern)
            if path.is_file() and not path.name.endswith(".safetensors")]


def _copy_aux_files(source: Path, out: Path) -> None:
    for path in aux_files(source):
        tmp = out / f".{path.name}{PARTIAL_SUFFIX}"
        shutil.copyfile(path, tmp)
        tmp.replace(out / path.name)


def convert_cpu(job: CpuJob, progress: LayerProgress) -> CpuResult:
    started = time.perf_counter()
    ckpt = open_checkpoint(job.input_path)
    model = find_experts(ckpt, job.input_type)
    _check_alignment(model, job.method, job.numa)
    if job.resume_layer is not None and job.resume_layer not in {layer.index for layer in model.layers}:
        raise KtqError(f"--resume-layer {job.resume_layer} is not a MoE layer of this model "
                       f"(MoE layers: {model.layers[0].index}..{model.layers[-1].index})")
    g = model.geometry
    if job.merge:
        sink = MergedSink(job.output, job.method, job.numa, g.hidden, g.intermediate, g.experts,
                          [layer.index for layer in model.layers])
    else:
        sink = KtTreeSink(job.output, job.method, job.numa)
    manifest, created = _prepare_output(job, _identity(job, ckpt, model, sink.form))
    try:
        todo, kept = _layers_to_convert(job, model, manifest)
        _check_disk(job.output, len(todo) * layer_output_bytes(model, job.method, job.numa))
        result = CpuResult(job.output, job.method, job.numa, sink.form, [layer.index for layer in todo], kept)
        result.input_bytes = sum(layer.input_bytes for layer in todo)
        for warning in model.warnings:
            progress.note(f"ktq: warning: {warning}")
        if kept:
            progress.note(f"continuing {job.output}: {len(kept)} layers already converted, {len(todo)} to go")
        progress.start(len(todo), sum(len(layer.experts) for layer in todo), result.input_bytes)
        with TensorReader() as reader:
            _Pipeline(job, model, sink, manifest, progress, reader).run(todo)
    except BaseException:
        if created and not manifest["layers"]:
            shutil.rmtree(job.output, ignore_errors=True)  # nothing of value was written: leave no trace
        raise
    if job.merge:
        _copy_aux_files(job.input_path, job.output)
        write_json_atomic(job.output / fmt.INDEX_NAME, index_document(sink, model))
    manifest["complete"] = True
    save_manifest(job.output, manifest)
    result.output_bytes = sum(record["bytes"] for record in manifest["layers"].values())
    result.seconds = time.perf_counter() - started
    return result
