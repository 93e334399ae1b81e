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
    weight_scheme,
)
from ktq.gpu.layout import ignore_reason
from ktq.gpu.model import ModelMap, linear_reasons
from ktq.gpu.output import CONFIG, GpuOutput, tensor_entry
from ktq.gpu.source import SourceCheckpoint, stored_weight, written_dtype
from ktq.hfformat import EXPERT_PROJECTION_NAMES, INDEX_NAME
from ktq.kernels.ktformat import PROJECTIONS

OUTPUT_NAMES = dict(zip(PROJECTIONS, EXPERT_PROJECTION_NAMES["proj"]))
MIXTRAL_NAMES = dict(zip(PROJECTIONS, EXPERT_PROJECTION_NAMES["w"]))
_FUSED_NAME = re.compile(r"^(?P<module>.*)\.(gate_up_proj|down_proj)\[expert (?P<e>\d+)")
_FUSED_LINEAR_NAME = re.compile(r"^(?P<block>.*)\.(input_linear|output_linear)\.weight\[expert (?P<e>\d+)")


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
        self.scheme = weight_scheme(opts.quant_type, opts.quant_method)
        self.losses: dict[str, float] = {}
        self.fallbacks: list[str] = []
        for record in output.manifest["units"].values():  # the layers a resumed run keeps
            self.losses.update(record.get("losses", {}))
        self._solved: dict | None = None  # the layer solved and not yet written

    # ---- the engine's calls -----------------------------------------------------------------------------------

    def pending(self, index: int) -> bool:
        return self.output.done(index) is None

    def routed(self, index: int) -> list[int] | None:
        record = self.output.done(index) or {}
        return record.get("routed", {}).get(self.model.experts_path[index])

    def collector(self, index: int, weights, act_fn) -> LayerHessians | None:
        return LayerHessians(weights[0], weights[1], act_fn) if self.opts.calibrated else None

    def solve(self, index: int, weights, hessians: LayerHessians | None, routed: list[int] | None,
              propagate: bool) -> None:
        """Quantise a MoE layer (weights then hold what the shard will); a dense layer is only copied."""
        quantized = None
        if weights is not None:
            if hessians is not None:
                self.world.reduce(hessians.tensors())
            quantized = self.quantize_layer(index, weights, hessians)
        prefix = self.model.layer_names[index] + "."
        extra: dict = {"losses": {k: v for k, v in self.losses.items() if k.startswith(prefix)}}
        if routed is not None:
            extra["routed"] = {self.model.experts_path[index]: routed}
        self._solved = {"index": index, "quantized": quantized, "weights": weights, "extra": extra}

    def write(self, index: int) -> None:
        solved, self._solved = self._solved, None
        if self.world.is_main:
            self.write_unit(index, solved["quantized"], solved["weights"], solved["extra"])

    def restore(self, index: int, weights) -> None:
        """Replace a committed layer's quantised expert weights by what its shard holds (dequantised), in place:
        the weights its propagation pass computed with when it was first written."""
        shard = self.output.read_unit(index)
        for e, projections in enumerate(self.expert_names(index)):
            for p, module in enumerate(projections):
                if f"{module}.weight_packed" in shard:
                    q = Quantized(*(shard[f"{module}.{suffix}"].to(self.device)
                                    for suffix in ("weight_packed", "weight_scale", "weight_shape")))
                    weights[p][e].copy_(unpack(q, self.scheme))

    # ---- quantising -------------------------------------------------------------------------------------------

    def expert_names(self, index: int) -> list[list[str]]:
        """Output module name of each expert's gate, up and down projection."""
        moe_layer = self.source.experts.layers[self.source.moe_layers[index]]
        return [[expert_module_name(expert[proj].name, e, proj) for proj in PROJECTIONS]
                for e, expert in enumerate(moe_layer.experts)]

    def quantize_layer(self, index: int, weights, stats: LayerHessians | None) -> list[list[Quantized | None]]:
        """GPTQ (stats given) or RTN of every expert projection not ignored; None for the projections kept as
        they are. Chunks of experts are shared out between the ranks and their results broadcast; every quantised
        weight is then replaced in place by what the output holds (dequantised), for the propagation pass, and the
        packed tensors move to the CPU for writing."""
        experts, inter, _ = weights[0].shape
        keep = [[ignore_reason(self.rules, self.model.linear_name(index, e, p), ["Linear"]) is not None
                 for p in range(3)] for e in range(experts)]
        solver = None
        if stats is not None:
            solver = SharedSolver(stats.gate_up / stats.samples, self.scheme.weights, self.opts.dampening_frac)
        result: list[list[Quantized | None]] = [[None] * 3 for _ in range(experts)]
        losses = torch.zeros((experts, 3), dtype=torch.float32, device=self.device)
        fallback = torch.zeros((experts, 3), dtype=torch.float32, device=self.device)
        step = gate_up_chunk(experts, inter)
        for chunk, first in enumerate(range(0, experts, step)):
            block = range(first, min(first + step, experts))
            owner = chunk % self.world.size
            if owner == self.world.rank:
                self._solve_gate_up(block, weights, solver, keep, result, losses, fallback)
                self._solve_down(block, weights, stats, keep, result, losses, fallback)
            for e in block:
                for p in range(3):
                    if keep[e][p]:
                        continue
                    q = result[e][p] or self._empty_quantized(weights[p][e])
                    self.world.share(owner, [q.packed, q.scale])
                    weights[p][e].copy_(unpack(q, self.scheme))
                    result[e][p] = Quantized(q.packed.cpu(), q.scale.cpu(), q.shape)
        self.world.reduce([losses, fallback])  # each entry was written by one rank, zeros elsewhere
        for e in range(experts):
            for p in range(3):
                if stats is not None and not keep[e][p]:
                    name = self.model.linear_name(index, e, p)
                    self.losses[name] = float(losses[e, p])
                    if fallback[e, p] > 0:
                        self.fallbacks.append(name)
        return result

    def _solve_gate_up(self, block: range, weights, solver, keep, result, losses, fallback) -> None:
        """The gate and up rows of a chunk of experts, stacked, against the layer's one shared Hessian."""
        gate, up, _ = weights
        inter, hidden = gate.shape[1:]
        rows = torch.stack([gate[block.start:block.stop], up[block.start:block.stop]], dim=1).reshape(-1, hidden)
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

    def _solve_down(self, block: range, weights, stats, keep, result, losses, fallback) -> None:
        """The down projections of a chunk of experts, a Hessian each, in batches through quantize_weight."""
        down = weights[2]
        hidden, inter = down.shape[1:]
        for first in range(block.start, block.stop, DOWN_BATCH):
            batch = slice(first, min(first + DOWN_BATCH, block.stop))
            w = down[batch]
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
        bits, group = self.scheme.weights.num_bits, self.scheme.weights.group_size
        return Quantized(torch.empty((rows, cols * bits // 32), dtype=torch.int32, device=self.device),
                         torch.empty((rows, -(-cols // group)), dtype=self.dtype, device=self.device),
                         torch.tensor((rows, cols), dtype=torch.int64))

    # ---- writing ----------------------------------------------------------------------------------------------

    def write_unit(self, unit: int | None, quantized=None, weights=None, extra: dict | None = None) -> None:
        """The shard of one decoder layer (or, unit None, of everything outside them): its stored weights on the
        CPU as the source holds them (FP8 decoded to bf16), then the experts packed or, where ignored, as read."""
        logical = self.source.logical
        names = self.model.unit_tensors(unit)
        tensors: list[tuple[str, object]] = [(name, lambda n=name: self.source.read(logical[n], "cpu", None))
                                             for name in names]
        stored = [stored_weight(logical[name]) for name in names]
        entries = [tensor_entry(name, written_dtype(info), tuple(info.shape)) for name, info in zip(names, stored)]
        if quantized is not None:
            expert_names = self.expert_names(unit)
            for e, projections in enumerate(quantized):
                for p, q in enumerate(projections):
                    module = expert_names[e][p]
                    if q is None:
                        tensor = weights[p][e].cpu()
                        entries.append(tensor_entry(f"{module}.weight", tensor.dtype, tuple(tensor.shape)))
                        tensors.append((f"{module}.weight", lambda t=tensor: t))
                        continue
                    for suffix, tensor in (("weight_packed", q.packed), ("weight_scale", q.scale),
                                           ("weight_shape", q.shape)):
                        tensor = tensor.cpu()
                        entries.append(tensor_entry(f"{module}.{suffix}", tensor.dtype, tuple(tensor.shape)))
                        tensors.append((f"{module}.{suffix}", lambda t=tensor: t))
        self.output.write_unit("rest" if unit is None else unit, entries, tensors, extra or {})

    def finish(self, routed: dict[int, list[int]]) -> None:
        """Everything outside the decoder layers, then the index, the placement file (routed: the calibration's
        routed tokens by decoder layer), the source's side files and, last, config.json with its
        quantization_config, once every shard is in."""
        from ktq.cpu.output import PLACEMENT_FILE
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

    def quantization_config(self) -> dict:
        """config.json's quantization_config, as llm-compressor's save writes it: the scheme, and every Linear
        left unquantised under its checkpoint name (compressed-tensors' own mapping from module names)."""
        import compressed_tensors
        from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus
        from compressed_tensors.quantization.quant_config import _map_to_checkpoint_names, get_vllm_module_type

        skeleton = self.model.skeleton
        kept = [name for name, module in skeleton.named_modules()
                if get_vllm_module_type(type(module).__name__) == "Linear"]
        kept = _map_to_checkpoint_names(skeleton, kept)
        g = self.source.experts.geometry
        for index in self.source.moe_layers:
            names = self.expert_names(index)
            kept += [names[e][p] for e in range(g.experts) for p in range(3)
                     if ignore_reason(self.rules, self.model.linear_name(index, e, p), ["Linear"]) is not None]
        config = QuantizationConfig(config_groups={"group_0": self.scheme}, ignore=kept, format="pack-quantized",
                                    quantization_status=QuantizationStatus.COMPRESSED)
        return {"version": compressed_tensors.__version__, "quant_method": "compressed-tensors",
                "sparsity_config": {}, "transform_config": {}, **config.model_dump(exclude=["quant_method"])}
