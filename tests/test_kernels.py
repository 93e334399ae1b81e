"""The Numba kernels against an independent numpy transcription of kt-format.md §2-3."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from ktq.kernels import ktformat as fmt
from ktq.kernels.amx import quantize_pack, quantize_pack_expert, unpack_dequantize
from ktq.kernels.decode import fp16_to_bf16
from ktq.sample import encode


def reference_pack(w: np.ndarray, method: fmt.Method) -> tuple[bytes, np.ndarray]:
    """Straight from the spec: per-row scales, codes, then tiles in (nb, kb, ns, ks) order."""
    n, k = w.shape
    amax = np.abs(w).max(axis=1)
    if method.bits == 8:
        d = (amax * np.float32(1 / 127)).astype(np.float32)
    else:
        d = (amax.astype(np.float64) / 112.0).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    q = np.clip(np.rint((w * inv[:, None]).astype(np.float32)), -128, 127).astype(np.int32)
    if method.bits == 4:
        q = np.sign(q) * ((np.abs(q) + 8) >> 4)
    tiles = []
    for nb in range(0, n, method.n_block):
        nbs = min(method.n_block, n - nb)
        for kb in range(0, k, method.k_block):
            kbs = min(method.k_block, k - kb)
            for ns in range(0, nbs, 32):
                for ks in range(0, kbs, method.k_step):
                    r, c = nb + ns, kb + ks
                    if method.bits == 8:
                        tile = q[r:r + 32, c:c + 64] & 0xFF
                    else:
                        tile = (q[r:r + 32, c:c + 64] & 0xF) | ((q[r:r + 32, c + 64:c + 128] & 0xF) << 4)
                    words = tile.astype(np.uint8).reshape(2, 16, 16, 4)  # half, row, word, byte
                    tiles.append(words.transpose(0, 2, 1, 3).tobytes())
    return b"".join(tiles), d


def bf16_matrix(n: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k), dtype=np.float32) * np.float32(0.05)
    w[0] = 0  # all-zero row: scale 0, codes 0
    w[1, 3] = 9.0  # one outlier
    w[2, :] = np.float32(1.0)
    w[2, ::5] = np.float32(127.0)  # INT8 amax 127 -> scale 1, exact .5 ties below
    w[2, 1::7] = np.float32(0.5)
    w[3, ::3] = np.float32(112.0)  # INT4 amax 112 -> q0 of 8, 24, 40 ... exactly
    w[3, 1::3] = np.float32(8.0)
    w[3, 2::3] = np.float32(-24.0)
    return encode(w, "BF16")


def widen(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def pack(bits: np.ndarray, method: fmt.Method, col0: int = 0, k: int | None = None):
    k = bits.shape[1] - col0 if k is None else k
    n = bits.shape[0]
    body = np.full(method.body_bytes(n, k), 0xAA, np.uint8)  # poisoned: every byte must be written
    scales = np.full(n, np.nan, np.float32)
    bad = quantize_pack(bits, col0, k, method.bits, body, scales)
    return bad, body, scales


@pytest.mark.parametrize("method", [fmt.INT4, fmt.INT8], ids=lambda m: m.name)
@pytest.mark.parametrize("shape", [(128, 256), (256, 4096), (384, 3712)], ids=str)
def test_kernel_matches_reference(method, shape):
    n, k = shape  # 3712 = 3584 + 128: a second, partial K block
    bits = bf16_matrix(n, k, seed=n + k)
    bad, body, scales = pack(bits, method)
    ref_body, ref_scales = reference_pack(widen(bits), method)
    assert bad == -1
    assert body.tobytes() == ref_body
    assert scales.tobytes() == ref_scales.tobytes()


@pytest.mark.parametrize("method", [fmt.INT4, fmt.INT8], ids=lambda m: m.name)
def test_column_window_equals_sliced_copy(method):
    """down's NUMA parts are column windows of the full matrix: same bytes as packing a copy of the slice."""
    bits = bf16_matrix(256, 1024, seed=7)
    _, windowed, s1 = pack(bits, method, col0=512, k=512)
    _, copied, s2 = pack(np.ascontiguousarray(bits[:, 512:]), method)
    assert windowed.tobytes() == copied.tobytes() and s1.tobytes() == s2.tobytes()


@pytest.mark.parametrize("method", [fmt.INT4, fmt.INT8], ids=lambda m: m.name)
def test_round_trip_error_within_bound(method):
    bits = bf16_matrix(256, 3712, seed=3)
    _, body, scales = pack(bits, method)
    back = unpack_dequantize(body, scales, 256, 3712, method.bits)
    w = widen(bits)
    # one rounding to the integer grid (half a step), plus for INT4 the rounding of q0 to a multiple of 16
    bound = scales * (0.5 if method.bits == 8 else 8.5) * (1 + 1e-5)
    err = np.abs(back - w).max(axis=1)
    assert np.all(err <= bound + 1e-30)
    assert np.abs(back - w).max() > 0  # it really quantised


@pytest.mark.parametrize("method", [fmt.INT4, fmt.INT8], ids=lambda m: m.name)
def test_thread_count_does_not_change_bytes(method):
    bits = bf16_matrix(512, 2048, seed=11)
    before = numba.get_num_threads()
    try:
        outputs = []
        for threads in sorted({1, 2, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(threads)
            outputs.append(pack(bits, method)[1].tobytes())
    finally:
        numba.set_num_threads(before)
    assert all(o == outputs[0] for o in outputs)


@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
def test_nonfinite_row_is_reported(value):
    bits = bf16_matrix(256, 256, seed=5)
    bits[77, 100] = encode(np.array([value], np.float32), "BF16")[0]
    bad, _, _ = pack(bits, fmt.INT8)
    assert bad == 77


def test_fp16_to_bf16_every_value():
    h = np.arange(65536, dtype=np.uint32).astype(np.uint16).reshape(256, 256)
    out = np.empty_like(h)
    fp16_to_bf16(h, out)
    f = h.view(np.float16).astype(np.float32)
    nan = np.isnan(f)
    assert np.array_equal(out[~nan], encode(f, "BF16")[~nan])
    assert np.all(np.isnan(widen(out[nan])))


@pytest.mark.parametrize("method", [fmt.INT4, fmt.INT8], ids=lambda m: m.name)
def test_every_code_and_every_tie(method):
    """A row holding every integer and every half-integer of the code range: both roundings at every value."""
    values = np.arange(-127, 127.5, 0.5, dtype=np.float32)  # 509 values, amax 127 (INT8 scale ~1)
    if method.bits == 4:
        values = values * np.float32(112 / 127)  # amax 112: INT4 scale exactly 1, the half-integers are ties
        values = np.round(values * 2) / 2
    row = np.zeros(1024, np.float32)
    row[:values.size] = values
    w = np.tile(row, (32, 1))
    w[1::2] = np.roll(row, 300)  # the same values in other tiles and nibble positions
    bits = encode(w, "BF16")
    _, body, scales = pack(bits, method)
    ref_body, ref_scales = reference_pack(widen(bits), method)
    assert body.tobytes() == ref_body and scales.tobytes() == ref_scales.tobytes()


def expert_layout(method: fmt.Method, hidden: int, intermediate: int, parts: int):
    """offsets (body word, first scale) per (projection, part), as PackedExpert lays them out, and the total."""
    offsets, size = [], 0
    for proj in fmt.PROJECTIONS:
        for _ in range(parts):
            n, k = fmt.projection_shape(proj, hidden, intermediate // parts)
            offsets.append((size // 4, (size + method.body_bytes(n, k)) // 4))
            size += method.body_bytes(n, k) + 4 * n
    return np.array(offsets, np.int64), size


@pytest.mark.parametrize("method", [fmt.INT4, fmt.INT8], ids=lambda m: m.name)
@pytest.mark.parametrize("parts", [1, 2, 3])
def test_expert_kernel_equals_one_call_per_projection_part(method, parts):
    hidden = 3712  # a second, partial K block
    intermediate = 384 if parts == 3 else 512  # parts of 128, 512 or 256 rows
    gate, up, down = (bf16_matrix(*shape, seed=s) for s, shape in
                      enumerate([(intermediate, hidden), (intermediate, hidden), (hidden, intermediate)]))
    offsets, size = expert_layout(method, hidden, intermediate, parts)
    out = np.full(size, 0xAA, np.uint8)
    threads = numba.get_num_threads()
    assert quantize_pack_expert(gate, up, down, parts, method.bits, out.view(np.uint32), out.view(np.float32),
                                offsets, threads) == (-1, -1)
    expected = []
    per_part = intermediate // parts
    for matrix, proj in zip((gate, up, down), fmt.PROJECTIONS):
        for p in range(parts):
            if proj == "down":
                _, body, scales = pack(matrix, method, col0=p * per_part, k=per_part)
            else:
                _, body, scales = pack(np.ascontiguousarray(matrix[p * per_part:(p + 1) * per_part]), method)
            expected.append(body.tobytes() + scales.tobytes())
    assert out.tobytes() == b"".join(expected)


@pytest.mark.parametrize("proj, row", [(0, 300), (1, 5), (2, 1000)])
def test_expert_kernel_reports_the_first_nonfinite_row(proj, row):
    hidden, intermediate, parts = 1024, 512, 2
    matrices = [bf16_matrix(intermediate, hidden, 1), bf16_matrix(intermediate, hidden, 2),
                bf16_matrix(hidden, intermediate, 3)]
    matrices[proj][row, 7] = encode(np.array([np.nan], np.float32), "BF16")[0]
    matrices[2][1020, 3] = encode(np.array([np.inf], np.float32), "BF16")[0]  # a later one, in down
    offsets, size = expert_layout(fmt.INT8, hidden, intermediate, parts)
    out = np.empty(size, np.uint8)
    found = quantize_pack_expert(*matrices, parts, 8, out.view(np.uint32), out.view(np.float32), offsets,
                                 numba.get_num_threads())
    assert found == (proj, row)


@pytest.mark.parametrize("case, tree", [("small", "kt-int4-numa2"), ("small", "kt-int8-numa1"),
                                        ("wide", "kt-int4-numa2"), ("wide", "kt-int8-numa2")])
def test_codes_packed_from_kt_kernel_s_own_files_give_its_bytes(golden, case, tree):
    """pack_codes, which writes calibrated codes, puts every code where kt-kernel 0.7.2 put it: the codes of its
    own files (decoded by unpack_dequantize, divided by the step) packed again are its files, byte for byte."""
    from ktq.kernels.amx import pack_codes

    folder = golden / case / tree
    files = sorted(folder.rglob("*_quant_.kt"))
    assert files
    method = fmt.METHODS[tree.split("-")[1]]
    step = 16 if method.bits == 4 else 1
    for body_file in files:
        name = fmt.parse_kt_file_name(body_file.name)
        scales = np.fromfile(next(body_file.parent.glob(f"{method.file_tag}_{name.proj}_{name.expert}_*_scale_.kt")),
                             np.float32)
        body = np.fromfile(body_file, np.uint8)
        n = scales.size
        k = body.size * 8 // method.bits // n
        values = unpack_dequantize(body, scales, n, k, method.bits)
        with np.errstate(divide="ignore", invalid="ignore"):
            codes = np.where(scales[:, None] == 0, 0, np.rint(values / (scales[:, None] * step))).astype(np.int8)
        again = np.zeros_like(body)
        pack_codes(codes, 0, k, method.bits, again)
        assert again.tobytes() == body.tobytes(), body_file


@pytest.mark.parametrize("method", [fmt.INT4, fmt.INT8], ids=lambda m: m.name)
def test_codes_of_a_column_range_pack_as_that_range_alone(method):
    """A down projection's NUMA part is a column range of the full matrix: col0 / k select it in place."""
    from ktq.kernels.amx import pack_codes

    low, high = (-8, 8) if method.bits == 4 else (-128, 128)
    codes = np.random.default_rng(5).integers(low, high, (128, 2 * 3712), dtype=np.int8)
    whole, part = (np.zeros(method.body_bytes(128, 3712), np.uint8) for _ in range(2))
    pack_codes(codes, 3712, 3712, method.bits, whole)
    pack_codes(np.ascontiguousarray(codes[:, 3712:]), 0, 3712, method.bits, part)
    assert whole.tobytes() == part.tobytes()
    values = unpack_dequantize(part, np.ones(128, np.float32), 128, 3712, method.bits)
    assert np.array_equal(values / (16 if method.bits == 4 else 1), codes[:, 3712:].astype(np.float32))
