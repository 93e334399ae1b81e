"""CPU experts three ways, in the real kt-kernel 0.7.2 on this machine: RAWINT4 read straight from a `ktq gpu
--group_size 32` checkpoint, and AMXINT4 / AMXINT8 from `ktq cpu`, all rounded to nearest from the same BF16 layer.

For each: the MoE forward's error against the BF16 experts computed in fp32 (relative RMS and cosine, over a decode
batch of 1 token and a prefill batch), and kt-kernel's forward time (median of --repeat runs, 1 and 2 threads; the
three methods take turns for --rounds rounds and each keeps its fastest round, so that other work on a shared machine
weighs on none of them in particular).
Weights are `ktq sample`'s Gaussian ones at Qwen3-30B-A3B's expert shape (hidden 2048, moe_intermediate 768), top-8
of --experts experts. Prints a markdown table; not a test.

    .venv/bin/python benchmarks/rawint4_vs_amx.py [--experts 32] [--tokens 1 512] [--repeat 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from gpu_models import run_ktq  # noqa: E402
from kt_kernel_check import _plain_moe, kt_kernel_forward_batches, kt_kernel_variant, make_inputs  # noqa: E402

HIDDEN, INTER, TOP_K, LAYER = 2048, 768, 8, 1


def bf16_experts(src: Path, experts: int) -> dict:
    from safetensors import safe_open

    weight_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    weights = {}
    for e in range(experts):
        for proj in ("gate", "up", "down"):
            name = f"model.layers.{LAYER}.mlp.experts.{e}.{proj}_proj.weight"
            with safe_open(src / weight_map[name], framework="pt") as f:
                weights[proj, e] = f.get_tensor(name).float()
    return weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 512])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "src"
        assert run_ktq("sample", src, "--arch", "qwen3_moe", "--layers", 2, "--dense-layers", 1, "--experts",
                       args.experts, "--hidden", HIDDEN, "--moe-intermediate", INTER) == 0
        outputs = {"RAWINT4 (ktq gpu W4A16, groups of 32)": (tmp / "gpu", "RAWINT4"),
                   "AMXINT4 (ktq cpu int4)": (tmp / "int4", "int4"), "AMXINT8 (ktq cpu int8)": (tmp / "int8", "int8")}
        assert run_ktq("gpu", "--model_id", src, "--output_dir", tmp / "gpu", "--quant_method", "RTN",
                       "--quant_type", "W4A16", "--group_size", 32, "--force_cpu", "--quiet") == 0
        for method in ("int4", "int8"):
            assert run_ktq("cpu", "-i", src, "-o", tmp / method, "--quant-method", method, "--threadpool-count", 1,
                           "--quiet") == 0
        reference = bf16_experts(src, args.experts)
        batches = [make_inputs(t, HIDDEN, args.experts, TOP_K, seed=t) for t in args.tokens]
        print(f"kt-kernel 0.7.2, {kt_kernel_variant()} build; {args.experts} experts of {HIDDEN} x {INTER}, "
              f"top-{TOP_K}; median of {args.repeat} forwards, fastest of {args.rounds} rounds\n")
        geometry = {"experts": args.experts, "hidden": HIDDEN, "intermediate": INTER}
        outs, seconds = {}, {}
        for _ in range(args.rounds):
            for label, (folder, method) in outputs.items():
                for threads in (1, 2):
                    got, times = kt_kernel_forward_batches(folder, method, 1, LAYER, batches=batches,
                                                           repeat=args.repeat, threads=threads, **geometry)
                    outs[label] = got
                    best = seconds.get((label, threads), times)
                    seconds[label, threads] = [min(a, b) for a, b in zip(best, times)]
        print("| CPU experts | " + " | ".join(f"{t} tok: rel. RMS error, cosine" for t in args.tokens) + " | "
              + " | ".join(f"{t} tok: ms, 1 / 2 threads" for t in args.tokens) + " |")
        print("|---" * (1 + 2 * len(args.tokens)) + "|")
        for label in outputs:
            errors, times = [], []
            for i, (x, ids, weights) in enumerate(batches):
                want = _plain_moe(x.float(), ids, weights, lambda proj, e: reference[proj, e])
                got = outs[label][i].float()
                rel = ((got - want).norm() / want.norm()).item()
                cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0).item()
                errors.append(f"{rel:.4f}, {cos:.5f}")
                times.append(f"{1e3 * seconds[label, 1][i]:.2f} / {1e3 * seconds[label, 2][i]:.2f}")
            print(f"| {label} | " + " | ".join(errors) + " | " + " | ".join(times) + " |")


if __name__ == "__main__":
    main()
