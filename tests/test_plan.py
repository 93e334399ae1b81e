"""`ktq cpu --dry-run` and the guard before real runs: the estimates against what real runs produce and use."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ktq.atomic import json_text
from ktq.cpu import plan as plan_module
from ktq.cpu.layout import Layout
from ktq.cpu.measure import READ_PROBE_BYTES
from ktq.cpu.output import extra_files_bytes, index_data
from ktq.kernels import ktformat as fmt
from ktq.safetensors_io import TensorReader, read_header
from ktq.sample import write_sample

# (sample, ktq cpu options): the big samples make the pipeline's buffers a large share of the peak, so a wrong
# buffer model cannot hide inside the 20% tolerance; FP8 adds the decode buffers and the decoder's code.
SAMPLES = {
    "bf16-big": dict(layers=1, experts=3, hidden=4096, moe_intermediate=2048, dtype="bf16", shards=1),
    "fp8-big": dict(layers=1, experts=3, hidden=2048, moe_intermediate=2048, dtype="fp8", shards=1),
    # MoE layers 1..11: shard headers of one- and two-digit layer indices differ in size
    "bf16-small": dict(layers=12, dense_layers=1, experts=4, hidden=256, moe_intermediate=256, dtype="bf16"),
}
CASES = {
    "bf16-big-int4-merged": ("bf16-big", ["--quant-method", "int4", "--threadpool-count", "1"]),
    "fp8-big-int8-kt-numa2": ("fp8-big", ["--quant-method", "int8", "--threadpool-count", "2",
                                          "--no-merge-safetensor"]),
    "bf16-small-int4-merged": ("bf16-small", ["--quant-method", "int4", "--threadpool-count", "1"]),
}


@pytest.fixture(scope="session")
def sample(tmp_path_factory):
    """sample(name) -> the folder of SAMPLES[name], written on first use."""
    root = tmp_path_factory.mktemp("plan-samples")

    def get(name: str) -> Path:
        folder = root / name
        return folder if folder.is_dir() else write_sample(folder, **SAMPLES[name])

    return get


# Runs `python -m ktq ARGS` from a small parent that prints its child's peak RSS: a child forked from pytest itself
# would count pytest's pages, resident until its exec, in its own peak.
_MEASURE = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")


def _ktq_process(args: list, log: Path) -> tuple[int, int]:
    """(exit code, peak RSS in bytes) of `ktq ARGS` as its own process."""
    with open(log, "w") as err:
        proc = subprocess.run([sys.executable, "-c", _MEASURE, sys.executable, "-m", "ktq", *map(str, args)],
                              stdout=subprocess.PIPE, stderr=err, text=True)
    return proc.returncode, int(proc.stdout.split()[-1]) * 1024  # Linux reports KiB


@pytest.fixture(scope="session")
def runs(sample, tmp_path_factory) -> dict[str, dict]:
    """Per case: the dry run's plan, then a real run's peak RSS and the bytes of the files it wrote."""
    root = tmp_path_factory.mktemp("plan-runs")
    results = {}
    for case, (name, options) in CASES.items():
        out = root / case
        args = ["cpu", "-i", sample(name), "-o", out, *options]
        dry = subprocess.run([sys.executable, "-m", "ktq", *map(str, args), "--dry-run", "--json"],
                             capture_output=True, text=True)
        assert dry.returncode == 0, dry.stderr
        code, peak = _ktq_process([*args, "--quiet"], root / f"{case}.log")
        assert code == 0, (root / f"{case}.log").read_text()
        files = [p for p in out.rglob("*") if p.is_file()]
        results[case] = {"plan": json.loads(dry.stdout), "peak": peak,
                         "bytes": sum(p.stat().st_size for p in files if p.name != "ktq.json")}
        print(f"\n{case}: peak RSS estimated {results[case]['plan']['peak_ram'] / 1e6:.1f} MB, "
              f"measured {peak / 1e6:.1f} MB")
    return results


@pytest.mark.parametrize("case", CASES)
def test_output_size_is_exact(runs, case):
    assert runs[case]["plan"]["output_bytes"] == runs[case]["bytes"]


@pytest.mark.parametrize("case", CASES)
def test_peak_ram_is_within_20_percent_of_a_real_run(runs, case):
    estimate, measured = runs[case]["plan"]["peak_ram"], runs[case]["peak"]
    assert abs(estimate - measured) <= 0.2 * measured, (estimate, measured)


def test_the_buffer_model_explains_how_the_peak_grows_with_the_model(runs):
    """The baseline is measured; the buffers are modelled. Their growth between a tiny and a big geometry must
    match the growth of the real peaks."""
    small = runs["bf16-small-int4-merged"]
    for case in ("bf16-big-int4-merged", "fp8-big-int8-kt-numa2"):
        big = runs[case]
        modelled = sum(big["plan"][k] - small["plan"][k] for k in ("ram_read_buffers", "ram_write_buffers"))
        measured = big["peak"] - small["peak"]
        assert modelled > 100e6  # the big samples are dominated by buffers
        assert abs(modelled - measured) <= 0.2 * measured, (case, modelled, measured)


def test_the_plan_describes_the_run(runs):
    plan = runs["fp8-big-int8-kt-numa2"]["plan"]
    assert (plan["input_type"], plan["method"], plan["form"], plan["numa"]) == ("fp8", "int8", "kt", 2)
    assert plan["layers"] == [0] and plan["experts"] == 3
    assert plan["input_bytes"] == 3 * 3 * (2048 * 2048 + 4 * 16 * 16)  # e4m3 weights and fp32 128x128-block scales
    assert plan["fits"] and not plan["problems"]
    assert plan["seconds"] == pytest.approx(plan["input_bytes"] / min(plan["read_bytes_per_second"],
                                                                      plan["kernel_bytes_per_second"]))


@pytest.mark.parametrize("layers", [(), (0,), (3, 4), tuple(range(1, 12)), (9, 10, 99, 100, 101)])
@pytest.mark.parametrize("method, numa, experts", [("int4", 1, 4), ("int8", 2, 3)])
def test_sizes_known_without_encoding_every_layer_are_those_of_the_encoded_files(layers, method, numa, experts):
    """The plan takes shard header and index sizes from one layer per index width; the files hold every layer."""
    layout = Layout("merged", fmt.METHODS[method], numa, 256, 256, experts, layers)
    assert extra_files_bytes(layout, None) == len(json_text(index_data(layout)).encode())
    for layer in layers:
        assert layout.layer_bytes(layer) == len(layout.shard_header(layer)) + experts * layout.expert_bytes()


# --- a DeepSeek-V3-scale checkpoint that holds no data ------------------------------------------------------------

@pytest.fixture(scope="session")
def deepseek_scale(tmp_path_factory) -> Path:
    """DeepSeek-V3 as published: its layout and MoE geometry (61 layers and the MTP layer 61, 3 dense, 256 experts,
    hidden 7168, moe_intermediate 2048), block-scaled FP8, 163 shards whose headers describe 0.67 TB, written as
    sparse files of zeros."""
    return write_sample(tmp_path_factory.mktemp("ds") / "DeepSeek-V3-scale", arch="deepseek_v3", dtype="fp8",
                        layers=61, dense_layers=3, experts=256, hidden=7168, moe_intermediate=2048, shards=163,
                        header_only=True)


def _bytes_read_by_this_process() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def test_dry_run_at_deepseek_v3_scale_reads_headers_only(ktq, deepseek_scale, small, tmp_path, monkeypatch):
    shards = sorted(deepseek_scale.glob("*.safetensors"))
    described = sum(p.stat().st_size for p in shards)
    metadata_bytes = sum(p.stat().st_size for p in deepseek_scale.glob("*.json"))  # config and index
    for shard in shards:
        with open(shard, "rb") as f:
            metadata_bytes += 8 + int.from_bytes(f.read(8), "little")
    assert described > 0.65e12 and len(shards) == 163
    # a first dry run imports the modules and loads the kernels, so that the bytes counted below are the plan's
    assert ktq("cpu", "-i", small, "-o", tmp_path / "warm", "--dry-run", "--json").code == 0

    def no_tensor_reads(*args):
        raise AssertionError("the dry run read a tensor")

    probed = []

    def counting_read_rate(*args):
        rate = read_rate(*args)
        probed.append(rate.nbytes)
        return rate

    read_rate = plan_module.read_rate
    monkeypatch.setattr(TensorReader, "read_into", no_tensor_reads)
    monkeypatch.setattr(plan_module, "read_rate", counting_read_rate)
    before, started = _bytes_read_by_this_process(), time.perf_counter()
    result = ktq("cpu", "-i", deepseek_scale, "-o", tmp_path / "out", "--dry-run", "--json")
    elapsed, read = time.perf_counter() - started, _bytes_read_by_this_process() - before
    print(f"\ndry run over {described / 1e12:.2f} TB described by {len(shards)} shards: {elapsed:.2f} s in-process, "
          f"{read / 1e6:.1f} MB read ({metadata_bytes / 1e6:.1f} MB of headers and JSON, {sum(probed) / 1e6:.1f} MB "
          "speed probe)")

    plan = json.loads(result.stdout)
    assert plan["input_type"] == "fp8" and plan["layers"] == list(range(3, 61)) and plan["experts"] == 58 * 256
    assert plan["input_bytes"] == 58 * 256 * 3 * (7168 * 2048 + 4 * (7168 // 128) * (2048 // 128))  # + scale_inv
    assert plan["output_bytes"] > 58 * 256 * 3 * (7168 * 2048 // 2)  # INT4 bodies, plus scales and headers
    assert plan["fits"] == (plan["disk_needed"] <= plan["disk_free"] and plan["peak_ram"] <= plan["ram_available"])
    assert result.code == (0 if plan["fits"] else 2)
    assert len(probed) == 1 and probed[0] <= READ_PROBE_BYTES
    # Everything read besides the one bounded speed probe: the headers, config.json and the index, and a little
    # more (/proc, sysfs), far less than one expert projection (15 MB) of the 0.67 TB described.
    assert read - probed[0] <= metadata_bytes + 2e6


# --- the guard, resume awareness and NUMA -------------------------------------------------------------------------

@pytest.fixture(scope="session")
def small(sample) -> Path:
    return sample("bf16-small")


def test_a_run_that_does_not_fit_is_refused_and_force_overrides(ktq, small, tmp_path, monkeypatch):
    monkeypatch.setattr(plan_module, "ram_available", lambda: 1_000_000)
    out = tmp_path / "out"
    refused = ktq("cpu", "-i", small, "-o", out, "--quiet")
    assert refused.code == 2
    assert refused.stderr.startswith("ktq: error: this conversion does not fit: peak RAM")
    assert "1.0 MB available" in refused.stderr and "--force" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert not out.exists()
    forced = ktq("cpu", "-i", small, "-o", out, "--quiet", "--force")
    assert forced.code == 0, forced.stderr
    assert forced.stderr.startswith("ktq: warning: this conversion does not fit: peak RAM")
    assert forced.stderr.rstrip().endswith("running anyway (--force)")
    assert json.loads((out / "ktq.json").read_text())["complete"]


def test_dry_run_that_does_not_fit_prints_the_plan_and_exits_2(ktq, small, tmp_path, monkeypatch):
    monkeypatch.setattr(plan_module, "disk_free", lambda path: 4096)
    result = ktq("cpu", "-i", small, "-o", tmp_path / "out", "--dry-run", "--json")
    assert result.code == 2
    plan = json.loads(result.stdout)
    assert not plan["fits"] and plan["disk_free"] == 4096
    assert plan["problems"] == [f"the output needs {plan['disk_needed'] / 1e6:.1f} MB more on the disk of "
                                f"{tmp_path}, which has 0.0 MB free"]
    assert result.stderr.startswith("ktq: error: this conversion would not fit: the output needs")
    table = ktq("cpu", "-i", small, "-o", tmp_path / "out", "--dry-run")
    assert table.code == 2 and "does not fit" in table.stdout and "peak RAM" in table.stdout
    assert not (tmp_path / "out").exists()


def test_the_plan_counts_only_the_layers_still_to_convert(ktq, small, tmp_path):
    out = tmp_path / "out"
    assert ktq("cpu", "-i", small, "-o", out, "--quiet", "--threadpool-count", "1").code == 0
    done = json.loads(ktq("cpu", "-i", small, "-o", out, "--dry-run", "--json", "--threadpool-count", "1").stdout)
    assert done["moe_layers"] == list(range(1, 12)) and done["layers"] == [] and done["input_bytes"] == 0
    assert done["ram_read_buffers"] == done["ram_write_buffers"] == 0
    written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and p.name != "ktq.json")
    assert done["output_bytes"] == written
    redo = json.loads(ktq("cpu", "-i", small, "-o", out, "--dry-run", "--json", "--threadpool-count", "1",
                          "--resume-layer", "10").stdout)
    assert redo["layers"] == [10, 11] and redo["input_bytes"] == 2 * 4 * 3 * 256 * 256 * 2
    other = json.loads(ktq("cpu", "-i", small, "-o", out, "--dry-run", "--json", "--threadpool-count", "1",
                           "--quant-method", "int8").stdout)
    assert other["layers"] == done["moe_layers"]  # another method cannot continue this output


def test_numa_count_defaults_to_the_machine_and_a_different_count_warns(ktq, small, tmp_path, monkeypatch):
    import ktq.commands.cpu as cpu_command

    for module in (plan_module, cpu_command):
        monkeypatch.setattr(module, "numa_nodes", lambda: 2)
    default = json.loads(ktq("cpu", "-i", small, "-o", tmp_path / "a", "--dry-run", "--json").stdout)
    assert default["numa"] == default["machine_numa_nodes"] == 2 and default["warnings"] == []
    chosen = json.loads(ktq("cpu", "-i", small, "-o", tmp_path / "b", "--dry-run", "--json",
                            "--threadpool-count", "1").stdout)
    assert chosen["numa"] == 1
    warning = ("--threadpool-count 1 differs from this machine's 2 NUMA nodes: the count is baked into the "
               "output, which must be served with --kt-threadpool-count 1")
    assert chosen["warnings"] == [warning]
    run = ktq("cpu", "-i", small, "-o", tmp_path / "b", "--threadpool-count", "1", "--quiet")
    assert run.code == 0 and run.stderr == f"ktq: warning: {warning}\n"
    assert json.loads((tmp_path / "b" / "ktq.json").read_text())["numa"] == 1


def test_json_goes_with_dry_run(ktq, small, tmp_path):
    result = ktq("cpu", "-i", small, "-o", tmp_path / "out", "--json")
    assert result.code == 2 and "--dry-run" in result.stderr and not (tmp_path / "out").exists()


def test_a_header_only_sample_has_the_headers_and_sizes_of_the_real_one(tmp_path):
    options = dict(layers=2, experts=4, hidden=256, moe_intermediate=128, shards=3)
    real = write_sample(tmp_path / "real", **options)
    empty = write_sample(tmp_path / "empty", header_only=True, **options)
    shards = sorted(p.name for p in real.glob("*.safetensors"))
    assert shards == sorted(p.name for p in empty.glob("*.safetensors")) and len(shards) == 3
    for name in shards:
        assert (real / name).stat().st_size == (empty / name).stat().st_size
        real_tensors, real_meta = read_header(real / name)
        empty_tensors, empty_meta = read_header(empty / name)
        assert real_meta == empty_meta
        assert {k: (v.dtype, v.shape, v.offset, v.nbytes) for k, v in real_tensors.items()} == \
               {k: (v.dtype, v.shape, v.offset, v.nbytes) for k, v in empty_tensors.items()}
    assert (real / "model.safetensors.index.json").read_text() == (empty / "model.safetensors.index.json").read_text()
