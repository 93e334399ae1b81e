"""GPTQ onto kt-kernel's own CPU grid: codes and per-row scales of AMXINT4 / AMXINT8 chosen against a Hessian.

kt-kernel decodes value = code x step x scale (step 16 for INT4, 1 for INT8), one fp32 scale per output row of each
NUMA part, and whatever codes it finds; round-to-nearest is only what its converter writes. llm-compressor's GPTQ
pieces cannot be used for this grid: compressed-tensors' integer grids are [-2^(b-1), 2^(b-1) - 1] with scales in
the weight dtype, while the codes here must stay inside what both of kt-kernel's kernels decode correctly (INT4
[-7, 7], INT8 [-127, 127]: its small-batch kernel reads weight byte -128 as if the activation had no sign) and the
scales are fp32. So the block loop is written here, batched over matrices that each have their own Hessian (the
experts of a layer), with llm-compressor's conventions: static activation order, blocks of 128 columns, dampening a
fraction of the mean diagonal (columns no calibration token reached are rounded as they are, not zeroed).

Scales come first, per row and part, by a clipping search: the step that minimises the round-to-nearest error
weighted by the Hessian's diagonal (the inputs' energy per column), among shrinking clipping ratios; then GPTQ
rounds column by column and carries each column's error into the columns not yet rounded, with feedback taken from
the Hessian's Cholesky factor alone (_feedback_factor: no inverse of it, unlike GPTQModifier).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ktq.calibrated import grid_kernels
from ktq.kernels.ktformat import BY_BITS
from ktq.precision import matmul_precision

BLOCK = 128  # columns per lazy-update block, as GPTQModifier.block_size
CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(13))  # 1.0 down to 0.7 of each row's largest magnitude


@dataclass
class GridCodes:
    """A batch of matrices on kt-kernel's grid: codes int8 [B, R, C] and fp32 stored scales [B, R, G] (one per row
    and column group: the NUMA parts of a down projection, a single group otherwise)."""

    codes: torch.Tensor
    scales: torch.Tensor
    groups: int
    rounded: torch.Tensor  # bool [B]: rounded to nearest (no Hessian, or one not positive definite)

    def dequantize(self, bits: int) -> torch.Tensor:
        """fp32 [B, R, C]: what kt-kernel computes with (one fp32 copy of the codes, the steps broadcast)."""
        b, r, c = self.codes.shape
        values = self.codes.float().view(b, r, self.groups, c // self.groups)
        return values.mul_((self.scales * BY_BITS[bits].code_step)[..., None]).view(b, r, c)

    def dequantize_into(self, target: torch.Tensor, bits: int, matrices: range, batch: int = 16) -> None:
        """dequantize() of `matrices` copied into target [len(matrices), R, C] (any device and dtype), `batch`
        matrices at a time."""
        for first in range(matrices.start, matrices.stop, batch):
            last = min(first + batch, matrices.stop)
            part = GridCodes(self.codes[first:last].to(target.device), self.scales[first:last].to(target.device),
                             self.groups, self.rounded)
            target[first - matrices.start:last - matrices.start].copy_(part.dequantize(bits))


def clipped_steps(weights: torch.Tensor, importance: torch.Tensor, bits: int, groups: int,
                  kernels: bool = True) -> torch.Tensor:
    """Grid steps [B, R, G] (value of code 1) for weights [B, R, C] fp32 split into `groups` column groups: per row
    and group, the clipping ratio with the least sum over columns of importance [B, C] x (w - rtn(w))^2. On a GPU
    one Triton kernel (grid_kernels) unless `kernels` is False."""
    levels = BY_BITS[bits].max_code
    if kernels and grid_kernels.usable(weights.device):
        return grid_kernels.clipped_steps(weights, importance, CLIP_RATIOS, levels, groups)
    b, r, c = weights.shape
    w = weights.view(b, r, groups, c // groups)
    imp = importance.view(b, 1, groups, c // groups)
    amax = w.abs().amax(dim=3)
    best_err = torch.full_like(amax, float("inf"))
    best = amax / levels
    work = torch.empty_like(w)  # one buffer for every ratio: fresh memory is slow to touch, and this is the size of w
    for ratio in CLIP_RATIOS:
        step = (amax * ratio / levels).clamp_min(torch.finfo(torch.float32).tiny)
        torch.div(w, step[..., None], out=work).round_().clamp_(-levels, levels).mul_(step[..., None]).sub_(w)
        err = work.square_().mul_(imp).sum(dim=3)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, step, best)
    # the stored scale is step / code_step: exact in fp32 (a power of two), so kt-kernel's step equals this one
    return best


def quantize_to_grid(weights: torch.Tensor, hessians: torch.Tensor | None, bits: int, groups: int = 1,
                     dampening: float = 0.01, kernels: bool = True) -> GridCodes:
    """Codes for weights [B, R, C] (any float dtype; not modified, read again block by block) against hessians
    [B, C, C] fp32 (consumed: overwritten by their feedback factors), or by round to nearest on the clipped steps
    when hessians is None. A Hessian that is zero or not positive definite even after more dampening gives
    round-to-nearest for its matrix. On a GPU the clipping search and the column loop run as Triton kernels
    (grid_kernels) unless `kernels` is False (PyTorch's loops, for comparison)."""
    w = weights.to(torch.float32, copy=True)
    b, r, c = w.shape
    levels = BY_BITS[bits].max_code
    if hessians is None:
        steps = clipped_steps(w, torch.ones((b, c), device=w.device), bits, groups, kernels)
        codes = _round(w, steps.repeat_interleave(c // groups, dim=2), levels)
        return GridCodes(codes.to(torch.int8), steps / BY_BITS[bits].code_step, groups,
                         torch.ones(b, dtype=torch.bool, device=w.device))
    # Columns no calibration token reached carry no information: unlike llm-compressor, which zeroes their weights,
    # they are rounded as they are (held-out text may reach them), with the mean energy of the others, decoupled
    # from the rest. A matrix with no such energy at all is rounded to nearest.
    diag = torch.diagonal(hessians, dim1=1, dim2=2)
    dead = diag == 0
    alive = (~dead).sum(dim=1)
    mean = torch.where(alive > 0, diag.sum(dim=1) / alive.clamp_min(1), torch.ones_like(diag[:, 0]))
    diag.copy_(torch.where(dead, mean[:, None], diag))
    steps = clipped_steps(w, diag, bits, groups, kernels)
    perm = torch.argsort(diag, dim=1, descending=True, stable=True)  # static activation order
    feedback, fallback = _feedback_factor(hessians, perm, dampening)
    del hessians, diag
    # Columns in the solved order, each one contiguous row of R weights ([B, C, R]): the loop below reads and
    # writes whole columns, which on a GPU a [B, R, C] layout turns into strided accesses at a fraction of the speed.
    # They hold the weights plus the feedback of the columns already rounded.
    wt = torch.empty((b, c, r), dtype=torch.float32, device=w.device)
    for j in range(b):
        wt[j].copy_(w[j].index_select(1, perm[j]).T)
    del w
    group_of = perm // (c // groups)  # [B, C]: the step group of each column, in the solved order
    codes_t = torch.empty((b, c, r), dtype=torch.int8, device=wt.device)
    original = torch.empty((b, BLOCK, r), dtype=torch.float32, device=wt.device)
    errors = torch.empty_like(original)
    round_block = grid_kernels.round_block if kernels and grid_kernels.usable(wt.device) else _round_block
    for i1 in range(0, c, BLOCK):
        i2 = min(i1 + BLOCK, c)
        n = i2 - i1
        s1 = torch.gather(steps.mT, 1, group_of[:, i1:i2, None].expand(b, n, r))  # [B, block, R]
        # the block's own weights, exact from the caller's (the feedback needs each column's error against them)
        original[:, :n].copy_(torch.gather(weights, 2, perm[:, None, i1:i2].expand(b, r, n)).mT)
        round_block(wt[:, i1:i2], original[:, :n], feedback[:, i1:i2, i1:i2], s1, levels, codes_t[:, i1:i2],
                    errors[:, :n])
        wt[:, i2:].baddbmm_(feedback[:, i1:i2, i2:].mT, errors[:, :n], alpha=-1)
    del wt, feedback
    codes = torch.empty((b, r, c), dtype=torch.int8, device=codes_t.device).scatter_(
        2, perm[:, None, :].expand(b, r, c), codes_t.mT)
    return GridCodes(codes, steps / BY_BITS[bits].code_step, groups, fallback | (alive == 0))


def warm_up(bits: int, groups: int, device) -> None:
    """On a GPU, the Triton kernels compiled on a small problem of the same kind (whole blocks, sizes that are
    multiples of 16, one column group and `groups`): Triton compiles on its first call, seconds the first layer
    would otherwise wait for. Nothing elsewhere."""
    device = torch.device(device)
    if not grid_kernels.usable(device):
        return
    generator = torch.Generator(device=device).manual_seed(0)
    for g in sorted({1, groups}):
        x = torch.randn((512, 256), device=device, generator=generator)
        weights = torch.randn((2, 64, 256), device=device, generator=generator).bfloat16()
        quantize_to_grid(weights, (x.T @ x / 512).expand(2, 256, 256).clone(), bits, groups=g)


def _round_block(v1: torch.Tensor, w1: torch.Tensor, f1: torch.Tensor, s1: torch.Tensor, levels: int,
                 codes: torch.Tensor, errors: torch.Tensor) -> None:
    """GPTQ's column loop over one block of columns of a batch of matrices, each column one contiguous row of R
    weights: v1 [B, n, R] the weights with the feedback so far (worked on in place), w1 [B, n, R] the weights
    themselves, f1 [B, n, n] the block's feedback factor (_feedback_factor), s1 [B, n, R] the steps. Each column
    is rounded onto its steps and its error (rounded minus the weight itself) carried into the block's later
    columns. codes int8 and errors fp32 (for the feedback into later blocks) [B, n, R] written. On a GPU
    grid_kernels.round_block does the same in one kernel. Each product is rounded before its sum (no addcmul with
    value 1, which CUDA may fuse into one multiply-add), as the kernel computes it."""
    for i in range(v1.shape[1]):
        qi = torch.div(v1[:, i], s1[:, i]).round_().clamp_(-levels, levels)
        ei = torch.mul(qi, s1[:, i], out=errors[:, i]).sub_(w1[:, i])
        v1[:, i + 1:].addcmul_(f1[:, i, i + 1:, None], ei[:, None, :], value=-1)
        codes[:, i].copy_(qi)


def _round(w: torch.Tensor, step: torch.Tensor, levels: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / step), -levels, levels)


def _feedback_factor(hessians: torch.Tensor, order: torch.Tensor,
                     dampening: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's error feedback for each matrix, written over `hessians` [B, C, C] fp32: its Hessian reordered by
    `order` [B, C] and dampened; and which matrices got none instead [B] (those still not positive definite at ten
    times the dampening: rounded to nearest).

    GPTQ factorises H^-1 = U^T U (U upper triangular) and, column by column, rounds v_k (the weight w_k plus the
    feedback so far) to q_k and subtracts U_kj (v_k - q_k) / U_kk from every later v_j. Written with the weights'
    own errors e_i = q_i - w_i instead, that is v_k = w_k - sum_{i<k} A_ik / A_kk e_i, where A = U^-1: the upper
    triangular factor of H = A A^T. So no inverse is needed: with J the reversal of the columns, J H J = L L^T gives
    A = J L J, and the feedback factor F_ik = A_ik / A_kk is A with each column divided by its diagonal (ones on
    it). One Cholesky factorisation per matrix against GPTQModifier's three (cholesky, cholesky_inverse, cholesky);
    the same codes as textbook GPTQ but for the order of the sums (tests/test_calibrated.py). One matrix at a time: a
    few C^2 temporaries, not [B, C, C] copies."""
    b, c, _ = hessians.shape
    eye = torch.eye(c, dtype=hessians.dtype, device=hessians.device)
    fallback = torch.zeros(b, dtype=torch.bool)
    reverse = order.flip(1)
    with matmul_precision("ieee"):  # whatever the caller set: a TF32 factor carries 1e-3 errors into every column
        for j in range(b):
            h = hessians[j].index_select(0, reverse[j]).index_select(1, reverse[j])
            mean, added, factor = h.diagonal().mean(), 0.0, None
            for attempt in (dampening, 10 * dampening):
                h.diagonal().add_((attempt - added) * mean)
                added = attempt
                lower, info = torch.linalg.cholesky_ex(h)
                factor = lower.flip(0, 1)
                factor.div_(factor.diagonal().clone())
                if bool((info == 0) & torch.isfinite(factor).all()):  # a pivot that underflowed: not finite
                    break
                factor = None
            hessians[j].copy_(eye if factor is None else factor)
            fallback[j] = factor is None
    return hessians, fallback.to(hessians.device)
