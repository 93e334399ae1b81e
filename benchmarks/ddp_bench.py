"""`ktq gpu --nproc N` (torch.distributed, llm-compressor's distributed path) against the plain single-process run on
the same sample MoE and calibration data: seconds per stage, each rank's stages, GPU peak, and the quantised
experts of both outputs compared word for word.

    python benchmarks/ddp_bench.py --work /tmp/ddp --out results/ [--nprocs 1 2 --layers 8 --experts 64
        --hidden 2048 --moe-intermediate 768 --samples 32 --seq 512 --scheme W4A16]

Writes results.json (ktq's reports, less per-module losses), table.md and bench.log to --out.
"""

from __future__ import annotations

import json
import sys

from gpu_bench import gb, log, packed_agreement, prepare, run, sample_parser


def first_layer(report: dict) -> list[int]:
    return next(iter(report["routed_tokens"].values()))


def main() -> None:
    parser = sample_parser(samples=32, timeout=600)
    parser.add_argument("--nprocs", type=int, nargs="+", default=[1])
    parser.add_argument("--scheme", default="W4A16")
    args = parser.parse_args()
    py = sys.executable

    import torch

    device, model, data = prepare(args)
    common = ["--model_id", str(model), "--overwrite", "--quant_type", args.scheme, "--dataset", str(data),
              "--num_calibration_samples", str(args.samples), "--max_sequence_length", str(args.seq)]

    results = {"device": device, "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()},
               "runs": []}
    plain = args.work / "plain"
    for label, extra, out in [("plain", [], plain)] + [(f"nproc {n}", ["--nproc", str(n)], args.work / f"nproc{n}")
                                                        for n in args.nprocs]:
        _, wall = run([py, "-m", "ktq", "gpu", "--output_dir", str(out), *common, *extra], args.out, args.timeout)
        report = json.loads((out / "ktq_gpu_report.json").read_text())
        row = {"run": label, "wall": wall, "seconds": sum(report["stages"].values()), "stages": report["stages"],
               "world_size": report["world_size"], "rank_stages": report["rank_stages"],
               "peak_gpu_bytes": report["peak_gpu_bytes"],
               "packed_words_identical_to_plain": packed_agreement(plain, out),
               # the first MoE layer's routing depends on no quantised layer: it must match exactly
               "first_layer_routing_equal": not results["runs"]
               or first_layer(report) == first_layer(results["runs"][0]),
               "routed_tokens": report["routed_tokens"],
               "report": {k: v for k, v in report.items() if k not in ("gptq_loss", "routed_tokens")}}
        results["runs"].append(row)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))

    base = results["runs"][0]
    lines = [f"ktq gpu --nproc N vs the plain run on {device}: sample qwen3_moe {args.layers} layers x {args.experts} "
             f"experts, hidden {args.hidden}, moe_intermediate {args.moe_intermediate}; {args.samples} samples x "
             f"{args.seq} tokens, GPTQ {args.scheme}", "",
             "| run | ranks | total s | load s | quantize s | save s | quantize per rank s | speedup (total) | "
             "GPU peak rank 0 | identical packed words | first MoE layer routing equal |", "|---" * 11 + "|"]
    for r in results["runs"]:
        per_rank = " / ".join(f"{s.get('quantize', 0):.1f}" for s in r["rank_stages"]) or "-"
        lines.append(f"| {r['run']} | {r['world_size']} | {r['seconds']:.1f} | {r['stages'].get('load', 0):.1f} | "
                     f"{r['stages'].get('quantize', 0):.1f} | {r['stages'].get('save', 0):.1f} | {per_rank} | "
                     f"{base['seconds'] / r['seconds']:.2f} | {gb(r['peak_gpu_bytes'])} | "
                     f"{100 * r['packed_words_identical_to_plain']:.1f}% | {r['first_layer_routing_equal']} |")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    log(args.out, "\n".join(lines))


if __name__ == "__main__":
    main()
