"""Short measurements on this machine that the plan turns into estimates: this process's memory, how fast the input's
disk reads, how fast the pipeline decodes and quantises. Each takes a fraction of a second."""

from __future__ import annotations

import mmap
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

from ktq.cpu.experts import ProjectionSource
from ktq.errors import KtqError
from ktq.kernels import ktformat as fmt
from ktq.safetensors_io import TensorInfo, TensorReader

READ_PROBE_BYTES = 256 * 1024 * 1024  # at most this much of a shard is read to time the disk
READ_CHUNK = 8 * 1024 * 1024
PROBE_SECONDS = 0.05  # each probe stops once it has run this long (after one full round)


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
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise KtqError(f"cannot open {path}: {exc.strerror}") from exc
    try:
        with mmap.mmap(-1, READ_CHUNK) as buffer:
            view = memoryview(buffer)
            done = 0
            started = time.perf_counter()
            while done < length and time.perf_counter() - started < PROBE_SECONDS:
                got = os.preadv(fd, [view[: min(READ_CHUNK, length - done)]], offset + done)
                if got == 0:
                    break
                done += got
            seconds = time.perf_counter() - started
            view.release()
    except OSError as exc:
        raise KtqError(f"cannot read {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    return Rate(done, seconds)


class _SyntheticReader:
    """Stands in for TensorReader when timing the decode: a tensor 'read' into a buffer is the synthetic bytes the
    buffer already holds. Only the small tensors that decoders read whole (`read`, e.g. a weight_shape) come from
    the checkpoint."""

    def __init__(self) -> None:
        self._reader = TensorReader()

    def read_into(self, info: TensorInfo, out: np.ndarray) -> np.ndarray:
        return out

    def read(self, info: TensorInfo) -> np.ndarray:
        return self._reader.read(info)

    def close(self) -> None:
        self._reader.close()


def _fill_synthetic(buffer: np.ndarray, rng: np.random.Generator) -> None:
    """Weight-like bytes that are finite whatever dtype reads them (bf16, fp16, fp8 e4m3, fp32, packed int):
    every byte is 0x30-0x3F or 0xB0-0xBF, a moderate exponent of either sign."""
    pattern = (rng.integers(0x30, 0x40, 1 << 16, dtype=np.uint8) | (rng.integers(0, 2, 1 << 16, dtype=np.uint8) << 7))
    raw = buffer.reshape(-1).view(np.uint8)
    whole = raw.size // pattern.size * pattern.size
    raw[:whole].reshape(-1, pattern.size)[:] = pattern
    raw[whole:] = pattern[: raw.size - whole]


class _ProbeMemory:
    """Buffers mapped straight from the OS and unmapped on exit: the probes leave no freed heap behind that would
    inflate the resident memory measured after them."""

    def __init__(self) -> None:
        self._maps: list[mmap.mmap] = []

    def array(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        count = int(np.prod(shape))
        self._maps.append(mmap.mmap(-1, max(1, count * np.dtype(dtype).itemsize)))
        return np.frombuffer(self._maps[-1], dtype, count).reshape(shape)

    def __enter__(self) -> "_ProbeMemory":
        return self

    def __exit__(self, *exc: object) -> None:
        for m in self._maps:
            try:
                m.close()
            except BufferError:  # an array still refers to it (a traceback's frame): it goes with that array
                pass


def stage_rate(source: ProjectionSource, method: fmt.Method, numa: int, seconds: float = PROBE_SECONDS) -> Rate:
    """Input bytes per second of the pipeline's middle stage on one gate projection [I, H]: decoded by its own
    source (on synthetic bytes: nothing is read from the checkpoint but the small tensors some decoders need whole)
    and quantised part by part, over and over (after one untimed round: once, then for about `seconds`), with the
    Numba threads as set."""
    with _ProbeMemory() as memory:
        return _time_stage(memory, source, method, numa, seconds)


def _time_stage(memory: _ProbeMemory, source: ProjectionSource, method: fmt.Method, numa: int,
                seconds: float) -> Rate:
    from ktq.kernels.amx import quantize_pack

    intermediate, hidden = source.shape
    rows = intermediate // numa
    bf16 = memory.array(source.shape, np.uint16)
    scratch = memory.array((source.scratch_bytes,), np.uint8)
    body, scales = memory.array((method.body_bytes(rows, hidden),), np.uint8), memory.array((rows,), np.float32)
    rng = np.random.default_rng(0)
    for buffer in (bf16, scratch, body, scales):
        _fill_synthetic(buffer, rng)  # touched, as the run's reused buffers are
    reader = _SyntheticReader()

    def one_round() -> None:
        source.read(reader, bf16, scratch)
        for part in range(numa):  # gate's NUMA parts are row blocks
            quantize_pack(bf16[part * rows:(part + 1) * rows], 0, hidden, method.bits, body, scales)

    try:
        # untimed: the decode, and the quantiser on a tile, load their kernels from Numba's cache (or compile them
        # the first time)
        source.read(reader, bf16, scratch)
        load_kernels(method)
        done = 0
        started = time.perf_counter()
        while done == 0 or time.perf_counter() - started < seconds:
            one_round()
            done += source.input_bytes
        return Rate(done, time.perf_counter() - started)
    finally:
        reader.close()


def load_kernels(method: fmt.Method) -> None:
    """Load the quantising kernel the run uses (from Numba's cache, compiled the first time): part of a run's fixed
    memory."""
    from ktq.cpu.pipeline import load_kernel

    load_kernel(method)
