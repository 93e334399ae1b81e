"""What this machine offers: cores, NUMA nodes, CPU features, memory and disk. Cheap: sysfs, /proc and psutil only."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import psutil

NODE_ROOT = Path("/sys/devices/system/node")
CPUINFO = Path("/proc/cpuinfo")

# /proc/cpuinfo flags that matter to kt-kernel's AMXINT4 / AMXINT8 backends (at serve time, not to convert)
AVX512_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")
AMX_FLAGS = ("amx_tile", "amx_int8", "amx_bf16")


def cpu_cores() -> int:
    """Logical CPUs this process may run on (respects taskset / cgroup affinity): the default thread count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def physical_cores() -> int | None:
    return psutil.cpu_count(logical=False)


def numa_nodes(root: Path | None = None) -> int:
    """NUMA nodes with CPUs, from sysfs (memory-only nodes such as CXL or HBM do not count); 1 where sysfs does not
    say. psutil has no NUMA interface, and kt-kernel's thread pools are per node with CPUs."""
    root = root or NODE_ROOT
    nodes = [p for p in root.glob("node[0-9]*") if (p / "cpulist").is_file() and (p / "cpulist").read_text().strip()]
    return max(1, len(nodes))


def cpu_flags(cpuinfo: Path | None = None) -> set[str]:
    """The feature flags of the first CPU in /proc/cpuinfo (x86 'flags', ARM 'Features'); empty when unreadable."""
    try:
        text = (cpuinfo or CPUINFO).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_model(cpuinfo: Path | None = None) -> str:
    try:
        for line in (cpuinfo or CPUINFO).read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware"):
                return value.strip()
    except OSError:
        pass
    return "unknown"


def ram_total() -> int:
    return psutil.virtual_memory().total


def ram_available() -> int:
    """Memory that can be had without swapping (MemAvailable: free plus reclaimable page cache)."""
    return psutil.virtual_memory().available


def existing_ancestor(path: Path) -> Path:
    """path itself or its nearest existing parent: where a folder about to be created will live."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_free(path: Path) -> int:
    """Free bytes on the file system that holds (or will hold) path."""
    return shutil.disk_usage(existing_ancestor(path)).free
