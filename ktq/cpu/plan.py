"""Know before you start: what `ktq cpu` will convert, write, hold in memory and take, from config.json and the
safetensors headers only (tensor data is never read), plus a fraction of a second of measurement.

- Output size is exact: the format fixes every byte (shard headers, bodies, scales, the index, the copied files);
  only ktq's own few-KB manifest ktq.json is left out. The disk it needs counts every file in whole 4 KiB blocks
  and room for ktq.json.
- Peak RAM is this process's resident memory once the checkpoint's headers and the kernels are loaded (measured,
  not guessed) plus the buffers the pipeline allocates (counted from its own slot objects): READ_AHEAD expert slots
  of bf16 with their decode buffers and WRITE_BEHIND slots of packed output. Nothing else grows with the model.
- Time is the expert bytes to read divided by the slower of two rates measured now: reading a slice of the largest
  shard, and decoding + quantising one projection with the run's threads and the input's own decoder (on synthetic
  bytes, so any input type's decode counts). The stages overlap, so the slower sets the pace; writing is not
  measured (the output is 1/4 to 1/2 of the input).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ktq.cpu import pipeline
from ktq.cpu.checkpoint import Checkpoint, collector_paused, open_checkpoint
from ktq.cpu.experts import Geometry, MoeModel, find_experts
from ktq.cpu.layout import Layout, expert_pieces
from ktq.cpu.manifest import Manifest, identity_mismatch, load_manifest
from ktq.cpu.measure import Rate, load_kernels, read_rate, rss, stage_rate
from ktq.cpu.output import extra_files_bytes, needed_bytes, plan_output
from ktq.cpu.pipeline import CpuJob
from ktq.errors import KtqError
from ktq.kernels import ktformat as fmt
from ktq.progress import counted, gb
from ktq.system import disk_free, existing_ancestor, numa_nodes, ram_available


@dataclass(frozen=True)
class RamEstimate:
    baseline: int  # this process with the checkpoint's headers and the kernels loaded
    read_buffers: int  # READ_AHEAD expert slots (bf16 + decode scratch)
    write_buffers: int  # WRITE_BEHIND packed expert slots

    @property
    def peak(self) -> int:
        return self.baseline + self.read_buffers + self.write_buffers


@dataclass(frozen=True)
class TimeEstimate:
    read: Rate  # the input's disk (or page cache)
    kernel: Rate  # decode + quantise + pack, in input bytes
    input_bytes: int

    @property
    def bottleneck(self) -> str:
        return "reading" if self.read.per_second < self.kernel.per_second else "quantising"

    @property
    def seconds(self) -> float:
        return self.input_bytes / min(self.read.per_second, self.kernel.per_second)


@dataclass
class CpuPlan:
    input_path: Path
    output: Path
    input_type: str
    method: fmt.Method
    form: str
    numa: int
    machine_numa: int
    threads: int
    geometry: Geometry
    moe_layers: list[int]
    layers: list[int]  # to convert in this run
    input_bytes: int  # expert bytes this run reads
    output_bytes: int  # the finished output's files, exact (ktq.json aside)
    disk_needed: int  # what this run still writes
    disk_free: int
    disk_path: Path
    ram: RamEstimate
    ram_available: int
    time: TimeEstimate | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def experts(self) -> int:
        return len(self.layers) * self.geometry.experts

    @property
    def problems(self) -> list[str]:
        """Why the run would not fit on this machine now; empty when it fits."""
        found = []
        if self.ram.peak > self.ram_available:
            found.append(f"peak RAM {gb(self.ram.peak)} is more than the {gb(self.ram_available)} available")
        if self.disk_needed > self.disk_free:
            found.append(f"the output needs {gb(self.disk_needed)} more on the disk of {self.disk_path}, which has "
                         f"{gb(self.disk_free)} free")
        return found

    def to_json(self) -> dict:
        g = self.geometry
        doc = {
            "command": "cpu", "input_path": str(self.input_path), "output": str(self.output),
            "input_type": self.input_type, "method": self.method.name, "kt_method": self.method.kt_method,
            "form": self.form, "numa": self.numa, "machine_numa_nodes": self.machine_numa, "threads": self.threads,
            "hidden": g.hidden, "intermediate": g.intermediate, "experts_per_layer": g.experts,
            "moe_layers": self.moe_layers, "layers": self.layers, "experts": self.experts,
            "input_bytes": self.input_bytes, "output_bytes": self.output_bytes,
            "disk_needed": self.disk_needed, "disk_free": self.disk_free,
            "peak_ram": self.ram.peak, "ram_baseline": self.ram.baseline, "ram_read_buffers": self.ram.read_buffers,
            "ram_write_buffers": self.ram.write_buffers, "ram_available": self.ram_available,
            "warnings": self.warnings, "problems": self.problems, "fits": not self.problems,
        }
        if self.time is not None:
            doc.update({"read_bytes_per_second": self.time.read.per_second,
                        "kernel_bytes_per_second": self.time.kernel.per_second,
                        "bottleneck": self.time.bottleneck, "seconds": self.time.seconds})
        return doc


def numa_warning(numa: int, machine_numa: int) -> str | None:
    if numa == machine_numa:
        return None
    return (f"--threadpool-count {numa} differs from this machine's {machine_numa} NUMA node"
            f"{'s' if machine_numa != 1 else ''}: the count is baked into the output, which must be served with "
            f"--kt-threadpool-count {numa}")


def _layers_done(job: CpuJob, ckpt: Checkpoint, model: MoeModel, layout: Layout) -> set[int]:
    """Layers an existing output already holds and the run keeps (unless --resume-layer), as the run decides;
    an output of other settings keeps nothing (the run refuses it, or starts it over with --force)."""
    existing = load_manifest(job.output) if job.output.is_dir() else None
    if existing is None:
        return set()
    wanted = Manifest(layout, model.input_type, ckpt.fingerprint())
    if identity_mismatch(existing, wanted):
        return set()
    return set(plan_output(job.output, wanted, force=False).manifest.layers)


def _buffers(model: MoeModel, method: fmt.Method, numa: int, items: int) -> tuple[int, int]:
    """(read, write) buffer bytes of the pipeline for `items` experts: its own slots, allocated and never touched
    here (so they take no memory), counted."""
    if items == 0:
        return 0, 0
    slot = pipeline._ExpertSlot(model)  # its owned buffers: an upper bound of what a mapped bf16 expert takes
    read = sum(a.nbytes for a in slot.owned.values()) + slot.scratch.nbytes
    g = model.geometry
    write = sum(p.body_bytes + p.scale_bytes for p in expert_pieces(method, numa, g.hidden, g.intermediate))
    return min(pipeline.READ_AHEAD, items) * read, min(pipeline.WRITE_BEHIND, items) * write


def _time(ckpt: Checkpoint, model: MoeModel, method: fmt.Method, numa: int, first_layer: int,
          input_bytes: int) -> TimeEstimate:
    """Times reading the largest shard from its first tensor on, and decoding + quantising the first projection the
    run converts."""
    shard = max(ckpt.files, key=lambda path: path.stat().st_size)
    start = min(info.offset for info in ckpt.tensors.values() if info.path == shard)
    read = read_rate(shard, start, shard.stat().st_size - start)
    layer = next(layer for layer in model.layers if layer.index == first_layer)
    return TimeEstimate(read, stage_rate(layer.experts[0]["gate"], method, numa), input_bytes)


@collector_paused()  # all of it: once the collector runs again, its next passes walk all that the headers made
def plan_cpu(job: CpuJob, threads: int, measure_time: bool) -> CpuPlan:
    """The plan of `ktq cpu` for job; the Numba thread count must already be set. measure_time adds the
    time estimate (a fraction of a second of reading and quantising)."""
    ckpt = open_checkpoint(job.input_path)
    model = find_experts(ckpt, job.input_type)
    g = model.geometry
    problem = fmt.alignment_problem(job.method, g.hidden, g.intermediate, job.numa)
    if problem:
        raise KtqError(problem)
    moe_layers = [layer.index for layer in model.layers]
    layout = pipeline.layout_of(job, model)
    done = _layers_done(job, ckpt, model, layout)
    todo = [layer for layer in moe_layers if layer not in done
            or (job.resume_layer is not None and layer >= job.resume_layer)]
    converting = set(todo)
    source = job.input_path if job.merge else None
    input_bytes = sum(layer.input_bytes for layer in model.layers if layer.index in converting)
    read_buffers, write_buffers = _buffers(model, job.method, job.numa, len(todo) * g.experts)
    # The time probes load every kernel the run uses (their buffers are gone once they return); without them, the
    # quantising kernel is loaded alone (the decoders' code, a few MB, then goes uncounted).
    timing = _time(ckpt, model, job.method, job.numa, todo[0], input_bytes) if measure_time and todo else None
    if timing is None:
        load_kernels(job.method)
    ram = RamEstimate(rss(), read_buffers, write_buffers)
    machine_numa = numa_nodes()
    plan = CpuPlan(
        input_path=job.input_path, output=job.output, input_type=model.input_type, method=job.method,
        form=layout.form, numa=job.numa, machine_numa=machine_numa, threads=threads, geometry=g,
        moe_layers=moe_layers, layers=todo, input_bytes=input_bytes,
        output_bytes=sum(layout.layer_bytes(layer) for layer in moe_layers) + extra_files_bytes(layout, source),
        disk_needed=needed_bytes(layout, todo, source),
        disk_free=disk_free(job.output), disk_path=existing_ancestor(job.output),
        ram=ram, ram_available=ram_available(), time=timing)
    warning = numa_warning(job.numa, machine_numa)
    if warning:
        plan.warnings.append(warning)
    return plan


def _ranges(values: list[int]) -> str:
    """[3, 4, 5, 9] -> '3-5, 9'"""
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "none"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def _verdict(ok: bool) -> str:
    return "[green]fits[/]" if ok else "[bold red]does not fit[/]"


def plan_table(plan: CpuPlan):
    """The plan as a rich table for people."""
    from rich.table import Table

    g = plan.geometry
    table = Table(title=f"ktq cpu plan: {plan.input_path} -> {plan.output}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("input", f"{plan.input_type}, {counted(len(plan.moe_layers), 'MoE layer')} x {g.experts} experts, "
                  f"hidden {g.hidden}, moe_intermediate {g.intermediate}")
    table.add_row("output", f"{plan.method.kt_method}, {plan.form} form, {counted(plan.numa, 'NUMA part')} (this "
                  f"machine: {plan.machine_numa}), {counted(plan.threads, 'thread')}")
    table.add_row("to convert", f"{counted(len(plan.layers), 'layer')} ({_ranges(plan.layers)}), "
                  f"{counted(plan.experts, 'expert')}, "
                  f"{gb(plan.input_bytes)} of expert weights to read")
    table.add_row("output size", f"{gb(plan.output_bytes)} ({plan.output_bytes:,} bytes, exact)")
    disk_ok = plan.disk_needed <= plan.disk_free
    table.add_row("disk", f"{gb(plan.disk_needed)} to write, {gb(plan.disk_free)} free on {plan.disk_path}: "
                  f"{_verdict(disk_ok)}")
    ram = plan.ram
    table.add_row("peak RAM", f"{gb(ram.peak)} (process {gb(ram.baseline)} + read buffers {gb(ram.read_buffers)} "
                  f"+ write buffers {gb(ram.write_buffers)}), {gb(plan.ram_available)} available: "
                  f"{_verdict(ram.peak <= plan.ram_available)}")
    if plan.time is not None:
        t = plan.time
        table.add_row("time", f"about {_duration(t.seconds)}: reading {gb(t.read.per_second)}/s, quantising "
                      f"{gb(t.kernel.per_second)}/s ({plan.threads} threads); {t.bottleneck} sets the pace")
    for warning in plan.warnings:
        table.add_row("[yellow]warning[/]", warning)
    return table
