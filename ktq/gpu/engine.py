"""The streaming engine of `ktq gpu`: one decoder layer at a time from the source's shards to the output's.

    source shards --(one layer, next one decoded ahead on a thread)--> transformers' own decoder layer class
        (meta skeleton, the layer's weights assigned; routed experts in a StreamedExperts)
    calibration pass over every sample: shared gate/up Hessian, per-expert down Hessians, routed-token counts
    GPTQ (gptq.py) -> packed experts -> the layer's shard, committed atomically (output.py)
    propagation pass: the layer again, with the weights the shard holds -> the next layer's inputs

Memory: the GPU holds one layer, its Hessians, the GPTQ working set and (when the plan puts them there) the
calibration hidden states; the host one decoded layer ahead, whatever the model's depth. A killed run re-run with
the same command keeps the committed layers and replays them (propagation only, from the packed weights they hold),
so it ends with the same bytes as a run that was never interrupted.
"""

from __future__ import annotations

import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from loguru import logger

from ktq.errors import KtqError
from ktq.gpu.cpu_experts import LayerCodes, RoutedInputs, StageClock, calibrate_layer
from ktq.gpu.cpu_output import CalibratedCpuOutput
from ktq.gpu.gptq import Quantized, SharedSolver, pack, qparams, solve_each, unpack, weight_scheme
from ktq.gpu.layout import ignore_reason
from ktq.gpu.output import StreamOutput, tensor_entry
from ktq.gpu.plan import DOWN_BATCH, GATE_UP_CHUNK_ROWS, experts_module, linear_reasons
from ktq.gpu.source import SourceCheckpoint, stored_weight, written_dtype
from ktq.gpu.streamed_experts import LayerStatistics, StreamedExperts
from ktq.kernels.ktformat import PROJECTIONS

OUTPUT_NAMES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
MIXTRAL_NAMES = {"gate": "w1", "up": "w3", "down": "w2"}
_FUSED_NAME = re.compile(r"^(?P<module>.*)\.(gate_up_proj|down_proj)\[expert (?P<e>\d+)")
_FUSED_LINEAR_NAME = re.compile(r"^(?P<block>.*)\.(input_linear|output_linear)\.weight\[expert (?P<e>\d+)")


@dataclass
class CpuArtifact:
    """The calibrated CPU experts a run writes: where, and on which grid."""

    output: CalibratedCpuOutput
    bits: int
    numa: int
    chunk: int  # experts solved at a time (the plan's)


class _Stop(Exception):
    """Raised by the last input catcher: nothing past the decoder layers is needed."""


@dataclass
class Captured:
    """The calibration samples at the first decoder layer, and what the model passes every layer besides them."""

    hidden: list[torch.Tensor]  # per sample [1, T, H], on the cache device
    kwargs: list[list[dict]]  # [sample][layer] keyword arguments (position embeddings, masks, ...)


class _Catcher(torch.nn.Module):
    def __init__(self, index: int, last: bool, sink: list) -> None:
        super().__init__()
        self.index, self.last, self.sink = index, last, sink

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if args[1:]:
            raise KtqError("the decoder layers take positional arguments besides the hidden states; ktq gpu passes "
                           "them by name only")
        self.sink.append((self.index, hidden, kwargs))
        if self.last:
            raise _Stop
        return hidden


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


class Engine:
    def __init__(self, opts, source: SourceCheckpoint, skeleton, layer_names: list[str], rules, device, cache_device,
                 world, progress, output: StreamOutput | None, cpu: CpuArtifact | None = None) -> None:
        """output: the GPU checkpoint's staging folder (None: only CPU experts are made); cpu: the calibrated CPU
        experts to write beside it (ktq cpu --calibrate, ktq gpu --cpu-output)."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key

        self.opts, self.source, self.skeleton, self.rules = opts, source, skeleton, rules
        self.layer_names, self.device, self.cache_device = layer_names, torch.device(device), cache_device
        self.world, self.progress, self.output, self.cpu = world, progress, output, cpu
        # the calibrated CPU experts' codes of one layer on the host, the same (pinned) buffers for every layer
        self.cpu_codes = LayerCodes(pin=self.device.type == "cuda") if cpu is not None else None
        self.dtype = getattr(torch, opts.torch_dtype)
        self.scheme = weight_scheme(opts.quant_type, opts.quant_method)
        text = skeleton.config.get_text_config()
        self.hidden_act = getattr(text, "hidden_act", None) or "silu"
        renamings = [t for t in get_model_conversion_mapping(skeleton) if isinstance(t, WeightRenaming)]
        self.logical = source.logical_names()
        # module path of every stored weight (transformers' renamings applied), and the reverse
        self.module_of = {name: rename_source_key(name, renamings, [])[0] for name in self.logical}
        self.stored_as = {module: name for name, module in self.module_of.items()}
        self.layers = [skeleton.get_submodule(name) for name in layer_names]
        self.experts_path = [self._experts_path(name, layer) for name, layer in zip(layer_names, self.layers)]
        self._ahead = ThreadPoolExecutor(1, thread_name_prefix="ktq-prefetch")
        self._next: tuple[int, Future] | None = None
        self.losses: dict[str, float] = {}
        self.routed: dict[str, list[int]] = {}
        self.fallbacks: list[str] = []
        self.layer_seconds: dict[str, dict[str, float]] = {}  # decoder layer -> stage -> seconds

    # ---- what is where ----------------------------------------------------------------------------------------

    @staticmethod
    def _experts_path(name: str, layer) -> str | None:
        sub = experts_module(layer)
        return f"{name}.{sub}" if sub is not None else None

    def unit_tensors(self, unit: int | None) -> list[str]:
        """Stored weights of decoder layer `unit` outside its routed experts (None: everything outside the decoder
        layers, the embeddings, final norm, lm_head and MTP layers included), sorted."""
        names = []
        for name, module in self.module_of.items():
            layer = self._layer_index(module)
            if layer != unit:
                continue
            experts = self.experts_path[layer] if layer is not None else None
            if experts is not None and module.startswith(experts + "."):
                continue
            names.append(name)
        return sorted(names)

    def _layer_index(self, module: str) -> int | None:
        for index, name in enumerate(self.layer_names):
            if module.startswith(name + "."):
                return index
        return None

    # ---- reading ----------------------------------------------------------------------------------------------

    def _expert_weights(self, layer: int) -> np.ndarray:
        """All experts of a decoder layer as bf16 bits [E, 3, I * H] (gate, up, down), decoded on the CPU."""
        moe_layer = self.source.experts.layers[self.source.moe_layers[layer]]
        g = self.source.experts.geometry
        out = np.empty((g.experts, 3, g.intermediate * g.hidden), np.uint16)
        scratch = np.empty(max(self.source.experts.scratch_bytes, 1), np.uint8)
        for e, expert in enumerate(moe_layer.experts):
            for p, proj in enumerate(PROJECTIONS):
                expert[proj].read(self.source.reader, out[e, p], scratch)
        return out

    def prefetch(self, layer: int) -> None:
        if layer < len(self.layers) and layer in self.source.moe_layers and self._next is None:
            self._next = (layer, self._ahead.submit(self._expert_weights, layer))

    def experts_on_device(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._next is None or self._next[0] != layer:
            self.prefetch(layer)
        _, future = self._next
        self._next = None
        bits = torch.from_numpy(future.result()).view(torch.bfloat16).to(self.device, self.dtype)
        g = self.source.experts.geometry
        e, i, h = g.experts, g.intermediate, g.hidden
        return bits[:, 0].view(e, i, h), bits[:, 1].view(e, i, h), bits[:, 2].view(e, h, i)

    def materialise(self, index: int):
        """Decoder layer `index` with its weights on the device, routed experts left out (on meta)."""
        from accelerate.utils import set_module_tensor_to_device

        layer, name = self.layers[index], self.layer_names[index]
        experts = self.experts_path[index]
        for pname, _ in list(layer.named_parameters()):
            full = f"{name}.{pname}"
            if experts is not None and full.startswith(experts + "."):
                continue
            stored = self.stored_as.get(full)
            if stored is None:
                raise KtqError(f"{full} is missing from the checkpoint (transformers' "
                               f"{type(self.skeleton).__name__} has this parameter)")
            set_module_tensor_to_device(layer, pname, self.device,
                                        value=self.source.read(self.logical[stored], self.device, self.dtype))
        for bname, buffer in list(layer.named_buffers()):
            set_module_tensor_to_device(layer, bname, self.device, value=buffer)
        return layer

    def release(self, index: int) -> None:
        self.layers[index].to_empty(device="meta")

    # ---- calibration inputs -----------------------------------------------------------------------------------

    def capture(self, dataset) -> Captured:
        """Each sample's hidden states at the first decoder layer and every layer's other arguments, from the
        model's own forward up to the first layer (embeddings, rotary embeddings, masks)."""
        from accelerate.utils import set_module_tensor_to_device

        base_name = self.layer_names[0].rsplit(".", 2)[0]
        base = self.skeleton.get_submodule(base_name)
        container = self.skeleton.get_submodule(self.layer_names[0].rsplit(".", 1)[0])
        for pname, _ in list(base.named_parameters()):
            full = f"{base_name}.{pname}"
            if self._layer_index(full) is not None:
                continue
            stored = self.stored_as.get(full)
            if stored is not None:
                set_module_tensor_to_device(base, pname, self.device,
                                            value=self.source.read(self.logical[stored], self.device, self.dtype))
        for bname, buffer in list(base.named_buffers()):
            if self._layer_index(f"{base_name}.{bname}") is None:
                set_module_tensor_to_device(base, bname, self.device, value=buffer)
        originals = list(container)
        sink: list = []
        count = len(originals)
        for i in range(count):
            container[i] = _Catcher(i, i == count - 1, sink)
        captured = Captured([], [])
        try:
            for ids in dataset["input_ids"]:
                sink.clear()
                try:
                    with torch.no_grad():
                        base(input_ids=torch.tensor([ids], device=self.device), use_cache=False)
                except _Stop:
                    pass
                except (TypeError, ValueError) as exc:
                    # e.g. GLM-5's layers hand their top-k indices on to the next layer, beside the hidden states
                    raise KtqError(f"{type(self.skeleton).__name__}'s decoder layers pass more than hidden states "
                                   f"from one layer to the next ({exc}); ktq gpu calibrates layer by layer on "
                                   "hidden states alone: use --quant_method RTN for this model") from exc
                captured.hidden.append(sink[0][1].to(self.cache_device))
                captured.kwargs.append([kwargs for _, _, kwargs in sink])
        finally:
            for i, layer in enumerate(originals):
                container[i] = layer
        return captured

    # ---- one layer --------------------------------------------------------------------------------------------

    def forward_all(self, layer, captured: Captured, index: int, keep: bool) -> None:
        for s, hidden in enumerate(captured.hidden):
            out = layer(hidden.to(self.device), **captured.kwargs[s][index])
            out = out[0] if isinstance(out, tuple) else out
            if keep:
                captured.hidden[s] = out.to(self.cache_device)
            else:
                self.progress.step(index)

    def expert_names(self, index: int) -> list[list[str]]:
        """Output module name of each expert's gate, up and down projection."""
        moe_layer = self.source.experts.layers[self.source.moe_layers[index]]
        return [[expert_module_name(expert[proj].name, e, proj) for proj in PROJECTIONS]
                for e, expert in enumerate(moe_layer.experts)]

    def report_name(self, index: int, e: int, proj: str) -> str:
        """The name llm-compressor gives the Linear of one expert projection (its report key and ignore target)."""
        return f"{self.experts_path[index]}.{e}.{OUTPUT_NAMES[proj]}"

    def quantize_layer(self, index: int, weights, stats: LayerStatistics | None) -> list[list[Quantized | None]]:
        """GPTQ (stats given) or RTN of every expert projection not ignored; None for the projections kept as
        they are. Chunks of experts are shared out between the ranks and their results broadcast; every quantised
        weight is then replaced in place by what the output holds (dequantised), for the propagation pass, and the
        packed tensors move to the CPU for writing."""
        experts, inter, _ = weights[0].shape
        keep = [[ignore_reason(self.rules, self.report_name(index, e, proj), ["Linear"]) is not None
                 for proj in PROJECTIONS] for e in range(experts)]
        solver = None
        if stats is not None:
            solver = SharedSolver(stats.gate_up / stats.samples, self.scheme.weights, self.opts.dampening_frac)
        result: list[list[Quantized | None]] = [[None] * 3 for _ in range(experts)]
        losses = torch.zeros((experts, 3), dtype=torch.float32, device=self.device)
        fallback = torch.zeros((experts, 3), dtype=torch.float32, device=self.device)
        step = max(1, GATE_UP_CHUNK_ROWS // (2 * inter))
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
            for p, proj in enumerate(PROJECTIONS):
                if stats is not None and not keep[e][p]:
                    name = self.report_name(index, e, proj)
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

    def write_unit(self, unit: int | None, quantized=None, expert_names=None, weights=None, extra: dict | None = None):
        """The shard of one decoder layer (or, unit None, of everything outside them): its stored weights on the
        CPU as the source holds them (FP8 decoded to bf16), then the experts packed or, where ignored, as read."""
        names = self.unit_tensors(unit)
        tensors: list[tuple[str, object]] = [(name, lambda n=name: self.source.read(self.logical[n], "cpu", None))
                                             for name in names]
        stored = [stored_weight(self.logical[name]) for name in names]
        entries = [tensor_entry(name, written_dtype(info), tuple(info.shape)) for name, info in zip(names, stored)]
        if quantized is not None:
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

    # ---- what the output says about itself ------------------------------------------------------------------

    def routed_by_layer(self) -> dict[int, list[int]]:
        """The routed calibration tokens of every expert, by decoder layer index (for the placement file)."""
        return {index: self.routed[path] for index, path in enumerate(self.experts_path) if path in self.routed}

    def module_reasons(self) -> list[str | None]:
        """For the report: each Linear of the model and each expert projection, None when quantised, else why
        it was kept."""
        return list(linear_reasons(self.skeleton, self.skeleton.config.get_text_config().to_dict(),
                                   self.rules).values())

    def quantization_config(self) -> dict:
        """config.json's quantization_config, as llm-compressor's save writes it: the scheme, and every Linear
        left unquantised under its checkpoint name (compressed-tensors' own mapping from module names)."""
        import compressed_tensors
        from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus
        from compressed_tensors.quantization.quant_config import _map_to_checkpoint_names, get_vllm_module_type

        kept = [name for name, module in self.skeleton.named_modules()
                if get_vllm_module_type(type(module).__name__) == "Linear"]
        kept = _map_to_checkpoint_names(self.skeleton, kept)
        g = self.source.experts.geometry
        for index in self.source.moe_layers:
            names = self.expert_names(index)
            kept += [names[e][p] for e in range(g.experts) for p, proj in enumerate(PROJECTIONS)
                     if ignore_reason(self.rules, self.report_name(index, e, proj), ["Linear"]) is not None]
        config = QuantizationConfig(config_groups={"group_0": self.scheme}, ignore=kept, format="pack-quantized",
                                    quantization_status=QuantizationStatus.COMPRESSED)
        return {"version": compressed_tensors.__version__, "quant_method": "compressed-tensors",
                "sparsity_config": {}, "transform_config": {}, **config.model_dump(exclude=["quant_method"])}

    # ---- the run ----------------------------------------------------------------------------------------------

    def run(self, dataset) -> None:
        """Every decoder layer in order (committed ones only replayed), then everything outside them."""
        captured = self.capture(dataset) if dataset is not None else None
        self.prefetch(self._next_moe_layer(-1))
        for index in range(len(self.layers)):
            self._layer(index, captured)
        if self.world.is_main and self.output is not None and self.output.done("rest") is None:
            self.write_unit(None)
        self._ahead.shutdown()

    def _next_moe_layer(self, after: int) -> int:
        return next((i for i in range(after + 1, len(self.layers)) if i in self.source.moe_layers), len(self.layers))

    def _layer(self, index: int, captured: Captured | None) -> None:
        """One decoder layer: calibrated and written where an artifact still lacks it, else only replayed from
        what was written (the propagation weights: the GPU checkpoint's when there is one, else the CPU experts')."""
        is_moe = index in self.source.moe_layers
        path = self.experts_path[index]
        gpu_done = self.output.done(index) if self.output is not None else None
        if gpu_done is not None:
            self.losses.update(gpu_done.get("losses", {}))
            self.routed.update(gpu_done.get("routed", {}))
        gpu_pending = self.output is not None and gpu_done is None
        cpu_pending = self.cpu is not None and is_moe and not self.cpu.output.done(index)
        if self.cpu is not None and is_moe and not cpu_pending and path not in self.routed:
            self.routed[path] = self.cpu.output.routed(index)
        propagate = captured is not None and index < len(self.layers) - 1
        if not (gpu_pending or cpu_pending or propagate):
            return
        times: dict[str, float] = {}
        clock = time.perf_counter()
        weights = self.experts_on_device(index) if is_moe else None
        # on a GPU the next layer is decoded while this one calibrates; on the CPU both would share the same
        # cores, so the next layer waits until this one is solved and the host holds one decoded layer less
        if self.device.type != "cpu":
            self.prefetch(self._next_moe_layer(index))
        layer = self.materialise(index) if captured is not None else None
        experts = None
        if is_moe and layer is not None:
            experts = StreamedExperts(*weights, self.hidden_act)
            layer.set_submodule(path[len(self.layer_names[index]) + 1:], experts)
        times["read"], clock = time.perf_counter() - clock, time.perf_counter()
        quantized, stats, extra = None, None, {}
        if is_moe and (gpu_pending or cpu_pending) and captured is not None:
            g = self.source.experts.geometry
            if gpu_pending:
                stats = experts.statistics = LayerStatistics(g.experts, g.hidden, g.intermediate, self.device)
            if cpu_pending:
                experts.inputs = RoutedInputs(self.cache_device)
            self.forward_all(layer, captured, index, keep=False)
            experts.statistics = None
            if stats is not None:
                self.world.reduce(stats.tensors())
                self.routed[path] = stats.routed.tolist()
            times["calibrate"], clock = time.perf_counter() - clock, time.perf_counter()
        cpu_codes = None
        if cpu_pending:
            inputs, experts.inputs = experts.inputs, None
            stages = StageClock(self.device)
            gate, up, down, routed = calibrate_layer(*weights, inputs, experts.act_fn, self.cpu.bits, self.cpu.numa,
                                                     self.cpu.chunk, self.cpu_codes, stages)
            logger.info(f"{path} CPU experts, {self.cpu.chunk} at a time: "
                        + ", ".join(f"{k} {v:.2f} s" for k, v in stages.seconds.items()))
            del inputs
            self.routed.setdefault(path, routed)
            if self.world.is_main:
                self.cpu.output.write_layer(index, gate, up, down, routed)
            cpu_codes = (gate, up, down)
            times["cpu experts"], clock = time.perf_counter() - clock, time.perf_counter()
        if gpu_pending:
            if is_moe:
                quantized = self.quantize_layer(index, weights, stats)
                times["solve"], clock = time.perf_counter() - clock, time.perf_counter()
            extra = {"losses": {k: v for k, v in self.losses.items() if k.startswith(self.layer_names[index] + ".")}}
            if path in self.routed:
                extra["routed"] = {path: self.routed[path]}
        self.prefetch(self._next_moe_layer(index))
        if gpu_pending and self.world.is_main:
            if is_moe:
                self.write_unit(index, quantized, self.expert_names(index), weights, extra)
            else:
                self.write_unit(index, extra=extra)
            times["write"], clock = time.perf_counter() - clock, time.perf_counter()
        if is_moe and propagate:
            if self.output is not None:
                if not gpu_pending:
                    self.restore(index, weights)
            else:
                if cpu_codes is None:
                    self.cpu.output.restore_into(index, weights)
                else:
                    for weight, codes in zip(weights, cpu_codes):
                        codes.dequantize_into(weight, self.cpu.bits)
        del cpu_codes
        if propagate:
            self.forward_all(layer, captured, index, keep=True)
            times["propagate"] = time.perf_counter() - clock
        if layer is not None:
            self.release(index)
        if experts is not None:
            experts.gate = experts.up = experts.down = None
        if captured is None:
            self.progress.step(index)
        self.layer_seconds[self.layer_names[index]] = {k: round(v, 3) for k, v in times.items()}
        replayed = gpu_done is not None or (self.cpu is not None and is_moe and not cpu_pending)
        logger.info(f"{self.layer_names[index]}{' (replayed)' if replayed else ''}: "
                    + ", ".join(f"{k} {v:.2f} s" for k, v in times.items()))
