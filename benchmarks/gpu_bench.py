"""`ktq gpu` (the streaming engine) against a bare llm-compressor `oneshot` on the same sample MoE and calibration data.

For each scheme: seconds of `ktq gpu` and of `oneshot` (each inside its own process, load to save), both per
expert-layer (MoE layers x experts), the GPU peak each allocated (and ktq's plan before loading), ktq's host peak
RSS, its seconds per MoE layer by stage, and the quantised experts of both outputs compared word for word with their
GPTQ losses. `--bare none` runs ktq alone (a model oneshot cannot take: FP8, too large); `--extrapolate N` adds the
time of an N-MoE-layer model of the same geometry from the measured per-layer time.

    python benchmarks/gpu_bench.py --work /tmp/bench --out results/ [--arch qwen3_moe --dtype bf16 --layers 8
        --dense-layers 0 --experts 64 --hidden 2048 --moe-intermediate 768 --samples 128 --seq 512
        --schemes W4A16 --bare causal|plain|none --extrapolate 58]

Writes results.json, table.md and bench.log to --out, and prints the table last.
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


def run(cmd: list[str], out: Path, timeout: int, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    log(out, "$ " + " ".join(cmd))
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
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
    return agreement(a, b)["identical"]


def agreement(a: Path, b: Path) -> dict:
    """Identical int32 words, and codes more than one step apart, over every quantised expert tensor."""
    from safetensors import safe_open

    def packed(folder: Path) -> dict:
        out = {}
        for shard in sorted(folder.glob("*.safetensors")):
            with safe_open(shard, "pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys() if k.endswith("weight_packed")})
        return out

    import torch

    left, right = packed(a), packed(b)
    assert left.keys() == right.keys(), "the two outputs quantised different modules"
    same = far = codes = 0
    for name, x in left.items():
        y = right[name]
        same += int((x == y).sum())
        bits = 32 * x.shape[1] // int(_shape(a, name)[1])
        shifts = torch.arange(0, 32, bits, dtype=torch.int32)
        cx = (x.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        cy = (y.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        far += int(((cx - cy).abs() > 1).sum())
        codes += cx.numel()
    words = sum(v.numel() for v in left.values())
    return {"identical": same / words, "words": words, "codes_more_than_one_step": far / codes}


def _shape(folder: Path, packed_name: str) -> list[int]:
    from safetensors import safe_open

    name = packed_name.replace("weight_packed", "weight_shape")
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            if name in f.keys():
                return f.get_tensor(name).tolist()
    raise KeyError(name)


def loss_agreement(ours: dict, theirs: dict) -> float | None:
    """Largest relative difference between two sets of per-module GPTQ losses (None without both)."""
    if not ours or not theirs or ours.keys() != theirs.keys():
        return None
    return max(abs(ours[k] - theirs[k]) / max(abs(theirs[k]), 1e-12) for k in theirs)


# runs a module as `python -m` would, then prints its peak RSS; a thread samples /proc/self/status five times a
# second and prints, at the highest VmRSS it saw, how that RSS splits (anonymous, file-backed, shared: memory from
# PyTorch's pinned allocator counts as shared) and when it came (seconds from the start)
PEAK_RSS = """import json, resource, runpy, sys, threading, time
PEAK, START = {"VmRSS": 0}, time.perf_counter()
def watch():
    while True:
        now = {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in open("/proc/self/status"))
               if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem")}
        if now["VmRSS"] > PEAK["VmRSS"]:
            PEAK.update(now, seconds=round(time.perf_counter() - START, 1))
        time.sleep(0.2)
threading.Thread(target=watch, daemon=True).start()
sys.argv = sys.argv[1:]
try:
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
finally:
    print("peak_rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, file=sys.stderr)
    print("peak_rss_split", json.dumps(PEAK), file=sys.stderr)
"""


def peak_rss(proc: subprocess.CompletedProcess) -> int | None:
    found = [line.split()[1] for line in proc.stderr.splitlines() if line.startswith("peak_rss ")]
    return int(found[-1]) if found else None


def peak_rss_split(proc: subprocess.CompletedProcess) -> dict | None:
    """PEAK_RSS's sample at the highest VmRSS: bytes by kind and the seconds from the start."""
    found = [line.split(" ", 1)[1] for line in proc.stderr.splitlines() if line.startswith("peak_rss_split ")]
    return json.loads(found[-1]) if found else None


def gb(value) -> str:
    return "n/a" if value is None else f"{value / 1e9:.2f} GB"


def sample_parser(samples: int, timeout: int) -> argparse.ArgumentParser:
    """The options of the sample model, calibration set and output folders, shared by the GPU benchmarks."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--arch", default="qwen3_moe")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dense-layers", type=int, default=0)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--moe-intermediate", type=int, default=768)
    parser.add_argument("--samples", type=int, default=samples)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--timeout", type=int, default=timeout)
    parser.add_argument("--fill", action="store_true", help="write the sample's data with torch (fill_sample.py), "
                        "not ktq sample: GPU speed, no MTP layer")
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
        target = args.work / "layout" if args.fill else model
        _, wall = run([sys.executable, "-m", "ktq", "sample", str(target), "--arch", args.arch, "--dtype", args.dtype,
                       "--layers", str(args.layers), "--dense-layers", str(args.dense_layers), "--experts",
                       str(args.experts), "--hidden", str(args.hidden), "--moe-intermediate",
                       str(args.moe_intermediate), "--shards", str(max(4, args.layers))]
                      + (["--header-only"] if args.fill else []), args.out, args.timeout)
        if args.fill:
            _, filled = run([sys.executable, str(HERE / "fill_sample.py"), str(target), str(model)], args.out,
                            args.timeout)
            wall += filled
        log(args.out, f"sample written in {wall:.1f} s")
    return device, model, calibration_file(args.work / "calib.jsonl", args.samples, 2 * args.seq)


def main() -> None:
    parser = sample_parser(samples=128, timeout=900)
    parser.add_argument("--schemes", nargs="+", default=["W4A16"])
    parser.add_argument("--bare", choices=("causal", "plain", "none"), default="causal",
                        help="oneshot with transformers' causal attention kept (comparable outputs), as it is, or not")
    parser.add_argument("--extrapolate", type=int, default=0, help="MoE layers of the full model to extrapolate to")
    args = parser.parse_args()
    py = sys.executable

    import torch

    device, model, data = prepare(args)
    moe_layers = args.layers - args.dense_layers
    expert_layers = moe_layers * args.experts
    results = {"device": device, "torch": torch.__version__, "model": vars(args) | {"work": str(args.work),
               "out": str(args.out)}, "runs": []}
    for scheme in args.schemes:
        ktq_out, bare_out = args.work / f"ktq-{scheme}", args.work / f"bare-{scheme}"
        proc, ktq_wall = run([py, "-c", PEAK_RSS, "ktq", "gpu", "--model_id", str(model), "--output_dir",
                              str(ktq_out), "--overwrite", "--quant_type", scheme, "--dataset", str(data),
                              "--num_calibration_samples", str(args.samples), "--max_sequence_length", str(args.seq)],
                             args.out, args.timeout)
        report = json.loads((ktq_out / "ktq_gpu_report.json").read_text())
        ktq_seconds = sum(report["stages"].values())
        moe = [stages for name, stages in report["layer_seconds"].items() if "calibrate" in stages or
               "solve" in stages]
        per_layer = sorted(sum(stages.values()) for stages in moe)
        row = {
            "scheme": scheme, "ktq_seconds": ktq_seconds, "ktq_stages": report["stages"], "ktq_wall": ktq_wall,
            "ktq_seconds_per_expert_layer": report["stages"]["quantize"] / expert_layers,
            "ktq_seconds_per_moe_layer": per_layer[len(per_layer) // 2] if per_layer else None,
            "moe_layer_stages": moe, "ktq_peak_gpu_bytes": report["peak_gpu_bytes"],
            "ktq_peak_rss_bytes": peak_rss(proc), "estimated_peak_gpu_bytes": report["plan"]["gpu_peak_bytes"],
            "estimated_peak_cpu_bytes": report["plan"]["cpu_peak_bytes"],
            "estimated_seconds": report["plan"]["seconds"], "calibration_tokens": report["calibration_tokens"],
            "unrouted_experts": sum(len(v) for v in report["unrouted_experts"].values()),
        }
        if args.extrapolate and row["ktq_seconds_per_moe_layer"]:
            row["extrapolated_seconds"] = args.extrapolate * row["ktq_seconds_per_moe_layer"]
        if args.bare != "none":
            losses = args.work / f"bare-{scheme}-losses.json"
            proc, bare_wall = run([py, str(HERE / "bare_oneshot.py"), str(model), str(bare_out), "--dataset",
                                   str(data), "--quant_type", scheme, "--samples", str(args.samples), "--seq",
                                   str(args.seq), "--losses", str(losses)]
                                  + (["--causal"] if args.bare == "causal" else []), args.out, args.timeout)
            bare = json.loads(proc.stdout.strip().splitlines()[-1])
            row |= {"bare": args.bare, "bare_seconds": bare["seconds"], "bare_wall": bare_wall,
                    "bare_seconds_per_expert_layer": bare["seconds"] / expert_layers,
                    "speedup": bare["seconds"] / ktq_seconds, "bare_peak_gpu_bytes": bare["peak_gpu_bytes"],
                    "packed": agreement(ktq_out, bare_out),
                    "loss_max_rel_diff": loss_agreement(report["gptq_loss"], json.loads(losses.read_text()))}
        results["runs"].append(row)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))

    lines = [f"ktq gpu vs bare llm-compressor oneshot on {device}: sample {args.arch} {args.dtype}, {args.layers} "
             f"layers ({args.dense_layers} dense) x {args.experts} experts, hidden {args.hidden}, moe_intermediate "
             f"{args.moe_intermediate}; {args.samples} samples x {args.seq} tokens", "",
             "| scheme | ktq s | s per MoE layer | s per expert-layer | oneshot s per expert-layer | speed-up "
             "| ktq GPU peak (plan) | oneshot GPU peak | ktq host peak RSS | identical words | codes > 1 step apart "
             "| GPTQ loss max rel. diff |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        packed = r.get("packed") or {}
        lines.append(
            f"| {r['scheme']} | {r['ktq_seconds']:.1f} | {r['ktq_seconds_per_moe_layer'] or 0:.1f} | "
            f"{r['ktq_seconds_per_expert_layer']:.3f} | "
            f"{r['bare_seconds_per_expert_layer']:.3f} | {r['speedup']:.1f}x | " if "bare" in r else
            f"| {r['scheme']} | {r['ktq_seconds']:.1f} | {r['ktq_seconds_per_moe_layer'] or 0:.1f} | "
            f"{r['ktq_seconds_per_expert_layer']:.3f} | n/a | n/a | ")
        lines[-1] += (f"{gb(r['ktq_peak_gpu_bytes'])} ({gb(r['estimated_peak_gpu_bytes'])}) | "
                      f"{gb(r.get('bare_peak_gpu_bytes'))} | {gb(r['ktq_peak_rss_bytes'])} | "
                      + (f"{100 * packed['identical']:.3f}% | {100 * packed['codes_more_than_one_step']:.4f}% | "
                         if packed else "n/a | n/a | ")
                      + (f"{r['loss_max_rel_diff']:.2e} |" if r.get("loss_max_rel_diff") is not None else "n/a |"))
        if "extrapolated_seconds" in r:
            lines.append(f"\n{args.extrapolate} MoE layers at {r['ktq_seconds_per_moe_layer']:.1f} s each: "
                         f"{r['extrapolated_seconds'] / 3600:.2f} h ({r['scheme']})")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    log(args.out, "\n".join(lines))


if __name__ == "__main__":
    main()
