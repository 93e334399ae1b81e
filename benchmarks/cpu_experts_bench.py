"""The time calibrated CPU experts cost, against the GPU pass they ride on (issue 15: at most 1.5x), in one run.

On one sample model and calibration set (gpu_bench.py's), three commands, each in its own process:
  gpu      ktq gpu (GPTQ W4A16), the GPU checkpoint alone: the reference
  both     ktq gpu --cpu-output: the GPU checkpoint and the calibrated CPU experts from the same pass
  cpu      ktq cpu --calibrate: the calibrated CPU experts alone
and prints seconds per MoE layer (median, from the per-layer stage times ktq logs) and per whole command, each as a
ratio to `gpu`, with the GPU and host peaks. The GPU checkpoints of `gpu` and `both` are compared byte for byte.

    python benchmarks/cpu_experts_bench.py --work /tmp/cx --out results/cpu-experts [--arch deepseek_v3
        --hidden 7168 --moe-intermediate 2048 --experts 32 --layers 3 --dense-layers 1 --samples 128 --seq 2048
        --cpu-method int4 --fill]
"""

from __future__ import annotations

import json
import re
import statistics
import sys

from gpu_bench import PEAK_RSS, gb, log, peak_rss, prepare, run, sample_parser

LAYER_LINE = re.compile(r"\| _layer \| INFO - (?P<layer>\S+): (?P<stages>.*)$")
CPU_EXPERTS_LINE = re.compile(r"\| _layer \| INFO - (\S+ CPU experts, .*)$", re.MULTILINE)


def moe_layer_stages(text: str) -> list[str]:
    """The stage times ktq logs (--debug) for each MoE layer it calibrated: 'read 1.20 s, calibrate ...'."""
    return [m["stages"] for m in map(LAYER_LINE.search, text.splitlines()) if m and "calibrate" in m["stages"]]


def seconds(stages: str) -> float:
    return sum(float(part.split()[-2]) for part in stages.split(", "))


def main() -> None:
    parser = sample_parser(samples=128, timeout=900)
    parser.add_argument("--cpu-method", default="int4", choices=("int4", "int8"))
    parser.add_argument("--threadpool-count", type=int, default=1)
    parser.add_argument("--runs", nargs="+", default=["gpu", "both", "cpu"], choices=("gpu", "both", "cpu"),
                        help="which commands to run (gpu, the reference, always runs)")
    args = parser.parse_args()
    py = sys.executable
    device, model, data = prepare(args)
    calibration = ["--dataset", str(data), "--num_calibration_samples", str(args.samples), "--max_sequence_length",
                   str(args.seq)]
    cpu_options = ["--cpu-method", args.cpu_method, "--threadpool-count", str(args.threadpool_count)]
    runs = {
        "gpu": [py, "-c", PEAK_RSS, "ktq", "--debug", "gpu", "--model_id", str(model), "--output_dir",
                str(args.work / "gpu"), "--overwrite", "--quant_type", "W4A16", *calibration],
        "both": [py, "-c", PEAK_RSS, "ktq", "--debug", "gpu", "--model_id", str(model), "--output_dir",
                 str(args.work / "both"), "--overwrite", "--quant_type", "W4A16", *calibration, "--cpu-output",
                 str(args.work / "both-cpu"), *cpu_options],
        "cpu": [py, "-c", PEAK_RSS, "ktq", "--debug", "cpu", "-i", str(model), "-o", str(args.work / "cpu"),
                "--force", "--quant-method", args.cpu_method, "--threadpool-count", str(args.threadpool_count),
                "--calibrate", str(data), "--num_calibration_samples", str(args.samples), "--max_sequence_length",
                str(args.seq)],
    }
    results = {"device": device, "model": {k: str(v) for k, v in vars(args).items()}, "runs": {}}
    for name, cmd in runs.items():
        if name != "gpu" and name not in args.runs:
            continue
        proc, wall = run(cmd, args.out, args.timeout)
        stages = moe_layer_stages(proc.stderr)
        layers = [seconds(line) for line in stages]
        report_file = args.work / name / "ktq_gpu_report.json"
        report = json.loads(report_file.read_text()) if report_file.is_file() else {}
        results["runs"][name] = {"wall": wall, "moe_layer_seconds": layers, "stages": stages,
                                 "cpu_expert_stages": CPU_EXPERTS_LINE.findall(proc.stderr),
                                 "peak_rss_bytes": peak_rss(proc), "peak_gpu_bytes": report.get("peak_gpu_bytes")}
    same = all((args.work / "gpu" / f.name).read_bytes() == f.read_bytes()
               for f in sorted((args.work / "both").glob("*.safetensors"))) if "both" in results["runs"] else None
    results["gpu_checkpoints_identical"] = same
    reference = results["runs"]["gpu"]
    lines = [f"# Calibrated CPU experts against the GPU pass ({device})", "",
             f"model: {args.arch} {args.dtype}, {args.layers} layers ({args.dense_layers} dense) x {args.experts} "
             f"experts, hidden {args.hidden}, moe_intermediate {args.moe_intermediate}; {args.samples} x {args.seq} "
             f"tokens; CPU experts {args.cpu_method}, {args.threadpool_count} NUMA parts", "",
             "| run | s per MoE layer (median) | ratio | whole command s | ratio | GPU peak | host peak RSS |",
             "|---|---|---|---|---|---|---|"]
    ref_layer = statistics.median(reference["moe_layer_seconds"]) if reference["moe_layer_seconds"] else None
    for name, row in results["runs"].items():
        layer = statistics.median(row["moe_layer_seconds"]) if row["moe_layer_seconds"] else None
        ratio = f"{layer / ref_layer:.2f}x" if layer and ref_layer else "n/a"
        lines.append(f"| {name} | {layer:.1f} | {ratio} | {row['wall']:.1f} | {row['wall'] / reference['wall']:.2f}x "
                     f"| {gb(row['peak_gpu_bytes'])} | {gb(row['peak_rss_bytes'])} |" if layer else
                     f"| {name} | n/a | n/a | {row['wall']:.1f} | {row['wall'] / reference['wall']:.2f}x | "
                     f"{gb(row['peak_gpu_bytes'])} | {gb(row['peak_rss_bytes'])} |")
    lines += ["", f"GPU checkpoints of gpu and both identical: {same}", "", "per-layer stages (last MoE layer):"]
    lines += [f"- {name}: {row['stages'][-1] if row['stages'] else 'n/a'}" for name, row in results["runs"].items()]
    lines += ["", "CPU-expert sub-stages, each MoE layer:"]
    lines += [f"- {name}: {line}" for name, row in results["runs"].items() for line in row["cpu_expert_stages"]]
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    log(args.out, "\n".join(lines))


if __name__ == "__main__":
    main()
