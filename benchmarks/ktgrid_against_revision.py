"""ktgrid's calibrated codes against those of an earlier revision of ktgrid, same run, same inputs: the share of
equal codes, the GPTQ objective sum_rows (w - q) H (w - q)^T of each, and the time of each.

For changes that should alter the codes only in the last bits of the arithmetic (another factorisation, another
order of the sums): the objectives should agree to ~1e-5. The earlier ktgrid.py is read from git (`git show
REV:ktq/calibrated/ktgrid.py`) and imported beside the installed ktq: its own imports come from this tree (from
68c97c4 on that includes grid_kernels, the Triton kernels, so on a GPU the two share them). Each is run once before
it is timed (Triton compiles its kernels on the first call).

    python benchmarks/ktgrid_against_revision.py --rev db1097e --out results/ktgrid-vs-db1097e.txt
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ktq.calibrated import ktgrid


def earlier_ktgrid(rev: str):
    source = subprocess.run(["git", "show", f"{rev}:ktq/calibrated/ktgrid.py"], check=True, capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout
    path = Path(tempfile.mkdtemp()) / "earlier_ktgrid.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("earlier_ktgrid", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def problem(matrices: int, rows: int, columns: int, tokens: int, seed: int):
    """bf16 weights and correlated Hessians with uneven column energies, as real expert inputs have."""
    gen = torch.Generator().manual_seed(seed)
    gains = torch.exp(torch.randn(columns, generator=gen) * 0.7)
    mix = torch.eye(columns) + 0.05 * torch.randn(columns, columns, generator=gen)
    hessians = []
    for _ in range(matrices):
        x = (torch.randn(tokens, columns, generator=gen) * gains) @ mix
        hessians.append(x.T @ x / tokens)
    weights = (torch.randn(matrices, rows, columns, generator=gen) * 0.02).bfloat16()
    return weights, torch.stack(hessians)


def objective(codes, weights: torch.Tensor, hessians: torch.Tensor, bits: int) -> float:
    d = codes.dequantize(bits) - weights.float()
    return torch.einsum("brc,bcd,brd->", d, hessians, d).item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rev", required=True, help="the earlier revision")
    parser.add_argument("--matrices", type=int, default=8)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--columns", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    earlier = earlier_ktgrid(args.rev)
    weights, hessians = problem(args.matrices, args.rows, args.columns, args.tokens, 0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    weights, hessians = weights.to(device), hessians.to(device)
    lines = [f"{torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}; {vars(args)}"]
    for bits in (4, 8):
        seconds, results = [], []
        for module in (ktgrid, earlier):
            module.quantize_to_grid(weights[:1], hessians[:1].clone(), bits)  # warm-up
            start = time.perf_counter()
            results.append(module.quantize_to_grid(weights, hessians.clone(), bits))
            if device == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
        now, before = results
        equal = (now.codes == before.codes).float().mean().item()
        rows = (now.codes == before.codes).all(dim=2).float().mean().item()
        loss_now, loss_before = (objective(r, weights, hessians, bits) for r in results)
        lines.append(f"INT{bits}: equal codes {equal:.6f} (rows {rows:.4f}); GPTQ objective {loss_now:.6e} against "
                     f"{loss_before:.6e} at {args.rev} (ratio {loss_now / loss_before:.6f}); {seconds[0]:.2f} s "
                     f"against {seconds[1]:.2f} s ({seconds[1] / seconds[0]:.2f}x)")
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
