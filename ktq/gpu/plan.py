"""The plan of a `ktq gpu` run, before any weight is read: memory per layer on the GPU and the host, disk, time.

The model is instantiated on the meta device, which gives every parameter's shape for any architecture transformers
knows; the source's safetensors headers (when the folder holds them) say whether the streaming engine can read it.
The engine (engine.py) holds one decoder layer at a time:

    GPU peak  = one decoder layer (its experts in bf16, the rest in --torch_dtype)
              + the layer's Hessians: one shared gate/up Hessian 4 H^2 and one down Hessian 4 I^2 per expert (GPTQ)
              + max(one sample's activations through the layer, the GPTQ working set of one chunk of experts)
              + the calibration hidden states of every sample, when they fit (else they stay on the host)
              + CUDA library workspaces (GPU_OVERHEAD)
    host peak = this process before the run (interpreter, torch, transformers: measured now)
              + the next layer's experts, decoded ahead (bf16)
              + the current layer's packed experts on their way to the disk
              + the calibration hidden states, when they are not on the GPU
    (calibrating on the CPU, everything above is host memory, the current layer once more)

With --max_gpu_memory the plan is for a GPU of that size, also on a machine without one (users plan before they
rent); its time estimate then uses nominal rates of an H100-class GPU, otherwise rates measured here in a fraction
of a second.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ktq.errors import KtqError
from ktq.gpu.devices import Device
from ktq.gpu.layout import MoeLayout, Rule
from ktq.gpu.model import DTYPE_BYTES, LayerSpec, layer_specs, linear_reasons
from ktq.gpu.options import GpuOptions
from ktq.hfformat import text_config
from ktq.progress import gb
from ktq.serving import TP_SIZES, tp_problem, tp_summary

WEIGHT_BITS = {"W4A16": 4, "W8A16": 8}
DEFAULT_GPU_SHARE = 0.9  # of the GPU memory free at start: the CUDA context and allocator slack need the rest
DEFAULT_CPU_SHARE = 0.85  # of the available RAM
GPU_OVERHEAD = 256 * 2**20  # cuBLAS / cuSOLVER workspaces and allocator slack beyond the terms above
# nominal rates of an H100-class GPU for planning without one (dense bf16 and fp32 matrix products, as reached)
NOMINAL_RATES = {"bf16": 500e12, "fp32": 45e12, "read": 2e9}


@dataclass
class Plan:
    device: Device
    planned_gpu: bool  # the GPU is the one --max_gpu_memory describes, not one of this machine
    method: str
    dtype: str
    quant_type: str
    layers: list[LayerSpec]
    top_k: int
    samples: int
    seq_len: int
    hessian_bytes: int
    solve_bytes: int
    activation_bytes: int
    cache_bytes: int
    packed_bytes: int  # one layer's experts as written
    output_bytes: int
    process_bytes: int
    gpu_budget: int
    cpu_budget: int
    disk_free: int
    quantized: int
    ignored: Counter
    source_note: str  # what was checked of the weights
    rates: dict[str, float] = field(default_factory=dict)
    rates_measured: bool = False
    gpu_artifact: bool = True  # a GPU checkpoint is written (not for ktq cpu --calibrate)
    cpu_experts: str | None = None  # kt method of the calibrated CPU experts written too, if any
    cpu_solve_bytes: int = 0  # Hessians of one chunk of CPU experts (ktq.calibrated.solve.stacked_bytes)
    cpu_chunk: int = 1  # CPU experts solved at a time
    cache_on_gpu: bool = False
    tp_sizes: dict[int, str | None] = field(default_factory=dict)  # sglang TP size -> why it cannot serve, or None
    problems: list[str] = field(default_factory=list)

    @property
    def layer(self) -> LayerSpec:
        """The largest decoder layer: the one every memory term is sized for."""
        return max(self.layers, key=lambda spec: spec.weight_bytes)

    @property
    def moe(self) -> LayerSpec | None:
        moe = [spec for spec in self.layers if spec.experts]
        return max(moe, key=lambda spec: spec.expert_bytes) if moe else None

    @property
    def moe_layers(self) -> int:
        return sum(1 for spec in self.layers if spec.experts)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def cache_device(self) -> str:
        return self.device.torch_device if self.cache_on_gpu else "cpu"

    @property
    def working_bytes(self) -> int:
        """Memory of the device that calibrates beyond the cached hidden states."""
        return self.layer.weight_bytes + self.hessian_bytes + max(self.activation_bytes, self.solve_bytes,
                                                                   self.cpu_solve_bytes)

    @property
    def gpu_peak(self) -> int:
        if not self.device.is_gpu:
            return 0
        return self.working_bytes + (self.cache_bytes if self.cache_on_gpu else 0) + GPU_OVERHEAD

    @property
    def cpu_peak(self) -> int:
        ahead = self.moe.expert_bytes if self.moe else 0
        # calibrated CPU experts: the layer's int8 codes wait on the host until they are packed and written
        codes = 3 * self.moe.experts * self.moe.hidden * self.moe.intermediate if self.cpu_experts and self.moe else 0
        host = (self.process_bytes + ahead + self.packed_bytes + codes
                + (0 if self.cache_on_gpu else self.cache_bytes))
        return host if self.device.is_gpu else host + self.working_bytes

    @property
    def fits(self) -> bool:
        return not self.problems

    def seconds(self) -> dict[str, float]:
        """Time per stage over the whole run, from the arithmetic of each layer and the rates."""
        tokens = self.samples * self.seq_len
        stages = {"read": 0.0, "calibrate": 0.0, "hessians": 0.0, "solve": 0.0, "cpu experts": 0.0,
                  "propagate": 0.0}
        for spec in self.layers:
            stages["read"] += spec.weight_bytes / self.rates["read"]
            dense = 2 * tokens * spec.dense_bytes / DTYPE_BYTES[self.dtype]  # two FLOPs per weight and token
            if not spec.experts:
                stages["propagate"] += dense / self.rates["bf16"]
                continue
            h, i, e = spec.hidden, spec.intermediate, spec.experts
            if self.method != "GPTQ":
                continue
            routed = tokens * self.top_k
            if self.gpu_artifact:  # every expert on every token: the all-token Hessians of llm-compressor's GPTQ
                stages["calibrate"] += (dense + tokens * e * 4 * h * i) / self.rates["bf16"]
                stages["hessians"] += tokens * 2 * (h * h + e * i * i) / self.rates["fp32"]
                stages["solve"] += 2 * e * (2 * i * h * h + h * i * i) / self.rates["fp32"]
            else:
                stages["calibrate"] += dense / self.rates["bf16"]
            if self.cpu_experts:  # Hessians of the routed tokens, then the same solve on kt-kernel's grid
                stages["cpu experts"] += (routed * 2 * (h * h + i * i + 2 * h * i)
                                          + 2 * e * (2 * i * h * h + h * i * i)) / self.rates["fp32"]
            stages["propagate"] += (dense + routed * 6 * h * i) / self.rates["bf16"]
        return stages

    def as_dict(self) -> dict:
        largest, moe = self.layer, self.moe
        return {
            "device": self.device.torch_device, "device_name": self.device.name, "planned_gpu": self.planned_gpu,
            "dtype": self.dtype, "num_layers": self.num_layers, "moe_layers": self.moe_layers,
            "largest_layer": largest.name, "layer_bytes": largest.weight_bytes,
            "experts": moe.experts if moe else 0, "hessian_bytes": self.hessian_bytes,
            "hessians": moe.experts + 1 if moe and self.method == "GPTQ" else 0,
            "activation_bytes": self.activation_bytes, "solve_bytes": self.solve_bytes,
            "cache_bytes": self.cache_bytes, "cache_device": self.cache_device, "packed_layer_bytes": self.packed_bytes,
            "output_bytes": self.output_bytes, "process_bytes": self.process_bytes,
            "gpu_peak_bytes": self.gpu_peak, "cpu_peak_bytes": self.cpu_peak, "gpu_budget_bytes": self.gpu_budget,
            "cpu_budget_bytes": self.cpu_budget, "disk_free_bytes": self.disk_free,
            "seconds": {k: round(v, 1) for k, v in self.seconds().items()},
            "seconds_total": round(sum(self.seconds().values()), 1),
            "rates": self.rates, "rates_measured": self.rates_measured, "source": self.source_note,
            "quantized_linears": self.quantized, "ignored_linears": dict(self.ignored), "problems": self.problems,
            "gpu_checkpoint": self.gpu_artifact, "cpu_experts": self.cpu_experts,
            "cpu_solve_bytes": self.cpu_solve_bytes, "cpu_chunk": self.cpu_chunk,
            "tp_sizes": [tp for tp, problem in self.tp_sizes.items() if problem is None],
        }


def activation_bytes(text: dict, seq_len: int, dtype_bytes: int, spec: LayerSpec) -> int:
    """GPU memory of one calibration sample passing one decoder layer, an upper estimate: hidden states in, out and
    residual (3 L H), attention's q, k, v and output (L (2 q + 2 kv)), one expert's gate, up and their product
    (3 L I) at a time, the router's logits and softmax in fp32 (2 L E 4), and the Hessian update, which casts the
    input to fp32 and scales it (2 L d_in 4)."""
    hidden = int(text["hidden_size"])
    heads = int(text.get("num_attention_heads") or 1)
    head_dim = int(text.get("head_dim") or hidden // heads)
    kv = int(text.get("num_key_value_heads") or heads) * head_dim
    per_token = (dtype_bytes * (4 * hidden + 2 * heads * head_dim + 2 * kv + 3 * spec.intermediate)
                 + 8 * spec.experts + 8 * max(hidden, spec.intermediate))
    return seq_len * per_token


def cache_bytes(text: dict, samples: int, seq_len: int, dtype_bytes: int) -> int:
    """The calibration hidden states of every sample (one layer's outputs replace its inputs sample by sample)
    and each sample's rotary cos/sin."""
    hidden = int(text["hidden_size"])
    head_dim = int(text.get("head_dim") or hidden // int(text.get("num_attention_heads") or 1))
    return samples * seq_len * (dtype_bytes * hidden + 2 * 4 * head_dim)


def packed_bytes(spec: LayerSpec, quant_type: str, group_size: int, dtype_bytes: int) -> int:
    """One layer's experts as written: packed integers and one scale per row and group of inputs (per row for
    group_size -1)."""
    bits = WEIGHT_BITS[quant_type]
    h, i = spec.hidden, spec.intermediate

    def groups(columns: int) -> int:
        return -(-columns // group_size) if group_size > 0 else 1

    per_expert = 3 * h * i * bits // 8 + dtype_bytes * (2 * i * groups(h) + h * groups(i))
    return spec.experts * per_expert


def measured_rates(device: Device) -> dict[str, float]:
    """Matrix-product rates of this device in bf16 and fp32, from a fraction of a second of products."""
    import torch

    size = 4096 if device.is_gpu else 512
    rates = {}
    for label, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a = torch.randn(size, size, device=device.torch_device, dtype=dtype)
        torch.mm(a, a)
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < 0.05 or runs < 2:
            torch.mm(a, a)
            runs += 1
            if device.is_gpu:
                torch.cuda.synchronize()
        rates[label] = 2 * size**3 * runs / (time.perf_counter() - start)
    rates["read"] = NOMINAL_RATES["read"]
    return rates


def _process_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def check_source(model_id: str):
    """The streaming engine reads local safetensors: the source opened (headers only) and checked, or None when the
    folder holds only config.json (planning before the download)."""
    from ktq.gpu.source import SourceCheckpoint
    from ktq.hfformat import INDEX_NAME

    folder = Path(model_id).expanduser()
    if not folder.is_dir():
        raise KtqError(f"--model_id {model_id} is not a local folder: ktq gpu reads the checkpoint's safetensors "
                       "one layer at a time, so download it first (e.g. huggingface-cli download "
                       f"{model_id} --local-dir DIR) and pass the folder")
    if not (folder / INDEX_NAME).exists() and not any(folder.glob("*.safetensors")):
        return None
    return SourceCheckpoint.open(folder)


def make_plan(opts: GpuOptions, config: dict, model, layout: MoeLayout, rules: list[Rule], device: Device,
              cpu_available: int, source=None) -> Plan:
    import torch

    from ktq.gpu.gptq import working_set_bytes  # llm-compressor's solver: imported when a plan is made

    text = text_config(config)
    width = DTYPE_BYTES[opts.torch_dtype]
    specs = layer_specs(model, text, opts.torch_dtype)
    planned = not device.is_gpu and opts.max_gpu_memory is not None and not opts.force_cpu
    if planned:
        device = Device("cuda", f"a GPU of {gb(opts.max_gpu_memory)}", opts.max_gpu_memory, opts.max_gpu_memory)
    gptq = opts.calibrated
    moe = [spec for spec in specs if spec.experts]
    largest_moe = max(moe, key=lambda spec: spec.expert_bytes) if moe else None
    samples, seq = (opts.num_calibration_samples, opts.max_sequence_length) if gptq else (0, 0)
    reasons = list(linear_reasons(model, text, rules).values())
    quantized = reasons.count(None)
    kept = Counter(reason for reason in reasons if reason is not None)
    parent = (opts.output_dir or opts.cpu_experts.output).expanduser().resolve().parent
    disk_free = shutil.disk_usage(next(p for p in (parent, *parent.parents) if p.exists())).free
    packed = packed_bytes(largest_moe, opts.quant_type, opts.group_size, width) if largest_moe else 0
    output = sum(spec.dense_bytes for spec in specs) + sum(packed_bytes(s, opts.quant_type, opts.group_size, width)
                                                          for s in moe)
    output += sum(p.numel() for name, p in model.named_parameters()
                  if not any(name.startswith(spec.name + ".") for spec in specs)) * width
    if opts.output_dir is None:
        output = 0
    if opts.cpu_experts is not None:
        output += sum(cpu_experts_bytes(spec, opts.cpu_experts) for spec in moe)
    plan = Plan(device=device, planned_gpu=planned, method=opts.quant_method, dtype=opts.torch_dtype,
                quant_type=opts.quant_type, layers=specs, top_k=int(text.get("num_experts_per_tok") or 1),
                samples=samples, seq_len=seq,
                hessian_bytes=4 * (largest_moe.hidden ** 2 + largest_moe.experts * largest_moe.intermediate ** 2)
                if (gptq and largest_moe and opts.output_dir is not None) else 0,
                solve_bytes=working_set_bytes(largest_moe.experts, largest_moe.hidden, largest_moe.intermediate, width)
                if largest_moe and opts.output_dir is not None else 0,
                activation_bytes=activation_bytes(text, seq, width, largest_moe or specs[0]) if gptq else 0,
                # calibrating CPU experts keeps each token's input to the experts as well (ktq.calibrated.routed)
                cache_bytes=cache_bytes(text, samples, seq, width) * (2 if opts.cpu_experts else 1) if gptq else 0,
                packed_bytes=packed,
                output_bytes=output, process_bytes=_process_bytes(),
                gpu_budget=(opts.max_gpu_memory or int(device.free_bytes * DEFAULT_GPU_SHARE)) if device.is_gpu else 0,
                cpu_budget=opts.max_cpu_memory or int(cpu_available * DEFAULT_CPU_SHARE), disk_free=disk_free,
                quantized=quantized, ignored=kept,
                source_note="safetensors headers read and checked" if source is not None
                else "config.json only: the weights were not checked")
    plan.gpu_artifact = opts.output_dir is not None
    if opts.cpu_experts is not None and largest_moe is not None:
        from ktq.kernels.ktformat import METHODS

        plan.cpu_experts = METHODS[opts.cpu_experts.method].kt_method
        _size_cpu_chunk(plan, largest_moe)
    plan.rates_measured = not planned and (torch.cuda.is_available() or not device.is_gpu)
    plan.rates = measured_rates(device) if plan.rates_measured else NOMINAL_RATES
    if not moe or not quantized:
        plan.problems.append("no routed-expert projection is left to quantise once the ignore rules apply; "
                             "check --ignore_patterns")
        return plan
    group = opts.group_size
    misaligned = next((spec for spec in moe if group > 0 and (spec.intermediate % group or spec.hidden % group)),
                      None)
    if misaligned:
        plan.problems.append(f"{misaligned.name}'s experts have {misaligned.hidden} / {misaligned.intermediate} "
                             f"input features, not multiples of the quantisation group size {group}")
    if plan.gpu_artifact:
        plan.tp_sizes = {tp: tp_problem(tp, largest_moe.hidden, largest_moe.intermediate, WEIGHT_BITS[opts.quant_type],
                                        group) for tp in TP_SIZES}
    if device.is_gpu:
        plan.cache_on_gpu = gptq and plan.gpu_peak + plan.cache_bytes <= plan.gpu_budget
        if plan.cpu_experts and plan.gpu_peak < plan.gpu_budget:
            _size_cpu_chunk(plan, largest_moe, plan.cpu_solve_bytes + (plan.gpu_budget - plan.gpu_peak) // 2)
        if plan.gpu_peak > plan.gpu_budget:
            plan.problems.append(
                f"calibrating one layer needs {gb(plan.gpu_peak)} on the GPU (layer {gb(plan.layer.weight_bytes)}, "
                f"Hessians {gb(plan.hessian_bytes)}, activations {gb(plan.activation_bytes)}, GPTQ working set "
                f"{gb(plan.solve_bytes)}) but {gb(plan.gpu_budget)} are available: raise --max_gpu_memory, lower "
                "--max_sequence_length, or calibrate on the CPU with --force_cpu")
    if plan.cpu_peak > plan.cpu_budget:
        plan.problems.append(
            f"the CPU must hold {gb(plan.cpu_peak)} (this process {gb(plan.process_bytes)}, the next layer's experts "
            f"{gb(largest_moe.expert_bytes)}, calibration hidden states "
            f"{gb(0 if plan.cache_on_gpu else plan.cache_bytes)} for {samples} samples of {seq} tokens) but "
            f"{gb(plan.cpu_budget)} are available: lower --num_calibration_samples or --max_sequence_length, or "
            "set --max_cpu_memory")
    if output > disk_free:
        plan.problems.append(f"the output needs {gb(output)} but {parent} has {gb(disk_free)} free")
    return plan


def _size_cpu_chunk(plan: Plan, spec: LayerSpec, budget: int | None = None) -> None:
    """Experts of a layer the CPU-expert solve takes at once: as many as fit in budget (at least CPU_SOLVE_BYTES,
    more where the GPU has room), for fewer passes of its column loop."""
    from ktq.calibrated.solve import CPU_SOLVE_BYTES, chunk_size, stacked_bytes

    plan.cpu_chunk = chunk_size(spec.experts, spec.hidden, spec.intermediate, max(budget or 0, CPU_SOLVE_BYTES))
    plan.cpu_solve_bytes = stacked_bytes(plan.cpu_chunk, spec.hidden, spec.intermediate)


def cpu_experts_bytes(spec: LayerSpec, cpu) -> int:
    """One MoE layer of a ktq cpu output (bodies and scales; a shard header is noise at this size)."""
    from ktq.kernels.ktformat import METHODS, part_bytes

    return spec.experts * cpu.numa * part_bytes(METHODS[cpu.method], spec.hidden, spec.intermediate // cpu.numa)


def plan_json(plan: Plan, opts: GpuOptions) -> dict:
    """The plan of --dry_run --json: the run it describes, every memory term, and whether it fits."""
    cpu = opts.cpu_experts
    return {"command": "gpu" if plan.gpu_artifact else "cpu", "model_id": opts.model_id,
            "output_dir": str(opts.output_dir) if opts.output_dir is not None else None,
            "cpu_output": str(cpu.output) if cpu is not None else None,
            "quant_method": opts.quant_method, "quant_type": opts.quant_type, **plan.as_dict(), "fits": plan.fits}


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min" if seconds >= 60 \
        else f"{seconds:.0f} s"


def plan_table(plan: Plan, opts: GpuOptions):
    """The plan as a rich table: each memory term, where it lives, the budgets and the time estimate."""
    from rich.table import Table

    made = [f"{opts.quant_method} {opts.quant_type}"] if plan.gpu_artifact else []
    made += [f"calibrated {plan.cpu_experts} CPU experts"] if plan.cpu_experts else []
    title = "ktq gpu plan" if plan.gpu_artifact else "ktq cpu --calibrate plan"
    table = Table(title=f"{title}: {' + '.join(made)} on {plan.device.name}", title_justify="left")
    for column, justify in (("item", "left"), ("size", "right"), ("where", "left"), ("note", "left")):
        table.add_column(column, justify=justify)
    place = "GPU" if plan.device.is_gpu else "CPU"
    layer, moe = plan.layer, plan.moe
    table.add_row("layer", gb(layer.weight_bytes), place,
                  f"{plan.num_layers} decoder layers ({plan.moe_layers} MoE), one at a time; largest {layer.name}")
    table.add_row("next layer's experts", gb(moe.expert_bytes if moe else 0), "CPU", "decoded ahead (bf16)")
    if plan.method == "GPTQ" and moe is not None and plan.gpu_artifact:
        table.add_row("Hessians", gb(plan.hessian_bytes), place,
                      f"one shared gate/up {moe.hidden}^2 + {moe.experts} down {moe.intermediate}^2, fp32")
    if plan.cpu_experts and moe is not None:
        table.add_row("CPU-expert Hessians", gb(plan.cpu_solve_bytes), place,
                      f"a gate/up {moe.hidden}^2 and a down {moe.intermediate}^2 for each of {plan.cpu_chunk} "
                      "experts solved together, fp32")
    if plan.method == "GPTQ" and moe is not None:
        table.add_row("activations", gb(plan.activation_bytes), place,
                      f"one sample of {opts.max_sequence_length} tokens through one layer")
        table.add_row("hidden states", gb(plan.cache_bytes), "GPU" if plan.cache_on_gpu else "CPU",
                      f"{opts.num_calibration_samples} samples x {opts.max_sequence_length} tokens"
                      + (", and their inputs to the experts" if plan.cpu_experts else ""))
    if plan.gpu_artifact:
        table.add_row("GPTQ working set", gb(plan.solve_bytes), place, "one chunk of experts")
    table.add_row("packed layer", gb(plan.packed_bytes), "CPU", "on its way to the disk")
    table.add_row("output", gb(plan.output_bytes), "disk", f"{gb(plan.disk_free)} free")
    kept = ", ".join(f"{n} {reason}" for reason, n in sorted(plan.ignored.items()))
    if plan.gpu_artifact:
        table.add_row("Linears", str(plan.quantized + sum(plan.ignored.values())), "",
                      f"{plan.quantized} expert projections quantised; kept: {kept or 'none'}")
        table.add_row("serves with", tp_summary(plan.tp_sizes), "GPU", "sglang --tp-size: each rank holds a share "
                      "of every expert's intermediate columns")
    if plan.device.is_gpu:
        table.add_row("GPU peak", gb(plan.gpu_peak), "GPU", f"budget {gb(plan.gpu_budget)}")
    table.add_row("CPU peak", gb(plan.cpu_peak), "CPU", f"budget {gb(plan.cpu_budget)}")
    seconds = plan.seconds()
    detail = ", ".join(f"{k} {_duration(v)}" for k, v in seconds.items() if v)
    table.add_row("time", _duration(sum(seconds.values())), "",
                  f"{detail} ({'measured' if plan.rates_measured else 'nominal H100-class'} rates)")
    table.add_row("source", "", "", plan.source_note)
    return table
