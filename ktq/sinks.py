"""Where quantised experts go: merged safetensors shards or the low-memory .kt tree.

Both write a layer under a temporary name, check every size, and only then rename it into place, so a crash at
any instant leaves whole layers and at most one temporary unit, which the next run removes. `commit` returns the
layer's manifest record: its path, its bytes and its sha256.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ktq.errors import KtqError
from ktq.kernels import ktformat as fmt
from ktq.manifest import tree_digest
from ktq.safetensors_io import ShardWriter, WriteBehind, byte_view, sha256_behind

PARTIAL_SUFFIX = ".partial"


@dataclass(frozen=True)
class PackedProjection:
    """One projection of one expert for one NUMA part, as the kernel wrote it."""

    proj: str
    part: int
    n: int
    k: int
    body: np.ndarray  # uint8
    scales: np.ndarray  # float32


def _write_error(path: Path, exc: OSError) -> KtqError:
    hint = " (disk full?)" if exc.errno in (28, 122) else ""
    return KtqError(f"cannot write {path}: {exc.strerror or exc}{hint}")


class MergedSink:
    """One safetensors shard per MoE layer, named model-{k}-of-{N} by the layer's rank among all MoE layers."""

    form = "merged"

    def __init__(self, out: Path, method: fmt.Method, numa: int, hidden: int, intermediate: int, experts: int,
                 moe_layers: list[int]) -> None:
        self.out, self.method, self.numa = out, method, numa
        self.experts = experts
        self._shapes = {proj: fmt.projection_shape(proj, hidden, intermediate // numa) for proj in fmt.PROJECTIONS}
        self._rank = {layer: k for k, layer in enumerate(moe_layers, start=1)}
        self._writer: ShardWriter | None = None
        self._layer = -1

    def shard_name(self, layer: int) -> str:
        return fmt.shard_name(self._rank[layer], len(self._rank))

    def tensor_entries(self, layer: int) -> list[tuple[str, str, tuple[int, ...], int]]:
        """The shard's tensors in the order they are streamed: expert, projection, NUMA part, weight then scale."""
        entries = []
        for e in range(self.experts):
            for proj in fmt.PROJECTIONS:
                n, k = self._shapes[proj]
                body = self.method.body_bytes(n, k)
                for part in range(self.numa):
                    entries.append((fmt.merged_tensor_name(layer, proj, e, part, "weight"), "I8", (body,), body))
                    entries.append((fmt.merged_tensor_name(layer, proj, e, part, "scale"), "F32", (n,),
                                    fmt.scale_bytes(n)))
        return entries

    def begin(self, layer: int) -> None:
        self._layer = layer
        partial = self.out / f".{self.shard_name(layer)}{PARTIAL_SUFFIX}"
        try:
            self._writer = ShardWriter(partial, self.tensor_entries(layer))
        except OSError as exc:
            raise _write_error(partial, exc) from exc

    def write_expert(self, expert: int, packed: list[PackedProjection]) -> None:
        assert self._writer is not None
        tensors = []
        for p in packed:
            tensors.append((fmt.merged_tensor_name(self._layer, p.proj, expert, p.part, "weight"), p.body))
            tensors.append((fmt.merged_tensor_name(self._layer, p.proj, expert, p.part, "scale"), p.scales))
        try:
            self._writer.write_all(tensors)
        except OSError as exc:
            raise _write_error(self._writer.path, exc) from exc

    def commit(self) -> dict:
        writer, self._writer = self._writer, None
        assert writer is not None
        try:
            digest = writer.finish()
            final = self.out / self.shard_name(self._layer)
            os.replace(writer.path, final)
        except OSError as exc:
            writer.abort()
            raise _write_error(writer.path, exc) from exc
        return {"path": final.name, "bytes": writer.size, "sha256": digest}

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None


class KtTreeSink:
    """_layer_{L}/_numa_{p}/{INT4|INT8}_{proj}_{e}_{size}Byte_{quant|scale}_.kt, one folder renamed per layer."""

    form = "kt"

    def __init__(self, out: Path, method: fmt.Method, numa: int) -> None:
        self.out, self.method, self.numa = out, method, numa
        self._partial: Path | None = None
        self._layer = -1
        self._digests: dict[str, str] = {}
        self._bytes = 0
        self._behind = WriteBehind()  # closes the files, a few MB after they are written

    def begin(self, layer: int) -> None:
        self._layer = layer
        self._partial = self.out / f"{fmt.layer_dir_name(layer)}{PARTIAL_SUFFIX}"
        shutil.rmtree(self._partial, ignore_errors=True)
        self._digests, self._bytes = {}, 0
        try:
            for part in range(self.numa):
                (self._partial / fmt.numa_dir_name(part)).mkdir(parents=True)
        except OSError as exc:
            raise _write_error(self._partial, exc) from exc

    def _put(self, relpath: str, raw: memoryview) -> None:
        assert self._partial is not None
        path = self._partial / relpath
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as exc:
            raise _write_error(path, exc) from exc
        try:
            done = 0
            while done < raw.nbytes:
                done += os.write(fd, raw[done:])
        except OSError as exc:
            os.close(fd)
            raise _write_error(path, exc) from exc
        self._behind.wrote(fd, 0, raw.nbytes, close=True)
        self._bytes += raw.nbytes

    def write_expert(self, expert: int, packed: list[PackedProjection]) -> None:
        files = {}
        for p in packed:
            body_name, scale_name = fmt.kt_file_names(self.method, p.proj, expert, p.n, p.k)
            folder = fmt.numa_dir_name(p.part)
            files[f"{folder}/{body_name}"] = byte_view(p.body)
            files[f"{folder}/{scale_name}"] = byte_view(p.scales)
        digests = sha256_behind(list(files.values()))
        try:
            for relpath, raw in files.items():
                self._put(relpath, raw)
        finally:
            self._digests.update(zip(files, digests.result()))  # the caller may reuse the arrays once this returns

    def commit(self) -> dict:
        partial, self._partial = self._partial, None
        assert partial is not None
        self._behind.drop_all()
        on_disk = sum(f.stat().st_size for f in partial.rglob("*.kt"))
        if on_disk != self._bytes:
            shutil.rmtree(partial, ignore_errors=True)
            raise KtqError(f"{partial}: {on_disk} bytes on disk, {self._bytes} written (disk full?)")
        final = self.out / fmt.layer_dir_name(self._layer)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        return {"path": final.name, "bytes": self._bytes, "sha256": tree_digest(self._digests)}

    def abort(self) -> None:
        self._behind.drop_all()
        if self._partial is not None:
            shutil.rmtree(self._partial, ignore_errors=True)
            self._partial = None
