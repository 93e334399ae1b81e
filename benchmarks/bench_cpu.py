#!/usr/bin/env python
"""`ktq cpu` speed and memory on this machine, every figure next to a reference measured in the same run.

    .venv/bin/python benchmarks/bench_cpu.py [--work /tmp/ktq-bench] [--repeat 3] [--deepseek]

Inputs are built with `ktq sample` (kept in --work between runs, so only the first run pays for them):
a 4-layer sample of Qwen3-30B-A3B geometry (128 experts, hidden 2048, moe_intermediate 768: 1.21 GB of BF16 per
layer), the same in block-scaled FP8, a tiny sample for start-up and compile cost, and with --deepseek a one-layer
sample of DeepSeek-V3 geometry (256 experts, hidden 7168, moe_intermediate 2048: 22.5 GB, deleted afterwards) for
its peak RSS.

Measured (medians of --repeat runs; each timed step first waits, up to a few minutes, for the CPUs to be idle
enough, and records how idle they were):
- kernel: quantize_pack_expert over experts already in memory, 1 and 2 threads, INT4 and INT8, against a memcpy
  of the same bytes;
- whole command: `ktq cpu` as a subprocess (start-up included) on the page-cached sample, both output forms,
  against reading the input once plus writing the output once, and against kt-kernel 0.7.2's in-memory rate;
  FP8 input against BF16 input of the same geometry (the same output);
- peak RSS of each conversion (wait4 of the child), and of a tiny conversion as the fixed overhead;
- Numba compile time (a cold cache against a warm one) and whether start-up imports torch or transformers.
Results go to benchmarks/results/ as JSON and markdown, with the machine described.
"""

from __future__ import annotations

import argparse
import json
import math
import mmap
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `ktq cpu` sets it (ktq/commands/cpu.py)
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numba
import numpy as np
import psutil

from ktq.cpu.checkpoint import open_checkpoint
from ktq.cpu.experts import find_experts
from ktq.cpu.layout import Layout
from ktq.cpu.pipeline import PackedExpert
from ktq.kernels import ktformat as fmt
from ktq.kernels.amx import quantize_pack_expert
from ktq.safetensors_io import TensorReader

RESULTS = Path(__file__).resolve().parent / "results"
KTQ = [sys.executable, "-m", "ktq"]
TIME = shutil.which("time", path="/usr/bin:/bin") or "/usr/bin/time"  # GNU time, for the peak RSS of a child
QWEN = dict(layers=4, experts=128, hidden=2048, moe_intermediate=768)
DEEPSEEK = dict(layers=1, experts=256, hidden=7168, moe_intermediate=2048)
TINY = dict(layers=1, experts=4, hidden=256, moe_intermediate=256)
NUMA = 2
# kt-kernel 0.7.2's own online quantizer on this kind of machine, BF16 already in memory, 2 threads, 1 NUMA part
# (issue 5): GB/s of BF16 input, one Qwen3-30B-A3B layer of 1.21 GB.
KT_KERNEL_RATE = {"int4": 0.70, "int8": 0.49}
KERNEL_EXPERTS = 16  # 151 MB of BF16: far more than the last-level cache, as in a real conversion
CHUNK = 8 << 20


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cpu_idle(seconds: float = 2.0) -> float:
    """Fraction of the machine's CPU time that was idle over the next `seconds` (from /proc/stat)."""
    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total

    idle0, total0 = sample()
    time.sleep(seconds)
    idle1, total1 = sample()
    return (idle1 - idle0) / max(1, total1 - total0)


def wait_quiet(min_idle: float, timeout: float) -> float:
    """Wait until the CPUs are at least min_idle idle over 2 s (other people share this machine), at most
    timeout seconds; returns the idle fraction it got."""
    deadline = time.monotonic() + timeout
    idle = cpu_idle()
    while idle < min_idle and time.monotonic() < deadline:
        idle = cpu_idle()
    return idle


def machine() -> dict:
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)  # starts the threading layer, to name it
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    flags = fields.get("Flags", "")
    return {"cpu": fields.get("Model name", platform.processor()).strip(), "cores": os.cpu_count(),
            "ram_gib": round(psutil.virtual_memory().total / 2**30, 1), "kernel": platform.release(),
            "avx512": "avx512f" in flags, "amx": "amx_tile" in flags, "python": platform.python_version(),
            "numpy": np.__version__, "numba": numba.__version__, "threading_layer": numba.threading_layer()}


def sample(work: Path, name: str, shape: dict) -> Path:
    path = work / name
    if not (path / "config.json").is_file():
        shutil.rmtree(path, ignore_errors=True)
        args = [f"--{k.replace('_', '-')}={v}" for k, v in shape.items()]
        subprocess.run([*KTQ, "sample", str(path), *args], check=True, stdout=subprocess.DEVNULL)
    return path


def page_in(path: Path) -> float:
    """Read every file under path once (into the page cache); returns the seconds it took."""
    buf = bytearray(CHUNK)
    started = time.perf_counter()
    for file in sorted(path.rglob("*")):
        if file.is_file():
            with open(file, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass
    return time.perf_counter() - started


def raw_write(out: Path, sizes: list[int], fsync: bool, direct: bool = False) -> float:
    """Write files of these sizes from one reused buffer (what writing the output costs at the least), through the
    page cache or with O_DIRECT (whole 4 KB blocks, then cut to size): the seconds of the writes (and of the
    fsyncs). Files left by an earlier call into the same folder are overwritten, not created again."""
    out.mkdir(parents=True, exist_ok=True)
    data = memoryview(np.frombuffer(mmap.mmap(-1, CHUNK), np.uint8))  # page-aligned, as O_DIRECT needs
    data[:] = np.random.default_rng(0).integers(0, 256, CHUNK, np.uint8)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
    started = time.perf_counter()
    for i, size in enumerate(sizes):
        fd = os.open(out / f"{i}.bin", flags, 0o644)
        left = -(-size // 4096) * 4096 if direct else size
        while left > 0:
            left -= os.write(fd, data[:min(left, CHUNK)])
        if direct:
            os.ftruncate(fd, size)
        if fsync:
            os.fsync(fd)
        os.close(fd)
    return time.perf_counter() - started


def layout(model, method: fmt.Method, form: str) -> Layout:
    g = model.geometry
    return Layout(form, method, NUMA, g.hidden, g.intermediate, g.experts, tuple(layer.index for layer in model.layers))


def output_file_sizes(model, method: fmt.Method, form: str) -> list[int]:
    """The sizes of the files of the output (the layers; the few small files beside them aside)."""
    out = layout(model, method, form)
    if form == "merged":
        return [out.layer_bytes(layer) for layer in out.layers]
    return [size for layer in out.layers for _, size in out.kt_files(layer)]


def run_ktq(args: list, env: dict | None = None) -> tuple[float, int, float, str]:
    """Run `ktq ARGS` as a child process: (wall seconds, its own peak RSS in bytes, its CPU seconds, stderr).

    The child is started through GNU time, a small process: the peak RSS the kernel reports for a child forked
    straight from this (large) benchmark process would include this process's own RSS at the fork.
    """
    with tempfile.NamedTemporaryFile() as rss, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.run([TIME, "-f", "%M %U %S", "-o", rss.name, *KTQ, *map(str, args)],
                              stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, **(env or {})})
        seconds = time.perf_counter() - started
        err.seek(0)
        stderr = err.read().decode()
        peak_kb, user, system = Path(rss.name).read_text().split()[-3:]
    if proc.returncode != 0:
        raise SystemExit(f"ktq {' '.join(map(str, args))} failed:\n{stderr}")
    return seconds, int(peak_kb) * 1024, float(user) + float(system), stderr


def convert_args(src: Path, out: Path, method: str, form: str) -> list:
    return ["cpu", "-i", src, "-o", out, "--quant-method", method, "--threadpool-count", NUMA, "--quiet",
            *(["--no-merge-safetensor"] if form == "kt" else [])]


def bench_kernel(src: Path, repeat: int, min_idle: float) -> dict:
    model = find_experts(open_checkpoint(src))
    experts = []
    with TensorReader() as reader:
        for expert in model.layers[0].experts[:KERNEL_EXPERTS]:
            matrices = [source.read(reader, np.empty(source.shape, np.uint16), np.empty(0, np.uint8))
                        for source in expert.values()]
            for m in matrices:
                m.flags.writeable = False  # the pipeline's read-only signature
            experts.append(matrices)
    nbytes = sum(m.nbytes for ms in experts for m in ms)
    copies = [[np.empty_like(m) for m in matrices] for matrices in experts]  # as large as the source: not cached
    results = {"bytes": nbytes, "experts": len(experts), "repeat": repeat}

    def memcpy() -> None:
        for matrices, targets in zip(experts, copies):
            for dst, m in zip(targets, matrices):
                np.copyto(dst, m)

    def median_rate(step) -> tuple[float, float, float]:
        """(GB/s, GB per CPU-second of this process, CPU idle fraction before) over repeat runs of step, each
        repeated for at least half a second (one pass takes milliseconds: too short to time on a shared host)."""
        step()  # compiles, touches the output once
        started = time.perf_counter()
        step()
        passes = math.ceil(0.5 / (time.perf_counter() - started))
        idle = wait_quiet(min_idle, 120)
        times, cpu = [], []
        for _ in range(repeat):
            started, cpu_started = time.perf_counter(), time.process_time()
            for _ in range(passes):
                step()
            times.append(time.perf_counter() - started)
            cpu.append(time.process_time() - cpu_started)
        done = nbytes * passes
        return done / statistics.median(times) / 1e9, done / statistics.median(cpu) / 1e9, idle

    results["memcpy_gbps"], _, _ = median_rate(memcpy)
    for method in (fmt.INT4, fmt.INT8):
        packed = PackedExpert(layout(model, method, "merged"))
        for threads in (1, 2):
            numba.set_num_threads(threads)

            def kernel() -> None:
                for gate, up, down in experts:
                    quantize_pack_expert(gate, up, down, NUMA, method.bits, packed.words, packed.floats,
                                         packed.offsets, threads)

            key = f"{method.name}_{threads}t"
            log(f"kernel {key}")
            results[f"{key}_gbps"], results[f"{key}_cpu_gbps"], results[f"{key}_idle"] = median_rate(kernel)
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    return results


def bench_command(inputs: dict[str, Path], work: Path, repeat: int, min_idle: float) -> dict:
    """`ktq cpu` in both methods and forms on the BF16 sample, and in both methods (merged) on the FP8 sample of the
    same geometry; the runs of each interleaved with the others (so that a busy spell of the machine does not fall on
    one of them only), each next to reading its input and writing its output."""
    models = {dtype: find_experts(open_checkpoint(src)) for dtype, src in inputs.items()}
    # Thousands of files deleted make ext4 creating the next ones slow (its allocator skips recently freed inodes:
    # a .kt run at 4.5 s became 8 s, sys time 1 s -> 5 s): each run of the .kt form writes into a folder of its
    # own, and those go only at the end (a user writes such an output once); the raw writes overwrite the files
    # of one folder per configuration. Disk used: 3 x (1.2 + 2.4) GB of .kt runs and 11 GB of raw writes.
    kept = work / "kept-outputs"
    shutil.rmtree(kept, ignore_errors=True)
    configs = [("bf16", method, form) for method in ("int4", "int8") for form in ("merged", "kt")]
    configs += [(dtype, method, "merged") for dtype in inputs if dtype != "bf16" for method in ("int4", "int8")]
    sizes = {c: output_file_sizes(models[c[0]], fmt.METHODS[c[1]], c[2]) for c in configs}
    rows: dict[tuple[str, str, str], list[dict]] = {config: [] for config in configs}
    for run in range(repeat):
        for config in configs:
            dtype, method, form = config
            idle = wait_quiet(min_idle, 180)
            log(f"ktq cpu {dtype} {method}/{form}, run {run + 1} of {repeat} (CPUs {idle:.0%} idle)")
            page_in(inputs[dtype])  # into the page cache (what is not read for a minute is paged out on this VM)
            out = kept / f"{dtype}-{method}-run{run}" if form == "kt" else work / "out"
            seconds, rss, cpu, _ = run_ktq(convert_args(inputs[dtype], out, method, form))
            if form == "merged":
                shutil.rmtree(out)
            read = page_in(inputs[dtype])
            raw = kept / f"{dtype}-{method}-{form}-raw"
            cached = raw_write(raw, sizes[config], fsync=False)
            direct = raw_write(raw, sizes[config], fsync=False, direct=True)
            write = min(cached, direct)  # the faster way to write the output here is the reference
            rows[config].append({"idle": idle, "read_s": read, "write_s": write, "write_cached_s": cached,
                                 "write_direct_s": direct, "ktq_s": seconds,
                                 "ktq_cpu_s": cpu, "peak_rss": rss})
    results = {"input_bytes": {dtype: sum(layer.input_bytes for layer in model.layers)
                               for dtype, model in models.items()},
               "layers": len(models["bf16"].layers), "repeat": repeat, "runs": []}
    for (dtype, method, form), runs in rows.items():
        results["runs"].append({
            "input": dtype, "method": method, "form": form, "output_bytes": sum(sizes[dtype, method, form]),
            "files": len(sizes[dtype, method, form]),
            "write_fsync_s": raw_write(kept / f"{dtype}-{method}-{form}-raw", sizes[dtype, method, form], fsync=True),
            "rows": runs,
            **{key: statistics.median(r[key] for r in runs)
               for key in ("read_s", "write_s", "write_cached_s", "write_direct_s", "ktq_s", "ktq_cpu_s", "peak_rss")},
            "ktq_best_s": min(r["ktq_s"] for r in runs)})
    shutil.rmtree(kept, ignore_errors=True)
    return results


def bench_startup(work: Path) -> dict:
    """Tiny conversion: warm (start-up + cached kernels), cold Numba cache, and what start-up imports."""
    src = sample(work, "tiny", TINY)
    out = work / "tiny-out"
    cache = work / "numba-cache"
    shutil.rmtree(cache, ignore_errors=True)
    env = {"NUMBA_CACHE_DIR": str(cache)}
    timings = {}
    for label in ("cold", "warm", "warm2"):
        shutil.rmtree(out, ignore_errors=True)
        timings[label], rss, _, _ = run_ktq(convert_args(src, out, "int4", "merged"), env)
    shutil.rmtree(out, ignore_errors=True)
    _, _, _, importtime = run_ktq(convert_args(src, out, "int4", "merged"), {**env, "PYTHONPROFILEIMPORTTIME": "1"})
    shutil.rmtree(out, ignore_errors=True)
    imported = {line.rsplit("|", 1)[-1].strip() for line in importtime.splitlines() if line.startswith("import time:")}
    warm = min(timings["warm"], timings["warm2"])
    return {"cold_s": timings["cold"], "warm_s": warm, "compile_s": timings["cold"] - warm, "overhead_rss": rss,
            "imports_torch": "torch" in imported, "imports_transformers": "transformers" in imported,
            "modules_imported": len(imported)}


def bench_deepseek(work: Path) -> dict:
    """Peak RSS of one DeepSeek-V3-geometry layer (22.5 GB of BF16), both forms; the sample is deleted after."""
    need = 22.6e9 + 11.5e9  # the sample and the INT8 output
    free = shutil.disk_usage(work).free
    if free < need:
        return {"skipped": f"needs {need / 1e9:.0f} GB free in {work}, has {free / 1e9:.0f} GB"}
    src = sample(work, "deepseek", DEEPSEEK)
    out = work / "deepseek-out"
    results = {"layer_bytes": find_experts(open_checkpoint(src)).layers[0].input_bytes, "runs": {}}
    try:
        for method in ("int4", "int8"):
            for form in ("merged", "kt"):
                shutil.rmtree(out, ignore_errors=True)
                log(f"DeepSeek-V3 layer, {method}/{form}")
                seconds, rss, cpu, _ = run_ktq(convert_args(src, out, method, form))
                results["runs"][f"{method}/{form}"] = {"ktq_s": seconds, "ktq_cpu_s": cpu, "peak_rss": rss}
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(src, ignore_errors=True)
    return results


def goals(r: dict) -> list[tuple[str, str, str, bool]]:
    """(goal, measured, ratio, met) rows of the issue's goals."""
    rows = []
    k = r["kernel"]
    for m in ("int4", "int8"):
        per_thread = min(k[f"{m}_1t_cpu_gbps"], k[f"{m}_2t_cpu_gbps"])
        one, two = k[f"{m}_1t_gbps"], k[f"{m}_2t_gbps"]
        rows.append((f"kernel {m.upper()} >= 2 GB/s per thread", f"{per_thread:.2f} GB per CPU-second (1 and 2 "
                     "threads, the lower)", f"{per_thread / 2:.2f}x", per_thread >= 2))
        rows.append((f"kernel {m.upper()} scales to 2 threads", f"{one:.2f} -> {two:.2f} GB/s",
                     f"{two / one:.2f}x", two / one >= 1.8))
        rows.append((f"kernel {m.upper()} against memcpy of the same bytes", f"{two:.2f} GB/s on 2 threads, memcpy "
                     f"{k['memcpy_gbps']:.2f} on 1", f"{two / k['memcpy_gbps']:.2f}x", True))
    c = r["command"]
    bf16 = c["input_bytes"]["bf16"]
    layer = bf16 / c["layers"]
    overhead = r["startup"]["overhead_rss"]
    by_config = {(run["input"], run["method"], run["form"]): run for run in c["runs"]}
    for run in c["runs"]:
        key = f"{run['method']}/{run['form']}"
        if run["input"] != "bf16":
            same = by_config["bf16", run["method"], run["form"]]
            rows.append((f"`ktq cpu` {key}: {run['input'].upper()} input no slower per output byte than BF16",
                         f"{run['ktq_s']:.2f} s, BF16 {same['ktq_s']:.2f} s (same output)",
                         f"{run['ktq_s'] / same['ktq_s']:.2f}x", run["ktq_s"] <= same["ktq_s"]))
            continue
        kt_s = bf16 / (KT_KERNEL_RATE[run["method"]] * 1e9)
        io_s = run["read_s"] + run["write_s"]
        rows.append((f"`ktq cpu` {key}: >= 3x kt-kernel", f"{run['ktq_s']:.2f} s, kt-kernel {kt_s:.2f} s",
                     f"{kt_s / run['ktq_s']:.2f}x", kt_s / run["ktq_s"] >= 3))
        rows.append((f"`ktq cpu` {key}: <= 1.5x read + write", f"{run['ktq_s']:.2f} s, read {run['read_s']:.2f} + "
                     f"write {run['write_s']:.2f} s", f"{run['ktq_s'] / io_s:.2f}x", run["ktq_s"] / io_s <= 1.5))
        rows.append((f"peak RSS {key} < 25% of a layer + overhead", f"{run['peak_rss'] / 1e6:.0f} MB, overhead "
                     f"{overhead / 1e6:.0f} MB, 25% of a layer {0.25 * layer / 1e6:.0f} MB",
                     f"{(run['peak_rss'] - overhead) / (0.25 * layer):.2f}", run["peak_rss"] - overhead < 0.25 * layer))
    ds = r.get("deepseek", {})
    for key, run in ds.get("runs", {}).items():
        rows.append((f"DeepSeek-V3 layer peak RSS {key} < 25% of the layer + overhead",
                     f"{run['peak_rss'] / 1e6:.0f} MB, 25% of the layer {0.25 * ds['layer_bytes'] / 1e9:.2f} GB",
                     f"{(run['peak_rss'] - overhead) / (0.25 * ds['layer_bytes']):.3f}",
                     run["peak_rss"] - overhead < 0.25 * ds["layer_bytes"]))
    s = r["startup"]
    rows.append(("start-up imports no torch / transformers", f"{s['modules_imported']} modules, start-up "
                 f"{s['warm_s']:.2f} s", "-", not (s["imports_torch"] or s["imports_transformers"])))
    return rows


def markdown(r: dict) -> str:
    m, k, c, s = r["machine"], r["kernel"], r["command"], r["startup"]
    gb = 1e9
    lines = [f"# ktq cpu benchmark, {r['date']}", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, Linux {m['kernel']}, AVX-512 "
             f"{'yes' if m['avx512'] else 'no'}, AMX {'yes' if m['amx'] else 'no'}; Python {m['python']}, numpy "
             f"{m['numpy']}, Numba {m['numba']} ({m['threading_layer']} threads). Medians of {k['repeat']} (kernel) "
             f"and {c['repeat']} (whole command) runs; the CPUs were {r['idle']} idle in the 2 s before each timed "
             "step (other people share this machine).",
             "", "## Goals", "", "| goal | measured | ratio | met |", "|---|---|---|---|"]
    lines += [f"| {g} | {v} | {ratio} | {'yes' if ok else '**no**'} |" for g, v, ratio, ok in goals(r)]
    lines += ["", f"## Kernel: quantise + pack of BF16 in memory ({k['experts']} experts, {k['bytes'] / gb:.2f} GB, "
              f"{NUMA} NUMA parts)", "", "GB/s of BF16 input; in brackets, GB per CPU-second, which other load on "
              "the machine disturbs less.", "", "| | 1 thread | 2 threads | 2 threads / memcpy |", "|---|---|---|---|"]
    for name in ("int4", "int8"):
        lines.append(f"| {name.upper()} | {k[f'{name}_1t_gbps']:.2f} ({k[f'{name}_1t_cpu_gbps']:.2f}) | "
                     f"{k[f'{name}_2t_gbps']:.2f} ({k[f'{name}_2t_cpu_gbps']:.2f}) | "
                     f"{k[f'{name}_2t_gbps'] / k['memcpy_gbps']:.2f} |")
    lines.append(f"| memcpy of the same bytes (1 thread) | {k['memcpy_gbps']:.2f} | | |")
    bf16 = c["input_bytes"]["bf16"]
    lines += ["", f"## Whole command: `ktq cpu --threadpool-count {NUMA}` on {c['layers']} page-cached layers of "
              f"Qwen3-30B-A3B geometry ({bf16 / gb:.2f} GB of BF16)", "",
              "Start-up included; medians, and the best run (other machines' load on the host only adds time). "
              "Read: the input files read once from the page cache; write: the output's files (same count and "
              "sizes) written once from one buffer, through the page cache and with O_DIRECT as `ktq cpu` does, "
              "without fsync (in brackets: cached, with an fsync per file); the faster of the two is the reference. "
              "kt-kernel: its in-memory rate for the same BF16 bytes.", "",
              "| input | method/form | output | ktq cpu: median, best (CPU s) | GB/s of BF16 | read | write: cached, "
              "O_DIRECT (fsync) | ktq / (read + write) | kt-kernel | peak RSS |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for run in c["runs"]:
        kt_s = bf16 / (KT_KERNEL_RATE[run["method"]] * gb)
        lines.append(f"| {run['input']} ({c['input_bytes'][run['input']] / gb:.2f} GB) | {run['method']}/{run['form']} "
                     f"| {run['output_bytes'] / gb:.2f} GB, {run['files']} files | {run['ktq_s']:.2f} s, "
                     f"{run['ktq_best_s']:.2f} s ({run['ktq_cpu_s']:.1f}) | {bf16 / run['ktq_s'] / gb:.2f} | "
                     f"{run['read_s']:.2f} s | {run['write_cached_s']:.2f} s, {run['write_direct_s']:.2f} s "
                     f"({run['write_fsync_s']:.2f} s) | "
                     f"{run['ktq_s'] / (run['read_s'] + run['write_s']):.2f} | {kt_s:.2f} s | "
                     f"{run['peak_rss'] / 1e6:.0f} MB |")
    lines += ["", "## Start-up and compile", "",
              f"A tiny sample ({TINY}) converted by the whole process: {s['warm_s']:.2f} s with the Numba cache warm, "
              f"{s['cold_s']:.2f} s cold: **compile {s['compile_s']:.2f} s, paid once** (the kernels are cached on "
              f"disk). Its peak RSS, the fixed overhead (interpreter, numpy, Numba): {s['overhead_rss'] / 1e6:.0f} MB. "
              f"Start-up imports {s['modules_imported']} modules; torch: {s['imports_torch']}, transformers: "
              f"{s['imports_transformers']}."]
    ds = r.get("deepseek")
    if ds:
        lines += ["", "## DeepSeek-V3 geometry, one layer (256 experts, hidden 7168, moe_intermediate 2048)", ""]
        if "skipped" in ds:
            lines.append(f"Skipped: {ds['skipped']}.")
        else:
            lines += [f"{ds['layer_bytes'] / gb:.1f} GB of BF16, read from disk (it does not fit in the page cache "
                      "next to other work).", "", "| method/form | ktq cpu (CPU s) | peak RSS | of the layer |",
                      "|---|---|---|---|"]
            lines += [f"| {key} | {run['ktq_s']:.1f} s ({run['ktq_cpu_s']:.1f}) | {run['peak_rss'] / 1e6:.0f} MB | "
                      f"{run['peak_rss'] / ds['layer_bytes']:.1%} |" for key, run in ds["runs"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "ktq-bench")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--min-idle", type=float, default=0.9, help="before each timed step, wait (up to 2-3 "
                        "minutes) until the CPUs are this idle")
    parser.add_argument("--layers", type=int, default=QWEN["layers"], help="layers of the Qwen3-30B-A3B sample")
    parser.add_argument("--deepseek", action="store_true", help="also the 22.5 GB DeepSeek-V3 layer (peak RSS)")
    parser.add_argument("--merge-into", type=Path, help="a results .json whose other parts to keep: only the parts "
                        "measured now replace its own")
    parser.add_argument("--parts", default="startup,kernel,command", help="what to measure, of startup,kernel,command")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    args.work.mkdir(parents=True, exist_ok=True)
    qwen = sample(args.work, f"qwen3-30b-a3b-{args.layers}layers", {**QWEN, "layers": args.layers})
    fp8 = sample(args.work, f"qwen3-30b-a3b-{args.layers}layers-fp8", {**QWEN, "layers": args.layers, "dtype": "fp8"})
    r = json.loads(args.merge_into.read_text()) if args.merge_into else {}
    r.update({"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine()})
    if "startup" in parts:
        log("start-up and compile")
        r["startup"] = bench_startup(args.work)
    if "kernel" in parts:
        r["kernel"] = bench_kernel(qwen, args.repeat, args.min_idle)
    if "command" in parts:
        r["command"] = bench_command({"bf16": qwen, "fp8": fp8}, args.work, args.repeat, args.min_idle)
    if args.deepseek:
        r["deepseek"] = bench_deepseek(args.work)
    idle = [v for key, v in r["kernel"].items() if key.endswith("_idle")]
    idle += [row["idle"] for run in r["command"]["runs"] for row in run["rows"]]
    r["idle"] = f"{min(idle):.0%}-{max(idle):.0%}"
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"{time.strftime('%Y-%m-%d-%H%M')}-{r['machine']['cpu'].lower().replace(' ', '-')}"
    stem.with_suffix(".json").write_text(json.dumps(r, indent=2) + "\n")
    text = markdown(r)
    stem.with_suffix(".md").write_text(text)
    print(text)
    print(f"saved {stem}.md and .json")


if __name__ == "__main__":
    main()
