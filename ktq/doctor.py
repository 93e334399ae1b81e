"""What this machine can do with ktq: CPU features, NUMA, memory, disk, GPUs, package versions, and for each command
whether it can run here and why not. Package versions come from their metadata (nothing heavy is imported); torch is
imported only to list GPUs, and only when installed."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from ktq import system

PACKAGES = ("numpy", "numba", "tokenizers", "torch", "transformers", "accelerate", "llmcompressor",
            "compressed-tensors", "datasets", "kt-kernel")

# What each command imports beyond ktq's core (typer, rich, psutil); a command not listed needs nothing more.
REQUIREMENTS: dict[str, tuple[str, ...]] = {
    "cpu": ("numpy", "numba"),
    "sample": ("numpy", "tokenizers"),
    "merge": ("numpy", "numba"),
    "inspect": ("numpy", "numba"),
    "gpu": ("torch", "transformers", "accelerate", "llmcompressor", "compressed-tensors", "datasets"),
}
GPU_COMMANDS = ("gpu",)  # commands that run on a CUDA GPU and fall back to the CPU without one

READY, LIMITED, BLOCKED = "ready", "limited", "cannot run"


@dataclass(frozen=True)
class Gpu:
    name: str
    memory: int  # bytes


@dataclass(frozen=True)
class GpuReport:
    gpus: list[Gpu]
    source: str  # "torch", "nvidia-smi" or "none"
    note: str


@dataclass(frozen=True)
class CommandStatus:
    name: str
    status: str  # READY, LIMITED or BLOCKED
    reason: str


def installed_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned_versions() -> dict[str, str]:
    """name -> version for every `name==version` that ktq's own metadata declares (the gpu extra's pins)."""
    try:
        requirements = metadata.requires("ktq") or []
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return {}
    pins = {}
    for requirement in requirements:
        match = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^;\s]+)", requirement)
        if match:
            pins[_normal(match[1])] = match[2]
    return pins


def _torch_gpus() -> GpuReport:
    try:
        import torch
    except Exception as exc:  # a broken install must not break the doctor
        return GpuReport([], "none", f"torch is installed but does not import: {type(exc).__name__}: {exc}")
    if not torch.cuda.is_available():
        build = "CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda} build"
        return GpuReport([], "torch", f"torch {torch.__version__} ({build}) sees no CUDA GPU")
    gpus = [Gpu(p.name, p.total_memory) for p in map(torch.cuda.get_device_properties,
                                                       range(torch.cuda.device_count()))]
    return GpuReport(gpus, "torch", f"torch {torch.__version__}, CUDA {torch.version.cuda}")


def _nvidia_smi_gpus() -> list[Gpu] | None:
    """GPUs as nvidia-smi lists them, or None when it is absent or fails."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=15, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    gpus = []
    for line in out.strip().splitlines():
        name, _, mib = line.rpartition(",")
        if name and mib.strip().isdigit():
            gpus.append(Gpu(name.strip(), int(mib) * 1024 * 1024))
    return gpus


def detect_gpus(torch_installed: bool) -> GpuReport:
    """CUDA GPUs as torch sees them when torch is installed; nvidia-smi tells whether GPUs exist that torch
    cannot use (or, without torch, whether there are any)."""
    report = _torch_gpus() if torch_installed else GpuReport([], "none", "torch is not installed")
    if report.gpus:
        return report
    smi = _nvidia_smi_gpus()
    if smi:
        why = "torch cannot use them" if torch_installed else "install torch with CUDA to use them"
        return GpuReport(smi, "nvidia-smi", f"{report.note}; nvidia-smi lists {len(smi)} GPU(s): {why}")
    return report


def command_status(name: str, versions: dict[str, str | None], pins: dict[str, str], gpus: GpuReport,
                   flags: set[str]) -> CommandStatus:
    """READY, LIMITED (runs, with a caveat) or BLOCKED, and why."""
    needed = REQUIREMENTS.get(name, ())
    missing = [dist for dist in needed if versions.get(dist) is None]
    if missing:
        install = "'ktq[gpu]'" if name in GPU_COMMANDS else " ".join(missing)
        return CommandStatus(name, BLOCKED, f"missing {', '.join(missing)}: pip install {install}")
    status, notes = READY, []
    for dist in needed:
        pinned = pins.get(_normal(dist))
        if pinned and versions[dist].split("+")[0] != pinned:  # a local label (2.13.0+cpu) is the same release
            status = LIMITED
            notes.append(f"{dist} {versions[dist]} is not the tested {pinned}")
    if name in GPU_COMMANDS and not (gpus.gpus and gpus.source == "torch"):
        status = LIMITED
        notes.append("no CUDA GPU that torch can use: runs on the CPU, practical for tiny models only")
    if name == "cpu":
        serve = "AMX" if "amx_tile" in flags else "AVX-512" if "avx512f" in flags else None
        notes.append("converts on any CPU; " + (f"this machine can also serve the output ({serve})" if serve
                                                else "serving the output needs AVX-512 or AMX, which this CPU lacks"))
    return CommandStatus(name, status, "; ".join(notes) or "everything it needs is installed")


def diagnose(commands: list[str], disk_path: Path) -> dict:
    """Everything the doctor reports, as plain data (the JSON output)."""
    flags = system.cpu_flags()
    versions = {dist: installed_version(dist) for dist in PACKAGES}
    pins = pinned_versions()
    gpus = detect_gpus(versions["torch"] is not None)
    return {
        "ktq": installed_version("ktq"),
        "cpu": {"model": system.cpu_model(), "logical_cpus": system.cpu_cores(),
                "physical_cores": system.physical_cores(), "numa_nodes": system.numa_nodes(),
                "avx512": [f for f in system.AVX512_FLAGS if f in flags],
                "amx": [f for f in system.AMX_FLAGS if f in flags]},
        "ram": {"total": system.ram_total(), "available": system.ram_available()},
        "disk": {"path": str(system.existing_ancestor(disk_path)), "free": system.disk_free(disk_path)},
        "gpus": {"source": gpus.source, "note": gpus.note, "devices": [asdict(g) for g in gpus.gpus]},
        "packages": {dist: {"installed": versions[dist], "pinned": pins.get(_normal(dist))} for dist in PACKAGES},
        "commands": [asdict(command_status(name, versions, pins, gpus, flags)) for name in commands],
    }
