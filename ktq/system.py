"""What this machine offers: cores, NUMA nodes, CPU features, memory and disk. Cheap: sysfs, /proc and psutil only.

Inside a container the machine's figures overstate what this process may use, so the CPU and memory limits of its
cgroup (v1 or v2) cap them.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import psutil

NODE_ROOT = Path("/sys/devices/system/node")
CPUINFO = Path("/proc/cpuinfo")
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
_NO_LIMIT = 1 << 62  # cgroup v1 writes "no limit" as a number near 2**63

# /proc/cpuinfo flags that matter to kt-kernel's AMXINT4 / AMXINT8 backends (at serve time, not to convert)
AVX512_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")
AMX_FLAGS = ("amx_tile", "amx_int8", "amx_bf16")


def _cgroup_file(controller: str, name: str) -> Path | None:
    """This process's cgroup file `name` (v1: under the controller's hierarchy; v2: the unified one)."""
    try:
        lines = PROC_CGROUP.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            base = CGROUP_ROOT / controller
        elif controllers == "":
            base = CGROUP_ROOT
        else:
            continue
        # a container usually sees its own cgroup at the root of the mount (cgroup namespace)
        for folder in (base / path.lstrip("/"), base):
            if (folder / name).is_file():
                return folder / name
    return None


def _read_cgroup(controller: str, name: str) -> str | None:
    path = _cgroup_file(controller, name)
    try:
        return path.read_text().strip() if path else None
    except OSError:
        return None


def cgroup_cpu_limit() -> int | None:
    """CPUs this process's cgroup quota allows (rounded up), or None without a quota."""
    v2 = _read_cgroup("cpu", "cpu.max")  # "max 100000" or "200000 100000"
    if v2 is not None:
        quota, _, period = v2.partition(" ")
    else:
        quota, period = _read_cgroup("cpu", "cpu.cfs_quota_us"), _read_cgroup("cpu", "cpu.cfs_period_us")
    try:
        quota_us, period_us = int(quota), int(period)
    except (TypeError, ValueError):  # "max", absent
        return None
    return max(1, math.ceil(quota_us / period_us)) if quota_us > 0 and period_us > 0 else None


def cgroup_memory_headroom() -> int | None:
    """What this process's cgroup may still take: limit - usage + reclaimable file cache; None without a limit."""
    limit = _read_cgroup("memory", "memory.max") or _read_cgroup("memory", "memory.limit_in_bytes")
    usage = _read_cgroup("memory", "memory.current") or _read_cgroup("memory", "memory.usage_in_bytes")
    if limit is None or usage is None or not limit.isdigit() or int(limit) >= _NO_LIMIT:
        return None
    stat = _read_cgroup("memory", "memory.stat") or ""
    fields = dict(line.split(" ", 1) for line in stat.splitlines() if " " in line)
    reclaimable = int(fields.get("inactive_file", fields.get("total_inactive_file", "0")))
    return max(0, int(limit) - int(usage) + reclaimable)


def cpu_cores() -> int:
    """CPUs this process may run on: its affinity (taskset, cpuset), capped by a cgroup CPU quota. The default
    thread count."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    return min(cores, quota) if quota else cores


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
    """Memory that can be had without swapping (MemAvailable: free plus reclaimable page cache), within this
    process's cgroup limit."""
    available = psutil.virtual_memory().available
    headroom = cgroup_memory_headroom()
    return min(available, headroom) if headroom is not None else available


def existing_ancestor(path: Path) -> Path:
    """path itself or its nearest existing parent: where a folder about to be created will live."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_free(path: Path) -> int:
    """Free bytes on the file system that holds (or will hold) path."""
    return shutil.disk_usage(existing_ancestor(path)).free
