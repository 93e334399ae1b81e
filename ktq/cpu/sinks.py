"""Where quantised experts go: merged safetensors shards or the low-memory .kt tree.

Both write a layer under a temporary name, flush it to the disk, check every size against the Layout, and only
then rename it into place, so a crash at any instant leaves whole layers and at most one temporary unit, which the
next run removes. `commit` returns the layer's manifest record: its path, its bytes and its digest (ktq.digest).
Any OSError (a full disk included) becomes a one-line KtqError; `abort` then removes the unit in flight.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ktq import digest
from ktq.atomic import PARTIAL_SUFFIX, fsync_dir
from ktq.cpu.layout import Layout, Piece
from ktq.cpu.manifest import PENDING_SUFFIX, LayerRecord
from ktq.errors import KtqError, write_error
from ktq.kernels import ktformat as fmt
from ktq.safetensors_io import DirectFile, ShardWriter, aligned_buffer, round_up, staging_buffers


@dataclass(frozen=True)
class PackedProjection:
    """One projection of one expert for one NUMA part, as the kernel wrote it."""

    proj: str
    part: int
    n: int
    k: int
    body: np.ndarray  # uint8
    scales: np.ndarray  # float32


def packed_slot(pieces: list[Piece]) -> list[PackedProjection]:
    """Buffers for one expert's pieces (Layout.pieces), in the order the sinks expect them: views of one buffer,
    so that one kernel call fills the whole expert. Each body and scale array starts on a page of its own, padded
    to whole blocks, so the .kt sink can hand every one to the disk as it is (DirectFile)."""
    sizes = [nbytes for p in pieces for nbytes in (p.body_bytes, p.scale_bytes)]
    buffer = aligned_buffer(sum(round_up(nbytes) for nbytes in sizes))
    arrays, at = [], 0
    for nbytes in sizes:
        arrays.append(buffer[at:at + nbytes])
        at += round_up(nbytes)
    return [PackedProjection(p.proj, p.part, p.n, p.k, body, scales.view(np.float32))
            for p, body, scales in zip(pieces, arrays[0::2], arrays[1::2])]


def _with_padding(data: np.ndarray) -> np.ndarray:
    """A uint8 array of a packed_slot extended over the padding that follows it, to a whole number of blocks."""
    start = data.ctypes.data - data.base.ctypes.data
    return data.base[start:start + round_up(data.nbytes)]


def merged_partial_path(out: Path, layout: Layout, layer: int) -> Path:
    return out / f".{layout.shard_name(layer)}{PARTIAL_SUFFIX}"


def merged_pending_path(out: Path, layout: Layout, layer: int) -> Path:
    """Where a layer's committed shard waits until the output is complete (ktq.cpu.output publishes it)."""
    return out / f"{layout.shard_name(layer)}{PENDING_SUFFIX}"


class MergedSink:
    """One safetensors shard per MoE layer, named model-{k}-of-{N} by the layer's rank among all MoE layers, under
    its pending name (merged_pending_path) until the output is complete."""

    def __init__(self, out: Path, layout: Layout) -> None:
        self.out, self.layout = out, layout
        self._writer: ShardWriter | None = None
        self._layer = -1
        self._stages = staging_buffers()  # shared by the layers' shards

    def begin(self, layer: int) -> None:
        self._layer = layer
        partial = merged_partial_path(self.out, self.layout, layer)
        try:
            self._writer = ShardWriter(partial, self.layout.tensor_entries(layer), stages=self._stages)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise write_error(partial, exc) from exc

    def write_expert(self, expert: int, packed: list[PackedProjection]) -> None:
        assert self._writer is not None
        tensors = []
        for p in packed:
            tensors.append((fmt.merged_tensor_name(self._layer, p.proj, expert, p.part, "weight"), p.body))
            tensors.append((fmt.merged_tensor_name(self._layer, p.proj, expert, p.part, "scale"), p.scales))
        try:
            self._writer.write_all(tensors)
        except OSError as exc:
            raise write_error(self._writer.path, exc) from exc

    def commit(self) -> LayerRecord:
        writer = self._writer
        assert writer is not None
        committed = merged_pending_path(self.out, self.layout, self._layer)
        try:
            file_digest = writer.finish()  # flushed, fsynced, every tensor written, size checked
            if writer.size != self.layout.layer_bytes(self._layer):
                raise KtqError(f"{writer.path}: {writer.size} bytes, the layout needs "
                               f"{self.layout.layer_bytes(self._layer)} (a bug in ktq)")
            os.replace(writer.path, committed)
            self._writer = None  # renamed: nothing left to remove
            fsync_dir(self.out)
        except OSError as exc:
            raise write_error(writer.path, exc) from exc
        finally:
            self.abort()
        return LayerRecord(self.layout.shard_name(self._layer), writer.size, digest.KEY, file_digest)

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None


class KtTreeSink:
    """_layer_{L}/_numa_{p}/{INT4|INT8}_{proj}_{e}_{size}Byte_{quant|scale}_.kt, one folder renamed per layer."""

    def __init__(self, out: Path, layout: Layout) -> None:
        self.out, self.layout = out, layout
        self._partial: Path | None = None
        self._layer = -1
        self._digests: dict[str, str] = {}

    def begin(self, layer: int) -> None:
        self._layer = layer
        self._partial = self.out / f"{fmt.layer_dir_name(layer)}{PARTIAL_SUFFIX}"
        self._digests = {}
        try:
            shutil.rmtree(self._partial, ignore_errors=True)
            for part in range(self.layout.numa):
                (self._partial / fmt.numa_dir_name(part)).mkdir(parents=True)
        except OSError as exc:
            raise write_error(self._partial, exc) from exc

    def _put(self, relpath: str, data: np.ndarray) -> None:
        assert self._partial is not None
        path = self._partial / relpath
        file = None
        try:
            file = DirectFile(path)
            file.write(_with_padding(data), data.nbytes)
            file.close(sync=False)  # commit fsyncs the layer's files together
        except OSError as exc:
            if file is not None:
                file.abort()
            raise write_error(path, exc) from exc

    def write_expert(self, expert: int, packed: list[PackedProjection]) -> None:
        files = {}
        for p in packed:
            body_name, scale_name = fmt.kt_file_names(self.layout.method, p.proj, expert, p.n, p.k)
            folder = fmt.numa_dir_name(p.part)
            files[f"{folder}/{body_name}"] = p.body
            files[f"{folder}/{scale_name}"] = p.scales.view(np.uint8)
        for relpath, data in files.items():
            self._put(relpath, data)
            self._digests[relpath] = digest.of(data)

    def _flush_and_check(self, partial: Path) -> int:
        """fsync every file (one journal commit covers most of them), then compare names and sizes with the
        layout. Returns the layer's bytes."""
        expected = dict(self.layout.kt_files(self._layer))
        if set(self._digests) != set(expected):
            raise KtqError(f"{partial}: {len(self._digests)} files written, the layout needs {len(expected)} "
                           "(a bug in ktq)")
        for relpath, size in expected.items():
            fd = os.open(partial / relpath, os.O_RDONLY)
            try:
                os.fsync(fd)
                actual = os.fstat(fd).st_size
            finally:
                os.close(fd)
            if actual != size:
                raise KtqError(f"{partial / relpath}: {actual} bytes on disk, {size} written (disk full?)")
        for part in range(self.layout.numa):
            fsync_dir(partial / fmt.numa_dir_name(part))
        return sum(expected.values())

    def commit(self) -> LayerRecord:
        partial = self._partial
        assert partial is not None
        final = self.out / fmt.layer_dir_name(self._layer)
        try:
            nbytes = self._flush_and_check(partial)
            if final.exists():  # written by a run that died before recording it in ktq.json
                shutil.rmtree(final)
            os.replace(partial, final)
            self._partial = None
            fsync_dir(self.out)
        except OSError as exc:
            raise write_error(partial, exc) from exc
        finally:
            self.abort()
        return LayerRecord(final.name, nbytes, digest.KEY, digest.of_tree(self._digests))

    def abort(self) -> None:
        if self._partial is not None:
            shutil.rmtree(self._partial, ignore_errors=True)
            self._partial = None
