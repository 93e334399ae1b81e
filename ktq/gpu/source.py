"""The source checkpoint as the streaming engine reads it: one decoder layer at a time, straight from the shards.

Names are the checkpoint's own. transformers' key renamings for the architecture (e.g. Mixtral's
`block_sparse_moe.` -> `mlp.`) map them to the parameters of its modules; its weight converters (which fuse the
per-expert tensors into 3-D parameters) are not used, because the routed experts never enter a transformers module
here: they are read by ktq's own expert finder (`ktq.experts`, every layout and storage the CPU side reads, decoded by
the same Numba kernels) into a `StreamedExperts` that replaces the layer's experts module.

Everything else is decoded on the device it is used on: BF16 / FP16 / FP32 as stored, block-scaled FP8 as
`bf16(fp32(w) * scale_inv[r // bn, c // bk])` (kt-format.md §5, the same formula as the CPU decoder).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from ktq.cpu.checkpoint import Checkpoint, open_checkpoint
from ktq.cpu.experts import MoeModel, find_experts
from ktq.errors import KtqError
from ktq.safetensors_io import TensorInfo, TensorReader

TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I8": torch.int8, "U8": torch.uint8,
                "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool}
SAFETENSORS_DTYPES = {dtype: name for name, dtype in TORCH_DTYPES.items()}
_SCALE_SUFFIX = "_scale_inv"  # FP8: `X.weight` beside `X.weight_scale_inv`


@dataclass
class SourceCheckpoint:
    """The source's tensors grouped by decoder layer, and how to read them."""

    ckpt: Checkpoint
    experts: MoeModel
    fp8_block: tuple[int, int] | None
    reader: TensorReader = field(default_factory=TensorReader)

    @classmethod
    def open(cls, path: Path) -> "SourceCheckpoint":
        ckpt = open_checkpoint(path)
        experts = find_experts(ckpt)
        block = None
        if any(info.dtype.startswith("F8_") for info in ckpt.tensors.values()):
            qc = ckpt.text_config.get("quantization_config") or ckpt.config.get("quantization_config") or {}
            block = tuple(qc.get("weight_block_size") or ())
            if len(block) != 2:
                raise KtqError(f"{path / 'config.json'}: FP8 weights need quantization_config.weight_block_size")
        return cls(ckpt, experts, block)

    @property
    def moe_layers(self) -> dict[int, int]:
        """Decoder layer index -> its position in `experts.layers`."""
        return {layer.index: i for i, layer in enumerate(self.experts.layers)}

    @cached_property
    def logical(self) -> dict[str, list[TensorInfo]]:
        """Every stored weight under its loadable name (`X.weight` for FP8 `X.weight` + `X.weight_scale_inv`)."""
        found: dict[str, list[TensorInfo]] = {}
        for name, info in self.ckpt.tensors.items():
            base = name[: -len(_SCALE_SUFFIX)] if name.endswith(_SCALE_SUFFIX) else name
            found.setdefault(base, []).append(info)
        return found

    def read(self, infos: list[TensorInfo], device: torch.device | str, dtype: torch.dtype | None) -> torch.Tensor:
        """One weight on `device`, FP8 decoded to bf16, floats cast to `dtype` when given."""
        weight = stored_weight(infos)
        tensor = read_tensor(self.reader, weight).to(device)
        if weight.dtype.startswith("F8_"):
            scale = next((i for i in infos if i.name.endswith(_SCALE_SUFFIX)), None)
            if scale is None:
                raise KtqError(f"{weight.name} is {weight.dtype} without a weight_scale_inv beside it")
            tensor = decode_fp8(tensor, read_tensor(self.reader, scale).to(device), self.fp8_block)
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        return tensor

    def close(self) -> None:
        self.reader.close()


def stored_weight(infos: list[TensorInfo]) -> TensorInfo:
    """The weight itself among the tensors of one logical weight (not its FP8 scale)."""
    return next(i for i in infos if not i.name.endswith(_SCALE_SUFFIX))


def written_dtype(weight: TensorInfo) -> torch.dtype:
    """The dtype a stored weight has once read: FP8 decoded to bf16, anything else as stored."""
    return torch.bfloat16 if weight.dtype.startswith("F8_") else TORCH_DTYPES[weight.dtype]


def read_tensor(reader: TensorReader, info: TensorInfo) -> torch.Tensor:
    """One tensor's raw bytes as a CPU torch tensor of its dtype."""
    if info.dtype not in TORCH_DTYPES:
        raise KtqError(f"{info.name} in {info.path.name} is {info.dtype}, a dtype ktq gpu does not read")
    buffer = np.empty(info.nbytes, np.uint8)
    reader.read_into(info, buffer)
    return torch.from_numpy(buffer).view(TORCH_DTYPES[info.dtype]).reshape(info.shape)


def decode_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """bf16(fp32(w) * scale_inv[r // bn, c // bk]), partly filled edge blocks included."""
    rows, cols = weight.shape
    bn, bk = block
    scale = scale_inv.float().repeat_interleave(bn, 0)[:rows].repeat_interleave(bk, 1)[:, :cols]
    return (weight.float() * scale).to(torch.bfloat16)
