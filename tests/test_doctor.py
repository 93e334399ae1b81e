"""ktq/system.py on fake sysfs and /proc files (machines this one is not), and `ktq doctor`."""

from __future__ import annotations

import json
import os
import shutil
from importlib import metadata
from pathlib import Path

import pytest

from ktq import doctor, system
from ktq.doctor import BLOCKED, LIMITED, READY, CommandStatus, Gpu, GpuReport


def _node(root: Path, name: str, cpulist: str) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "cpulist").write_text(cpulist + "\n")


def test_numa_nodes_counts_nodes_with_cpus(tmp_path):
    _node(tmp_path, "node0", "0-31,64-95")
    _node(tmp_path, "node1", "32-63,96-127")
    _node(tmp_path, "node2", "")  # memory only (CXL / HBM): kt-kernel runs no threads there
    (tmp_path / "possible").write_text("0-2\n")
    assert system.numa_nodes(tmp_path) == 2


def test_numa_nodes_is_one_without_sysfs(tmp_path):
    assert system.numa_nodes(tmp_path / "missing") == 1


def test_cpu_flags_and_model_from_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
                   "flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512vl avx512_vnni amx_bf16 amx_tile amx_int8\n\n"
                   "processor\t: 1\nflags\t\t: fpu\n")
    assert {"avx512f", "amx_tile", "amx_int8"} <= system.cpu_flags(x86) and "fpu" in system.cpu_flags(x86)
    assert system.cpu_model(x86) == "Intel(R) Xeon(R) Platinum 8480+"
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve\nModel\t: Raspberry Pi 5\n")
    assert system.cpu_flags(arm) == {"fp", "asimd", "sve"} and system.cpu_model(arm) == "Raspberry Pi 5"
    assert system.cpu_flags(tmp_path / "absent") == set()


def _cgroups(tmp_path: Path, monkeypatch, membership: str, files: dict[str, str]) -> None:
    """A fake /proc/self/cgroup and /sys/fs/cgroup tree."""
    (tmp_path / "proc-cgroup").write_text(membership)
    for rel, text in files.items():
        (tmp_path / "fs" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fs" / rel).write_text(text + "\n")
    monkeypatch.setattr(system, "PROC_CGROUP", tmp_path / "proc-cgroup")
    monkeypatch.setattr(system, "CGROUP_ROOT", tmp_path / "fs")


def test_cgroup_v2_limits_cap_cpus_and_memory(tmp_path, monkeypatch):
    _cgroups(tmp_path, monkeypatch, "0::/user.slice/job\n", {
        "user.slice/job/cpu.max": "50000 100000",
        "user.slice/job/memory.max": str(4 << 30),
        "user.slice/job/memory.current": str(1 << 30),
        "user.slice/job/memory.stat": f"anon {1 << 29}\ninactive_file {1 << 29}\nactive_file {1 << 28}",
    })
    assert system.cgroup_cpu_limit() == 1 and system.cpu_cores() == 1
    assert system.cgroup_memory_headroom() == (4 << 30) - (1 << 30) + (1 << 29)
    assert system.ram_available() <= (3 << 30) + (1 << 29)  # whatever the machine has


def test_cgroup_v1_limits_from_the_namespace_root(tmp_path, monkeypatch):
    _cgroups(tmp_path, monkeypatch, "5:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n", {
        "cpu/cpu.cfs_quota_us": "250000", "cpu/cpu.cfs_period_us": "100000",
        "memory/memory.limit_in_bytes": str(8 << 30), "memory/memory.usage_in_bytes": str(9 << 30),
        "memory/memory.stat": "cache 0\ntotal_inactive_file 0",
    })
    assert system.cgroup_cpu_limit() == 3
    assert system.cgroup_memory_headroom() == 0 and system.ram_available() == 0


def test_no_cgroup_limits(tmp_path, monkeypatch):
    _cgroups(tmp_path, monkeypatch, "0::/\n", {"cpu.max": "max 100000", "memory.max": "max",
                                                "memory.current": "123"})
    assert system.cgroup_cpu_limit() is None and system.cgroup_memory_headroom() is None
    assert system.cpu_cores() == len(os.sched_getaffinity(0))
    _cgroups(tmp_path, monkeypatch, "4:memory:/\n", {"memory/memory.limit_in_bytes": "9223372036854771712",
                                                     "memory/memory.usage_in_bytes": "1"})
    assert system.cgroup_memory_headroom() is None


def test_disk_free_of_a_folder_not_created_yet(tmp_path):
    future = tmp_path / "a" / "b" / "out"
    assert system.existing_ancestor(future) == tmp_path
    assert abs(system.disk_free(future) - shutil.disk_usage(tmp_path).free) < 64e6


GPU_PACKAGES = doctor.REQUIREMENTS["gpu"]
H100 = GpuReport([Gpu("NVIDIA H100 80GB HBM3", 85520809984)], "torch", "torch 2.13.0, CUDA 12.8")
NO_GPU = GpuReport([], "torch", "torch 2.13.0+cpu (CPU-only build) sees no CUDA GPU")
PINS = {"torch": "2.13.0", "transformers": "5.17.0"}


def _versions(**overrides) -> dict:
    versions = {dist: "1.0" for dist in doctor.PACKAGES}
    versions.update({"torch": "2.13.0+cu128", "transformers": "5.17.0"})
    versions.update({k.replace("_", "-"): v for k, v in overrides.items()})
    return versions


def test_gpu_command_needs_its_packages_and_a_gpu():
    assert doctor.command_status("gpu", _versions(), PINS, H100, set()) == \
        CommandStatus("gpu", READY, "everything it needs is installed")
    missing = doctor.command_status("gpu", _versions(llmcompressor=None, datasets=None), PINS, H100, set())
    assert missing == CommandStatus("gpu", BLOCKED, "missing llmcompressor, datasets: pip install 'ktq[gpu]'")
    cpu_only = doctor.command_status("gpu", _versions(), PINS, NO_GPU, set())
    assert cpu_only.status == LIMITED and "runs on the CPU" in cpu_only.reason
    smi_only = GpuReport(H100.gpus, "nvidia-smi", "torch cannot use them")
    assert doctor.command_status("gpu", _versions(), PINS, smi_only, set()).status == LIMITED
    off_pin = doctor.command_status("gpu", _versions(transformers="5.16.0"), PINS, H100, set())
    assert off_pin == CommandStatus("gpu", LIMITED, "transformers 5.16.0 is not the tested 5.17.0")


def test_cpu_command_runs_anywhere_and_says_where_its_output_can_be_served():
    amx = doctor.command_status("cpu", _versions(), PINS, NO_GPU, {"avx512f", "amx_tile"})
    assert amx.status == READY and "can also serve the output (AMX)" in amx.reason
    plain = doctor.command_status("cpu", _versions(), PINS, NO_GPU, {"avx2"})
    assert plain.status == READY and "needs AVX-512 or AMX, which this CPU lacks" in plain.reason
    assert doctor.command_status("cpu", _versions(numba=None), PINS, NO_GPU, set()) == \
        CommandStatus("cpu", BLOCKED, "missing numba: pip install numba")
    assert doctor.command_status("inspect", _versions(), PINS, NO_GPU, set()).status == READY  # nothing extra


def test_pins_come_from_ktq_metadata():
    pins = doctor.pinned_versions()
    for requirement in metadata.requires("ktq"):
        if requirement.startswith("torch=="):
            assert pins["torch"] == requirement.split("==")[1].split(";")[0].strip()
    assert set(GPU_PACKAGES) <= set(pins)


def test_gpus_from_nvidia_smi_when_torch_is_absent(tmp_path, monkeypatch):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 81559'\necho 'NVIDIA H100 80GB HBM3, 81559'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    report = doctor.detect_gpus(torch_installed=False)
    assert report.source == "nvidia-smi"
    assert report.gpus == [Gpu("NVIDIA H100 80GB HBM3", 81559 * 2**20)] * 2
    assert "install torch with CUDA" in report.note


def test_doctor_reports_this_machine(ktq, tmp_path):
    result = ktq("doctor", "--json", "--path", tmp_path / "not" / "yet")
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["cpu"]["numa_nodes"] == system.numa_nodes()
    assert report["cpu"]["logical_cpus"] == len(os.sched_getaffinity(0))
    assert report["disk"]["path"] == str(tmp_path)
    assert report["packages"]["numba"]["installed"] == metadata.version("numba")
    from ktq.cli import app

    names = [status["name"] for status in report["commands"]]
    assert names == [command.name for command in app.registered_commands] and {"cpu", "doctor"} <= set(names)
    if shutil.which("nvidia-smi") is None:
        assert report["gpus"]["devices"] == []
    table = ktq("doctor")
    assert table.code == 0 and "NUMA nodes" in table.stdout and "commands" in table.stdout


@pytest.mark.parametrize("flag", ["avx512f", "amx_tile"])
def test_doctor_lists_the_cpu_features_it_found(ktq, tmp_path, monkeypatch, flag):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"model name\t: Test CPU\nflags\t\t: fpu {flag}\n")
    monkeypatch.setattr(system, "CPUINFO", cpuinfo)
    report = json.loads(ktq("doctor", "--json").stdout)
    assert report["cpu"]["model"] == "Test CPU"
    assert report["cpu"]["avx512" if flag.startswith("avx") else "amx"] == [flag]
