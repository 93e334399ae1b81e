"""`ktq gpu` against a bare llm-compressor `oneshot` on the same sample MoE, recipe and calibration data.

For each scheme: time of `ktq gpu` (its stages, load to save) over the time inside `oneshot` (load to save), and
the peak GPU memory each allocated against the peak ktq's plan estimated before loading. Each run is its own
process, so peaks do not mix. The quantised experts of both outputs are compared word for word.

    python benchmarks/gpu_bench.py --work /tmp/bench --out results/ [--layers 8 --experts 64 --hidden 2048
        --moe-intermediate 768 --samples 128 --seq 512 --schemes W4A16 W8A16]

Writes results.json (with ktq's reports, less per-module losses), table.md and bench.log to --out, and
prints the table last.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORDS = ("experts route tokens to a few of many the quick brown fox jumps over lazy dog hot cold GPU CPU "
         "quantisation maps weights to fewer bits and the model serves them with kernels on both sides "
         "0 1 2 3 4 5 6 7 8 9 ( ) [ ] + - * / =").split()


def log(out: Path, text: str) -> None:
    print(text, flush=True)
    with open(out / "bench.log", "a") as f:
        f.write(text + "\n")


def run(cmd: list[str], out: Path, timeout: int) -> tuple[subprocess.CompletedProcess, float]:
    log(out, "$ " + " ".join(cmd))
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    tail = (proc.stdout[-3000:] + proc.stderr[-6000:]).rstrip()
    log(out, f"[exit {proc.returncode}, {wall:.1f} s]\n{tail}")
    if proc.returncode != 0:
        raise SystemExit(f"command failed: {' '.join(cmd)}")
    return proc, wall


def calibration_file(path: Path, samples: int, words: int) -> Path:
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(samples):
            messages = [{"role": "user", "content": " ".join(rng.choices(WORDS, k=words // 3))},
                        {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=2 * words // 3))}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def packed_agreement(a: Path, b: Path) -> float:
    """Share of identical int32 words over every quantised expert tensor of two outputs."""
    from safetensors import safe_open

    def packed(folder: Path) -> dict:
        out = {}
        for shard in sorted(folder.glob("*.safetensors")):
            with safe_open(shard, "pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys() if k.endswith("weight_packed")})
        return out

    left, right = packed(a), packed(b)
    assert left.keys() == right.keys(), "the two outputs quantised different modules"
    same = sum(int((left[k] == right[k]).sum()) for k in left)
    return same / sum(v.numel() for v in left.values())


def gb(value) -> str:
    return "n/a" if value is None else f"{value / 1e9:.2f} GB"


def sample_parser(samples: int, timeout: int) -> argparse.ArgumentParser:
    """The options of the sample model, calibration set and output folders, shared by the GPU benchmarks."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--moe-intermediate", type=int, default=768)
    parser.add_argument("--samples", type=int, default=samples)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--timeout", type=int, default=timeout)
    return parser


def prepare(args) -> tuple[str, Path, Path]:
    """Device name, sample model (written once into --work) and calibration file; logs the device."""
    import torch

    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    log(args.out, f"device: {device} x {torch.cuda.device_count()}; torch {torch.__version__}")
    model = args.work / "sample"
    if not model.exists():
        _, wall = run([sys.executable, "-m", "ktq", "sample", str(model), "--layers", str(args.layers), "--experts",
                       str(args.experts), "--hidden", str(args.hidden), "--moe-intermediate",
                       str(args.moe_intermediate), "--shards", "4"], args.out, args.timeout)
        log(args.out, f"sample written in {wall:.1f} s")
    return device, model, calibration_file(args.work / "calib.jsonl", args.samples, 2 * args.seq)


def main() -> None:
    parser = sample_parser(samples=128, timeout=900)
    parser.add_argument("--schemes", nargs="+", default=["W4A16", "W8A16"])
    args = parser.parse_args()
    py = sys.executable

    import torch

    device, model, data = prepare(args)

    results = {"device": device, "torch": torch.__version__, "model": vars(args) | {"work": str(args.work),
               "out": str(args.out)}, "runs": []}
    for scheme in args.schemes:
        ktq_out, bare_out = args.work / f"ktq-{scheme}", args.work / f"bare-{scheme}"
        _, ktq_wall = run([py, "-m", "ktq", "gpu", "--model_id", str(model), "--output_dir", str(ktq_out),
                           "--overwrite", "--quant_type", scheme, "--dataset", str(data), "--num_calibration_samples",
                           str(args.samples), "--max_sequence_length", str(args.seq)], args.out, args.timeout)
        report = json.loads((ktq_out / "ktq_gpu_report.json").read_text())
        proc, bare_wall = run([py, str(HERE / "bare_oneshot.py"), str(model), str(bare_out), "--dataset", str(data),
                               "--quant_type", scheme, "--samples", str(args.samples), "--seq", str(args.seq)],
                              args.out, args.timeout)
        bare = json.loads(proc.stdout.strip().splitlines()[-1])
        ktq_seconds = sum(report["stages"].values())
        row = {
            "scheme": scheme, "ktq_seconds": ktq_seconds, "ktq_stages": report["stages"], "ktq_wall": ktq_wall,
            "bare_seconds": bare["seconds"], "bare_wall": bare_wall, "ratio": ktq_seconds / bare["seconds"],
            "estimated_peak_gpu_bytes": report["plan"]["gpu_peak_bytes"],
            "ktq_peak_gpu_bytes": report["peak_gpu_bytes"],
            "bare_peak_gpu_bytes": bare["peak_gpu_bytes"], "gptq_batch": report["plan"]["gptq_batch"],
            "plan": {k: report["plan"][k] for k in ("gpu_weight_bytes", "hessian_bytes", "activation_bytes",
                                                    "gptq_batch_bytes", "onload_bytes")},
            "calibration_tokens": report["calibration_tokens"], "unrouted_experts": report["unrouted_experts"],
            "packed_words_identical": packed_agreement(ktq_out, bare_out),
            "ktq_report": {k: v for k, v in report.items() if k not in ("gptq_loss", "routed_tokens")},
        }
        results["runs"].append(row)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))

    lines = [f"ktq gpu vs bare llm-compressor oneshot on {device}: sample qwen3_moe {args.layers} layers x "
             f"{args.experts} experts, hidden {args.hidden}, moe_intermediate {args.moe_intermediate}; "
             f"{args.samples} samples x {args.seq} tokens", "",
             "| scheme | ktq s | oneshot s | ktq/oneshot | GPU peak est. | ktq GPU peak | oneshot GPU peak | est./ktq "
             "| identical packed words |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        measured = r["ktq_peak_gpu_bytes"]
        ratio = f"{r['estimated_peak_gpu_bytes'] / measured:.2f}" if measured else "n/a"
        lines.append(f"| {r['scheme']} | {r['ktq_seconds']:.1f} | {r['bare_seconds']:.1f} | {r['ratio']:.2f} | "
                     f"{gb(r['estimated_peak_gpu_bytes'])} | {gb(measured)} | {gb(r['bare_peak_gpu_bytes'])} | "
                     f"{ratio} | {100 * r['packed_words_identical']:.1f}% |")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    log(args.out, "\n".join(lines))


if __name__ == "__main__":
    main()
