"""Safetensors without torch: headers, raw tensor reads into reusable buffers, and a streaming writer.

The CPU conversion never materialises a whole file: it reads one tensor's bytes at a time into a buffer it owns
(fresh memory is slow to touch, page-cache copies are fast) and writes a shard tensor by tensor, the header first,
since the format fixes every size in advance.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

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
    """Reads tensors into caller-owned buffers with pread; keeps one open descriptor per file."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

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

    def read(self, info: TensorInfo) -> np.ndarray:
        """A fresh array of the tensor (raw bits for types numpy lacks); for small tensors and tests."""
        dtype = DTYPES[info.dtype][1]
        out = np.empty(info.shape, dtype)
        return self.read_into(info, out)

    def close(self) -> None:
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
        self._hash = hashlib.sha256()
        self._file = open(path, "wb")
        self._put(header)

    def _put(self, data) -> None:
        self._hash.update(data)
        self._file.write(data)

    def write(self, name: str, data: np.ndarray) -> None:
        expected_name, _, _, nbytes = self._entries[self._next]
        if name != expected_name or data.nbytes != nbytes:
            raise RuntimeError(f"shard {self.path.name}: got {name} ({data.nbytes} B), "
                               f"expected {expected_name} ({nbytes} B)")
        self._put(memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8)))
        self._next += 1

    def finish(self) -> str:
        """Flush and close; returns the sha256 hex digest. Raises when a tensor is missing or the size is off."""
        self._file.flush()
        os.fsync(self._file.fileno())
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
