"""Where the routed experts of a checkpoint are, and how to read each projection as bf16 bits.

The conversion sees a model as a list of MoE layers, each a list of experts, each three ProjectionSources
(gate, up, down) that fill a caller-owned uint16 buffer with the projection's bf16 bit patterns in the HF
orientation (out x in). Everything architecture- or dtype-specific stays in this module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ktq.checkpoint import Checkpoint
from ktq.errors import KtqError
from ktq.kernels.decode import fp16_to_bf16
from ktq.kernels.ktformat import PROJECTIONS
from ktq.safetensors_io import TensorInfo, TensorReader

# input type -> safetensors dtype of the expert weights
INPUT_DTYPES = {"bf16": "BF16", "fp16": "F16", "fp8": "F8_E4M3"}

# One expert projection per key: (L, e, projection as the checkpoint names it)
_PER_EXPERT_KEY = re.compile(
    r"^(?P<prefix>(?:model\.)?(?:language_model\.)?(?:model\.)?)layers\.(?P<layer>\d+)\."
    r"mlp\.experts\.(?P<expert>\d+)\.(?P<proj>gate|up|down)_proj\.weight$"
)


@dataclass(frozen=True)
class Geometry:
    hidden: int
    intermediate: int
    experts: int


@dataclass(frozen=True)
class ProjectionSource:
    """One projection of one expert: its shape (rows, cols), the bytes it reads, and how to decode them."""

    name: str
    shape: tuple[int, int]
    input_bytes: int
    _decode: Callable[[TensorReader, np.ndarray, np.ndarray], None]
    stored: TensorInfo | None = None  # set when the file holds exactly this bf16 matrix, 2-byte aligned

    def read(self, reader: TensorReader, out: np.ndarray, scratch: np.ndarray) -> np.ndarray:
        """Fill out (uint16, at least rows*cols) with bf16 bits; scratch is a byte buffer of input_bytes or more."""
        view = out.reshape(-1)[: self.shape[0] * self.shape[1]].reshape(self.shape)
        self._decode(reader, view, scratch)
        return view

    def map(self, reader: TensorReader) -> np.ndarray | None:
        """The bf16 matrix as a read-only view of the page cache (no copy), or None when it must be `read`.
        Call `unmap` when done with it."""
        if self.stored is None:
            return None
        return reader.map(self.stored).view(np.uint16).reshape(self.shape)

    def unmap(self, reader: TensorReader) -> None:
        if self.stored is not None:
            reader.drop(self.stored)


@dataclass(frozen=True)
class MoeLayer:
    index: int
    experts: list[dict[str, ProjectionSource]]  # experts[e][proj]

    @property
    def input_bytes(self) -> int:
        return sum(src.input_bytes for expert in self.experts for src in expert.values())


@dataclass(frozen=True)
class MoeModel:
    geometry: Geometry
    layers: list[MoeLayer]
    input_type: str


def _config_int(config: dict, *keys: str) -> int:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    raise KtqError(f"config.json has no {' / '.join(keys)}: is this a Mixture-of-Experts model?")


def geometry_of(config: dict) -> Geometry:
    return Geometry(
        hidden=_config_int(config, "hidden_size"),
        intermediate=_config_int(config, "moe_intermediate_size", "intermediate_size"),
        experts=_config_int(config, "n_routed_experts", "num_experts", "num_local_experts"),
    )


def moe_layer_indices(config: dict) -> list[int]:
    """Decoder layers with routed experts according to the config; MTP layers (>= num_hidden_layers) excluded."""
    count = _config_int(config, "num_hidden_layers")
    first_moe = config.get("first_k_dense_replace") or 0
    dense = set(config.get("mlp_only_layers") or [])
    step = config.get("decoder_sparse_step") or 1
    return [layer for layer in range(count)
            if layer >= first_moe and layer not in dense and (layer + 1) % step == 0]


def _raw_bf16(info: TensorInfo) -> Callable:
    def decode(reader: TensorReader, out: np.ndarray, scratch: np.ndarray) -> None:
        reader.read_into(info, out)
    return decode


def _fp16(info: TensorInfo) -> Callable:
    def decode(reader: TensorReader, out: np.ndarray, scratch: np.ndarray) -> None:
        raw = scratch.view(np.uint16)[: out.size].reshape(out.shape)
        reader.read_into(info, raw)
        fp16_to_bf16(raw, out)
    return decode


_DECODERS = {"BF16": _raw_bf16, "F16": _fp16}


def detect_input_type(dtypes: set[str], requested: str | None, example: str) -> str:
    found = {dtype: kind for kind, dtype in INPUT_DTYPES.items() if dtype in dtypes}
    if len(dtypes) != 1 or not found:
        raise KtqError(f"routed-expert weights have dtypes {sorted(dtypes)} (e.g. {example}); ktq reads "
                       f"{', '.join(f'{v} ({k})' for k, v in INPUT_DTYPES.items())}, one kind per model")
    actual = next(iter(found.values()))
    if requested and requested != actual:
        raise KtqError(f"--input-type {requested} does not match the checkpoint: expert weights such as {example} "
                       f"are {INPUT_DTYPES[actual]} ({actual}); drop --input-type or pass --input-type {actual}")
    if actual == "fp8":
        raise KtqError("FP8 block-scaled input is not supported yet: dequantise it to BF16 first")
    return actual


def find_experts(ckpt: Checkpoint, requested_type: str | None = None) -> MoeModel:
    """The model's MoE layers with every expert's projections, checked for completeness and shapes."""
    config = ckpt.text_config
    found: dict[tuple[int, int, str], TensorInfo] = {}
    prefixes = set()
    for name, info in ckpt.tensors.items():
        match = _PER_EXPERT_KEY.match(name)
        if match:
            prefixes.add(match["prefix"])
            found[(int(match["layer"]), int(match["expert"]), match["proj"])] = info
    if not found:
        raise KtqError(f"no routed-expert tensors in {ckpt.path} (looked for "
                       "model.layers.L.mlp.experts.E.gate_proj.weight and its variants): not a MoE checkpoint?")
    if len(prefixes) > 1:
        raise KtqError(f"expert tensors under several prefixes ({', '.join(sorted(prefixes))}): ambiguous checkpoint")
    prefix = prefixes.pop()
    geometry = geometry_of(config)
    layer_indices = moe_layer_indices(config)
    expected_shape = {"gate": (geometry.intermediate, geometry.hidden), "up": (geometry.intermediate, geometry.hidden),
                      "down": (geometry.hidden, geometry.intermediate)}
    infos = []
    layers = []
    for layer in layer_indices:
        experts = []
        for e in range(geometry.experts):
            projections = {}
            for proj in PROJECTIONS:
                info = found.get((layer, e, proj))
                if info is None:
                    raise KtqError(f"expert tensor {prefix}layers.{layer}.mlp.experts.{e}.{proj}_proj.weight is missing "
                                   f"from {ckpt.path} (config.json promises {geometry.experts} experts in layer {layer})")
                if tuple(info.shape) != expected_shape[proj]:
                    raise KtqError(f"{info.name} has shape {list(info.shape)}, config.json implies "
                                   f"{list(expected_shape[proj])} (hidden_size {geometry.hidden}, "
                                   f"moe_intermediate_size {geometry.intermediate})")
                infos.append(info)
                projections[proj] = info
            experts.append(projections)
        layers.append((layer, experts))
    input_type = detect_input_type({i.dtype for i in infos}, requested_type, infos[0].name)
    decoder = _DECODERS[INPUT_DTYPES[input_type]]
    def source(info: TensorInfo) -> ProjectionSource:
        mappable = input_type == "bf16" and info.offset % 2 == 0
        return ProjectionSource(info.name, tuple(info.shape), info.nbytes, decoder(info), info if mappable else None)

    moe_layers = [MoeLayer(layer, [{p: source(i) for p, i in expert.items()} for expert in experts])
                  for layer, experts in layers]
    return MoeModel(geometry, moe_layers, input_type)
