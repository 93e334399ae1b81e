"""Short measurements on this machine that the plan turns into estimates: this process's memory, how fast the input's
disk reads, how fast the kernels quantise. Each takes a fraction of a second."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

from ktq.errors import KtqError
from ktq.kernels import ktformat as fmt

READ_PROBE_BYTES = 256 * 1024 * 1024  # at most this much of a shard is read to time the disk
READ_CHUNK = 8 * 1024 * 1024
PROBE_SECONDS = 0.1  # each probe stops once it has run this long


@dataclass(frozen=True)
class Rate:
    """bytes processed in seconds"""

    nbytes: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.nbytes / self.seconds if self.seconds > 0 else float("inf")


def rss() -> int:
    """Resident memory of this process now."""
    return psutil.Process().memory_info().rss


def read_rate(path: Path, offset: int, length: int) -> Rate:
    """Reads up to READ_PROBE_BYTES of path from offset (not past offset + length) for at most PROBE_SECONDS.

    What a run will see: the page cache counts when the data is cached, the disk otherwise.
    """
    length = min(length, READ_PROBE_BYTES)
    buffer = np.empty(min(READ_CHUNK, max(length, 1)), np.uint8)
    view = memoryview(buffer)
    done = 0
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise KtqError(f"cannot open {path}: {exc.strerror}") from exc
    started = time.perf_counter()
    try:
        while done < length and time.perf_counter() - started < PROBE_SECONDS:
            got = os.preadv(fd, [view[: min(len(view), length - done)]], offset + done)
            if got == 0:
                break
            done += got
    except OSError as exc:
        raise KtqError(f"cannot read {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    return Rate(done, time.perf_counter() - started)


def _probe_matrix(rows: int, cols: int, input_type: str) -> np.ndarray:
    """rows x cols of weight-like values (std 0.02) in the input's bits: a random stripe of 32 rows, repeated."""
    from ktq.sample import encode

    stripe = np.random.default_rng(0).standard_normal((fmt.TILE_ROWS, cols), dtype=np.float32) * np.float32(0.02)
    bits = encode(stripe, "F16" if input_type == "fp16" else "BF16")
    return np.ascontiguousarray(np.tile(bits, (rows // fmt.TILE_ROWS, 1)))


def kernel_rate(method: fmt.Method, input_type: str, rows: int, cols: int, seconds: float = PROBE_SECONDS) -> Rate:
    """Decode (fp16) and quantise + pack one [rows, cols] projection over and over for about `seconds`, with the
    Numba threads as set: input bytes per second of the work the quantising stage does per expert."""
    from ktq.kernels.amx import quantize_pack
    from ktq.kernels.decode import fp16_to_bf16

    source = _probe_matrix(rows, cols, input_type)
    bf16 = source if input_type == "bf16" else np.empty_like(source)
    body = np.empty(method.body_bytes(rows, cols), np.uint8)
    scales = np.empty(rows, np.float32)
    done = 0
    started = time.perf_counter()
    while done == 0 or time.perf_counter() - started < seconds:
        if input_type != "bf16":
            fp16_to_bf16(source, bf16)
        quantize_pack(bf16, 0, cols, method.bits, body, scales)
        done += source.nbytes
    return Rate(done, time.perf_counter() - started)


def load_kernels(method: fmt.Method, input_type: str) -> None:
    """Load the kernels a run uses (from Numba's cache, compiled the first time): part of its fixed memory."""
    kernel_rate(method, input_type, fmt.TILE_ROWS, method.align, seconds=0.0)
