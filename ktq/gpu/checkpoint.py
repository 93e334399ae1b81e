"""The GPU checkpoint, one artifact of the streaming engine: GPTQ (or RTN) of every layer's routed experts in
compressed-tensors' pack-quantized form, one committed shard per decoder layer in the output folder
(output.GpuOutput), then the index, the placement file, the source's side files and config.json with its
quantization_config.

GPTQ needs the layer's Hessians from the calibration pass (gptq.LayerHessians); chunks of experts are solved on the
ranks in turn and each result broadcast, so every rank holds the same quantised layer. Every quantised weight is
replaced in place by what the shard holds (dequantised): the propagation pass computes with it, and a resumed run
restores it from the shard it wrote.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from ktq.atomic import json_text
from ktq.gpu.gptq import (
    DOWN_BATCH,
    LayerHessians,
    Quantized,
    SharedSolver,
    gate_up_chunk,
    pack,
    qparams,
    solve_each,
    unpack,
    warm_up,
    weight_scheme,
)
from ktq.gpu.layer_experts import Chunk, DeviceExperts
from ktq.gpu.layout import ignore_reason
from ktq.gpu.model import ModelMap, linear_reasons
from ktq.gpu.output import CONFIG, GpuOutput, tensor_entry
from ktq.gpu.serving import (
    EXPERT_WEIGHT,
    NEXTN_LINEARS,
    fp8_linear_config,
    fp8_scheme,
    nextn_name,
    refuse_partial_layer,
    served_scheme,
)
from ktq.gpu.source import TORCH_DTYPES, SourceCheckpoint, read_tensor, stored_weight, written_dtype
from ktq.hfformat import EXPERT_PROJECTION_NAMES, INDEX_NAME
from ktq.kernels.ktformat import PROJECTIONS
from ktq.serving import PLACEMENT_FILE

OUTPUT_NAMES = dict(zip(PROJECTIONS, EXPERT_PROJECTION_NAMES["proj"]))
MIXTRAL_NAMES = dict(zip(PROJECTIONS, EXPERT_PROJECTION_NAMES["w"]))
_FUSED_NAME = re.compile(r"^(?P<module>.*)\.(gate_up_proj|down_proj)\[expert (?P<e>\d+)")
_FUSED_LINEAR_NAME = re.compile(r"^(?P<block>.*)\.(input_linear|output_linear)\.weight\[expert (?P<e>\d+)")


def scale_columns(cols: int, scheme) -> int:
    """Scale columns of a [rows, cols] projection: one per group of input columns, or one per row (channel)."""
    group = scheme.weights.group_size
    return -(-cols // group) if group else 1


@dataclass(frozen=True)
class MtpLayer:
    """DeepSeek's multi-token-prediction layer (index num_hidden_layers, outside the model transformers builds):
    sglang's NextN draft builds it with the model's quantization config under `model.decoder`, so its routed
    experts are written in the experts' scheme (rounded to nearest: no calibration reaches it) and its other
    Linears are listed under both names."""

    prefix: str  # its stored names' prefix, `model.layers.61`
    experts: dict[str, str]  # stored weight -> output module of each routed-expert projection quantised
    kept_experts: list[str]  # modules of expert projections an ignore rule keeps
    linears: list[str]  # modules of its other Linears

    @classmethod
    def find(cls, model: ModelMap, source: SourceCheckpoint, rules) -> "MtpLayer | None":
        index = len(model.layer_names)
        prefix = f"{model.layer_names[0].rsplit('.', 1)[0]}.{index}"
        stored = [name for name in source.logical if name.startswith(prefix + ".")]
        moe = next((i for i, path in enumerate(model.experts_path) if path is not None), None)
        if not stored or moe is None:
            return None
        experts, kept = {}, []
        for name in stored:
            found = EXPERT_WEIGHT.match(name)
            if found:
                if ignore_reason(rules, found["module"], ["Linear"]) is None:
                    experts[name] = found["module"]
                else:
                    kept.append(found["module"])
        refuse_partial_layer(f"{prefix}.mlp.experts", kept, len(kept) + len(experts))
        layer = model.layer_names[moe] + "."
        relative = [name[len(layer):] for name in kept_linears(model) if name.startswith(layer)]
        linears = [f"{prefix}.{rel}" for rel in (*relative, *NEXTN_LINEARS) if f"{prefix}.{rel}.weight" in stored]
        return cls(prefix, experts, kept, linears)


def kept_linears(model: ModelMap) -> list[str]:
    """The model's Linears outside the routed experts (checkpoint names), which the GPU checkpoint keeps as the
    source holds them."""
    from compressed_tensors.quantization.quant_config import _map_to_checkpoint_names, get_vllm_module_type

    skeleton = model.skeleton
    kept = [name for name, module in skeleton.named_modules()
            if get_vllm_module_type(type(module).__name__) == "Linear"]
    return _map_to_checkpoint_names(skeleton, kept)


def expert_module_name(source_name: str, e: int, proj: str) -> str:
    """The output name of one expert projection: the source's own (`...experts.7.gate_proj`, Mixtral's
    `...experts.7.w1`); fused sources get llm-compressor's per-expert names (`...experts.7.gate_proj`), Granite-MoE's
    `input_linear` / `output_linear` the names SGLang's and vLLM's GraniteMoe loaders split them into
    (`block_sparse_moe.experts.7.w1`, Mixtral's)."""
    fused = _FUSED_NAME.match(source_name)
    if fused:
        return f"{fused['module']}.{e}.{OUTPUT_NAMES[proj]}"
    linear = _FUSED_LINEAR_NAME.match(source_name)
    if linear:
        return f"{linear['block']}.experts.{e}.{MIXTRAL_NAMES[proj]}"
    return source_name.rsplit(".", 1)[0]


class GpuCheckpoint:
    """The engine's artifact for `ktq gpu` (see engine.Artifact)."""

    stages = ("solve", "write")

    def __init__(self, opts, source: SourceCheckpoint, model: ModelMap, rules, world, output: GpuOutput,
                 device) -> None:
        self.opts, self.source, self.model, self.rules, self.world, self.output = opts, source, model, rules, world, \
            output
        self.device, self.dtype = torch.device(device), getattr(torch, opts.torch_dtype)
        self.scheme = weight_scheme(opts.quant_type, opts.quant_method, opts.group_size)
        self.mtp = MtpLayer.find(model, source, rules)
        self.losses: dict[str, float] = {}
        self.fallbacks: list[str] = []
        for record in output.manifest["units"].values():  # the layers a resumed run keeps
            self.losses.update(record.get("losses", {}))
        self._layer: tuple | None = None  # (index, quantized, kept) of the layer solved or read back last
        self._extra: dict = {}  # what the manifest records of the layer solved last

    # ---- the engine's calls -----------------------------------------------------------------------------------

    def prepare(self) -> None:
        if self.opts.calibrated and self.device.type == "cuda":
            warm_up(self.scheme, self.device)

    def pending(self, index: int) -> bool:
        return self.output.done(index) is None

    def routed(self, index: int) -> list[int] | None:
        record = self.output.done(index) or {}
        return record.get("routed", {}).get(self.model.experts_path[index])

    def collector(self, index: int, act_fn) -> LayerHessians | None:
        if not self.opts.calibrated:
            return None
        g = self.source.experts.geometry
        return LayerHessians(g.experts, g.hidden, g.intermediate, self.device)

    def solve(self, index: int, experts: DeviceExperts | None, hessians: LayerHessians | None,
              routed: list[int] | None) -> None:
        """Quantise a MoE layer; a dense layer is only copied."""
        self._layer = None
        if experts is not None:
            if hessians is not None:
                self.world.reduce(hessians.tensors())
            self._layer = (index, *self.quantize_layer(index, experts, hessians))
        prefix = self.model.layer_names[index] + "."
        self._extra = {"losses": {k: v for k, v in self.losses.items() if k.startswith(prefix)}}
        if routed is not None:
            self._extra["routed"] = {self.model.experts_path[index]: routed}

    def write(self, index: int) -> None:
        if self.world.is_main:
            quantized, kept = self._layer[1:] if self._layer is not None else (None, None)
            self.write_unit(index, quantized, kept, self._extra)

    def written(self, index: int, chunk: Chunk) -> None:
        """Replace the quantised experts of `chunk` by what the shard holds (dequantised), in place: the weights
        the propagation pass computes with, from the layer just solved or, resumed, from its committed shard."""
        if self._layer is None or self._layer[0] != index:
            self._layer = (index, self._read_back(index), None)
        quantized = self._layer[1]
        for j, e in enumerate(chunk.block):
            for p, weight in enumerate(chunk.projections()):
                q = quantized[e][p]
                if q is not None:
                    q = Quantized(q.packed.to(self.device), q.scale.to(self.device), q.shape)
                    weight[j].copy_(unpack(q, self.scheme))

    def _read_back(self, index: int) -> list[list[Quantized | None]]:
        shard = self.output.read_unit(index)
        return [[Quantized(*(shard[f"{module}.{suffix}"] for suffix in ("weight_packed", "weight_scale",
                                                                         "weight_shape")))
                 if f"{module}.weight_packed" in shard else None for module in projections]
                for projections in self.expert_names(index)]

    # ---- quantising -------------------------------------------------------------------------------------------

    def expert_names(self, index: int) -> list[list[str]]:
        """Output module name of each expert's gate, up and down projection."""
        moe_layer = self.source.experts.layers[self.source.moe_layers[index]]
        return [[expert_module_name(expert[proj].name, e, proj) for proj in PROJECTIONS]
                for e, expert in enumerate(moe_layer.experts)]

    def quantize_layer(self, index: int, experts: DeviceExperts, stats: LayerHessians | None
                       ) -> tuple[list[list[Quantized | None]], dict[tuple[int, int], torch.Tensor]]:
        """GPTQ (stats given) or RTN of every expert projection not ignored, packed on the CPU (None for the
        projections kept as they are, which come back as their weights, on the CPU). Chunks of experts are shared
        out between the ranks and their results broadcast, so every rank holds the whole quantised layer."""
        g = self.source.experts.geometry
        keep = [[ignore_reason(self.rules, self.model.linear_name(index, e, p), ["Linear"]) is not None
                 for p in range(3)] for e in range(g.experts)]
        solver = None
        if stats is not None:
            solver = SharedSolver(stats.gate_up / stats.samples, self.scheme.weights, self.opts.dampening_frac)
        result: list[list[Quantized | None]] = [[None] * 3 for _ in range(g.experts)]
        kept: dict[tuple[int, int], torch.Tensor] = {}
        losses = torch.zeros((g.experts, 3), dtype=torch.float32, device=self.device)
        fallback = torch.zeros((g.experts, 3), dtype=torch.float32, device=self.device)
        # the rows solved together are fixed by the geometry, never by the memory plan: the same codes for any plan
        for part, chunk in enumerate(experts.chunks(gate_up_chunk(g.experts, g.intermediate))):
            owner = part % self.world.size
            if owner == self.world.rank:
                self._solve_gate_up(chunk, solver, keep, result, losses, fallback)
                self._solve_down(chunk, stats, keep, result, losses, fallback)
            for j, e in enumerate(chunk.block):
                for p, weight in enumerate(chunk.projections()):
                    if keep[e][p]:
                        kept[(e, p)] = weight[j].cpu()
                        continue
                    q = result[e][p] or self._empty_quantized(weight[j])
                    self.world.share(owner, [q.packed, q.scale])
                    result[e][p] = Quantized(q.packed.cpu(), q.scale.cpu(), q.shape)
        self.world.reduce([losses, fallback])  # each entry was written by one rank, zeros elsewhere
        for e in range(g.experts):
            for p in range(3):
                if stats is not None and not keep[e][p]:
                    name = self.model.linear_name(index, e, p)
                    self.losses[name] = float(losses[e, p])
                    if fallback[e, p] > 0:
                        self.fallbacks.append(name)
        return result, kept

    def _solve_gate_up(self, chunk: Chunk, solver, keep, result, losses, fallback) -> None:
        """The gate and up rows of a chunk of experts, stacked, against the layer's one shared Hessian."""
        block, (hidden, inter) = chunk.block, chunk.down.shape[1:]
        rows = chunk.gate_up.reshape(-1, hidden)
        scale, zp = qparams(rows, self.scheme.weights)
        q = rows
        if solver is not None:
            q, row_losses = solver.solve(rows, scale, zp)
            losses[block.start:block.stop, :2] = row_losses.view(-1, 2, inter).sum(-1)
            fallback[block.start:block.stop, :2] = float(solver.fallback)
        del rows
        q, scale, zp = (t.view(len(block), 2, inter, t.shape[-1]) for t in (q, scale, zp))
        for j, e in enumerate(block):
            for p in (0, 1):
                if not keep[e][p]:
                    result[e][p] = pack(q[j, p], scale[j, p], zp[j, p], self.scheme, self.dtype)

    def _solve_down(self, chunk: Chunk, stats, keep, result, losses, fallback) -> None:
        """The down projections of a chunk of experts, a Hessian each, in batches through quantize_weight."""
        hidden, inter = chunk.down.shape[1:]
        for first in range(chunk.block.start, chunk.block.stop, DOWN_BATCH):
            batch = slice(first, min(first + DOWN_BATCH, chunk.block.stop))
            w = chunk.down[batch.start - chunk.block.start:batch.stop - chunk.block.start]
            scale, zp = qparams(w.reshape(-1, inter), self.scheme.weights)
            scale, zp = scale.view(len(w), hidden, -1), zp.view(len(w), hidden, -1)
            if stats is not None:
                w, losses[batch, 2], rtn = solve_each(w, stats.down[batch] / stats.samples, scale, zp,
                                                      self.scheme.weights, self.opts.dampening_frac)
                fallback[batch, 2] = rtn.float()
            for j, e in enumerate(range(batch.start, batch.stop)):
                if not keep[e][2]:
                    result[e][2] = pack(w[j], scale[j], zp[j], self.scheme, self.dtype)

    def _empty_quantized(self, weight: torch.Tensor) -> Quantized:
        """Room for a projection that another rank quantises."""
        rows, cols = weight.shape
        bits = self.scheme.weights.num_bits
        return Quantized(torch.empty((rows, cols * bits // 32), dtype=torch.int32, device=self.device),
                         torch.empty((rows, scale_columns(cols, self.scheme)), dtype=self.dtype, device=self.device),
                         torch.tensor((rows, cols), dtype=torch.int64))

    # ---- writing ----------------------------------------------------------------------------------------------

    def write_unit(self, unit: int | None, quantized=None, kept=None, extra: dict | None = None) -> None:
        """The shard of one decoder layer (or, unit None, of everything outside them, the MTP layer's routed
        experts rounded to nearest in the experts' scheme): its stored weights as the source holds them (FP8
        Linears byte for byte with their scales, other FP8 decoded to bf16), then the experts packed or, where
        ignored, as read."""
        entries: list = []
        tensors: list[tuple[str, object]] = []
        for name in self.model.unit_tensors(unit):
            if self.mtp is not None and name in self.mtp.experts:
                rows, cols = self.source.logical[name][0].shape
                self._add_quantized(entries, tensors, self.mtp.experts[name], rows, cols, self._rtn(name))
            elif name.removesuffix(".weight") in self.fp8_linears:
                for info in self.source.logical[name]:  # the FP8 weight and its weight_scale_inv, as stored
                    entries.append(tensor_entry(info.name, TORCH_DTYPES[info.dtype], tuple(info.shape)))
                    tensors.append((info.name, lambda i=info: read_tensor(self.source.reader, i)))
            else:
                info = stored_weight(self.source.logical[name])
                entries.append(tensor_entry(name, written_dtype(info), tuple(info.shape)))
                tensors.append((name, lambda n=name: self.source.read(self.source.logical[n], "cpu", None)))
        if quantized is not None:
            expert_names = self.expert_names(unit)
            for e, projections in enumerate(quantized):
                for p, q in enumerate(projections):
                    module = expert_names[e][p]
                    if q is None:
                        tensor = kept[(e, p)]
                        entries.append(tensor_entry(f"{module}.weight", tensor.dtype, tuple(tensor.shape)))
                        tensors.append((f"{module}.weight", lambda t=tensor: t))
                        continue
                    rows, cols = (int(v) for v in q.shape.tolist())
                    self._add_quantized(entries, tensors, module, rows, cols, lambda q=q: q)
        self.output.write_unit("rest" if unit is None else unit, entries, tensors, extra or {})

    def _add_quantized(self, entries: list, tensors: list, module: str, rows: int, cols: int, make) -> None:
        """A quantised [rows, cols] projection's three tensors; make() gives its Quantized, called once, when the
        first of them is written (the writer takes them in order)."""
        made: list[Quantized] = []

        def part(suffix: str) -> torch.Tensor:
            if suffix == "packed":
                made[:] = [make()]
            return getattr(made[0], suffix).cpu()

        bits = self.scheme.weights.num_bits
        for suffix, dtype, shape in (("packed", torch.int32, (rows, cols * bits // 32)),
                                     ("scale", self.dtype, (rows, scale_columns(cols, self.scheme))),
                                     ("shape", torch.int64, (2,))):
            entries.append(tensor_entry(f"{module}.weight_{suffix}", dtype, shape))
            tensors.append((f"{module}.weight_{suffix}", lambda s=suffix: part(s)))

    def _rtn(self, name: str):
        """Round to nearest of one stored weight in the experts' scheme, read when called."""
        def make() -> Quantized:
            weight = self.source.read(self.source.logical[name], "cpu", self.dtype)
            scale, zp = qparams(weight, self.scheme.weights)
            return pack(weight, scale, zp, self.scheme, self.dtype)
        return make

    def finish(self, routed: dict[int, list[int]]) -> None:
        """Everything outside the decoder layers, then the index, the placement file (routed: the calibration's
        routed tokens by decoder layer), the source's side files and, last, config.json with its
        quantization_config, once every shard is in."""
        from ktq.placement import write_placement

        if self.output.done("rest") is None:
            self.write_unit(None)
        self.output.check_complete()
        self.output.write_text(INDEX_NAME, json_text({"metadata": {"total_size": self.output.total_size()},
                                                      "weight_map": self.output.weight_map()}))
        if routed:
            write_placement(self.output.folder / PLACEMENT_FILE, routed, len(self.model.layers),
                            self.source.experts.geometry.experts)
        source = Path(self.opts.model_id).expanduser()
        self.output.copy_side_files(source)
        config = json.loads((source / "config.json").read_text())
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else None
        for holder in (config, text):
            if holder is not None and isinstance(holder.get("quantization_config"), dict):
                del holder["quantization_config"]  # the source's FP8 scheme: its weights are decoded now
                holder["torch_dtype"] = self.opts.torch_dtype
        config["quantization_config"] = self.quantization_config()
        self.output.write_text(CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")

    # ---- what the checkpoint says about itself ----------------------------------------------------------------

    def module_reasons(self) -> list[str | None]:
        """For the report: each Linear of the model and each expert projection, None when quantised, else why
        it was kept."""
        skeleton = self.model.skeleton
        return list(linear_reasons(skeleton, skeleton.config.get_text_config().to_dict(), self.rules).values())

    @cached_property
    def fp8_linears(self) -> set[str]:
        """The Linears outside the routed experts whose stored weight is FP8: written as stored."""
        return {name[: -len(".weight")] for name, infos in self.source.logical.items()
                if name.endswith(".weight") and stored_weight(infos).dtype.startswith("F8_")
                and not EXPERT_WEIGHT.match(name)}

    def kept_modules(self) -> dict[str, list[str]]:
        """Every Linear written as the source holds it (its checkpoint name), with the names loaders look it up by:
        the model's non-expert Linears, the expert projections ignore rules keep, and the MTP layer's Linears, also
        under the NextN draft's names."""
        kept = {name: [name] for name in kept_linears(self.model)}
        g = self.source.experts.geometry
        for index in self.source.moe_layers:
            names = self.expert_names(index)
            kept.update((names[e][p], [names[e][p]]) for e in range(g.experts) for p in range(3)
                        if ignore_reason(self.rules, self.model.linear_name(index, e, p), ["Linear"]) is not None)
        if self.mtp is not None:
            kept.update((name, [name, nextn_name(name, self.mtp.prefix)])
                        for name in self.mtp.linears + self.mtp.kept_experts)
        return kept

    def quantization_config(self) -> dict:
        """config.json's quantization_config, as llm-compressor's save writes it: the experts' scheme as the files
        hold it (ktq.gpu.serving), every Linear left unquantised in `ignore`, and an FP8 source's FP8 Linears under
        an FP8 block scheme and sglang-kt's linear_fp8_config."""
        import compressed_tensors
        from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

        kept = self.kept_modules()
        fp8 = [name for module, names in kept.items() if module in self.fp8_linears for name in names]
        groups = {"group_0": served_scheme(self.scheme)}
        if fp8:
            groups["group_1"] = fp8_scheme(self.source.fp8_block, fp8)
        ignore = [name for module, names in kept.items() if module not in self.fp8_linears for name in names]
        config = QuantizationConfig(config_groups=groups, ignore=ignore, format="pack-quantized",
                                    quantization_status=QuantizationStatus.COMPRESSED)
        written = {"version": compressed_tensors.__version__, "quant_method": "compressed-tensors",
                   "sparsity_config": {}, "transform_config": {}, **config.model_dump(exclude=["quant_method"])}
        if fp8:
            written["linear_fp8_config"] = fp8_linear_config(self.source.fp8_block)
        return written
