"""Per-row INT4 / INT8 quantisation and AMX tile packing of kt-kernel (kt-format.md §2-3), and its inverse.

The source is a matrix of bf16 bit patterns (uint16). Work is split into stripes of 32 rows (one tile row): a stripe
is quantised and packed by one thread, and no two stripes touch the same output bytes, so the result does not
depend on the thread count.

Speed (6-8 GB/s of bf16 per thread on AVX-512, from 0.5): the inner loops over columns vectorise 16 lanes wide
(bf16 -> fp32 is a register bitcast; indices are unsigned, so Numba adds no negative-index checks; INT4 codes
are computed in fp32, as Numba's integer arithmetic is 64-bit); a stripe finds its 32 rows' scales first (which
brings its rows into L2), then fills its tiles one after the other while each sits in L1, and the word transpose
of a tile is done with vector shuffles.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from . import threadsafe  # noqa: F401  the threading layer, before any kernel runs
from .decode import bf16_bits_to_f32
from .ktformat import INT4, INT8, TILE_BYTES, TILE_ROWS

_KB = INT4.k_block
assert INT8.k_block == _KB
_NB4, _KS4 = INT4.n_block, INT4.k_step
_NB8, _KS8 = INT8.n_block, INT8.k_step
_STEP4, _STEP8 = np.float32(INT4.code_step), np.float32(INT8.code_step)
_TILE_WORDS = TILE_BYTES // 4
_HALF_WORDS = _TILE_WORDS // 2
_INV127 = np.float32(1.0 / 127.0)  # kt-kernel multiplies by the fp32 reciprocal; amax / 127 differs in ~1.5% of rows
_ABS_MASK = np.uint16(0x7FFF)
_NONFINITE = np.int32(0x7F80)  # |bf16| bit patterns at or above this are Inf or NaN
_LO = np.float32(-128.0)
_HI = np.float32(127.0)


@intrinsic
def _transpose_words(typingctx, src, src_start, dst, dst_start):
    """dst[dst_start + 16 w + i] = src[src_start + 16 i + w] for w, i in 0..15 (uint32 arrays): the 16 x 16 word
    transpose of a half tile, as 16 vector loads, 64 two-vector shuffles (vpermt2d) and 16 vector stores, where
    scalar code needs 256 loads and 256 stores. Four rounds swap the off-diagonal blocks of 8, 4, 2, 1 words."""
    if not (isinstance(src, types.Array) and isinstance(dst, types.Array) and src.dtype == dst.dtype == types.uint32):
        return None

    def codegen(context, builder, signature, args):
        i32, i64 = ir.IntType(32), ir.IntType(64)
        vector = ir.VectorType(i32, 16)

        def row_pointer(array_type, array, start, row):
            data = context.make_array(array_type)(context, builder, array).data
            return builder.bitcast(builder.gep(data, [builder.add(start, ir.Constant(i64, 16 * row))]),
                                   vector.as_pointer())

        rows = [builder.load(row_pointer(signature.args[0], args[0], args[1], i), align=4) for i in range(16)]
        for d in (8, 4, 2, 1):
            upper = ir.Constant(ir.VectorType(i32, 16), [c if c & d == 0 else 16 + c - d for c in range(16)])
            lower = ir.Constant(ir.VectorType(i32, 16), [c + d if c & d == 0 else 16 + c for c in range(16)])
            for i in range(16):
                if i & d == 0:
                    rows[i], rows[i + d] = (builder.shuffle_vector(rows[i], rows[i + d], upper),
                                            builder.shuffle_vector(rows[i], rows[i + d], lower))
        for w in range(16):
            builder.store(rows[w], row_pointer(signature.args[2], args[2], args[3], w), align=4)
        return context.get_dummy_value()

    return types.void(src, types.int64, dst, types.int64), codegen


@njit(cache=True, inline="always")
def _q0(bits, inv):
    """clamp(round_half_even(fp32(w * inv)), -128, 127), still in fp32 (kt-format.md §2 step 4)."""
    return min(max(np.rint(bf16_bits_to_f32(bits) * inv), _LO), _HI)


@njit(cache=True, inline="always")
def _int8_code(bits, inv):
    return np.uint8(np.int32(_q0(bits, inv)))  # two's complement byte


@njit(cache=True, inline="always")
def _int4_code(bits, inv):
    """The INT4 code m in [-8, 8] as an fp32: q0 rounded again to a multiple of 16, ties away from zero (§2 step 5:
    sign(q0) * ((|q0| + 8) >> 4)), computed as trunc(q0 / 16 +- 1/2), exact in fp32 for these small integers."""
    t = _q0(bits, inv) * np.float32(0.0625)
    return np.trunc(t + np.copysign(np.float32(0.5), t))


@njit(cache=True, inline="always")
def _row_scale(row, bits):
    """(stored scale d, reciprocal used for quantising, whether the row holds Inf/NaN) of one source row."""
    amax = np.int32(0)
    for c in range(row.shape[0]):  # in int32: twice the lanes of Numba's default 64-bit integer arithmetic
        amax = max(amax, np.int32(row[c] & _ABS_MASK))
    if amax >= _NONFINITE:
        return np.float32(0.0), np.float32(0.0), True
    a = bf16_bits_to_f32(amax)
    if bits == 4:
        d = np.float32(np.float64(a) / 112.0)
    else:
        d = np.float32(a * _INV127)
    inv = np.float32(1.0) / d if d != np.float32(0.0) else np.float32(0.0)
    return d, inv, False


@njit(cache=True, inline="always")
def _quantised_bytes(src, r, c0, iv, bits, packed, out):
    """The 64 code bytes of row r at tile columns c0.. into packed[out:out + 64], quantised from bf16 bits with the
    row's reciprocal scale iv."""
    if bits == 8:
        for j in range(64):
            packed[out + np.uint64(j)] = _int8_code(src[r, np.uint64(c0 + j)], iv)
    else:  # low nibble m & 0xF: columns c0..c0+63, high nibble: c0+64..c0+127
        for j in range(64):
            lo = _int4_code(src[r, np.uint64(c0 + j)], iv)
            lo = lo + np.float32(16.0) if lo < np.float32(0.0) else lo
            hi = _int4_code(src[r, np.uint64(c0 + 64 + j)], iv)
            # the int32 -> uint8 conversion keeps the low 8 bits: 16 * hi wraps to (hi & 0xF) << 4
            packed[out + np.uint64(j)] = np.uint8(np.int32(lo + np.float32(16.0) * hi))


@njit(cache=True, inline="always")
def _given_bytes(src, r, c0, iv, bits, packed, out):
    """The same bytes from codes chosen elsewhere (int8; INT4 codes in [-8, 7])."""
    if bits == 8:
        for j in range(64):
            packed[out + np.uint64(j)] = np.uint8(np.int32(src[r, np.uint64(c0 + j)]) & 0xFF)
    else:
        for j in range(64):
            lo = np.int32(src[r, np.uint64(c0 + j)]) & 0xF
            hi = np.int32(src[r, np.uint64(c0 + 64 + j)]) & 0xF
            packed[out + np.uint64(j)] = np.uint8(lo | (hi << 4))


def _stripe_placer(tile_bytes):
    """The stripe placer for one way of making the code bytes (_quantised_bytes or _given_bytes), bound as a
    global of the placer, so the tile layout is written once and each kernel inlines its own byte maker into the
    loops that LLVM vectorises."""

    @njit(cache=True, inline="always")
    def place_stripe(src, col0, k, bits, r0, words, body_word0, inv, packed):
        """Rows r0..r0+31 of src[:, col0:col0+k] into the body that starts at words[body_word0], each 2 KB tile
        filled while it sits in L1. inv: the rows' reciprocal scales (quantising only); packed (uint8[1024]):
        scratch."""
        n = src.shape[0]
        nb_rows = _NB4 if bits == 4 else _NB8
        k_step = _KS4 if bits == 4 else _KS8
        nb = (r0 // nb_rows) * nb_rows
        nbs = min(nb_rows, n - nb)
        ns = r0 - nb
        packed_words = packed.view(np.uint32)
        # Indices are unsigned below: Numba then adds no negative-index check, which would stop LLVM vectorising.
        for kb in range(0, k, _KB):
            kbs = min(_KB, k - kb)
            block_word0 = body_word0 + (nb * k + nbs * kb + ns * kbs) * bits // 32
            for t in range(kbs // k_step):
                c0 = col0 + kb + t * k_step
                for half in range(2):
                    for i in range(16):  # the 64 code bytes of each of the half tile's 16 rows, one after the other
                        tile_bytes(src, np.uint64(r0 + 16 * half + i), c0, inv[16 * half + i], bits, packed,
                                    np.uint64(64 * i))
                    # each 16-row half of the tile is a 16 x 16 matrix of 4-byte words, stored transposed
                    _transpose_words(packed_words, 0, words, block_word0 + t * _TILE_WORDS + half * _HALF_WORDS)

    return place_stripe


_place_quantised = _stripe_placer(_quantised_bytes)
_place_given = _stripe_placer(_given_bytes)


@njit(cache=True, inline="always")
def _pack_stripe(src, col0, k, bits, r0, words, body_word0, scales, inv, packed):
    """Quantise rows r0..r0+31 of src[:, col0:col0+k] into the body that starts at words[body_word0].

    scales (float32, one per row of src) receives the stripe's scales. inv (float32[32]) and packed (uint8[1024])
    are the caller's scratch. First the 32 rows' scales (which brings the stripe into L2), then the tiles. Returns
    the first row holding Inf or NaN, or -1.
    """
    for i in range(TILE_ROWS):
        d, iv, nonfinite = _row_scale(src[r0 + i, col0:col0 + k], bits)
        if nonfinite:
            return r0 + i
        scales[r0 + i] = d
        inv[i] = iv
    _place_quantised(src, col0, k, bits, r0, words, body_word0, inv, packed)
    return -1


@njit(parallel=True, cache=True, nogil=True)
def quantize_pack(src, col0, k, bits, body, scales):
    """Quantise src[:, col0:col0+k] (uint16 bf16 bits, n rows) and pack it into body (uint8, n*k*bits/8 bytes).

    scales (float32, n) receives the per-row scales. Returns the first row index holding Inf or NaN, or -1
    (the outputs are then incomplete and must be discarded).
    """
    stripes = src.shape[0] // TILE_ROWS
    bad = np.full(stripes, -1, np.int64)
    words = body.view(np.uint32)
    for s in prange(stripes):
        inv = np.empty(TILE_ROWS, np.float32)
        packed = np.empty(1024, np.uint8)
        bad[s] = _pack_stripe(src, col0, k, bits, s * TILE_ROWS, words, 0, scales, inv, packed)
    for s in range(stripes):
        if bad[s] >= 0:
            return bad[s]
    return -1


@njit(parallel=True, cache=True, nogil=True)
def pack_codes(codes, col0, k, bits, body):
    """Pack codes chosen elsewhere (int8 [n, cols]; INT4 codes in [-8, 7]) of columns col0:col0+k into body (uint8,
    n*k*bits/8 bytes), in quantize_pack's layout: calibrated rounding writes the format through the same placer."""
    words = body.view(np.uint32)
    unused = np.zeros(TILE_ROWS, np.float32)
    for s in prange(codes.shape[0] // TILE_ROWS):
        packed = np.empty(1024, np.uint8)
        _place_given(codes, col0, k, bits, s * TILE_ROWS, words, 0, unused, packed)


@intrinsic
def _claim(typingctx, counter):
    """Atomically take the next work unit: counter[0] += 1, returning the old value (threads share counter)."""
    if not (isinstance(counter, types.Array) and counter.dtype == types.int64):
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        return builder.atomic_rmw("add", data, ir.Constant(ir.IntType(64), 1), "monotonic")

    return types.int64(counter), codegen


@njit(parallel=True, cache=True, nogil=True)
def quantize_pack_expert(gate, up, down, parts, bits, words, floats, offsets, threads):
    """Quantise and pack one expert's three projections for every NUMA part in one parallel launch.

    gate, up: [I, H] and down: [H, I] (uint16 bf16 bits). words (uint32) and floats (float32) view the same output
    buffer; offsets[proj * parts + part] = (first word of the body, first float of the scales) of that projection part
    (proj 0, 1, 2 = gate, up, down; kt-format.md §1 for the NUMA split).

    The work units are the 32-row stripes of all six (or 3 * parts) matrices, largest first; idle threads take
    the next unit, so a thread slowed by other work on its core delays nothing (threads: Numba's thread count).
    Returns (proj, row) of the first row holding Inf or NaN (row in the full projection), or (-1, -1).
    """
    part_rows = gate.shape[0] // parts
    gu_stripes = part_rows // TILE_ROWS  # stripes of one gate or up part
    down_stripes = down.shape[0] // TILE_ROWS  # stripes of one down part
    gu_units = 2 * parts * gu_stripes
    units = gu_units + parts * down_stripes
    bad = np.full(units, -1, np.int64)
    counter = np.zeros(1, np.int64)
    for _ in prange(threads):
        inv = np.empty(TILE_ROWS, np.float32)
        packed = np.empty(1024, np.uint8)
        u = _claim(counter)
        while u < units:
            if u < gu_units:
                proj, rest = divmod(u, parts * gu_stripes)
                part, stripe = divmod(rest, gu_stripes)
                body, scale = offsets[proj * parts + part, 0], offsets[proj * parts + part, 1]
                rows = slice(part * part_rows, (part + 1) * part_rows)
                src = gate[rows] if proj == 0 else up[rows]
                found = _pack_stripe(src, 0, src.shape[1], bits, stripe * TILE_ROWS, words, body,
                                     floats[scale:scale + part_rows], inv, packed)
                if found >= 0:
                    bad[u] = part * part_rows + found
            else:
                part, stripe = divmod(u - gu_units, down_stripes)
                body, scale = offsets[2 * parts + part, 0], offsets[2 * parts + part, 1]
                found = _pack_stripe(down, part * part_rows, part_rows, bits, stripe * TILE_ROWS, words, body,
                                     floats[scale:scale + down.shape[0]], inv, packed)
                bad[u] = found
            u = _claim(counter)
    first = (-1, -1)
    for u in range(units):  # units run gate, up, down: the first projection with a bad row wins
        proj = 2 if u >= gu_units else u // (parts * gu_stripes)
        if bad[u] >= 0 and (first[0] < 0 or (proj == first[0] and bad[u] < first[1])):
            first = (proj, bad[u])
    return first



@njit(parallel=True, cache=True, nogil=True)
def unpack_dequantize(body, scales, n, k, bits):
    """The inverse of quantize_pack: float32 [n, k] of the dequantised values (INT8 q*d, INT4 m*16*d)."""
    out = np.empty((n, k), np.float32)
    nb_rows = _NB4 if bits == 4 else _NB8
    k_step = _KS4 if bits == 4 else _KS8
    step = _STEP4 if bits == 4 else _STEP8
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
