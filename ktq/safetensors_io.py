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
import fcntl
import json
import mmap
import os
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ktq import digest
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


ALIGN = 4096  # O_DIRECT: buffer address, file offset and length multiples of the logical block size (512 or 4096)
STAGE_BYTES = 4 << 20  # a shard's bytes go to the disk in blocks of this size


def aligned_buffer(nbytes: int) -> np.ndarray:
    """A page-aligned uint8 buffer (numpy only promises 64 bytes); its pages are touched on first use."""
    return np.frombuffer(mmap.mmap(-1, max(nbytes, 1)), np.uint8)[:nbytes]


def staging_buffers() -> list[np.ndarray]:
    """The two staging buffers of a ShardWriter."""
    return [aligned_buffer(STAGE_BYTES) for _ in range(2)]


def round_up(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


class DirectFile:
    """A new file written front to back from page-aligned buffers, through O_DIRECT where the file system allows it.

    Why: written through the page cache, ktq's output cost more CPU than its quantisation kernel on the 2-core
    machine this was tuned on (every page freshly allocated, copied, written back, then dropped: 0.55 s of a 2.7 s
    4-layer INT4 run); O_DIRECT hands the disk this process's buffer instead (1.1-1.5 GB/s there, no copy), and the
    writing thread sleeps meanwhile. Each write is padded to whole blocks; `close` cuts the file to its size.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        try:
            self._fd = os.open(path, flags | os.O_DIRECT, 0o644)
            self.direct = True
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: this file system has no O_DIRECT
                raise
            self._fd = os.open(path, flags, 0o644)
            self.direct = False
        self.size = 0

    def write(self, buffer: np.ndarray, nbytes: int) -> None:
        """Append buffer[:nbytes]; buffer is page-aligned and holds nbytes rounded up to ALIGN (the padding is
        written and later cut off). Only the file's last write may have nbytes not a multiple of ALIGN."""
        view = memoryview(buffer)[: round_up(nbytes) if self.direct else nbytes]
        done = 0
        while done < len(view):
            try:
                done += os.write(self._fd, view[done:])
            except OSError as exc:
                if not (self.direct and done == 0 and exc.errno == errno.EINVAL):
                    raise
                self._buffered()  # O_DIRECT accepted by open, refused by write (blocks larger than ALIGN)
                view = view[:nbytes]
                continue
            if self.direct and done % ALIGN:  # a regular file takes less than asked only when the disk is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.size += nbytes

    def _buffered(self) -> None:
        """Go on without O_DIRECT; every earlier write was whole blocks, so the file position is right."""
        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.direct = False

    def close(self, sync: bool = True) -> None:
        """Cut the padding, flush to the disk (file size and extents: O_DIRECT leaves those to fsync) and close.

        Why fsync: the caller then records the file in ktq.json, itself fsynced; without it a power loss could
        leave a manifest that vouches for a file whose size never reached the disk, and a resumed run would keep it.
        sync=False leaves the fsync to the caller (one journal commit then covers many files).
        """
        try:
            if self.direct and self.size % ALIGN:
                os.ftruncate(self._fd, self.size)
            if sync:
                os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = -1

    def abort(self) -> None:
        """Close without flushing (when still open) and remove the file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.path.unlink(missing_ok=True)


# Shard blocks go to the disk on this thread while the writer fills the next one (file writes release the GIL).
_DISK = ThreadPoolExecutor(1, thread_name_prefix="ktq-disk")


def byte_view(data: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))


class ShardWriter:
    """Writes one safetensors file whose tensors are all declared up front, then streamed in declaration order.

    Tensors are copied into one of two aligned staging buffers (a memcpy: 0.1 s per GB); a full one is hashed
    (ktq.digest) and goes to the disk on another thread while the next one fills. Every write is checked against the
    declared size, and `finish` refuses a file that did not receive every byte it promised. A writer that writes
    shards one after the other passes the same `stages` to each (first touches of fresh memory are slow here).
    """

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...], int]],
                 metadata: dict[str, str] | None = None, stages: list[np.ndarray] | None = None) -> None:
        self.path = path
        self._entries = entries
        self._next = 0
        header = encode_header(entries, metadata)
        self.size = len(header) + sum(e[3] for e in entries)
        self._digest = digest.new()
        self._stages = stages or staging_buffers()
        self._stage, self._fill = self._stages[0], 0
        self._in_flight: Future | None = None  # the other stage's write
        self._file = DirectFile(path)
        self._append(memoryview(header))

    def _append(self, data: memoryview) -> None:
        while len(data):
            n = min(len(data), len(self._stage) - self._fill)
            self._stage[self._fill:self._fill + n] = np.frombuffer(data[:n], np.uint8)
            self._fill += n
            data = data[n:]
            if self._fill == len(self._stage):
                self._flush_stage()

    def _flush_stage(self) -> None:
        stage, fill = self._stage, self._fill
        self._digest.update(memoryview(stage)[:fill])
        flushing = _DISK.submit(self._file.write, stage, fill)
        self._settle()  # the other stage is free again (the disk thread keeps the order of the blocks)
        self._in_flight = flushing
        self._stage, self._fill = self._stages[self._stages[0] is stage], 0

    def _settle(self) -> None:
        """Wait for the block in flight; raises its error."""
        flushing, self._in_flight = self._in_flight, None
        if flushing is not None:
            flushing.result()

    def write(self, name: str, data: np.ndarray) -> None:
        self.write_all([(name, data)])

    def write_all(self, tensors: list[tuple[str, np.ndarray]]) -> None:
        """Write the next declared tensors, in order; the caller may reuse the arrays once this returns."""
        for name, data in tensors:
            expected_name, _, _, nbytes = self._entries[self._next]
            if name != expected_name or data.nbytes != nbytes:
                raise RuntimeError(f"shard {self.path.name}: got {name} ({data.nbytes} B), "
                                   f"expected {expected_name} ({nbytes} B)")
            self._append(byte_view(data))
            self._next += 1

    def finish(self) -> str:
        """Write the rest, flush to the disk and close; returns the file's digest (ktq.digest). Raises when a tensor is
        missing or the size is off."""
        if self._next != len(self._entries):
            raise RuntimeError(f"shard {self.path.name}: {len(self._entries) - self._next} tensors never written")
        self._flush_stage()
        self._settle()
        self._file.close()
        actual = self.path.stat().st_size
        if actual != self.size:
            raise KtqError(f"{self.path}: wrote {actual} bytes, expected {self.size} (disk full?)")
        return self._digest.hexdigest()

    def abort(self) -> None:
        """Remove the unfinished file, once no block of it is in flight."""
        try:
            self._settle()
        except OSError:
            pass
        finally:
            self._file.abort()
