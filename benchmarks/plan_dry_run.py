"""How long `ktq cpu --dry-run` takes on checkpoints of DeepSeek-V3 scale, as a user runs it (a fresh process).

The checkpoints are header-only (`ktq sample --header-only`), sparse files holding no data, 163 shards each:
DeepSeek-V3 as published (block-scaled FP8, 0.67 TB, 92k tensors) and its BF16 version (1.3 TB, 45k tensors).
Prints the wall time of each run; not a test.

    .venv/bin/python benchmarks/plan_dry_run.py [--runs 5] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ktq.sample import write_sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for dtype in ("fp8", "bf16"):
            source = write_sample(Path(tmp) / f"DeepSeek-V3-{dtype}", arch="deepseek_v3", dtype=dtype, layers=61,
                                  dense_layers=3, experts=256, hidden=7168, moe_intermediate=2048, shards=163,
                                  header_only=True)
            _time_dry_runs(source, Path(tmp) / "out", args.runs)


def _time_dry_runs(source: Path, out: Path, runs: int) -> None:
    described = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    command = [sys.executable, "-m", "ktq", "cpu", "-i", str(source), "-o", str(out), "--dry-run", "--json"]
    subprocess.run(command, capture_output=True)  # the first run may compile the Numba kernels
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        times.append(time.perf_counter() - started)
        if done.returncode not in (0, 2):  # 2: it would not fit on this disk, still a complete plan
            sys.exit(done.stderr)
    print(f"{source.name}: {described / 1e12:.2f} TB described by 163 shards (exit code {done.returncode}): "
          "wall s per run " + ", ".join(f"{t:.2f}" for t in times)
          + f"; median {statistics.median(times):.2f} s, min {min(times):.2f} s")


if __name__ == "__main__":
    main()
