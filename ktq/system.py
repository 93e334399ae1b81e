"""What this machine offers: cores, NUMA nodes."""

from __future__ import annotations

import os
from pathlib import Path


def cpu_cores() -> int:
    """Cores this process may run on (respects taskset / cgroup affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def numa_nodes() -> int:
    """NUMA nodes with CPUs, from sysfs; 1 where sysfs does not say."""
    nodes = [p for p in Path("/sys/devices/system/node").glob("node[0-9]*") if (p / "cpulist").is_file()
             and (p / "cpulist").read_text().strip()]
    return max(1, len(nodes))
