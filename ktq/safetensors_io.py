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
import stat
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ktq import digest
from ktq.errors import KtqError

# Every dtype of the safetensors format -> bits per element (the Rust library refuses any other name)
DTYPE_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
              "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
              "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64}
# The dtypes ktq reads -> the numpy dtype that holds their raw bits
NUMPY_DTYPES: dict[str, type] = {
    "BF16": np.uint16, "F16": np.uint16, "F32": np.float32, "F64": np.float64, "F8_E4M3": np.uint8,
    "F8_E5M2": np.uint8, "I8": np.int8, "U8": np.uint8, "I16": np.int16, "I32": np.int32, "I64": np.int64,
    "BOOL": np.bool_,
}
_MAX_HEADER = 100_000_000  # bytes; the Rust safetensors library refuses a longer header (HeaderTooLarge)
_USIZE = 1 << 64  # shapes and offsets are usize to that library: a larger value is a damaged header
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


_FILE_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
               stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder"}


def open_regular(path: Path) -> int:
    """A read-only descriptor of path, which must be a regular file (a symlink to one is fine: Hugging Face caches
    link every shard to a blob). Anything else is refused before it is opened: opening a FIFO blocks until a writer
    comes, and opening a device can act on it. O_NONBLOCK and the second look after opening close the window in
    which the name could be swapped for one."""
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISREG(mode):
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            mode = os.fstat(fd).st_mode
            if stat.S_ISREG(mode):
                return fd
            os.close(fd)
    except OSError as exc:
        raise KtqError(f"cannot read {path}: {exc.strerror or exc}") from exc
    raise KtqError(f"{path} is {_FILE_KINDS.get(stat.S_IFMT(mode), 'not a regular file')}: ktq reads only regular "
                   "files (or symlinks to them)")


def read_regular(path: Path) -> bytes:
    """The bytes of a small regular file (config.json, an index), under open_regular's rules."""
    with os.fdopen(open_regular(path), "rb") as f:
        try:
            return f.read()
        except OSError as exc:
            raise KtqError(f"cannot read {path}: {exc.strerror or exc}") from exc


class _Object(list):
    """A JSON object of a header as its (name, value) pairs, in order: json's C decoder builds these without calling
    back into Python, and a name given twice stays visible (a dict would keep the last one silently, where another
    reader may keep the first, so the file would mean different tensors to different tools)."""


def _fields(path: Path, pairs: _Object, what: str) -> dict:
    found = dict(pairs)
    if len(found) != len(pairs):
        seen: set[str] = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise KtqError(f"{path}: invalid safetensors header: {what} names {twice!r} twice")
    return found


def _constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _entry(path: Path, name: str, entry: object) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one tensor's header entry, checked against its byte count. Inline checks, no
    helper per value: this runs for every tensor of a checkpoint (92k in DeepSeek-V3)."""
    fields = _fields(path, entry, f"tensor {name}'s entry") if type(entry) is _Object else {}
    try:
        dtype, shape, offsets = fields["dtype"], fields["shape"], fields["data_offsets"]
    except KeyError:
        raise KtqError(f"{path}: malformed header entry for tensor {name} (it needs dtype, shape and "
                       "data_offsets)") from None
    bits = DTYPE_BITS.get(dtype) if type(dtype) is str else None
    if bits is None:
        raise KtqError(f"{path}: tensor {name} has dtype {dtype!r}, which is not a safetensors dtype")
    numel, valid = 1, type(shape) is list
    for dim in shape if valid else ():
        if type(dim) is not int or not 0 <= dim < _USIZE:  # type(): a bool is an int to Python, not to JSON
            valid = False
            break
        numel *= dim
    if not valid:
        raise KtqError(f"{path}: tensor {name} has shape {shape!r}, not a list of non-negative integers")
    if not (type(offsets) is list and len(offsets) == 2 and type(offsets[0]) is int and type(offsets[1]) is int
            and 0 <= offsets[0] <= offsets[1] < _USIZE):
        raise KtqError(f"{path}: tensor {name} has data_offsets {offsets!r}, not two integers [begin, end] with "
                       "0 <= begin <= end")
    begin, end = offsets
    if numel * bits != 8 * (end - begin):
        needed = numel * bits / 8 if numel * bits % 8 else numel * bits // 8  # sub-byte dtypes: whole bytes only
        raise KtqError(f"{path}: tensor {name} has {end - begin} bytes, its shape {shape} of {dtype} needs {needed}")
    return dtype, tuple(shape), begin, end


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensors of one safetensors file and its __metadata__, checked as the Rust safetensors library checks
    them (a header of sane length, UTF-8 JSON, an object; known dtypes; usize shapes and offsets; each tensor's
    bytes equal to its shape times its dtype; the tensors contiguous, in order, never overlapping, and covering
    the data section exactly) and refusing a name given twice; a one-line error for anything else."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        raw_len = os.pread(fd, 8, 0)
        if len(raw_len) < 8:
            raise KtqError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > _MAX_HEADER:
            raise KtqError(f"{path}: not a safetensors file (header length {header_len} bytes, the format allows "
                           f"{_MAX_HEADER})")
        if 8 + header_len > size:
            raise KtqError(f"{path}: not a safetensors file or truncated (header length {header_len} bytes "
                           f"in a {size}-byte file)")
        blob = os.pread(fd, header_len, 8)
    except OSError as exc:
        raise KtqError(f"cannot read {path}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    try:
        pairs = json.loads(blob.decode(), object_pairs_hook=_Object, parse_constant=_constant)
    except UnicodeDecodeError as exc:
        raise KtqError(f"{path}: not a safetensors file (its header is not UTF-8 text)") from exc
    except ValueError as exc:  # json.JSONDecodeError included
        raise KtqError(f"{path}: not a safetensors file (its header is not JSON: {exc})") from exc
    if type(pairs) is not _Object:
        raise KtqError(f"{path}: invalid safetensors header: a JSON {type(pairs).__name__}, not an object")
    header = _fields(path, pairs, "the header")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    elif type(metadata) is _Object:
        metadata = _fields(path, metadata, "__metadata__")
    if type(metadata) is not dict or not all(type(v) is str for v in metadata.values()):
        raise KtqError(f"{path}: invalid safetensors header: __metadata__ must map names to strings")
    data_start = 8 + header_len
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        dtype, shape, begin, end = _entry(path, name, entry)
        tensors[name] = TensorInfo(name, path, dtype, shape, data_start + begin, end - begin)
        spans.append((begin, end, name))
    spans.sort()  # ktq's and the reference writers' order already: linear
    covered, previous = 0, None
    for begin, end, name in spans:
        if begin < covered:
            raise KtqError(f"{path}: tensor {name}'s data_offsets [{begin}, {end}] overlap the bytes of tensor "
                           f"{previous}")
        if begin > covered:
            raise KtqError(f"{path}: bytes {covered}..{begin} of the data section belong to no tensor (before "
                           f"tensor {name})")
        covered, previous = end, name
    if data_start + covered > size:
        raise KtqError(f"{path} is truncated: tensor {previous} ends at byte {data_start + covered}, the file has "
                       f"{size}")
    if data_start + covered < size:
        raise KtqError(f"{path}: the last {size - data_start - covered} bytes belong to no tensor (the tensors end "
                       f"at byte {data_start + covered} of {size})")
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
            fd = self._fds[path] = open_regular(path)
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
        out = np.empty(info.shape, NUMPY_DTYPES[info.dtype])
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
