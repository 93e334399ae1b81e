"""Where the routed experts of a checkpoint are, and how to read each projection as bf16 bits.

The conversion sees a model as a list of MoE layers, each a list of experts, each three ProjectionSources
(gate, up, down) that fill a caller-owned uint16 buffer with the projection's bf16 bit patterns in the HF
orientation (out x in). Everything architecture- or dtype-specific stays in this module:

- key layouts (kt-format.md §5): per-expert `experts.{e}.{gate,up,down}_proj` or, Mixtral's names,
  `experts.{e}.{w1,w3,w2}`, fused `experts.gate_up_proj` + `experts.down_proj` (or Granite-MoE's
  `input_linear.weight` + `output_linear.weight`) in either orientation, under `mlp`, `block_sparse_moe` or
  `feed_forward`, each also under a VL wrapper (`model.language_model.layers.*`);
- the families whose experts kt-kernel cannot compute (hfformat.refusal) are refused before anything is read;
- storage: BF16, FP16, block-scaled FP8 (`weight` + `weight_scale_inv`) and compressed-tensors pack-quantized
  INT4 (`weight_packed` + `weight_scale` + `weight_shape`), decoded by the Numba kernels of ktq.kernels.decode.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from ktq import hfformat
from ktq.cpu.checkpoint import Checkpoint, collector_paused
from ktq.errors import KtqError
from ktq.kernels.decode import fp8_blocks_to_bf16, fp16_to_bf16, packed_int_to_bf16, transpose_u16
from ktq.kernels.ktformat import PROJECTIONS
from ktq.safetensors_io import TensorInfo, TensorReader

_PLAIN_TYPES = {"BF16": "bf16", "F16": "fp16"}
_SCALE_DTYPES = {"F32": np.float32, "BF16": np.uint16}  # scale tensors: float32, or bf16 kept as bits

_PREFIX = r"^(?P<prefix>(?:model\.)?(?:language_model\.)?(?:model\.)?)layers\.(?P<layer>\d+)\."
# The MoE block: `mlp` (most), `block_sparse_moe` (Mixtral, MiniMax, Granite-MoE), `feed_forward` (Jamba, LFM2-MoE)
_BLOCK = r"(?P<block>mlp|block_sparse_moe|feed_forward)\."
# One projection of one expert: {prefix}layers.{L}.{block}.experts.{e}.{name}.{param}
_PER_EXPERT_KEY = re.compile(_PREFIX + _BLOCK + r"experts\.(?P<expert>\d+)\.(?P<name>\w+)\.(?P<param>\w+)$")
_PROJECTION_NAMES = {naming: dict(zip(names, PROJECTIONS))  # naming -> checkpoint projection name -> gate / up / down
                     for naming, names in hfformat.EXPERT_PROJECTION_NAMES.items()}
_NAMING = {name: naming for naming, names in _PROJECTION_NAMES.items() for name in names}
# All experts of a layer in two 3-D tensors, gate|up and down: naming -> kind -> name after the block
_FUSED_NAMES = {
    "fused": {"gate_up_proj": "experts.gate_up_proj", "down_proj": "experts.down_proj"},  # Qwen3-VL/3.5-MoE, ZAYA
    "fused_linear": {"gate_up_proj": "input_linear.weight", "down_proj": "output_linear.weight"},  # Granite-MoE
}
_FUSED_KIND = {name: (naming, kind) for naming, names in _FUSED_NAMES.items() for kind, name in names.items()}
_FUSED_KEY = re.compile(_PREFIX + _BLOCK + r"(?P<fused>" + "|".join(re.escape(n) for n in _FUSED_KIND) + r")$")
_LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")  # any tensor of decoder layer L
# Tensors that make up one stored projection, by storage kind
_STORAGE_PARAMS = {"weight", "weight_scale_inv", "weight_packed", "weight_scale", "weight_shape",
                   "weight_zero_point", "weight_g_idx"}

FP8_WARNING = ("FP8 input: every weight is rounded twice (to FP8 by its publisher, to AMXINT4/AMXINT8 here); "
               "converting a BF16 release of the model, where one exists, gives better accuracy")
INT4_WARNING = ("compressed INT4 input is dequantised to BF16 and requantised with one scale per row instead of "
                "its group scales: --quant-method int8 keeps more of its accuracy than int4")


@dataclass(frozen=True)
class Geometry:
    hidden: int
    intermediate: int
    experts: int


@dataclass(frozen=True, slots=True)  # slots: built once per projection (44k in DeepSeek-V3), twice as fast
class ProjectionSource:
    """One projection of one expert: its shape (rows, cols), the bytes it reads, and how to decode them."""

    name: str
    shape: tuple[int, int]
    input_bytes: int  # checkpoint bytes this projection accounts for (progress and rates)
    scratch_bytes: int  # size of the byte buffer `read` decodes through
    _decode: Callable[[TensorReader, np.ndarray, np.ndarray], None]
    stored: TensorInfo | None = None  # set when the file holds exactly this bf16 matrix, 2-byte aligned
    fp8: tuple[TensorInfo, TensorInfo, tuple[int, int]] | None = None  # block-scaled FP8: weight, scale_inv, block

    def read(self, reader: TensorReader, out: np.ndarray, scratch: np.ndarray) -> np.ndarray:
        """Fill out (uint16, at least rows*cols) with bf16 bits; scratch is a byte buffer of scratch_bytes or more."""
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
    warnings: tuple[str, ...] = ()  # for the user, once per conversion

    @property
    def scratch_bytes(self) -> int:
        return max(src.scratch_bytes for layer in self.layers for expert in layer.experts for src in expert.values())


def _config_int(config: dict, *keys: str) -> int:
    """The first of keys that config sets, a positive integer (hfformat.count)."""
    value = hfformat.count(config, *keys)
    if value is None:
        raise KtqError(f"config.json has no {' / '.join(keys)}: is this a Mixture-of-Experts model?")
    return value


def geometry_of(config: dict) -> Geometry:
    return Geometry(
        hidden=_config_int(config, "hidden_size"),
        intermediate=_config_int(config, "moe_intermediate_size", "intermediate_size"),
        experts=_config_int(config, *hfformat.EXPERT_COUNT_KEYS),
    )


def moe_layer_indices(config: dict) -> list[int]:
    """Decoder layers with routed experts according to the config (hfformat.moe_layers: MTP layers excluded)."""
    _config_int(config, "num_hidden_layers")  # missing, it is named in one line
    return list(hfformat.moe_layers(config))


def _check_layer_count(config: dict, held_layers: int) -> None:
    """num_hidden_layers sizes the layer list: it cannot exceed the decoder layers the shards hold tensors of."""
    count = _config_int(config, "num_hidden_layers")
    if count > held_layers:
        raise KtqError(f"config.json: num_hidden_layers is {count}, but the shards hold tensors of {held_layers} "
                       "decoder layers: the config does not describe these shards")


def _quantization_config(ckpt: Checkpoint) -> dict:
    found = ckpt.text_config.get("quantization_config") or ckpt.config.get("quantization_config") or {}
    return found if isinstance(found, dict) else {}


# ---- sources: one per storage kind -------------------------------------------------------------------------

def _plain(info: TensorInfo, name: str | None = None) -> ProjectionSource:
    """A contiguous BF16 matrix read straight into the buffer, or FP16 read into scratch and rounded to bf16."""
    shape = tuple(info.shape)
    if info.dtype == "BF16":
        def decode(reader: TensorReader, out: np.ndarray, scratch: np.ndarray) -> None:
            reader.read_into(info, out)
        mappable = info if info.offset % 2 == 0 else None  # a uint16 view needs an even address
        return ProjectionSource(name or info.name, shape, info.nbytes, 0, decode, mappable)

    def decode_fp16(reader: TensorReader, out: np.ndarray, scratch: np.ndarray) -> None:
        raw = scratch.view(np.uint16)[: out.size].reshape(out.shape)
        reader.read_into(info, raw)
        fp16_to_bf16(raw, out)
    return ProjectionSource(name or info.name, shape, info.nbytes, info.nbytes, decode_fp16)


def _transposed(block: TensorInfo, columns: slice, name: str) -> ProjectionSource:
    """The transpose of block[:, columns]: block is one expert's slice of a fused tensor stored in x out."""
    rows = len(range(block.shape[1])[columns])
    shape = (rows, block.shape[0])

    def decode(reader: TensorReader, out: np.ndarray, scratch: np.ndarray) -> None:
        raw = scratch.view(np.uint16)[: block.numel].reshape(block.shape)
        reader.read_into(block, raw)
        transpose_u16(raw[:, columns], out)
        if block.dtype == "F16":
            fp16_to_bf16(out, out)  # elementwise, so in place is safe
    return ProjectionSource(name, shape, 2 * rows * block.shape[0], block.nbytes, decode)


def _fp8(weight: TensorInfo, scale_inv: TensorInfo, block: tuple[int, int]) -> ProjectionSource:
    """kt-format.md §5: bf16(fp32(w) * scale_inv[r // bn, c // bk]); weight and scales share the scratch."""
    scale_at = -(-weight.nbytes // 8) * 8
    scale_dtype = _SCALE_DTYPES[scale_inv.dtype]

    def decode(reader: TensorReader, out: np.ndarray, scratch: np.ndarray) -> None:
        w = reader.read_into(weight, scratch[: weight.nbytes]).reshape(weight.shape)
        s = scratch[scale_at: scale_at + scale_inv.nbytes].view(scale_dtype).reshape(scale_inv.shape)
        reader.read_into(scale_inv, s)
        fp8_blocks_to_bf16(w, s, block[0], block[1], out)
    return ProjectionSource(weight.name, tuple(weight.shape), weight.nbytes + scale_inv.nbytes,
                            scale_at + scale_inv.nbytes, decode, fp8=(weight, scale_inv, block))


@dataclass(frozen=True)
class _PackedArgs:
    """The weight scheme of a compressed-tensors pack-quantized checkpoint."""

    bits: int
    group: int | None  # columns per scale; None: one scale per row (channel strategy)


def _packed(packed: TensorInfo, scale: TensorInfo, stored_shape: TensorInfo | None, shape: tuple[int, int],
            args: _PackedArgs) -> ProjectionSource:
    """compressed-tensors pack-quantized (symmetric): bf16(q * scale), as its own decompressor computes it."""
    scale_at = -(-packed.nbytes // 8) * 8
    scale_dtype = _SCALE_DTYPES[scale.dtype]
    group = args.group or shape[1]

    def decode(reader: TensorReader, out: np.ndarray, scratch: np.ndarray) -> None:
        if stored_shape is not None:
            recorded = [int(v) for v in reader.read(stored_shape).reshape(-1)]
            if recorded != list(shape):
                raise KtqError(f"{stored_shape.name} records shape {recorded} but {packed.name} packs {list(shape)}: "
                               "the checkpoint is inconsistent, re-download that shard")
        words = reader.read_into(packed, scratch[: packed.nbytes]).view(np.uint32).reshape(packed.shape)
        s = scratch[scale_at: scale_at + scale.nbytes].view(scale_dtype).reshape(scale.shape)
        reader.read_into(scale, s)
        packed_int_to_bf16(words, s, group, args.bits, out)
    return ProjectionSource(packed.name, shape, packed.nbytes + scale.nbytes + (stored_shape.nbytes if stored_shape
                            else 0), scale_at + scale.nbytes, decode)


# ---- storage kinds: detection and per-projection checks ----------------------------------------------------

def _storage_kind(params: dict[str, TensorInfo]) -> str:
    """The input type of one stored projection, from the tensors it is made of."""
    if "weight_packed" in params:
        return "int4"
    weight = params.get("weight")
    if weight is None:
        example = next(iter(params.values())).name
        raise KtqError(f"{example} belongs to an expert projection without weight or weight_packed tensor: "
                       "the checkpoint is incomplete or in a format ktq does not read")
    if weight.dtype == "F8_E4M3":
        if "weight_scale_inv" not in params:
            raise KtqError(f"{weight.name} is F8_E4M3 without a weight_scale_inv beside it: ktq reads block-scaled "
                           "FP8 (weight_scale_inv + quantization_config.weight_block_size) only")
        return "fp8"
    if weight.dtype not in _PLAIN_TYPES:
        raise KtqError(f"{weight.name} is {weight.dtype}: ktq reads expert weights stored as "
                       f"{', '.join(hfformat.INPUT_TYPES.values())}")
    return _PLAIN_TYPES[weight.dtype]


def _check_input_type(kinds: dict[str, str], requested: str | None) -> str:
    """The single input type of the routed experts; kinds maps each kind found to an example tensor."""
    if len(kinds) > 1:
        found = "; ".join(f"{kind} (e.g. {example})" for kind, example in sorted(kinds.items()))
        raise KtqError(f"routed-expert weights mix storage kinds: {found}; ktq reads one kind per model")
    actual, example = next(iter(kinds.items()))
    if requested and requested != actual:
        raise KtqError(f"--input-type {requested} does not match the checkpoint: expert weights such as {example} "
                       f"are {hfformat.INPUT_TYPES[actual]} ({actual}); drop --input-type or pass --input-type "
                       f"{actual}")
    return actual


def _fp8_block(ckpt: Checkpoint) -> tuple[int, int]:
    block = _quantization_config(ckpt).get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise KtqError(f"{ckpt.path / 'config.json'}: FP8 expert weights need quantization_config.weight_block_size "
                       f"[rows, cols] (block-scaled FP8 as in DeepSeek-V3), found {block!r}")
    return block[0], block[1]


def _packed_args(ckpt: Checkpoint) -> _PackedArgs:
    config = _quantization_config(ckpt)
    where = f"{ckpt.path / 'config.json'} quantization_config"
    if config.get("quant_method") != "compressed-tensors" or config.get("format") != "pack-quantized":
        raise KtqError(f"expert tensors are stored as weight_packed, but {where} does not declare compressed-tensors "
                       f"pack-quantized (quant_method {config.get('quant_method')!r}, format {config.get('format')!r})")
    groups = config.get("config_groups") or {}
    if not isinstance(groups, dict):
        raise KtqError(f"{where}: config_groups is {hfformat.shown(groups)}, not an object of weight schemes")
    schemes = [group["weights"] for group in groups.values()
               if isinstance(group, dict) and isinstance(group.get("weights"), dict)]
    if len({json.dumps(s, sort_keys=True) for s in schemes}) != 1:
        raise KtqError(f"{where} has {len(schemes)} different weight schemes; ktq reads checkpoints with one")
    scheme = schemes[0]
    problems = []
    if scheme.get("type") != "int" or scheme.get("num_bits") != 4:
        problems.append(f"type {scheme.get('type')!r} with {scheme.get('num_bits')} bits (ktq reads int, 4 bits)")
    if scheme.get("symmetric") is False:
        problems.append("asymmetric (zero points)")
    if scheme.get("strategy") not in ("group", "channel"):
        problems.append(f"strategy {scheme.get('strategy')!r} (ktq reads group and channel)")
    if scheme.get("actorder") == "group":
        problems.append("actorder group (g_idx)")
    if problems:
        raise KtqError(f"{where}: weights are {', '.join(problems)}; not supported")
    group = scheme.get("group_size") if scheme["strategy"] == "group" else None
    if group is not None and not (isinstance(group, int) and group > 0):
        raise KtqError(f"{where}: group strategy without a positive group_size ({group!r})")
    return _PackedArgs(4, group)


def _shape_error(info: TensorInfo, expected: tuple[int, ...], g: Geometry) -> KtqError:
    return KtqError(f"{info.name} has shape {list(info.shape)}, config.json implies {list(expected)} "
                    f"(hidden_size {g.hidden}, moe_intermediate_size {g.intermediate})")


def _scale_check(scale: TensorInfo | None, owner: TensorInfo, expected: tuple[int, int], what: str) -> TensorInfo:
    if scale is None:
        raise KtqError(f"{owner.name} has no {what} beside it: the checkpoint is incomplete")
    if scale.dtype not in _SCALE_DTYPES or tuple(scale.shape) != expected:
        raise KtqError(f"{scale.name} is {scale.dtype} {list(scale.shape)}, {owner.name} needs F32 or BF16 "
                       f"{list(expected)}")
    return scale


class _Storage:
    """Builds the ProjectionSource of each stored projection of one input type, checking its tensors."""

    def __init__(self, input_type: str, ckpt: Checkpoint, g: Geometry) -> None:
        self.input_type, self.g = input_type, g
        self.block = _fp8_block(ckpt) if input_type == "fp8" else None
        self.packed = _packed_args(ckpt) if input_type == "int4" else None

    def source(self, params: dict[str, TensorInfo], expected: tuple[int, int]) -> ProjectionSource:
        if self.input_type == "int4":
            return self._packed_source(params, expected)
        weight = params["weight"]
        if tuple(weight.shape) != expected:
            raise _shape_error(weight, expected, self.g)
        if self.input_type != "fp8":
            return _plain(weight)
        bn, bk = self.block
        scale = _scale_check(params.get("weight_scale_inv"), weight, (-(-expected[0] // bn), -(-expected[1] // bk)),
                             "weight_scale_inv")
        return _fp8(weight, scale, self.block)

    def _packed_source(self, params: dict[str, TensorInfo], expected: tuple[int, int]) -> ProjectionSource:
        packed, args = params["weight_packed"], self.packed
        for unsupported in ("weight_zero_point", "weight_g_idx"):
            if unsupported in params:
                raise KtqError(f"{params[unsupported].name}: asymmetric or act-order INT4 is not supported")
        n, k = expected
        if packed.dtype != "I32" or tuple(packed.shape) != (n, k * args.bits // 32):
            raise KtqError(f"{packed.name} is {packed.dtype} {list(packed.shape)}, config.json implies I32 "
                           f"{[n, k * args.bits // 32]} (shape {[n, k]} packed {32 // args.bits} per int32)")
        groups = -(-k // args.group) if args.group else 1
        scale = _scale_check(params.get("weight_scale"), packed, (n, groups), "weight_scale")
        stored_shape = params.get("weight_shape")
        if stored_shape is not None and (stored_shape.dtype not in ("I32", "I64") or stored_shape.shape != (2,)):
            raise KtqError(f"{stored_shape.name} is {stored_shape.dtype} {list(stored_shape.shape)}, {packed.name} "
                           "needs I32 or I64 [2] (its rows and columns)")
        return _packed(packed, scale, stored_shape, expected, args)


# ---- layouts -----------------------------------------------------------------------------------------------

def _expected_shape(proj: str, g: Geometry) -> tuple[int, int]:
    return (g.hidden, g.intermediate) if proj == "down" else (g.intermediate, g.hidden)


def _unknown_layout(ckpt: Checkpoint) -> KtqError:
    config = ckpt.config
    hint = next((n for n in sorted(ckpt.tensors) if "experts." in n and "shared_expert" not in n), None)
    if hint is None:
        return KtqError(f"no routed-expert tensors in {ckpt.path} (looked for "
                        "model.layers.L.mlp.experts.E.gate_proj.weight and its variants): not a MoE checkpoint?")
    return KtqError(f"{ckpt.path} (model_type {config.get('model_type')!r}, architectures "
                    f"{config.get('architectures')}) keeps its experts in a layout ktq does not know, e.g. {hint}; "
                    "ktq reads layers.L.{mlp,block_sparse_moe,feed_forward}. followed by experts.E.{gate,up,down}_proj"
                    ", experts.E.{w1,w3,w2}, fused experts.{gate_up_proj,down_proj} or {input,output}_linear.weight")


def _scan(ckpt: Checkpoint) -> tuple[str, str, str, dict, dict, int]:
    """(prefix, block, naming, per-expert {(L, e, proj): {param: info}}, fused {(L, kind): info}) of the one layout
    used (naming: a key of _PROJECTION_NAMES or of _FUSED_NAMES), and the number of decoder layers the shards hold
    tensors of (1 + the highest L of any `layers.L.` name)."""
    per_expert: dict[tuple[int, int, str], dict[str, TensorInfo]] = {}
    fused: dict[tuple[int, str], TensorInfo] = {}
    layouts: dict[tuple[str, str, str], str] = {}  # (prefix, block, naming) -> an example key
    other_layers = [-1]  # of the tensors that are not experts (a few per layer)
    for name, info in ckpt.tensors.items():
        match = _PER_EXPERT_KEY.match(name)
        if match:  # one group tuple, not a look-up per group: this loop sees every tensor (92k for DeepSeek-V3)
            prefix, layer, block, expert, checkpoint_name, param = match.groups()
            naming = _NAMING.get(checkpoint_name)
            if naming is not None:
                if param not in _STORAGE_PARAMS:
                    raise KtqError(f"expert tensor {name}: ktq does not read '{param}' tensors; it reads expert "
                                   f"weights stored as {', '.join(hfformat.INPUT_TYPES.values())}")
                layouts.setdefault((prefix, block, naming), name)
                proj = _PROJECTION_NAMES[naming][checkpoint_name]
                per_expert.setdefault((int(layer), int(expert), proj), {})[param] = info
                continue
        match = _FUSED_KEY.match(name)
        if match:
            naming, kind = _FUSED_KIND[match["fused"]]
            layouts.setdefault((match["prefix"], match["block"], naming), name)
            fused[(int(match["layer"]), kind)] = info
        elif match := _LAYER_KEY.search(name):
            other_layers.append(int(match[1]))
    if not layouts:
        raise _unknown_layout(ckpt)
    if len(layouts) > 1:
        raise KtqError(f"expert tensors in several layouts ({', '.join(sorted(layouts.values()))}): "
                       "ambiguous checkpoint")
    (prefix, block, naming), = layouts
    held = 1 + max([key[0] for key in per_expert] + [key[0] for key in fused] + other_layers)
    return prefix, block, naming, per_expert, fused, held


def _per_expert_model(ckpt: Checkpoint, where: str, naming: str, found: dict, g: Geometry, layer_indices: list[int],
                      requested: str | None) -> MoeModel:
    """where: the layer key template, `{prefix}layers.{L}.{block}.`."""
    checkpoint_name = {proj: name for name, proj in _PROJECTION_NAMES[naming].items()}
    wanted = {}
    for layer in layer_indices:
        for e in range(g.experts):
            for proj in PROJECTIONS:
                params = found.get((layer, e, proj))
                if params is None:
                    raise KtqError(f"expert tensor {where.format(L=layer)}experts.{e}.{checkpoint_name[proj]}.weight "
                                   f"is missing from {ckpt.path} (config.json promises {g.experts} experts in layer "
                                   f"{layer})")
                wanted[(layer, e, proj)] = params
    kinds = {}
    for params in wanted.values():
        kinds.setdefault(_storage_kind(params), next(iter(params.values())).name)
    input_type = _check_input_type(kinds, requested)
    storage = _Storage(input_type, ckpt, g)
    layers = [MoeLayer(layer, [{proj: storage.source(wanted[(layer, e, proj)], _expected_shape(proj, g))
                                for proj in PROJECTIONS} for e in range(g.experts)])
              for layer in layer_indices]
    warnings = {"fp8": (FP8_WARNING,), "int4": (INT4_WARNING,)}.get(input_type, ())
    return MoeModel(g, layers, input_type, warnings)


def _expert_slice(info: TensorInfo, e: int, first_row: int = 0, rows: int | None = None) -> TensorInfo:
    """Rows [first_row, first_row + rows) of expert e of a 3-D tensor [E, R, C], as a tensor of its own."""
    _, all_rows, cols = info.shape
    rows = all_rows if rows is None else rows
    width = info.nbytes // info.numel
    offset = info.offset + ((e * all_rows + first_row) * cols) * width
    return replace(info, shape=(rows, cols), offset=offset, nbytes=rows * cols * width)


def _fused_transposed(gate_up: TensorInfo, down: TensorInfo, g: Geometry) -> bool:
    """False for [E, 2I, H] + [E, H, I] (out x in), True for [E, H, 2I] + [E, I, H] (in x out).

    Every family stores the two tensors in one orientation, and a family's checkpoints come in either: Qwen3-VL-MoE's
    releases are in x out, what transformers 5.17 saves of it out x in. When hidden_size = 2 x moe_intermediate_size
    both orientations of gate_up_proj have the same shape; down_proj's never do (H != I), so the pair decides."""
    e, h, i = g.experts, g.hidden, g.intermediate
    pairs = {((e, 2 * i, h), (e, h, i)): False, ((e, h, 2 * i), (e, i, h)): True}
    shapes = (tuple(gate_up.shape), tuple(down.shape))
    if shapes in pairs:
        return pairs[shapes]
    downs = [list(down_shape) for gate_up_shape, down_shape in pairs if gate_up_shape == shapes[0]]
    if not downs:
        raise KtqError(f"{gate_up.name} has shape {list(gate_up.shape)}, config.json implies [E, 2I, H] = "
                       f"{[e, 2 * i, h]} or [E, H, 2I] = {[e, h, 2 * i]} (experts {e}, hidden_size {h}, "
                       f"moe_intermediate_size {i})")
    raise KtqError(f"{down.name} has shape {list(down.shape)}, {gate_up.name} {list(gate_up.shape)} implies "
                   f"{' or '.join(map(str, downs))}")


def _fused_expert(gate_up: TensorInfo, down: TensorInfo, e: int, i: int, transposed: bool) -> dict:
    """Gate is the first I of the 2I axis, up the second."""
    names = {proj: f"{gate_up.name}[expert {e}, {proj}]" for proj in ("gate", "up")}
    names["down"] = f"{down.name}[expert {e}]"
    if not transposed:
        return {"gate": _plain(_expert_slice(gate_up, e, 0, i), names["gate"]),
                "up": _plain(_expert_slice(gate_up, e, i, i), names["up"]),
                "down": _plain(_expert_slice(down, e), names["down"])}
    block = _expert_slice(gate_up, e)  # [H, 2I]: read whole, each half transposed out of it
    return {"gate": _transposed(block, slice(0, i), names["gate"]),
            "up": _transposed(block, slice(i, 2 * i), names["up"]),
            "down": _transposed(_expert_slice(down, e), slice(None), names["down"])}


def _fused_model(ckpt: Checkpoint, where: str, naming: str, found: dict, g: Geometry, layer_indices: list[int],
                 requested: str | None) -> MoeModel:
    layers = []
    kinds: dict[str, str] = {}
    for layer in layer_indices:
        tensors = []
        for kind in ("gate_up_proj", "down_proj"):
            info = found.get((layer, kind))
            if info is None:
                raise KtqError(f"expert tensor {where.format(L=layer)}{_FUSED_NAMES[naming][kind]} is missing from "
                               f"{ckpt.path} (config.json makes layer {layer} a MoE layer)")
            if info.dtype not in _PLAIN_TYPES:
                raise KtqError(f"{info.name} is {info.dtype}: ktq reads fused experts stored as BF16 or F16")
            kinds.setdefault(_PLAIN_TYPES[info.dtype], info.name)
            tensors.append(info)
        gate_up, down = tensors
        transposed = _fused_transposed(gate_up, down, g)
        layers.append(MoeLayer(layer, [_fused_expert(gate_up, down, e, g.intermediate, transposed)
                                       for e in range(g.experts)]))
    return MoeModel(g, layers, _check_input_type(kinds, requested))


@collector_paused()
def find_experts(ckpt: Checkpoint, requested_type: str | None = None) -> MoeModel:
    """The model's MoE layers with every expert's projections, checked for completeness, shapes and storage."""
    refused = hfformat.refusal(ckpt.config)
    if refused is not None:
        raise KtqError(f"{ckpt.path / 'config.json'}: {refused}")
    prefix, block, naming, per_expert, fused, held_layers = _scan(ckpt)
    geometry = geometry_of(ckpt.text_config)
    _check_layer_count(ckpt.text_config, held_layers)
    layer_indices = moe_layer_indices(ckpt.text_config)
    if not layer_indices:
        raise KtqError(f"{ckpt.path / 'config.json'} makes no decoder layer a MoE layer (see num_hidden_layers, "
                       f"{', '.join(hfformat.MOE_LAYER_RULES)})")
    where = f"{prefix}layers.{{L}}.{block}."
    if naming in _FUSED_NAMES:
        return _fused_model(ckpt, where, naming, fused, geometry, layer_indices, requested_type)
    return _per_expert_model(ckpt, where, naming, per_expert, geometry, layer_indices, requested_type)
