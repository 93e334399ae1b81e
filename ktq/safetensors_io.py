"""Safetensors without torch: headers, raw tensor reads into reusable buffers, and a streaming writer.

The CPU conversion never materialises a whole file. It maps each shard once and hands the kernels the page-cache
pages of one tensor at a time (`TensorReader.map`: no copy, and the pages are dropped from this process again after
use, so memory stays bounded by the tensors in flight), or reads a tensor's bytes into a buffer it owns
(`read_into`, for data that must be decoded first). It writes a shard tensor by tensor, the header first, since the
format fixes every size in advance.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import mmap
import os
import struct
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ktq.errors import KtqError

# safetensors dtype -> (bytes per element, numpy dtype used to hold the raw bits)
DTYPES: dict[str, tuple[int, type]] = {
    "BF16": (2, np.uint16),
    "F16": (2, np.uint16),
    "F32": (4, np.float32),
    "F64": (8, np.float64),
    "F8_E4M3": (1, np.uint8),
    "F8_E5M2": (1, np.uint8),
    "I8": (1, np.int8),
    "U8": (1, np.uint8),
    "I16": (2, np.int16),
    "I32": (4, np.int32),
    "I64": (8, np.int64),
    "BOOL": (1, np.bool_),
}
_MAX_HEADER = 100 * 1024 * 1024
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14+; Python 3.11 lacks the name
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


def _madvise(address: int, length: int, advice: int) -> None:
    """madvise(2) through ctypes, which lets the other threads run meanwhile: mmap.madvise holds the GIL, and
    paging in one tensor takes a millisecond."""
    if _libc.madvise(address, length, advice) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


@dataclass(frozen=True, slots=True)  # slots: built once per tensor (92k in DeepSeek-V3), twice as fast
class TensorInfo:
    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensors of one safetensors file and its __metadata__; a clear error for anything malformed."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise KtqError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > min(_MAX_HEADER, size - 8):
                raise KtqError(f"{path}: not a safetensors file or truncated (header length {header_len} bytes "
                               f"in a {size}-byte file)")
            header = json.loads(f.read(header_len))
    except OSError as exc:
        raise KtqError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KtqError(f"{path}: not a safetensors file (its header is not JSON)") from exc
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise KtqError(f"{path}: malformed header entry for tensor {name}") from exc
        info = TensorInfo(name, path, dtype, shape, data_start + begin, end - begin)
        width = DTYPES.get(dtype, (None,))[0]
        if width is not None and info.numel * width != info.nbytes:
            raise KtqError(f"{path}: tensor {name} has {info.nbytes} bytes, its shape {list(shape)} of {dtype} "
                           f"needs {info.numel * width}")
        if info.offset + info.nbytes > size:
            raise KtqError(f"{path} is truncated: tensor {name} ends at byte {info.offset + info.nbytes}, "
                           f"the file has {size}")
        tensors[name] = info
    return tensors, metadata


class TensorReader:
    """Maps tensors, or reads them into caller-owned buffers with pread; keeps one descriptor and map per file."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._maps: dict[Path, tuple[mmap.mmap, int]] = {}
        self._populate = _MADV_POPULATE_READ

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise KtqError(f"cannot open {path}: {exc.strerror}") from exc
            self._fds[path] = fd
        return fd

    def read_into(self, info: TensorInfo, out: np.ndarray) -> np.ndarray:
        """Fill out (any dtype, at least info.nbytes bytes, C-contiguous) with the tensor's raw bytes."""
        view = memoryview(out.reshape(-1).view(np.uint8))[: info.nbytes]
        fd = self._fd(info.path)
        done = 0
        while done < info.nbytes:
            try:
                got = os.preadv(fd, [view[done:]], info.offset + done)
            except OSError as exc:
                raise KtqError(f"cannot read tensor {info.name} from {info.path}: {exc.strerror}") from exc
            if got == 0:
                raise KtqError(f"{info.path} is truncated: tensor {info.name} ends past the end of the file")
            done += got
        return out

    def _map(self, path: Path) -> tuple[mmap.mmap, int]:
        """The file's read-only shared map and its address."""
        found = self._maps.get(path)
        if found is None:
            fd = self._fd(path)
            try:
                mapped = mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED, mmap.PROT_READ)
            except (OSError, ValueError) as exc:
                raise KtqError(f"cannot map {path}: {exc}") from exc
            found = self._maps[path] = (mapped, np.frombuffer(mapped, np.uint8).ctypes.data)
        return found

    def _advise(self, info: TensorInfo, advice: int) -> None:
        """madvise the pages that hold the tensor."""
        start = info.offset - info.offset % mmap.PAGESIZE
        _madvise(self._map(info.path)[1] + start, info.offset + info.nbytes - start, advice)

    def map(self, info: TensorInfo) -> np.ndarray:
        """The tensor's raw bytes as a read-only uint8 view of the page cache, already paged in (read from disk
        when not cached), so that the threads which use it do not stall on page faults.

        The header check guarantees the file is long enough; a file truncated while mapped would end the process
        with SIGBUS, a risk shared by every mmap-based safetensors loader. Call `drop` when done with the view.
        """
        try:
            self._advise(info, self._populate)
        except OSError as exc:
            if exc.errno != errno.EINVAL or self._populate == mmap.MADV_WILLNEED:
                raise KtqError(f"cannot read tensor {info.name} from {info.path}: {exc.strerror}") from exc
            self._populate = mmap.MADV_WILLNEED  # kernels before 5.14: read ahead asynchronously, fault on use
            self._advise(info, self._populate)
        return np.frombuffer(self._map(info.path)[0], np.uint8, info.nbytes, info.offset)

    def drop(self, info: TensorInfo) -> None:
        """Unmap the pages of a tensor from this process (they stay in the page cache): bounds the RSS."""
        self._advise(info, mmap.MADV_DONTNEED)

    def read(self, info: TensorInfo) -> np.ndarray:
        """A fresh array of the tensor (raw bits for types numpy lacks); for small tensors and tests."""
        dtype = DTYPES[info.dtype][1]
        out = np.empty(info.shape, dtype)
        return self.read_into(info, out)

    def close(self) -> None:
        """Closes every file; views from `map` must be gone by then."""
        for mapped, _ in self._maps.values():
            try:
                mapped.close()
            except BufferError:  # a view is still alive (an error path): the map goes when the view does
                pass
        self._maps.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def encode_header(entries: list[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str] | None) -> bytes:
    """The header of a file holding entries (name, dtype, shape, nbytes) in that order, padded to 8 bytes."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob


WRITEBACK_BYTES = 32 << 20  # see WriteBehind


class WriteBehind:
    """Keeps written output from piling up in the page cache.

    Call `wrote(file, start, end)` once bytes [start, end) of an open file have reached the kernel: POSIX_FADV_DONTNEED
    starts their disk writes without waiting for them. Once WRITEBACK_BYTES more have been handed over, the same
    advice on the range (on disk by then) drops its pages, and the next writes reuse them. Why: written pages would
    otherwise stay cached until memory runs out, each one a freshly touched page (on this kind of VM with free page
    reporting, 0.4 GB/s against 5 GB/s for recycled pages, measured), and at the end fsync would wait for all of it.
    Files handed over with close=True are closed when dropped.
    """

    def __init__(self) -> None:
        self._ranges: deque[tuple[BinaryIO, int, int, bool]] = deque()  # file, start, end, close
        self._pending = 0

    def wrote(self, file: BinaryIO, start: int, end: int, close: bool = False) -> None:
        os.posix_fadvise(file.fileno(), start, end - start, os.POSIX_FADV_DONTNEED)
        self._ranges.append((file, start, end, close))
        self._pending += end - start
        while self._pending - self._size(self._ranges[0]) >= WRITEBACK_BYTES:
            self._drop(self._ranges.popleft())

    @staticmethod
    def _size(entry: tuple[BinaryIO, int, int, bool]) -> int:
        return entry[2] - entry[1]

    def _drop(self, entry: tuple[BinaryIO, int, int, bool]) -> None:
        file, start, end, close = entry
        self._pending -= end - start
        os.posix_fadvise(file.fileno(), start, end - start, os.POSIX_FADV_DONTNEED)
        if close:
            file.close()

    def drop_all(self) -> None:
        """Drop every range still held (call after an fsync to drop them all) and close the files handed over."""
        while self._ranges:
            self._drop(self._ranges.popleft())


# sha256 (1.8 GB/s here) and the page-cache write (5 GB/s) one after the other in the write thread made it the
# slowest stage of the conversion (INT8: 3.5 s of a 4-layer sample, against 2.3 s without hashing). hashlib and
# file writes release the GIL, so the writers hash on this thread while they write.
_HASHER = ThreadPoolExecutor(1, thread_name_prefix="ktq-hash")


def sha256_behind(blocks: list[memoryview]) -> Future:
    """The sha256 hex digests of blocks, computed on the hashing thread; the blocks must not change meanwhile."""
    return _HASHER.submit(lambda: [hashlib.sha256(block).hexdigest() for block in blocks])


def _update(digest, blocks: list[memoryview]) -> None:
    for block in blocks:
        digest.update(block)


def byte_view(data: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))


class ShardWriter:
    """Writes one safetensors file whose tensors are all declared up front, then streamed in declaration order.

    Every write is checked against the declared size, the sha256 of the whole file is computed on the way, and
    `finish` refuses a file that did not receive every byte it promised.
    """

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...], int]],
                 metadata: dict[str, str] | None = None) -> None:
        self.path = path
        self._entries = entries
        self._next = 0
        header = encode_header(entries, metadata)
        self.size = len(header) + sum(e[3] for e in entries)
        self._hash = hashlib.sha256(header)
        self._file = open(path, "wb")
        self._behind = WriteBehind()
        self._written = 0
        self._handed_over = 0  # bytes passed to WriteBehind
        self._put(header)

    def _put(self, data) -> None:
        self._file.write(data)
        self._written += len(data)
        if self._written - self._handed_over >= WRITEBACK_BYTES:
            self._file.flush()
            self._behind.wrote(self._file, self._handed_over, self._written)
            self._handed_over = self._written

    def write(self, name: str, data: np.ndarray) -> None:
        self.write_all([(name, data)])

    def write_all(self, tensors: list[tuple[str, np.ndarray]]) -> None:
        """Write the next declared tensors, in order; they are hashed on another thread meanwhile."""
        blocks = []
        for name, data in tensors:
            expected_name, _, _, nbytes = self._entries[self._next + len(blocks)]
            if name != expected_name or data.nbytes != nbytes:
                raise RuntimeError(f"shard {self.path.name}: got {name} ({data.nbytes} B), "
                                   f"expected {expected_name} ({nbytes} B)")
            blocks.append(byte_view(data))
        hashed = _HASHER.submit(_update, self._hash, blocks)
        try:
            for block in blocks:
                self._put(block)
        finally:
            hashed.result()  # the caller may reuse the arrays once this returns
        self._next += len(blocks)

    def finish(self) -> str:
        """Flush, fsync and close; returns the sha256 hex digest. Raises when a tensor is missing or the size is off.

        Why fsync: the caller records the finished shard in the manifest, which is itself fsynced; without this,
        a power loss could leave a manifest that vouches for a shard whose data never reached the disk (the right
        size, full of zeros), and a resumed run would keep it. A killed process needs no fsync (the page cache
        survives it), but power loss does. It costs next to nothing (measured: no difference within noise on a
        4-layer Qwen3-30B-A3B sample) because WriteBehind has started the disk writes as the shard grew: fsync
        waits for the last few MB only.
        """
        self._file.flush()
        self._behind.wrote(self._file, self._handed_over, self._written)
        os.fsync(self._file.fileno())
        self._behind.drop_all()
        self._file.close()
        if self._next != len(self._entries):
            raise RuntimeError(f"shard {self.path.name}: {len(self._entries) - self._next} tensors never written")
        actual = self.path.stat().st_size
        if actual != self.size:
            raise KtqError(f"{self.path}: wrote {actual} bytes, expected {self.size} (disk full?)")
        return self._hash.hexdigest()

    def abort(self) -> None:
        """Remove the unfinished file; closing may fail again on a full disk (flushing its buffer), ignore that."""
        try:
            self._file.close()
        except OSError:
            pass
        finally:
            self.path.unlink(missing_ok=True)
