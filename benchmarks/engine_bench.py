"""The streaming engine on one GPU, in the same call: main before the chunked engine (`--base-site`, an installed
copy of that ktq) against this one, uncapped and with the process capped as a 24 GiB or 48 GiB card, and with
`--cpu-output` (`cpu`; `cpu24` capped as a 24 GiB card; `cpuchunked` forced to 5 experts and 16 samples at a time,
whose CPU experts must equal `cpu`'s byte for byte).

    python benchmarks/engine_bench.py --work /tmp/eb --out results/ --runs base new cap24 cap48 cpu \\
        [--base-site /tmp/base-site] [sample options of gpu_bench.py]

For each run: seconds in all and per MoE layer by stage (ktq_gpu_report.json), the GPU peak torch allocated
(`max_memory_allocated`) beside the plan's, the host peak RSS beside the plan's, the plan's time beside the run's;
against `base`: identical packed words, codes more than one step apart, GPTQ losses (largest and mean relative
difference); against `new`: whether every shard is byte-identical (the plan's sizes must not change the output;
`chunked` forces 5 experts and 16 samples at a time).
A capped run sets `torch.cuda.set_per_process_memory_fraction` before ktq starts and passes `--max_gpu_memory`, so
the plan sizes for that card and the allocator refuses anything beyond it. `fp32` reruns `new` with the Hessians'
products in FP32 (llm-compressor's own path) instead of TF32, for the quality comparison.

Writes results.json and table.md to --out and prints the table last.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import statistics
import sys
from pathlib import Path

from gpu_bench import PEAK_RSS, agreement, gb, log, peak_rss, peak_rss_split, prepare, run, sample_parser

CAPS = {"cap24": 24 * 2**30, "cap48": 48 * 2**30, "cpu24": 24 * 2**30}
CPU_OUTPUT = ("cpu", "cpu24", "cpuchunked")  # runs with --cpu-output
CPU_STAGES = re.compile(r"layer (\d+) CPU experts, \d+ at a time: (.*)$")
WRITTEN_BEHIND = re.compile(r"model\.layers\.(\d+) written behind: (.*)$")


def capped(cap: int) -> str:
    """PEAK_RSS with the CUDA caching allocator held to `cap` bytes first."""
    return ("import torch\ntorch.cuda.set_per_process_memory_fraction("
            f"{cap} / torch.cuda.get_device_properties(0).total_memory)\n" + PEAK_RSS)


FP32_HESSIANS = "import ktq.gpu.gptq as g\ng.HESSIAN_TF32 = False\n" + PEAK_RSS


def shard_digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


def losses(a: dict, b: dict) -> dict | None:
    if not a or a.keys() != b.keys():
        return None
    rel = [abs(a[k] - b[k]) / max(abs(b[k]), 1e-12) for k in b]
    return {"max": max(rel), "mean": statistics.mean(rel),
            "sum_ratio": sum(a.values()) / sum(b.values())}


def logged_stages(log_file: Path, pattern: re.Pattern) -> dict[str, dict[str, float]]:
    """Seconds by stage of each layer from the lines of ktq's log that `pattern` matches (group 1 the layer's
    number, group 2 "stage 1.23 s, ...")."""
    found = {}
    for line in log_file.read_text().splitlines() if log_file.exists() else []:
        match = pattern.search(line)
        if match:
            found[f"model.layers.{match[1]}"] = {part.rsplit(" ", 2)[0]: float(part.rsplit(" ", 2)[1])
                                                 for part in match[2].split(", ")}
    return found


def main() -> None:
    parser = sample_parser(samples=512, timeout=590)
    parser.add_argument("--runs", nargs="+", default=["base", "new"],
                        choices=("base", "new", "cap24", "cap48", "cpu", "cpu24", "cpuchunked", "fp32", "chunked"))
    parser.add_argument("--base-site", type=Path, help="site folder of main's ktq before the chunked engine")
    parser.add_argument("--keep", action="store_true", help="keep every output (default: only base and new)")
    args = parser.parse_args()
    py = sys.executable
    device, model, data = prepare(args)
    results_file = args.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {"device": device, "runs": {}}
    common = ["--model_id", str(model), "--quant_type", "W4A16", "--dataset", str(data),
              "--num_calibration_samples", str(args.samples), "--max_sequence_length", str(args.seq)]
    for name in args.runs:
        out = args.work / name
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(args.work / f"{name}-cpu", ignore_errors=True)
        env = None
        wrapper = capped(CAPS[name]) if name in CAPS else FP32_HESSIANS if name == "fp32" else PEAK_RSS
        extra = ["--max_gpu_memory", f"{CAPS[name] // 2**30}GiB"] if name in CAPS else []
        if name in CPU_OUTPUT:
            extra += ["--cpu-output", str(args.work / f"{name}-cpu")]
        if name in ("chunked", "cpuchunked"):  # a few experts and the smallest group at a time, whatever the GPU holds
            extra += ["--expert_chunk", "5", "--sample_group", "16"]
        if name == "base":
            env = {**os.environ, "PYTHONPATH": f"{args.base_site}:{os.environ.get('PYTHONPATH', '')}"}
        proc, wall = run([py, "-c", wrapper, "ktq", "gpu", *common, "--output_dir", str(out), *extra], args.out,
                         args.timeout, env=env)
        report = json.loads((out / "ktq_gpu_report.json").read_text())
        moe = {layer: stages for layer, stages in report["layer_seconds"].items() if "calibrate" in stages}
        row = {"wall": wall, "stages": report["stages"], "moe_layers": moe,
               "moe_layer_seconds": {layer: round(sum(stages.values()), 1) for layer, stages in moe.items()},
               "peak_gpu_bytes": report["peak_gpu_bytes"], "plan_gpu_peak_bytes": report["plan"]["gpu_peak_bytes"],
               "peak_rss_bytes": peak_rss(proc), "peak_rss_split": peak_rss_split(proc),
               "plan_cpu_peak_bytes": report["plan"]["cpu_peak_bytes"],
               "plan_seconds": report["plan"].get("seconds_total"),
               "plan_sizes": {k: report["plan"].get(k) for k in ("expert_chunk", "sample_group", "cache_device",
                                                                  "cpu_chunk")},
               "digests": shard_digests(out),
               "cpu_expert_stages": logged_stages(out / "ktq_gpu.log", CPU_STAGES),
               "written_behind": logged_stages(out / "ktq_gpu.log", WRITTEN_BEHIND),
               "cpu_digests": shard_digests(args.work / f"{name}-cpu")}
        base = args.work / "base"
        if name != "base" and base.exists():
            base_report = json.loads((base / "ktq_gpu_report.json").read_text())
            row["against_base"] = {"packed": agreement(out, base),
                                   "losses": losses(report["gptq_loss"], base_report["gptq_loss"])}
        if name != "new" and "new" in results["runs"] and name != "base":
            row["identical_to_new"] = row["digests"] == results["runs"]["new"]["digests"]
        if name in CPU_OUTPUT and name != "cpu" and "cpu" in results["runs"]:
            row["cpu_experts_identical_to_cpu"] = row["cpu_digests"] == results["runs"]["cpu"]["cpu_digests"]
        results["runs"][name] = row
        results_file.write_text(json.dumps(results, indent=1))
        if name not in ("base", "new") and not args.keep:
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(args.work / f"{name}-cpu", ignore_errors=True)
    table(results, args)


def table(results: dict, args) -> None:
    lines = [f"Streaming engine on {results['device']}: sample {args.arch} {args.dtype}, {args.layers} layers "
             f"({args.dense_layers} dense) x {args.experts} experts, hidden {args.hidden}, moe_intermediate "
             f"{args.moe_intermediate}; {args.samples} samples x {args.seq} tokens, W4A16", "",
             "| run | s in all | s per MoE layer | GPU peak (plan) | host peak (plan) | plan s | identical words "
             "vs base | codes > 1 step | GPTQ loss rel. diff max / mean | same bytes as new |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["runs"].items():
        against = r.get("against_base") or {}
        packed, loss = against.get("packed") or {}, against.get("losses") or {}
        lines.append(
            f"| {name} | {r['wall']:.1f} | {', '.join(f'{v:.1f}' for v in r['moe_layer_seconds'].values())} | "
            f"{gb(r['peak_gpu_bytes'])} ({gb(r['plan_gpu_peak_bytes'])}) | {gb(r['peak_rss_bytes'])} "
            f"({gb(r['plan_cpu_peak_bytes'])}) | {r['plan_seconds']} | "
            + (f"{100 * packed['identical']:.2f}% | {100 * packed['codes_more_than_one_step']:.4f}% | "
               if packed else "| | ")
            + (f"{loss['max']:.2e} / {loss['mean']:.2e} | " if loss else "| ")
            + f"{r.get('identical_to_new', '')}"
            + (f", CPU experts {r['cpu_experts_identical_to_cpu']}" if "cpu_experts_identical_to_cpu" in r else "")
            + " |")
    lines += ["", "Stages per MoE layer (s):"]
    for name, r in results["runs"].items():
        for layer, stages in r["moe_layers"].items():
            lines.append(f"- {name} {layer}: " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))
            parts = r.get("cpu_expert_stages", {}).get(layer)
            if parts:
                lines.append("  - of which cpu experts: " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()))
            behind = r.get("written_behind", {}).get(layer)
            if behind:
                lines.append("  - written behind the next stages: "
                             + ", ".join(f"{k} {v:.1f}" for k, v in behind.items()))
        split = r.get("peak_rss_split")
        if split:
            lines.append(f"- {name} host peak at {split['seconds']} s: anonymous {gb(split['RssAnon'])}, files "
                         f"{gb(split['RssFile'])}, shared {gb(split['RssShmem'])}")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    log(args.out, "\n".join(lines))


if __name__ == "__main__":
    main()
