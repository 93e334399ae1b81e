"""Decoders from checkpoint dtypes to bf16 bit patterns, exactly as the reference tool feeds its quantiser.

Each kernel fills a caller-owned uint16 matrix in the HF orientation (out x in), parallel over its rows.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from . import threadsafe  # noqa: F401  the threading layer, before any kernel runs


@intrinsic
def bf16_bits_to_f32(typingctx, bits):
    """The fp32 whose upper half is the bf16 pattern `bits` (exact widening), as a register bitcast.

    bits is any integer type holding a 16-bit pattern (Numba widens uint16 arithmetic to 64 bits).
    """
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        value = args[0]
        if bits.bitwidth > 32:
            value = builder.trunc(value, i32)
        elif bits.bitwidth < 32:
            value = builder.zext(value, i32)
        return builder.bitcast(builder.shl(value, ir.Constant(i32, 16)), ir.FloatType())

    return types.float32(bits), codegen


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


def _e4m3_values() -> np.ndarray:
    """The 256 float8_e4m3fn values (no infinities; S.1111.111 is NaN), exact in float32."""
    codes = np.arange(256)
    exp, mant = (codes >> 3) & 0xF, codes & 7
    magnitude = np.where(exp == 0, mant * 2.0 ** -9, (8 + mant) * 2.0 ** (exp - 10.0))
    values = np.where(codes & 0x80, -magnitude, magnitude)
    values[(codes & 0x7F) == 0x7F] = np.nan
    return values.astype(np.float32)


E4M3_VALUES = _e4m3_values()
_TWO_POW_120 = np.float32(2.0 ** 120)
_NAN = np.float32(np.nan)


def widen_scale(x):
    """A scale as float32: bf16 bit patterns (uint16) are widened exactly, floats converted (jitted code only)."""
    raise NotImplementedError("widen_scale is only available inside Numba kernels")


@overload(widen_scale, inline="always")
def _widen_scale(x):
    if x == types.uint16:
        return lambda x: np.uint32(np.uint32(x) << np.uint32(16)).view(np.float32)
    return lambda x: np.float32(x)


@njit(cache=True, inline="always")
def _scaled_to_bf16(value, scale):
    """bf16 (RNE) of the fp32 product, the only rounding of both dequantisers."""
    return f32_bits_to_bf16(np.float32(value * scale).view(np.uint32))


@njit(cache=True, inline="always")
def _e4m3_to_f32(code):
    """The fp32 value of a float8_e4m3fn code, computed rather than looked up (so that it vectorises): sign,
    exponent and mantissa moved to the top of a bf16 pattern make the fp32 2^(e-127) * (1 + m/8) (or, for e = 0,
    the subnormal m/8 * 2^-126), and * 2^120 rebias it exactly to e4m3's 2^(e-7) * (1 + m/8) (or m * 2^-9)."""
    bits = np.uint32(code)
    pattern = ((bits & np.uint32(0x80)) << np.uint32(8)) | ((bits & np.uint32(0x7F)) << np.uint32(4))
    value = bf16_bits_to_f32(pattern) * _TWO_POW_120
    return _NAN if (code & 0x7F) == 0x7F else value


@njit(parallel=True, cache=True, nogil=True)
def fp8_blocks_to_bf16(w, scale_inv, block_rows, block_cols, dst):
    """Block-scaled FP8 (kt-format.md §5): dst[r, c] = bf16(fp32(w[r, c]) * scale_inv[r // bn, c // bk]).

    w: uint8 [n, k] float8_e4m3fn bits; scale_inv: float32 or bf16 bits [ceil(n/bn), ceil(k/bk)] (the last
    block row and column may cover fewer than bn rows / bk columns); dst: uint16 [n, k].
    """
    n, k = w.shape
    for r in prange(n):
        scales = scale_inv[r // block_rows]
        codes, out = w[r], dst[r]
        for c0 in range(0, k, block_cols):
            s = widen_scale(scales[c0 // block_cols])
            for c in range(c0, min(c0 + block_cols, k)):  # unsigned: no negative-index check, which stops vectorising
                out[np.uint64(c)] = _scaled_to_bf16(_e4m3_to_f32(codes[np.uint64(c)]), s)


@njit(parallel=True, cache=True, nogil=True)
def packed_int_to_bf16(packed, scale, group, bits, dst):
    """compressed-tensors pack-quantized, symmetric: dst[r, c] = bf16(q[r, c] * scale[r, c // group]).

    packed: uint32 [n, k * bits / 32], value c in bits (c % per_word) * bits of word c // per_word, stored with
    an offset of 2^(bits-1); scale: float32 or bf16 bits [n, ceil(k / group)]; bits: 4 or 8; dst: uint16 [n, k].
    """
    n, k = dst.shape
    per_word = 32 // bits
    mask = np.uint32((1 << bits) - 1)
    offset = np.int32(1 << (bits - 1))
    for r in prange(n):
        for g0 in range(0, k, group):
            s = widen_scale(scale[r, g0 // group])
            for c in range(g0, min(g0 + group, k)):
                word = packed[r, c // per_word]
                q = np.int32((word >> np.uint32(bits * (c % per_word))) & mask) - offset
                dst[r, c] = _scaled_to_bf16(np.float32(q), s)


_TILE = 64  # transpose in 64 x 64 tiles: source and destination tile stay in L1


@njit(parallel=True, cache=True, nogil=True)
def transpose_u16(src, dst):
    """dst[r, c] = src[c, r] for 16-bit patterns; src may be a strided view (a column range of a wider matrix)."""
    rows, cols = dst.shape
    for rb in prange((rows + _TILE - 1) // _TILE):
        r0 = rb * _TILE
        r1 = min(r0 + _TILE, rows)
        for c0 in range(0, cols, _TILE):
            for c in range(c0, min(c0 + _TILE, cols)):
                for r in range(r0, r1):
                    dst[r, c] = src[c, r]
