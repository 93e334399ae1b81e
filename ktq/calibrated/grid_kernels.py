"""Triton kernels for ktgrid's two hot loops on a GPU: the clipping search and GPTQ's column loop within a block.

In PyTorch both are chains of small elementwise kernels: the clipping search makes ~16 passes over the weights for
each of its 13 ratios (0.58 s of a 3.5 s DeepSeek-V3 gate/up chunk on an H100), and the column loop five launches per
column, its in-block update reading and writing the whole block once per column (~17 GB per 128-column block of 64
gate/up matrices). Here each program keeps its part in registers: one row-group of weights read twice (its largest
magnitude, then every ratio's error at once), or one tile of rows through all of a block's columns.

Each value is computed with the operations of ktgrid's PyTorch code, in the same order, rounded the same way:
IEEE division (div_rn, not Triton's approximate `/`), rint (torch.round: half to even), no fused multiply-adds
(`enable_fp_fusion=False`; ktgrid's loop rounds each product before its sum). The column loop is bit-identical to
PyTorch's; the clipping search's sums run in another order, so a ratio whose error ties another's to the last bits
may be chosen differently (benchmarks/cpu_experts_profile.py counts such rows against PyTorch's, same run). Both
for finite inputs: Triton's minimum and maximum drop a NaN that torch.clamp would keep.

Triton comes with PyTorch's CUDA wheels; without it (or on the CPU) ktgrid runs its PyTorch code.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # CPU-only PyTorch: ktgrid keeps its PyTorch loops
    triton = None

TILE_ROWS = 32  # rows of a block each column-loop program carries through the block's columns
CLIP_COLUMNS = 256  # columns of a row-group each clipping-search step takes, for all ratios at once
RATIO_SLOTS = 16  # the clipping ratios padded to a power of two (Triton's tensor sizes)


def usable(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


if triton is not None:

    @triton.jit
    def _round_block_kernel(v_ptr, w_ptr, f_ptr, s_ptr, code_ptr, err_ptr, n, rows, levels,
                            v_sb, v_sc, w_sb, w_sc, f_sb, f_sc, s_sb, s_sc, c_sb, c_sc, e_sb, e_sc,
                            BLOCK: tl.constexpr, TILE: tl.constexpr):
        """One matrix's tile of TILE rows through a block's n columns (each column one row of the [n, rows]
        layouts), as ktgrid._round_block: the tile's weights with their feedback stay in registers, updated column
        by column; each column's steps, own weights and feedback row are read as it comes, its codes and errors
        written."""
        b = tl.program_id(1).to(tl.int64)  # offsets past 2^31 elements in large chunks
        r = tl.program_id(0) * TILE + tl.arange(0, TILE)
        col = tl.arange(0, BLOCK)
        in_rows = r < rows
        v = tl.load(v_ptr + b * v_sb + col[:, None] * v_sc + r[None, :],
                    mask=(col[:, None] < n) & in_rows[None, :], other=0.0)
        f_row = f_ptr + b * f_sb
        for i in range(n):
            vi = tl.sum(tl.where((col == i)[:, None], v, 0.0), axis=0)  # column i: exact (the rest are zeros)
            si = tl.load(s_ptr + b * s_sb + i * s_sc + r, mask=in_rows, other=1.0)
            qi = tl.minimum(tl.maximum(libdevice.rint(tl.math.div_rn(vi, si)), -levels), levels)
            ei = qi * si - tl.load(w_ptr + b * w_sb + i * w_sc + r, mask=in_rows, other=0.0)
            fi = tl.load(f_row + i * f_sc + col, mask=(col > i) & (col < n), other=0.0)
            v = v - fi[:, None] * ei[None, :]
            tl.store(code_ptr + b * c_sb + i * c_sc + r, qi.to(tl.int8), mask=in_rows)
            tl.store(err_ptr + b * e_sb + i * e_sc + r, ei, mask=in_rows)

    @triton.jit
    def _clip_kernel(w_ptr, imp_ptr, ratio_ptr, step_ptr, rows, groups, width, levels, tiny,
                     COUNT: tl.constexpr, SLOTS: tl.constexpr, COLUMNS: tl.constexpr):
        """The step of one row-group (`width` contiguous columns of a [B, R, C] matrix batch) as
        ktgrid.clipped_steps: its largest magnitude, then the importance-weighted error of every ratio."""
        pid = tl.program_id(0).to(tl.int64)  # offsets past 2^31 elements in large chunks
        g = pid % groups
        b = pid // (groups * rows)
        row = w_ptr + (pid // groups) * (groups * width) + g * width
        imp = imp_ptr + b * (groups * width) + g * width
        offs = tl.arange(0, COLUMNS)
        amax = tl.zeros((COLUMNS,), dtype=tl.float32)
        for c0 in range(0, width, COLUMNS):
            amax = tl.maximum(amax, tl.abs(tl.load(row + c0 + offs, mask=c0 + offs < width, other=0.0)))
        top = tl.max(amax, axis=0)
        k = tl.arange(0, SLOTS)
        ratios = tl.load(ratio_ptr + k, mask=k < COUNT, other=1.0)
        # PyTorch divides by a Python number as a product with its reciprocal
        steps = tl.maximum(top * ratios * tl.math.div_rn(1.0, levels), tiny)
        err = tl.zeros((SLOTS,), dtype=tl.float32)
        for c0 in range(0, width, COLUMNS):
            inside = c0 + offs < width
            w = tl.load(row + c0 + offs, mask=inside, other=0.0)[None, :]
            q = tl.minimum(tl.maximum(libdevice.rint(tl.math.div_rn(w, steps[:, None])), -levels), levels)
            d = q * steps[:, None] - w
            err += tl.sum(d * d * tl.load(imp + c0 + offs, mask=inside, other=0.0)[None, :], axis=1)
        err = tl.where(k < COUNT, err, float("inf"))
        # the first of the least errors, as ktgrid's strict `<` over the ratios in order keeps it
        best = tl.min(err, axis=0)
        first = tl.min(tl.where(err == best, k, SLOTS), axis=0)
        tl.store(step_ptr + pid, tl.sum(tl.where(k == first, steps, 0.0), axis=0))


def round_block(v1: torch.Tensor, w1: torch.Tensor, f1: torch.Tensor, s1: torch.Tensor, levels: int,
                codes: torch.Tensor, errors: torch.Tensor) -> None:
    """ktgrid._round_block on a GPU: v1 / w1 / s1 [B, n, R] and f1 [B, n, n] fp32 (rows contiguous; v1 not
    modified), codes int8 and errors fp32 [B, n, R] written."""
    b, n, rows = v1.shape
    tensors = (v1, w1, f1, s1, codes, errors)
    assert all(t.stride(-1) == 1 for t in tensors), "rows must be contiguous"
    strides = [stride for t in tensors for stride in (t.stride(0), t.stride(1))]
    _round_block_kernel[(triton.cdiv(rows, TILE_ROWS), b)](*tensors, n, rows, float(levels), *strides,
                                                           BLOCK=triton.next_power_of_2(n), TILE=TILE_ROWS,
                                                           enable_fp_fusion=False)


def clipped_steps(w: torch.Tensor, importance: torch.Tensor, ratios: tuple[float, ...], levels: int,
                  groups: int) -> torch.Tensor:
    """ktgrid.clipped_steps on a GPU: w [B, R, C] fp32 contiguous, importance [B, C]; steps [B, R, groups]."""
    b, r, c = w.shape
    assert len(ratios) <= RATIO_SLOTS and c % groups == 0, (len(ratios), c, groups)
    w, importance = w.contiguous(), importance.to(torch.float32).contiguous()
    steps = torch.empty((b, r, groups), dtype=torch.float32, device=w.device)
    table = torch.tensor(ratios, dtype=torch.float32, device=w.device)
    _clip_kernel[(b * r * groups,)](w, importance, table, steps, r, groups, c // groups, float(levels),
                                    torch.finfo(torch.float32).tiny, COUNT=len(ratios), SLOTS=RATIO_SLOTS,
                                    COLUMNS=CLIP_COLUMNS, enable_fp_fusion=False)
    return steps
