"""The plan of a streaming run (`ktq gpu`, `ktq cpu --calibrate`), before any weight is read: what one layer needs on
the device and the host (budget.py), the chunk of experts and group of samples that fit, disk and time
(timing.py), and every problem with its numbers and what would make the run fit.

The model is instantiated on the meta device, which gives every parameter's shape for any architecture transformers
knows; the source's safetensors headers (when the folder holds them) say whether the streaming engine can read it
and how its experts are stored. With --max_gpu_memory the plan is for a GPU of that size, also on a machine without
one (users plan before they rent): its time is then estimated for each GPU class from public specifications;
otherwise from rates measured here in a fraction of a second.
"""

from __future__ import annotations

import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ktq.errors import KtqError
from ktq.gpu import budget, timing
from ktq.gpu.budget import WEIGHT_BITS, Sizes, Terms, layer_terms, packed_bytes
from ktq.gpu.devices import Device
from ktq.gpu.layout import MoeLayout, Rule
from ktq.gpu.model import DTYPE_BYTES, LayerSpec, layer_specs, linear_reasons
from ktq.gpu.options import GpuOptions
from ktq.gpu.streamed_experts import SAMPLES_PER_PRODUCT
from ktq.hfformat import text_config
from ktq.progress import gb
from ktq.serving import TP_SIZES, tp_problem, tp_summary

DEFAULT_GPU_SHARE = 0.9  # of the GPU memory free at start: the CUDA context and allocator slack need the rest
DEFAULT_CPU_SHARE = 0.85  # of the available RAM
GPU_OVERHEAD = budget.GPU_OVERHEAD


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
    terms: Terms
    output_bytes: int
    gpu_budget: int
    cpu_budget: int
    disk_free: int
    quantized: int
    ignored: Counter
    source_note: str  # what was checked of the weights
    sizes: Sizes = field(default_factory=lambda: Sizes(1, 1, False))
    rates: dict[str, float] = field(default_factory=dict)
    rates_measured: bool = False
    gpu_artifact: bool = True  # a GPU checkpoint is written (not for ktq cpu --calibrate)
    cpu_experts: str | None = None  # kt method of the calibrated CPU experts written too, if any
    tp_sizes: dict[int, str | None] = field(default_factory=dict)  # sglang TP size -> why it cannot serve, or None
    problems: list[str] = field(default_factory=list)

    @property
    def layer(self) -> LayerSpec:
        """The largest decoder layer."""
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
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def hessian_bytes(self) -> int:
        return self.terms.hessians

    @property
    def cache_bytes(self) -> int:
        return self.terms.cache

    @property
    def activation_bytes(self) -> int:
        return self.terms.activations

    @property
    def packed_bytes(self) -> int:
        return self.terms.packed

    @property
    def solve_bytes(self) -> int:
        return self.terms.gptq

    @property
    def cache_on_gpu(self) -> bool:
        return self.device.is_gpu and self.sizes.cache_on_device

    @property
    def cache_device(self) -> str:
        return self.device.torch_device if self.cache_on_gpu else "cpu"

    @property
    def gpu_peak(self) -> int:
        return budget.device_peak(self.terms, self.sizes) if self.device.is_gpu else 0

    @property
    def cpu_peak(self) -> int:
        return budget.host_peak(self.terms, self.sizes, not self.device.is_gpu)

    @property
    def fits(self) -> bool:
        return not self.problems

    def seconds(self) -> dict[str, float]:
        """Time per stage over the whole run on this plan's device (timing.py)."""
        return timing.seconds(self, self.rates, self.sizes)

    def classes(self) -> dict[str, dict]:
        """For each GPU class: the sizes its memory allows, the peak and the time (datasheet rates)."""
        found = {}
        for name, gpu in timing.GPU_CLASSES.items():
            card = int(gpu.memory * DEFAULT_GPU_SHARE)
            sizes = budget.fit(self.terms, card)
            peak = budget.device_peak(self.terms, sizes)
            found[name] = {"memory_bytes": gpu.memory, "gpu_peak_bytes": peak, "fits": peak <= card,
                           "cpu_peak_bytes": budget.host_peak(self.terms, sizes, False),
                           "expert_chunk": sizes.expert_chunk, "sample_group": sizes.sample_group,
                           "seconds": round(sum(timing.seconds(self, gpu.rates(), sizes).values()), 1)}
        return found

    def as_dict(self) -> dict:
        largest, moe, t = self.layer, self.moe, self.terms
        seconds = self.seconds()
        return {
            "device": self.device.torch_device, "device_name": self.device.name, "planned_gpu": self.planned_gpu,
            "dtype": self.dtype, "num_layers": self.num_layers, "moe_layers": self.moe_layers,
            "largest_layer": largest.name, "layer_bytes": largest.weight_bytes, "dense_bytes": t.dense,
            "experts": moe.experts if moe else 0, "expert_chunk": self.sizes.expert_chunk,
            "experts_device_bytes": budget.experts_on_device(t, self.sizes.expert_chunk),
            "host_experts_bytes": budget.host_experts(t, not self.device.is_gpu),
            "sample_group": self.sizes.sample_group,
            "group_bytes": self.sizes.sample_group * t.per_sample, "hessian_bytes": t.hessians,
            "hessians": moe.experts + 1 if moe and t.hessians else 0,
            "activation_bytes": t.activations, "product_bytes": t.products, "solve_bytes": t.gptq,
            "cpu_solve_bytes": budget.solve_bytes(t, self.sizes.cpu_chunk) if t.cpu_expert else 0,
            "cpu_chunk": self.sizes.cpu_chunk, "cache_bytes": t.cache, "cache_device": self.cache_device,
            "packed_layer_bytes": t.packed, "cpu_codes_bytes": t.codes, "output_bytes": self.output_bytes,
            "process_bytes": t.process, "gpu_peak_bytes": self.gpu_peak, "cpu_peak_bytes": self.cpu_peak,
            "gpu_budget_bytes": self.gpu_budget, "cpu_budget_bytes": self.cpu_budget,
            "disk_free_bytes": self.disk_free, "seconds": {k: round(v, 1) for k, v in seconds.items()},
            "seconds_total": round(sum(seconds.values()), 1), "rates": self.rates,
            "rates_measured": self.rates_measured, "gpu_classes": self.classes(), "source": self.source_note,
            "quantized_linears": self.quantized, "ignored_linears": dict(self.ignored), "problems": self.problems,
            "gpu_checkpoint": self.gpu_artifact, "cpu_experts": self.cpu_experts,
            "tp_sizes": [tp for tp, problem in self.tp_sizes.items() if problem is None],
        }


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


def cpu_experts_bytes(spec: LayerSpec, cpu) -> int:
    """One MoE layer of a ktq cpu output (bodies and scales; a shard header is noise at this size)."""
    from ktq.kernels.ktformat import METHODS, part_bytes

    return spec.experts * cpu.numa * part_bytes(METHODS[cpu.method], spec.hidden, spec.intermediate // cpu.numa)


def make_plan(opts: GpuOptions, config: dict, model, layout: MoeLayout, rules: list[Rule], device: Device,
              cpu_available: int, source=None) -> Plan:
    import torch

    text = text_config(config)
    width = DTYPE_BYTES[opts.torch_dtype]
    specs = layer_specs(model, text, opts.torch_dtype)
    planned = not device.is_gpu and opts.max_gpu_memory is not None and not opts.force_cpu
    if planned:
        device = Device("cuda", f"a GPU of {gb(opts.max_gpu_memory)}", opts.max_gpu_memory, opts.max_gpu_memory)
    moe = [spec for spec in specs if spec.experts]
    largest_moe = max(moe, key=lambda spec: spec.expert_bytes) if moe else None
    samples, seq = (opts.num_calibration_samples, opts.max_sequence_length) if opts.calibrated else (0, 0)
    reasons = list(linear_reasons(model, text, rules).values())
    quantized = reasons.count(None)
    kept = Counter(reason for reason in reasons if reason is not None)
    parent = (opts.output_dir or opts.cpu_experts.output).expanduser().resolve().parent
    disk_free = shutil.disk_usage(next(p for p in (parent, *parent.parents) if p.exists())).free
    output = sum(spec.dense_bytes for spec in specs) + sum(packed_bytes(s, opts.quant_type, opts.group_size, width)
                                                          for s in moe)
    output += sum(p.numel() for name, p in model.named_parameters()
                  if not any(name.startswith(spec.name + ".") for spec in specs)) * width
    if opts.output_dir is None:
        output = 0
    if opts.cpu_experts is not None:
        output += sum(cpu_experts_bytes(spec, opts.cpu_experts) for spec in moe)
    fp8 = source.experts.input_type == "fp8" if source is not None else \
        (text.get("quantization_config") or config.get("quantization_config") or {}).get("quant_method") == "fp8"
    dense = max(spec.dense_bytes for spec in specs)

    process = _process_bytes()

    def terms(samples: int, seq: int) -> Terms:
        return layer_terms(opts, text, largest_moe, dense, fp8, samples, seq, process)

    gpu_budget = (opts.max_gpu_memory or int(device.free_bytes * DEFAULT_GPU_SHARE)) if device.is_gpu else 0
    plan = Plan(device=device, planned_gpu=planned, method=opts.quant_method, dtype=opts.torch_dtype,
                quant_type=opts.quant_type, layers=specs, top_k=int(text.get("num_experts_per_tok") or 1),
                samples=samples, seq_len=seq, terms=terms(samples, seq), output_bytes=output,
                gpu_budget=gpu_budget, cpu_budget=opts.max_cpu_memory or int(cpu_available * DEFAULT_CPU_SHARE),
                disk_free=disk_free, quantized=quantized, ignored=kept,
                source_note="safetensors headers read and checked" if source is not None
                else "config.json only: the weights were not checked (ktq sample --header-only writes stand-in "
                     "shards of any model's size to plan against)")
    plan.gpu_artifact = opts.output_dir is not None
    if opts.cpu_experts is not None and largest_moe is not None:
        from ktq.kernels.ktformat import METHODS

        plan.cpu_experts = METHODS[opts.cpu_experts.method].kt_method
    plan.sizes = _sizes(plan, opts)
    plan.rates_measured = not planned and (torch.cuda.is_available() or not device.is_gpu)
    plan.rates = timing.measured_rates(device.torch_device) if plan.rates_measured else \
        timing.GPU_CLASSES["H100"].rates()
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
    if device.is_gpu and plan.gpu_peak > plan.gpu_budget:
        plan.problems.append(_gpu_problem(plan, terms))
    if plan.cpu_peak > plan.cpu_budget:
        plan.problems.append(_host_problem(plan, terms))
    if output > disk_free:
        plan.problems.append(f"the output needs {gb(output)} but {parent} has {gb(disk_free)} free")
    return plan


def _sizes(plan: Plan, opts: GpuOptions) -> Sizes:
    """The sizes that fit the device (budget.fit); calibrating on the CPU, the layer's experts stay where they were
    read and as many CPU experts are solved together as the host has room for."""
    t = plan.terms
    if plan.device.is_gpu:
        return budget.fit(t, plan.gpu_budget, opts.expert_chunk, opts.sample_group)
    chunk = opts.expert_chunk or max(t.experts, 1)
    sizes = Sizes(chunk, budget.round_group(t.samples, opts.sample_group or t.samples), False)
    if not t.cpu_expert:
        return sizes
    room = plan.cpu_budget - budget.host_peak(t, sizes, True) + budget.solve_bytes(t, 1)
    return Sizes(chunk, sizes.sample_group, False, budget.cpu_chunk_for(t, room, chunk))


def _parts(named: dict[str, int]) -> str:
    return ", ".join(f"{name} {gb(value)}" for name, value in named.items() if value)


def _gpu_problem(plan: Plan, terms) -> str:
    """The GPU cannot hold one layer's smallest working set: by how much, and what would."""
    t = plan.terms
    least = Sizes(1, budget.round_group(t.samples, 0), False)
    need = budget.device_peak(t, least)
    parts = _parts({"layer outside its experts": t.dense, "one expert at a time": budget.experts_on_device(t, 1),
                    "Hessians": t.hessians, f"a group of {least.sample_group} samples": least.sample_group
                    * t.per_sample, "working set": budget.working_set(t, 1),
                    "CUDA workspaces": t.overhead})
    would = [f"a GPU with {gb(need / DEFAULT_GPU_SHARE)} or more (--max_gpu_memory {gb(need)})"]
    shorter = next((seq for seq in (1024, 512, 256, 128) if seq < plan.seq_len
                    and budget.device_peak(terms(plan.samples, seq), least) <= plan.gpu_budget), None)
    if shorter:
        would.append(f"--max_sequence_length {shorter}")
    return (f"one layer needs at least {gb(need)} on the GPU ({parts}) but {gb(plan.gpu_budget)} are available; "
            f"what would fit: {', or '.join(would)}; or calibrate on the CPU with --force_cpu")


def _host_problem(plan: Plan, terms) -> str:
    """The host cannot hold its share: by how much, and what would."""
    t, s = plan.terms, plan.sizes
    parts = _parts({"this process": t.process, "two layers of experts as read":
                    budget.host_experts(t, not plan.device.is_gpu),
                    f"hidden states of {plan.samples} samples of {plan.seq_len} tokens":
                    0 if s.cache_on_device else t.cache, "routed inputs":
                    budget.routed_on_host(t, s, pin=plan.device.is_gpu), "packed layer": t.packed,
                    "CPU codes": t.codes})
    would = [f"{gb(plan.cpu_peak)} of RAM (--max_cpu_memory)"]
    fewer = next((n for n in range(plan.samples - 1, 0, -max(1, plan.samples // 64))
                  if budget.host_peak(terms(n, plan.seq_len), s, not plan.device.is_gpu) <= plan.cpu_budget), None)
    if fewer:
        would.append(f"--num_calibration_samples {fewer}")
    elif plan.samples > 1:  # say so: fewer samples is the advice users try first
        least = budget.host_peak(terms(1, plan.seq_len), s, not plan.device.is_gpu)
        would.append(f"not fewer --num_calibration_samples: 1 sample still needs {gb(least)}")
    if plan.device.is_gpu and not s.cache_on_device and t.cache:
        would.append(f"a GPU that also holds the hidden states ({gb(plan.gpu_peak + t.cache)} or more)")
    return (f"the CPU must hold {gb(plan.cpu_peak)} ({parts}) but {gb(plan.cpu_budget)} are available; what "
            f"would fit: {', or '.join(would)}")


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
    t, s = plan.terms, plan.sizes
    place = "GPU" if plan.device.is_gpu else "CPU"
    layer, moe = plan.layer, plan.moe
    table.add_row("layer outside its experts", gb(t.dense), place,
                  f"{plan.num_layers} decoder layers ({plan.moe_layers} MoE), one at a time; largest {layer.name}")
    if moe is not None:
        held = f"all {moe.experts} of the layer" if s.expert_chunk >= moe.experts else \
            f"{moe.experts} in chunks of {s.expert_chunk}: two chunks and the next as read"
        table.add_row("experts on the device", gb(budget.experts_on_device(t, s.expert_chunk)), place, held)
        table.add_row("experts on the host", gb(budget.host_experts(t, not plan.device.is_gpu)), "CPU",
                      "this layer and the next, read ahead, " + ("FP8 as stored" if t.expert_host < t.expert
                                                                  else "bf16"))
    if t.hessians:
        table.add_row("Hessians", gb(t.hessians), place,
                      f"one shared gate/up {moe.hidden}^2 + {moe.experts} down {moe.intermediate}^2, fp32")
    if plan.method == "GPTQ" and moe is not None:
        groups = -(-plan.samples // s.sample_group)
        table.add_row("sample group", gb(s.sample_group * t.per_sample), place,
                      f"{s.sample_group} samples' inputs to the experts, their output and routing ({groups} "
                      f"group{'s' if groups != 1 else ''})")
        table.add_row("activations", gb(t.activations), place,
                      f"one sample of {opts.max_sequence_length} tokens through one layer")
        table.add_row("expert products", gb(t.products), place, f"{SAMPLES_PER_PRODUCT} samples through one expert")
        table.add_row("hidden states", gb(t.cache), "GPU" if plan.cache_on_gpu else "CPU",
                      f"{opts.num_calibration_samples} samples x {opts.max_sequence_length} tokens")
        routed = budget.routed_on_host(t, s, pin=plan.device.is_gpu)
        if routed:
            table.add_row("routed inputs", gb(routed), "CPU", "every token's input to the experts and routing, for "
                          "the CPU experts (the sample group holds them when it holds every sample)")
    if plan.gpu_artifact:
        table.add_row("GPTQ working set", gb(t.gptq), place, "one solve of stacked experts")
        table.add_row("packed layer", gb(t.packed), "CPU", "on its way to the disk")
    if plan.cpu_experts and moe is not None:
        table.add_row("CPU-expert solve", gb(budget.solve_bytes(t, s.cpu_chunk)), place,
                      f"a gate/up {moe.hidden}^2 and a down {moe.intermediate}^2 Hessian for each of "
                      f"{s.cpu_chunk} experts solved together, fp32")
        table.add_row("CPU codes", gb(t.codes), "CPU", "the layer's codes and scales on their way to the disk")
    table.add_row("this process", gb(t.process), "CPU", "interpreter, torch, transformers (measured)")
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
                  f"{detail} ({'rates measured here' if plan.rates_measured else 'H100 datasheet rates'})")
    for name, found in plan.classes().items():
        fit = "fits" if found["fits"] else f"does not fit ({gb(found['gpu_peak_bytes'])})"
        table.add_row(f"time on {name}", _duration(found["seconds"]), "",
                      f"{gb(found['memory_bytes'])}: {fit}, {found['expert_chunk']} experts and "
                      f"{found['sample_group']} samples at a time (datasheet rates x {timing.REACHED})")
    table.add_row("source", "", "", plan.source_note)
    return table
