"""Matrix products in TF32 where that loses nothing: inputs that came from bf16 (or fp16) values are held exactly by
TF32's 10-bit mantissa, and the products and sums stay FP32, so only the order of the sums differs from FP32, at 8x
FP32's rate on a GPU. Nothing changes on the CPU."""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def matmul_precision(kind: str):
    """CUDA fp32 matrix products in `kind` ("tf32", or "ieee": full fp32) within the block, whatever was set."""
    saved = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = kind
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = saved


def tf32_products():
    return matmul_precision("tf32")
