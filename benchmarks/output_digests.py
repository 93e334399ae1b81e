"""Digests of every output ktq writes on small test models: run before and after a change that must not change a
byte (a refactor), and compare the two printouts.

    .venv/bin/python benchmarks/output_digests.py WORKDIR        # prints one line per output: name, files, sha256

Outputs: ktq cpu (RTN int4 merged, int8 .kt tree), ktq cpu --calibrate, ktq gpu GPTQ W4A16 and RTN W8A16 (qwen3_moe
and deepseek_v3 with MLA and shared experts), ktq gpu --cpu-output. Everything runs on the CPU (--force_cpu), so the
digests are the same on every machine with the same library versions. The GPU run's report and log (times) are left
out of its digest; every other file is in.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from gpu_models import chat_rows, deepseek_moe, write_jsonl  # noqa: E402
from ktq.sample import write_sample  # noqa: E402

TIMED = {"ktq_gpu_report.json", "ktq_gpu.log"}  # stage times: differ on every run


def digest(folder: Path) -> tuple[int, str]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in TIMED)
    h = hashlib.sha256()
    for path in files:
        h.update(str(path.relative_to(folder)).encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return len(files), h.hexdigest()


def ktq(*args: object) -> None:
    subprocess.run([sys.executable, "-m", "ktq", *map(str, args)], check=True, stdout=subprocess.DEVNULL)


def main(work: Path) -> None:
    work.mkdir(parents=True, exist_ok=False)
    qwen = write_sample(work / "qwen", layers=4, experts=8, hidden=256, moe_intermediate=256, dense_layers=1, seed=1)
    deepseek = deepseek_moe(work / "deepseek", layers=3, first_k_dense=1)
    data = write_jsonl(work / "calib.jsonl", chat_rows(16))
    gpu = ("--force_cpu", "--dataset", data, "--num_calibration_samples", 8, "--max_sequence_length", 64, "-q")
    runs = {
        "cpu-int4-merged": lambda o: ktq("cpu", "-i", qwen, "-o", o, "--quant-method", "int4",
                                         "--threadpool-count", 2, "-q"),
        "cpu-int8-kt": lambda o: ktq("cpu", "-i", qwen, "-o", o, "--quant-method", "int8", "--threadpool-count", 1,
                                     "--no-merge-safetensor", "-q"),
        "cpu-calibrated-int4": lambda o: ktq("cpu", "-i", qwen, "-o", o, "--calibrate", data,
                                             "--num_calibration_samples", 8, "--max_sequence_length", 64,
                                             "--threadpool-count", 2, "--force_cpu", "-q"),
        "gpu-gptq-w4-qwen": lambda o: ktq("gpu", "--model_id", qwen, "--output_dir", o, "--quant_type", "W4A16",
                                          *gpu),
        "gpu-rtn-w8-qwen": lambda o: ktq("gpu", "--model_id", qwen, "--output_dir", o, "--quant_method", "RTN",
                                         "--force_cpu", "-q"),
        "gpu-gptq-w4-deepseek": lambda o: ktq("gpu", "--model_id", deepseek, "--output_dir", o,
                                              "--quant_type", "W4A16", *gpu),
        "gpu-and-cpu-output": lambda o: ktq("gpu", "--model_id", qwen, "--output_dir", o, "--quant_type", "W4A16",
                                            "--cpu-output", f"{o}-cpu", "--threadpool-count", 2, *gpu),
    }
    for name, run in runs.items():
        out = work / name
        run(out)
        for folder in (out, Path(f"{out}-cpu")):
            if folder.exists():
                files, value = digest(folder)
                print(f"{folder.name:28s} {files:3d} files  {value}", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
