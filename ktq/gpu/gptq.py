"""GPTQ and round-to-nearest of one layer's routed experts, through llm-compressor's solver and compressed-tensors'
scheme, observer and packing, so the result is what `oneshot` writes for the same weights and Hessians.

While every expert is calibrated on every token, all gate and up projections of a layer see the same inputs and so
the same Hessian. llm-compressor keeps and factorises one copy per projection (2E of them: 109.5 GB per DeepSeek-V3
layer); here the rows of all gate and up matrices are stacked and solved against the one shared Hessian, factorised
once. Rows are independent given the Hessian, so the stacked solve gives the same weights as per-module solves.
`quantize_weight` cannot be called for that: it factorises the Hessian on every call and returns one loss per batch
item, where the report needs one per projection, so `SharedSolver` runs its block loop (the same pieces:
`apply_activation_ordering`, `factorize_hessian`, `gptq_block_update`, which picks the Triton kernel on a GPU) over
chunks of rows and keeps the per-row losses. The down projections, one Hessian each, go through `quantize_weight`
as they are, batched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import (
    ActivationOrdering,
    QuantizationArgs,
    QuantizationScheme,
    QuantizationStrategy,
    preset_name_to_scheme,
)
from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
from llmcompressor.modifiers.gptq.gptq_quantize import gptq_block_update, quantize_weight
from llmcompressor.modifiers.gptq.helpers import (
    GPTQ_PRECISION,
    accumulate_hessian,
    apply_activation_ordering,
    factorize_hessian,
)
from llmcompressor.observers import Observer

from ktq.precision import tf32_products

GPTQ_BLOCK = 128  # GPTQModifier.block_size
GATE_UP_CHUNK_ROWS = 1 << 16  # stacked gate/up rows solved at a time (fp32: 64k x H x 4 bytes)
DOWN_BATCH = 32  # down projections solved together through quantize_weight
# accumulate_hessian dispatches on the module type: a Linear's input is [tokens, features]
_LINEAR_INPUT = torch.nn.Linear(1, 1, device="meta")
# On a GPU the Hessians' products run in TF32 on the bf16 activations (exact inputs, FP32 sums: GPTQ losses within
# 0.07% of FP32's on DeepSeek-V3 geometry, benchmarks/results/engine-2026-12-07/); False: llm-compressor's FP32
HESSIAN_TF32 = True


def weight_scheme(quant_type: str, method: str, group_size: int = 128) -> QuantizationScheme:
    """compressed-tensors' preset (W4A16 / W8A16: symmetric int) in groups of group_size input columns (-1: one
    scale per output channel) as the modifier resolves it: GPTQ adds static activation ordering, and weights always
    take the memoryless min-max observer."""
    scheme = preset_name_to_scheme(quant_type, ["Linear"])
    scheme.format = "pack-quantized"
    if group_size == -1:
        scheme.weights.strategy, scheme.weights.group_size = QuantizationStrategy.CHANNEL, None
    else:
        scheme.weights.group_size = group_size
    if method == "GPTQ":
        scheme.weights.actorder = ActivationOrdering.STATIC
    scheme.weights.observer = "memoryless_minmax"
    scheme.weights.observer_kwargs = {}
    return scheme


def qparams(weight: torch.Tensor, args: QuantizationArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of a [rows, cols] weight (rows of stacked matrices are independent)."""
    observer = Observer.load_from_registry(args.observer, base_name="weight", args=args)
    observer(weight)
    found = observer.get_qparams()
    return found["scale"], found["zero_point"]


class LayerHessians:
    """What GPTQ takes from one layer's calibration pass, accumulated as llm-compressor's `accumulate_hessian` does
    while every expert runs on every token (its `moe_calibrate_all_experts`): the gate and up projections of all
    experts see the same input, so one shared Hessian serves all of them; each down projection gets its own, from
    that expert's intermediate activations. Summed over samples (normalised by the sample count when solved)."""

    wants_intermediates = True

    def __init__(self, experts: int, hidden: int, intermediate: int, device) -> None:
        self.gate_up = torch.zeros((hidden, hidden), dtype=torch.float32, device=device)
        self.down = torch.zeros((experts, intermediate, intermediate), dtype=torch.float32, device=device)
        self.samples = torch.zeros((), dtype=torch.float32, device=device)

    def add_group(self, group, rows: slice, total: int) -> None:
        for sample in range(group.samples):  # sample by sample, as llm-compressor does
            _accumulate(group.x[group.rows(sample)], self.gate_up)
            self.samples += 1

    def add_intermediate(self, expert: int, h: torch.Tensor) -> None:
        _accumulate(h, self.down[expert])

    def tensors(self) -> list[torch.Tensor]:
        """Everything summed over ranks in a distributed run."""
        return [self.gate_up, self.down, self.samples]


def _accumulate(x: torch.Tensor, hessian: torch.Tensor) -> None:
    """hessian += 2 x^T x for one sample's rows x [T, C]: on a GPU as TF32 products of the bf16 / fp16 values (held
    exactly; HESSIAN_TF32), else through llm-compressor's own accumulate_hessian in FP32."""
    if hessian.is_cuda and HESSIAN_TF32 and x.dtype in (torch.bfloat16, torch.float16):
        x = x.float()
        with tf32_products():
            hessian.addmm_(x.T, x, alpha=2.0)
        return
    # each call adds one sample (a [tokens, features] input) to a throwaway counter: one count serves all
    accumulate_hessian(x, _LINEAR_INPUT, hessian, torch.zeros((), device=x.device))


@dataclass
class Quantized:
    """One projection in compressed-tensors' pack-quantized form, as the checkpoint stores it."""

    packed: torch.Tensor  # int32 [rows, cols * bits / 32]
    scale: torch.Tensor  # [rows, groups], the weight dtype
    shape: torch.Tensor  # int64 [2]


def pack(quantized: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, scheme: QuantizationScheme,
         dtype: torch.dtype) -> Quantized:
    """The codes of a quantised weight (already on the grid) packed as compressed-tensors does; weight and scale
    are cast to the model dtype first, as llm-compressor's update_batch_qparams does."""
    weight, scale = quantized.to(dtype), scale.to(dtype)
    codes = quantize(x=weight, scale=scale, zero_point=zero_point, args=scheme.weights, dtype=torch.int8)
    return Quantized(pack_to_int32(codes, scheme.weights.num_bits), scale,
                     torch.tensor(tuple(weight.shape), dtype=torch.int64))


def unpack(q: Quantized, scheme: QuantizationScheme) -> torch.Tensor:
    """The weight a loader computes with: codes times scale, in the scale's dtype."""
    shape = torch.Size(int(v) for v in q.shape.tolist())
    codes = unpack_from_int32(q.packed, scheme.weights.num_bits, shape)
    return dequantize(codes, q.scale, None, args=scheme.weights, dtype=q.scale.dtype)


def _group_index(columns: int, args: QuantizationArgs, perm: torch.Tensor | None, device) -> torch.Tensor | None:
    """quantize_weight's mapping of columns to scale groups."""
    if args.strategy not in (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP):
        return None
    g_idx = torch.arange(columns, device=device, dtype=torch.int) // args.group_size
    if args.actorder == ActivationOrdering.WEIGHT and perm is not None:
        g_idx = g_idx[perm]
    return g_idx


class SharedSolver:
    """GPTQ of row-stacked matrices that share one normalised Hessian [C, C] (fp32, consumed), factorised once."""

    def __init__(self, hessian: torch.Tensor, args: QuantizationArgs, percdamp: float) -> None:
        columns = hessian.shape[0]
        device = hessian.device
        self.args, self.columns = args, columns
        empty = torch.empty((1, 0, columns), device=device, dtype=GPTQ_PRECISION)
        _, H, perm = apply_activation_ordering(empty, hessian.to(GPTQ_PRECISION)[None], args.actorder)
        self.perm = perm[0] if perm is not None else None  # one Hessian: one column order for every row
        self.dead = torch.diagonal(H[0]) == 0
        fallback = torch.zeros(1, dtype=torch.bool, device=device)
        self.hinv = factorize_hessian(empty, H, percdamp, fallback)
        self.fallback = bool(fallback.item())  # not positive definite: identity factors, i.e. round to nearest
        self.g_idx = _group_index(columns, args, self.perm, device)

    def solve(self, weights: torch.Tensor, scale: torch.Tensor,
              zero_point: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """weights [R, C], scale / zero_point [R, groups]: the quantised weights [R, C] in the weights' dtype (what
        llm-compressor stores back into the module) and the loss of every row [R]. One fp32 working copy: the
        column order is applied before widening and undone after narrowing."""
        rows, columns = weights.shape
        W = weights[:, self.perm] if self.perm is not None else weights
        W = W.to(device=self.hinv.device, dtype=GPTQ_PRECISION, copy=True)
        W.masked_fill_(self.dead, 0)
        W = W[None]
        scale, zero_point = scale[None], zero_point[None]
        losses = torch.zeros((1, rows), dtype=GPTQ_PRECISION, device=W.device)
        for i1 in range(0, columns, GPTQ_BLOCK):
            i2 = min(i1 + GPTQ_BLOCK, columns)
            W1 = W[:, :, i1:i2].clone()
            Q1, Err1, losses1 = torch.zeros_like(W1), torch.zeros_like(W1), torch.zeros_like(W1)
            gptq_block_update(W1, self.hinv[:, i1:i2, i1:i2], Q1, Err1, losses1, scale=scale, zero_point=zero_point,
                              global_scale=None, g_idx=self.g_idx, quant_args=self.args, i1=i1)
            W[:, :, i1:i2] = Q1
            losses += torch.sum(losses1, 2) / 2
            W[:, :, i2:] -= torch.bmm(Err1, self.hinv[:, i1:i2, i2:])
        quantized = W[0].to(weights.dtype)
        del W
        if self.perm is not None:
            quantized = quantized[:, torch.argsort(self.perm)]
        return quantized, losses[0]


def solve_each(weights: torch.Tensor, hessians: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
               args: QuantizationArgs, percdamp: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ of a batch of matrices with a Hessian each, straight through llm-compressor's quantize_weight."""
    return quantize_weight(weights=weights.to(GPTQ_PRECISION), hessians=hessians, scale=scale, zero_point=zero_point,
                           global_scale=None, quant_args=args, blocksize=GPTQ_BLOCK, percdamp=percdamp)


def gate_up_chunk(experts: int, intermediate: int) -> int:
    """Experts whose stacked gate and up rows are solved at a time."""
    return min(experts, max(1, GATE_UP_CHUNK_ROWS // (2 * intermediate)))


def working_set_bytes(experts: int, hidden: int, intermediate: int, dtype_bytes: int) -> int:
    """The solve's memory beyond the Hessians: a chunk of stacked gate/up rows (the stack and its column
    permutation in the model dtype, one fp32 working copy) with the factorised shared Hessian, or a batch of down
    projections with their Hessian copies, whichever is larger."""
    h, i = hidden, intermediate
    unit = gate_up_chunk(experts, i)  # the down projections are solved within the same experts
    gate_up = unit * 2 * i * h * (2 * dtype_bytes + 4) + 4 * h * h
    down = min(unit, DOWN_BATCH) * (3 * 4 * h * i + 2 * 4 * i * i)
    return max(gate_up, down)


def warm_up(scheme: QuantizationScheme, device) -> None:
    """GPTQ's kernels run once on a small problem of the same kind (bf16 rows, columns a multiple of the group):
    Triton compiles its block update on the first call, seconds that would otherwise stall the first layer."""
    generator = torch.Generator(device=device).manual_seed(0)
    weights = torch.randn((64, 256), device=device, generator=generator).to(torch.bfloat16)
    x = torch.randn((512, 256), device=device, generator=generator)
    hessian = x.T @ x / 512
    scale, zero_point = qparams(weights, scheme.weights)
    SharedSolver(hessian.clone(), scheme.weights, 0.01).solve(weights, scale, zero_point)
    solve_each(weights[None], hessian[None], scale[None], zero_point[None], scheme.weights, 0.01)
