"""How long `ktq cpu --dry-run` takes on a checkpoint of DeepSeek-V3 scale, as a user runs it (a fresh process).

The checkpoint is header-only (`ktq sample --header-only`): DeepSeek-V3's MoE geometry in BF16, 163 shards whose
headers describe 1.3 TB, sparse files holding no data. Prints the wall time of each run; not a test.

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
        source = write_sample(Path(tmp) / "DeepSeek-V3-scale", layers=61, dense_layers=3, experts=256,
                              hidden=7168, moe_intermediate=2048, shards=163, header_only=True)
        described = sum(p.stat().st_size for p in source.glob("*.safetensors"))
        command = [sys.executable, "-m", "ktq", "cpu", "-i", str(source), "-o", str(Path(tmp) / "out"),
                   "--dry-run", "--json"]
        subprocess.run(command, capture_output=True)  # the first run may compile the Numba kernels
        times = []
        for _ in range(args.runs):
            started = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True)
            times.append(time.perf_counter() - started)
            if done.returncode not in (0, 2):  # 2: it would not fit on this disk, still a complete plan
                sys.exit(done.stderr)
        print(f"ktq cpu --dry-run over {described / 1e12:.2f} TB described by 163 shards "
              f"(exit code {done.returncode}): wall s per run " + ", ".join(f"{t:.2f}" for t in times)
              + f"; median {statistics.median(times):.2f} s, min {min(times):.2f} s")


if __name__ == "__main__":
    main()
