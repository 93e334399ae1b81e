"""Per-row INT4 / INT8 quantisation and AMX tile packing of kt-kernel (kt-format.md §2-3), and its inverse.

The source is a matrix of bf16 bit patterns (uint16). Work is split into stripes of 32 rows (one tile row): a stripe
is quantised and packed by one thread, and no two stripes touch the same output bytes, so the result does not
depend on the thread count.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .ktformat import INT4, INT8, TILE_BYTES, TILE_ROWS

_KB = INT4.k_block
assert INT8.k_block == _KB
_NB4, _KS4 = INT4.n_block, INT4.k_step
_NB8, _KS8 = INT8.n_block, INT8.k_step
_TILE_WORDS = TILE_BYTES // 4
_HALF_WORDS = _TILE_WORDS // 2
_INV127 = np.float32(1.0 / 127.0)  # kt-kernel multiplies by the fp32 reciprocal; amax / 127 differs in ~1.5% of rows
_ABS_MASK = np.uint16(0x7FFF)
_NONFINITE = 0x7F80  # |bf16| bit patterns at or above this are Inf or NaN


@njit(cache=True, inline="always")
def _bits_to_f32(bits, scratch):
    scratch[0] = np.uint32(bits) << np.uint32(16)
    return scratch.view(np.float32)[0]


@njit(cache=True, inline="always")
def _row_scale(src_row, col0, k, bits, scratch):
    """(stored scale d, reciprocal used for quantising, 1 when the row holds Inf/NaN)."""
    amax_bits = np.uint16(0)
    for c in range(col0, col0 + k):
        a = src_row[c] & _ABS_MASK
        if a > amax_bits:
            amax_bits = a
    if amax_bits >= _NONFINITE:
        return np.float32(0.0), np.float32(0.0), 1
    amax = _bits_to_f32(amax_bits, scratch)
    if bits == 4:
        d = np.float32(np.float64(amax) / 112.0)
    else:
        d = np.float32(amax * _INV127)
    inv = np.float32(1.0) / d if d != np.float32(0.0) else np.float32(0.0)
    return d, inv, 0


@njit(cache=True, inline="always")
def _quantise_run(src_row, c0, count, inv, widened, codes):
    """codes[j] = clamp(round_half_even(fp32(w * inv)), -128, 127) for count source values from column c0."""
    for j in range(count):
        widened[j] = np.uint32(src_row[c0 + j]) << np.uint32(16)
    values = widened.view(np.float32)
    for j in range(count):
        q = np.rint(values[j] * inv)
        q = min(max(q, np.float32(-128.0)), np.float32(127.0))
        codes[j] = np.int32(q)


@njit(parallel=True, cache=True, nogil=True)
def quantize_pack(src, col0, k, bits, body, scales):
    """Quantise src[:, col0:col0+k] (uint16 bf16 bits, n rows) and pack it into body (uint8, n*k*bits/8 bytes).

    scales (float32, n) receives the per-row scales. Returns the first row index holding Inf or NaN, or -1
    (the outputs are then incomplete and must be discarded).
    """
    n = src.shape[0]
    nb_rows = _NB4 if bits == 4 else _NB8
    k_step = _KS4 if bits == 4 else _KS8
    stripes = n // TILE_ROWS
    bad = np.full(stripes, -1, np.int64)
    body_words = body.view(np.uint32)
    for s in prange(stripes):
        scratch = np.empty(1, np.uint32)
        inv = np.empty(TILE_ROWS, np.float32)
        widened = np.empty(k_step, np.uint32)
        codes = np.empty(k_step, np.int32)
        packed = np.empty(64, np.uint8)
        packed_words = packed.view(np.uint32)
        r0 = s * TILE_ROWS
        for i in range(TILE_ROWS):
            d, iv, nonfinite = _row_scale(src[r0 + i], col0, k, bits, scratch)
            if nonfinite and bad[s] < 0:
                bad[s] = r0 + i
            scales[r0 + i] = d
            inv[i] = iv
        if bad[s] >= 0:
            continue
        nb = (r0 // nb_rows) * nb_rows
        nbs = min(nb_rows, n - nb)
        ns = r0 - nb
        for kb in range(0, k, _KB):
            kbs = min(_KB, k - kb)
            base_bytes = (nb * k + nbs * kb + ns * kbs) * bits // 8
            for t in range(kbs // k_step):
                tile = (base_bytes + t * TILE_BYTES) // 4
                c0 = col0 + kb + t * k_step
                for i in range(TILE_ROWS):
                    _quantise_run(src[r0 + i], c0, k_step, inv[i], widened, codes)
                    if bits == 8:
                        for j in range(64):
                            packed[j] = np.uint8(codes[j] & 0xFF)
                    else:
                        for j in range(64):
                            lo = codes[j]
                            hi = codes[64 + j]
                            # second rounding to a multiple of 16, ties away from zero
                            lo = (abs(lo) + 8) >> 4 if lo >= 0 else -((abs(lo) + 8) >> 4)
                            hi = (abs(hi) + 8) >> 4 if hi >= 0 else -((abs(hi) + 8) >> 4)
                            packed[j] = np.uint8((lo & 0xF) | ((hi & 0xF) << 4))
                    # each 16-row half of the tile is a 16 x 16 matrix of 4-byte words, stored transposed
                    dst = tile + (i // 16) * _HALF_WORDS + (i % 16)
                    for w in range(16):
                        body_words[dst + w * 16] = packed_words[w]
    first_bad = -1
    for s in range(stripes):
        if bad[s] >= 0:
            first_bad = bad[s]
            break
    return first_bad


@njit(parallel=True, cache=True, nogil=True)
def unpack_dequantize(body, scales, n, k, bits):
    """The inverse of quantize_pack: float32 [n, k] of the dequantised values (INT8 q*d, INT4 m*16*d)."""
    out = np.empty((n, k), np.float32)
    nb_rows = _NB4 if bits == 4 else _NB8
    k_step = _KS4 if bits == 4 else _KS8
    step = np.float32(16.0) if bits == 4 else np.float32(1.0)
    for s in prange(n // TILE_ROWS):
        r0 = s * TILE_ROWS
        nb = (r0 // nb_rows) * nb_rows
        nbs = min(nb_rows, n - nb)
        ns = r0 - nb
        for kb in range(0, k, _KB):
            kbs = min(_KB, k - kb)
            base_bytes = (nb * k + nbs * kb + ns * kbs) * bits // 8
            for t in range(kbs // k_step):
                tile = base_bytes + t * TILE_BYTES
                c0 = kb + t * k_step
                for i in range(TILE_ROWS):
                    r = r0 + i
                    d = scales[r] * step
                    for w in range(16):
                        src = tile + (i // 16) * (TILE_BYTES // 2) + w * 64 + (i % 16) * 4
                        for b in range(4):
                            byte = np.int32(body[src + b])
                            j = 4 * w + b
                            if bits == 8:
                                out[r, c0 + j] = np.float32(byte - 256 if byte >= 128 else byte) * d
                            else:
                                lo = byte & 0xF
                                hi = byte >> 4
                                out[r, c0 + j] = np.float32(lo - 16 if lo >= 8 else lo) * d
                                out[r, c0 + 64 + j] = np.float32(hi - 16 if hi >= 8 else hi) * d
    return out
