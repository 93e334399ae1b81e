"""Decoders from checkpoint dtypes to bf16 bit patterns, exactly as the reference tool feeds its quantiser."""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True, inline="always")
def f32_bits_to_bf16(u):
    """Round-to-nearest-even of fp32 bits to bf16 bits; NaN stays a (quiet) NaN."""
    if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint16((u >> np.uint32(16)) | np.uint32(0x40))
    return np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@njit(cache=True, inline="always")
def _fp16_bits_to_f32_bits(h):
    sign = np.uint32(h & 0x8000) << np.uint32(16)
    exp = (h >> 10) & 0x1F
    mant = np.uint32(h & 0x3FF)
    if exp == 0x1F:  # Inf / NaN
        return sign | np.uint32(0x7F800000) | (mant << np.uint32(13))
    if exp != 0:
        return sign | (np.uint32(exp + 112) << np.uint32(23)) | (mant << np.uint32(13))
    if mant == 0:
        return sign
    top = 9  # subnormal: mant * 2^-24, renormalised around its highest set bit
    while (mant >> np.uint32(top)) == 0:
        top -= 1
    return sign | (np.uint32(top + 103) << np.uint32(23)) | ((mant << np.uint32(23 - top)) & np.uint32(0x7FFFFF))


@njit(parallel=True, cache=True, nogil=True)
def fp16_to_bf16(src, dst):
    """src: uint16 [n, k] fp16 bits; dst: uint16 [n, k] receives the bf16 (RNE) of each value."""
    n = src.shape[0]
    for r in prange(n):
        for c in range(src.shape[1]):
            dst[r, c] = f32_bits_to_bf16(_fp16_bits_to_f32_bits(np.uint16(src[r, c])))
