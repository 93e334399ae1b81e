"""The memory plan of a `ktq gpu` run, from config.json alone (no weight is read), and the device map.

The model is instantiated on the meta device, which gives every parameter's shape for any architecture
transformers knows. llm-compressor's sequential pipeline calibrates one decoder layer at a time on the GPU:

    GPU peak = weights kept on the GPU
             + one offloaded layer, onloaded for its turn            (when some layers stay on the CPU)
             + the Hessians of that layer's quantised Linears         4 * d_in^2 bytes each, fp32
             + max(activations of one sample through the layer,      (calibration pass)
                   the working set of one GPTQ batch)                 (after the pass, Hessians still held)
             + the intermediate activations of all samples, when they fit (else they live on the CPU)
             + CUDA library workspaces                                 (a constant, GPU_OVERHEAD)
    CPU peak = weights offloaded to the CPU
             + the intermediate activations of all samples, when they are not on the GPU

The plan chooses the GPTQ batch (how many same-shape experts are solved together), then how many layers stay on
the GPU, then whether the activation cache fits beside them: batching speeds GPTQ up, an offloaded layer costs one
copy per layer, and a cache on the CPU one copy per sample and layer.
"""

from __future__ import annotations

import re
import shutil
from collections import Counter
from dataclasses import dataclass, field

from ktq.gpu.devices import Device
from ktq.gpu.layout import MoeLayout, Rule, ignore_reason
from ktq.gpu.options import GpuOptions
from ktq.hfformat import expert_count, text_config
from ktq.progress import gb

GROUP_SIZE = 128  # W4A16 and W8A16 quantise weights in groups of 128 input columns
GPTQ_BLOCK = 128  # GPTQModifier.block_size
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
WEIGHT_BITS = {"W4A16": 4, "W8A16": 8}
DEFAULT_GPU_SHARE = 0.9  # of the GPU memory free at start: the CUDA context and allocator slack need the rest
DEFAULT_CPU_SHARE = 0.85  # of the available RAM
SAVE_SHARD = 5 * 10**9  # save_pretrained's max_shard_size: a shard is assembled in RAM before it is written
# cuBLAS / cuSOLVER workspaces that torch allocates through its caching allocator; a 2-layer sample on an H100
# allocated about 20 MB beyond every other term
GPU_OVERHEAD = 64 * 2**20


@dataclass(frozen=True)
class LinearSpec:
    """A Linear layer as llm-compressor sees it after linearising fused experts."""

    name: str
    d_in: int
    d_out: int
    ignored: str | None  # the ignore rule's reason, None when quantised

    @property
    def hessian_bytes(self) -> int:
        return 4 * self.d_in * self.d_in

    @property
    def gptq_bytes(self) -> int:
        """GPTQ's working set for this module beyond its accumulated Hessian, in fp32.

        llm-compressor sizes a module at max(H + 3 W + 4 B, 3 H + 2 W) (gptq/helpers.py max_batch_size; H the
        Hessian, W the weight, B one block of columns); its H is the accumulated Hessian moved into the batch's
        stacked tensor, which the layer's Hessians already count. Measured on an H100 (8-layer sample, batches of
        128 experts): this term plus the Hessians came within 6% of the allocated peak, from above.
        """
        weight, hessian, block = self.d_in * self.d_out, self.d_in * self.d_in, self.d_out * GPTQ_BLOCK
        return 4 * max(3 * weight + 4 * block, 2 * hessian + 2 * weight)


@dataclass(frozen=True)
class TargetSpec:
    """One sequential target (a decoder layer): its weights and the Linears calibrated inside it."""

    name: str
    weight_bytes: int
    linears: tuple[LinearSpec, ...]

    @property
    def quantized(self) -> tuple[LinearSpec, ...]:
        return tuple(lin for lin in self.linears if lin.ignored is None)

    @property
    def hessian_bytes(self) -> int:
        return sum(lin.hessian_bytes for lin in self.quantized)

    def largest_batch_group(self) -> tuple[LinearSpec | None, int]:
        """The same-shape group GPTQ batches (the largest per-module working set) and its size."""
        groups = Counter((lin.d_in, lin.d_out) for lin in self.quantized)
        if not groups:
            return None, 0
        worst = max(self.quantized, key=lambda lin: lin.gptq_bytes)
        return worst, groups[(worst.d_in, worst.d_out)]


@dataclass
class Plan:
    device: Device
    method: str
    dtype: str
    weight_bytes: int
    gpu_weight_bytes: int
    cpu_weight_bytes: int
    onload_bytes: int
    device_map: dict[str, object] | None
    gpu_layers: int
    layer_names: list[str]
    target: TargetSpec | None
    activation_bytes: int
    gptq_batch: int
    gptq_batch_bytes: int
    cache_bytes: int
    cache_on_gpu: bool
    output_bytes: int
    gpu_budget: int
    cpu_budget: int
    disk_free: int
    quantized: int
    ignored: Counter
    problems: list[str] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    @property
    def hessian_bytes(self) -> int:
        return self.target.hessian_bytes if self.target and self.method == "GPTQ" else 0

    @property
    def working_bytes(self) -> int:
        """Memory of the device that calibrates, beyond the weights it keeps."""
        return self.onload_bytes + self.hessian_bytes + max(self.activation_bytes, self.gptq_batch_bytes)

    @property
    def cache_device(self) -> str:
        return self.device.torch_device if self.cache_on_gpu else "cpu"

    @property
    def gpu_peak(self) -> int:
        if not self.device.is_gpu:
            return 0
        cache = self.cache_bytes if self.cache_on_gpu else 0
        return self.gpu_weight_bytes + self.working_bytes + cache + GPU_OVERHEAD

    @property
    def cpu_peak(self) -> int:
        cache = 0 if self.cache_on_gpu else self.cache_bytes
        on_cpu = self.cpu_weight_bytes + cache + min(self.output_bytes, SAVE_SHARD)
        return on_cpu if self.device.is_gpu else on_cpu + self.working_bytes

    @property
    def fits(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {
            "device": self.device.torch_device, "device_name": self.device.name, "dtype": self.dtype,
            "weight_bytes": self.weight_bytes, "gpu_weight_bytes": self.gpu_weight_bytes,
            "cpu_weight_bytes": self.cpu_weight_bytes, "onload_bytes": self.onload_bytes,
            "gpu_layers": self.gpu_layers, "num_layers": self.num_layers,
            "largest_target": self.target.name if self.target else None,
            "hessian_linears": len(self.target.quantized) if self.target else 0,
            "hessian_bytes": self.hessian_bytes, "activation_bytes": self.activation_bytes,
            "gptq_batch": self.gptq_batch, "gptq_batch_bytes": self.gptq_batch_bytes,
            "cache_bytes": self.cache_bytes, "cache_device": self.cache_device, "output_bytes": self.output_bytes,
            "gpu_peak_bytes": self.gpu_peak, "cpu_peak_bytes": self.cpu_peak,
            "gpu_budget_bytes": self.gpu_budget, "cpu_budget_bytes": self.cpu_budget, "disk_free_bytes": self.disk_free,
            "quantized_linears": self.quantized, "ignored_linears": dict(self.ignored), "problems": self.problems,
        }


def auto_model_class(config):
    """AutoModelForImageTextToText for a multimodal config (Qwen3-VL-MoE, Qwen3.5-MoE's wrapper), else
    AutoModelForCausalLM; remote-code models resolve through their own auto_map in AutoModelForCausalLM.

    The multimodal class comes first: AutoModelForCausalLM also maps some multimodal configs (Qwen3.5-MoE's) to the
    text-only model, which has no vision tower, so the tower's Linears would be missing from what is kept."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    if type(config) in AutoModelForImageTextToText._model_mapping:
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def meta_model(config, dtype: str, trust_remote_code: bool):
    """The model with every parameter on the meta device: shapes without memory."""
    import torch
    from accelerate import init_empty_weights

    with init_empty_weights():
        return auto_model_class(config).from_config(config, dtype=getattr(torch, dtype),
                                                    trust_remote_code=trust_remote_code)


def _fused_expert_linears(name: str, module, hidden: int) -> list[tuple[str, int, int]] | None:
    """Per-expert Linears of a transformers fused-experts module (3-D gate_up_proj / up_proj and down_proj), named
    as llm-compressor's linearisation names them: `{name}.{e}.{gate,up,down}_proj`."""
    down = getattr(module, "down_proj", None)
    gate_up = getattr(module, "gate_up_proj", None)
    up = gate_up if gate_up is not None else getattr(module, "up_proj", None)
    if not all(getattr(p, "ndim", 0) == 3 for p in (down, up)):
        return None
    experts = down.shape[0]
    inter = down.shape[2] if down.shape[1] == hidden else down.shape[1]  # down is [E, H, I] or, transposed, [E, I, H]
    projections = (["gate_proj"] if gate_up is not None else []) + ["up_proj"]
    out = []
    for e in range(experts):
        out += [(f"{name}.{e}.{proj}", hidden, inter) for proj in projections]
        out.append((f"{name}.{e}.down_proj", inter, hidden))
    return out


def list_linears(model, text: dict, rules: list[Rule]) -> list[LinearSpec]:
    """Every Linear of the model, fused experts expanded, each with its ignore reason. Only the routed experts are
    quantised (the engine streams nothing else), so every other Linear is kept, for its rule's reason if one matches."""
    import torch

    hidden = int(text.get("moe_latent_size") or text["hidden_size"])
    specs: list[LinearSpec] = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            classes = [c.__name__ for c in type(module).__mro__]
            reason = ignore_reason(rules, name, classes) or "not a routed expert"
            specs.append(LinearSpec(name, module.in_features, module.out_features, reason))
            continue
        fused = _fused_expert_linears(name, module, hidden)
        for lin_name, d_in, d_out in fused or ():
            specs.append(LinearSpec(lin_name, d_in, d_out, ignore_reason(rules, lin_name, ["Linear"])))
    return specs


def decoder_layers(model) -> list[tuple[str, object]]:
    """The sequential targets llm-compressor calibrates one at a time (transformers' _no_split_modules classes),
    narrowed to the language model's `layers.N` where a vision tower's blocks are in the same list: text-only
    calibration never runs those."""
    classes = set(getattr(model, "_no_split_modules", None) or ())
    found = [(name, module) for name, module in model.named_modules() if type(module).__name__ in classes]
    text = [(name, module) for name, module in found if re.search(r"(^|\.)layers\.\d+$", name)]
    return text or found


def sequential_targets(model, linears: list[LinearSpec], dtype_bytes: int) -> list[TargetSpec]:
    """The decoder layers with their weights and the Linears calibrated inside them."""
    targets = []
    for name, module in decoder_layers(model):
        prefix = name + "."
        weight = sum(p.numel() for p in module.parameters()) * dtype_bytes
        targets.append(TargetSpec(name, weight, tuple(lin for lin in linears if lin.name.startswith(prefix))))
    return targets


def activation_bytes(text: dict, seq_len: int, dtype_bytes: int, max_d_in: int) -> int:
    """GPU memory of one calibration sample (batch size 1) passing one decoder layer, an upper estimate.

    Hidden states in, out and residual (3 L H), attention's q, k, v and output (L (2 q + 2 kv)), one expert at a
    time when every expert sees every token (gate, up and their product 3 L I, output L H), the router's logits and
    softmax in fp32 (2 L E 4 bytes), and the Hessian update, which casts the module input to fp32 and scales it
    (2 L d_in 4 bytes).
    """
    hidden = int(text["hidden_size"])
    heads = int(text.get("num_attention_heads") or 1)
    head_dim = int(text.get("head_dim") or hidden // heads)
    kv = int(text.get("num_key_value_heads") or heads) * head_dim
    inter = int(text.get("moe_intermediate_size") or text.get("intermediate_size") or hidden)
    experts = expert_count(text)
    per_token = dtype_bytes * (4 * hidden + 2 * heads * head_dim + 2 * kv + 3 * inter) + 8 * experts + 8 * max_d_in
    return seq_len * per_token


def cache_bytes(text: dict, samples: int, seq_len: int, dtype_bytes: int) -> int:
    """The CPU cache of intermediate activations: hidden states and rotary cos/sin for every sample, twice while a
    layer's outputs replace its inputs."""
    hidden = int(text["hidden_size"])
    head_dim = int(text.get("head_dim") or hidden // int(text.get("num_attention_heads") or 1))
    return 2 * samples * seq_len * dtype_bytes * (hidden + 2 * head_dim)


def output_bytes(linears: list[LinearSpec], weight_bytes: int, dtype_bytes: int, quant_type: str) -> int:
    """The checkpoint written: packed integer weights and one scale per group for quantised Linears, the rest as is."""
    bits = WEIGHT_BITS[quant_type]
    quantized = [lin for lin in linears if lin.ignored is None]
    original = sum(lin.d_in * lin.d_out for lin in quantized) * dtype_bytes
    packed = sum(lin.d_in * lin.d_out * bits // 8 + lin.d_out * -(-lin.d_in // GROUP_SIZE) * dtype_bytes
                 for lin in quantized)
    return weight_bytes - original + packed


def _device_map(model, gpu_weight_budget: int, cpu_budget: int, dtype: str) -> dict[str, object]:
    import torch
    from accelerate.utils import infer_auto_device_map

    # accelerate keeps room for the largest layer on the GPU whenever it offloads, the same room onloading needs
    return infer_auto_device_map(model, max_memory={0: max(gpu_weight_budget, 0), "cpu": cpu_budget},
                                 no_split_module_classes=list(model._no_split_modules or []),
                                 dtype=getattr(torch, dtype))


def module_sizes(model, dtype: str) -> dict[str, int]:
    import torch
    from accelerate.utils import compute_module_sizes

    return compute_module_sizes(model, dtype=getattr(torch, dtype))


def _placed_bytes(model, device_map: dict[str, object], dtype: str) -> tuple[int, int]:
    sizes = module_sizes(model, dtype)
    on_gpu = sum(sizes[name] for name, where in device_map.items() if where == 0)
    return on_gpu, sizes[""] - on_gpu


def make_plan(opts: GpuOptions, config: dict, model, layout: MoeLayout, rules: list[Rule], device: Device,
              cpu_available: int) -> Plan:
    text = text_config(config)
    width = DTYPE_BYTES[opts.torch_dtype]
    linears = list_linears(model, text, rules)
    quantized = [lin for lin in linears if lin.ignored is None]
    targets = sequential_targets(model, linears, width)
    target = max(targets, key=lambda t: (t.hessian_bytes, t.weight_bytes)) if targets else None
    weights = module_sizes(model, opts.torch_dtype)[""]  # parameters and buffers, as the device map counts them
    gptq = opts.calibrated
    max_d_in = max((lin.d_in for lin in quantized), default=0)
    act = activation_bytes(text, opts.max_sequence_length, width, max_d_in) if gptq else 0
    cache = cache_bytes(text, opts.num_calibration_samples, opts.max_sequence_length, width) if gptq else 0
    out_bytes = output_bytes(linears, weights, width, opts.quant_type)
    cpu_budget = opts.max_cpu_memory or int(cpu_available * DEFAULT_CPU_SHARE)
    gpu_budget = (opts.max_gpu_memory or int(device.free_bytes * DEFAULT_GPU_SHARE)) if device.is_gpu else 0
    parent = opts.output_dir.expanduser().resolve().parent
    disk_free = shutil.disk_usage(next(p for p in (parent, *parent.parents) if p.exists())).free

    worst, group = target.largest_batch_group() if target else (None, 0)
    plan = Plan(device=device, method=opts.quant_method, dtype=opts.torch_dtype, weight_bytes=weights,
                gpu_weight_bytes=0, cpu_weight_bytes=weights, onload_bytes=0, device_map=None, gpu_layers=0,
                layer_names=[t.name for t in targets], target=target, activation_bytes=act, gptq_batch=1,
                gptq_batch_bytes=worst.gptq_bytes if (worst and gptq) else 0, cache_bytes=cache, cache_on_gpu=False,
                output_bytes=out_bytes, gpu_budget=gpu_budget, cpu_budget=cpu_budget, disk_free=disk_free,
                quantized=len(quantized), ignored=Counter(lin.ignored for lin in linears if lin.ignored))
    if not quantized:
        plan.problems.append("no Linear layer is left to quantise once the ignore rules apply; check --ignore_patterns")
        return plan
    misaligned = [lin for lin in quantized if lin.d_in % GROUP_SIZE]
    if misaligned:
        plan.problems.append(f"{misaligned[0].name} has {misaligned[0].d_in} input features, not a multiple of the "
                             f"quantisation group size {GROUP_SIZE}; add it to --ignore_patterns")
    if device.is_gpu:
        _place_on_gpu(plan, model, worst, group, gptq, opts)
    if plan.cpu_peak > cpu_budget:
        plan.problems.append(
            f"the CPU must hold {gb(plan.cpu_peak)} (weights left on the CPU {gb(plan.cpu_weight_bytes)}, cached "
            f"activations {gb(cache)} for {opts.num_calibration_samples} samples of {opts.max_sequence_length} tokens) "
            f"but {gb(cpu_budget)} are available: raise --max_gpu_memory to keep more layers on the GPU, lower "
            f"--num_calibration_samples or --max_sequence_length, or set --max_cpu_memory")
    if out_bytes > disk_free:
        plan.problems.append(f"the output needs {gb(out_bytes)} but {parent} has {gb(disk_free)} free")
    return plan


def _place_on_gpu(plan: Plan, model, worst: LinearSpec | None, group: int, gptq: bool, opts: GpuOptions) -> None:
    """Choose the GPTQ batch, then give the GPU the weights that fit beside the working set."""
    offload_room = plan.target.weight_bytes if plan.target else 0
    fixed = plan.hessian_bytes + offload_room + GPU_OVERHEAD
    if gptq and worst is not None:
        room = plan.gpu_budget - fixed
        plan.gptq_batch = max(1, min(group, room // worst.gptq_bytes))
        plan.gptq_batch_bytes = plan.gptq_batch * worst.gptq_bytes
    working = plan.hessian_bytes + max(plan.activation_bytes, plan.gptq_batch_bytes) + GPU_OVERHEAD
    plan.device_map = _device_map(model, plan.gpu_budget - working, plan.cpu_budget, opts.torch_dtype)
    plan.gpu_weight_bytes, plan.cpu_weight_bytes = _placed_bytes(model, plan.device_map, opts.torch_dtype)
    plan.onload_bytes = offload_room if plan.cpu_weight_bytes else 0
    plan.gpu_layers = sum(1 for name in plan.layer_names if device_of(name, plan.device_map) == 0)
    plan.cache_on_gpu = plan.cache_bytes > 0 and plan.gpu_peak + plan.cache_bytes <= plan.gpu_budget
    if any(where == "disk" for where in plan.device_map.values()):
        plan.problems.append("the weights do not fit in GPU and CPU memory together, and llm-compressor cannot "
                             "calibrate from disk: raise --max_cpu_memory or use a machine with more memory")
    if plan.gpu_peak > plan.gpu_budget:
        plan.problems.append(
            f"calibrating one layer needs {gb(plan.working_bytes)} on the GPU (Hessians of "
            f"{len(plan.target.quantized) if plan.target else 0} Linears {gb(plan.hessian_bytes)}, activations "
            f"{gb(plan.activation_bytes)}, onloaded layer {gb(plan.onload_bytes)}) but {gb(plan.gpu_budget)} are "
            f"available: raise --max_gpu_memory, lower --max_sequence_length, or calibrate on the CPU with --force_cpu")


def device_of(module_name: str, device_map: dict[str, object]):
    """Where a device map puts a module: the entry of its longest prefix ('' is the whole model)."""
    owners = [key for key in device_map if key == "" or module_name == key or module_name.startswith(key + ".")]
    return device_map[max(owners, key=len)] if owners else None


def plan_json(plan: Plan, opts: GpuOptions) -> dict:
    """The plan of --dry_run --json: the run it describes, every memory term, and whether it fits."""
    return {"command": "gpu", "model_id": opts.model_id, "output_dir": str(opts.output_dir),
            "quant_method": opts.quant_method, "quant_type": opts.quant_type, **plan.as_dict(), "fits": plan.fits}


def plan_table(plan: Plan, opts: GpuOptions):
    """The plan as a rich table: each memory term, where it lives, and the budgets."""
    from rich.table import Table

    table = Table(title=f"ktq gpu plan: {opts.quant_method} {opts.quant_type} on {plan.device.name}",
                  title_justify="left")
    table.add_column("item")
    table.add_column("size", justify="right")
    table.add_column("where")
    table.add_column("note")
    place = "GPU" if plan.device.is_gpu else "CPU"
    layers = f"{plan.gpu_layers}/{plan.num_layers} layers on the GPU" if plan.device.is_gpu else "all on the CPU"
    table.add_row("weights", gb(plan.weight_bytes), layers,
                  f"GPU {gb(plan.gpu_weight_bytes)}, CPU {gb(plan.cpu_weight_bytes)}" if plan.device.is_gpu else "")
    if plan.onload_bytes:
        table.add_row("onloaded layer", gb(plan.onload_bytes), place, "one CPU-resident layer at a time")
    if plan.method == "GPTQ" and plan.target is not None:
        table.add_row("Hessians", gb(plan.hessian_bytes), place,
                      f"{len(plan.target.quantized)} Linears of {plan.target.name}, 4*d_in^2 bytes each")
        table.add_row("activations", gb(plan.activation_bytes), place,
                      f"one sample of {opts.max_sequence_length} tokens through one layer")
        table.add_row("GPTQ batch", gb(plan.gptq_batch_bytes), place, f"{plan.gptq_batch} modules solved together")
        table.add_row("activation cache", gb(plan.cache_bytes), "GPU" if plan.cache_on_gpu else "CPU",
                      f"{opts.num_calibration_samples} samples x {opts.max_sequence_length} tokens")
    table.add_row("output", gb(plan.output_bytes), "disk", f"{gb(plan.disk_free)} free")
    ignored = ", ".join(f"{n} {reason}" for reason, n in sorted(plan.ignored.items()))
    table.add_row("Linears", str(plan.quantized + sum(plan.ignored.values())), "",
                  f"{plan.quantized} quantised; kept: {ignored or 'none'}")
    if plan.device.is_gpu:
        table.add_row("GPU peak", gb(plan.gpu_peak), "GPU", f"budget {gb(plan.gpu_budget)}")
    table.add_row("CPU peak", gb(plan.cpu_peak), "CPU", f"budget {gb(plan.cpu_budget)}")
    return table
