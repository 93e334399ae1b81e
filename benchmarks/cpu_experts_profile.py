"""Where one layer's calibrated CPU experts spend their time, on synthetic data of a given geometry (default
DeepSeek-V3: 256 experts, hidden 7168, moe_intermediate 2048, 256 x 2048 tokens routed top-8).

Runs ktq's own `calibrate_layer` with its stage clock once per --chunk (experts solved at a time), with the GPU
peak against the plan's working set for that chunk; then one chunk's gate/up solve by part, on a GPU with ktgrid's
Triton kernels against PyTorch's loops (time, and rows with the same steps and codes), with --profile its top CUDA
kernels; then ktgrid's feedback factor against GPTQ's inverse factor (cholesky, cholesky_inverse, cholesky) on the same
eight Hessians, time and largest difference.

    python benchmarks/cpu_experts_profile.py --out results/cpu-experts-profile.txt [--experts 256 --chunk 44 96]

ktq must be installed (the venv's editable install, or the device wheels: benchmarks/device_wheels.sh), since its
Numba kernels install as ktq.kernels from the top-level kernels/ folder; on the device machine:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site python3 benchmarks/cpu_experts_profile.py --chunk 64 --out "$OUT/profile.txt"
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from ktq.calibrated import ktgrid
from ktq.calibrated.routed import RoutedInputs
from ktq.calibrated.solve import LayerCodes, StageClock, calibrate_layer, stacked_bytes
from ktq.gpu.layer_experts import Chunk
from ktq.held_buffers import HeldBuffers


def synthetic(experts: int, hidden: int, inter: int, tokens: int, top_k: int, device):
    gen = torch.Generator(device=device).manual_seed(0)
    gains = torch.exp(torch.randn(hidden, generator=gen, device=device) * 0.7)
    router = torch.randn(hidden, experts, generator=gen, device=device) / hidden ** 0.5
    parts = []
    for first in range(0, tokens, 8192):
        n = min(8192, tokens - first)
        x = (torch.randn(n, hidden, generator=gen, device=device) * gains).bfloat16()
        probs = torch.softmax(x.float() @ router * 4, dim=1)
        w, ids = probs.topk(top_k, dim=1)
        parts.append((x, ids, w / w.sum(dim=1, keepdim=True)))
    weights = [torch.randn(experts, inter, hidden, generator=gen, device=device).mul_(0.02).bfloat16()
               for _ in range(2)]
    weights.append(torch.randn(experts, hidden, inter, generator=gen, device=device).mul_(0.02).bfloat16())
    return weights, parts


def routed_inputs(parts, device) -> RoutedInputs:
    """A RoutedInputs over the same tensors, as the engine gives it when one group holds every sample."""
    x, ids, weights = (torch.cat(tensors) for tensors in zip(*parts))
    inputs = RoutedInputs(HeldBuffers(pin=device.type == "cuda"))
    inputs.add_group(SimpleNamespace(x=x, index=ids, weights=weights), slice(0, len(x)), len(x))
    return inputs


class Resident:
    """A layer's experts already on the device, handed out in chunks as ktq.gpu.layer_experts.DeviceExperts does."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        self.gate_up, self.down = torch.cat([gate, up], dim=1), down
        self.experts, self.device = len(down), down.device

    def chunks(self, size: int):
        for first in range(0, self.experts, size):
            block = range(first, min(first + size, self.experts))
            yield Chunk(block, self.gate_up[block.start:block.stop], self.down[block.start:block.stop])


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeat: int = 1) -> float:
    sync()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--inter", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=256 * 2048)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--chunk", type=int, nargs="+", default=[44], help="experts solved at a time, each a run")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--profile", action="store_true", help="also the top kernels of one chunk's gate/up solve")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    say(f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'} torch {torch.__version__}; {vars(args)}")
    weights, parts = synthetic(args.experts, args.hidden, args.inter, args.tokens, args.top_k, device)
    act = torch.nn.functional.silu
    host = LayerCodes(pin=device.type == "cuda")

    for chunk in args.chunk:
        clock = StageClock(device)
        torch.cuda.reset_peak_memory_stats() if device.type == "cuda" else None
        start = time.perf_counter()
        calibrate_layer(Resident(*weights), routed_inputs(parts, device), act, args.bits, 1, chunk, host, clock)
        say(f"calibrate_layer, {args.experts} experts, {chunk} at a time: {time.perf_counter() - start:.2f} s; "
            + ", ".join(f"{k} {v:.2f} s" for k, v in clock.seconds.items()))
        if device.type == "cuda":
            say(f"  GPU peak {torch.cuda.max_memory_allocated() / 1e9:.1f} GB; the plan's chunk working set "
                f"{stacked_bytes(chunk, args.hidden, args.inter) / 1e9:.1f} GB")

    # one chunk's gate/up solve by part: the clipping search, the feedback factors, and the whole of it (the column
    # loop and its lazy updates are the rest), on the chunk's weights and one Hessian from the routed tokens
    chunk = args.chunk[0]
    gate_up = torch.cat([weights[0][:chunk], weights[1][:chunk]], dim=1)
    x = torch.cat([p[0] for p in parts])[:16384].float()
    hessian = x.T @ x / x.shape[0]
    del x

    def hessians() -> torch.Tensor:
        return hessian.expand(chunk, *hessian.shape).clone()

    diag = torch.diagonal(hessian).expand(chunk, -1).contiguous()
    order = torch.argsort(diag, dim=1, descending=True, stable=True)
    # each timing includes making its inputs (one copy of the chunk's weights or Hessians: milliseconds)
    clip = timed(lambda: ktgrid.clipped_steps(gate_up.float(), diag, args.bits, 1))
    factor = timed(lambda: ktgrid._feedback_factor(hessians(), order, 0.01))
    whole = timed(lambda: ktgrid.quantize_to_grid(gate_up, hessians(), args.bits))
    say(f"gate/up solve of {chunk} experts: {whole:.2f} s; clipping search {clip:.2f} s, feedback factors "
        f"{factor:.2f} s, the rest (column loop, lazy updates, layout copies) {whole - clip - factor:.2f} s")
    if device.type == "cuda":  # the Triton kernels against PyTorch's loops, same chunk, same run
        loops = timed(lambda: ktgrid.quantize_to_grid(gate_up, hessians(), args.bits, kernels=False))
        clip_loops = timed(lambda: ktgrid.clipped_steps(gate_up.float(), diag, args.bits, 1, kernels=False))
        kernel = ktgrid.quantize_to_grid(gate_up, hessians(), args.bits)
        torch_loops = ktgrid.quantize_to_grid(gate_up, hessians(), args.bits, kernels=False)
        same_steps = (kernel.scales == torch_loops.scales).all(dim=2)
        same_codes = (kernel.codes == torch_loops.codes).all(dim=2)
        say(f"  with Triton kernels {whole:.2f} s, PyTorch's loops {loops:.2f} s: {loops / whole:.2f}x; clipping "
            f"search {clip:.3f} s against {clip_loops:.3f} s: {clip_loops / clip:.1f}x")
        say(f"  rows with the same steps {same_steps.float().mean().item():.6f}; of those, rows with the same codes "
            f"{same_codes[same_steps].float().mean().item():.6f}")
        if args.profile:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                ktgrid.quantize_to_grid(gate_up, hessians(), args.bits)
                sync()
            say(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=20, max_name_column_width=60))

    # the feedback factor of 8 gate/up Hessians against GPTQ's own inverse factor (cholesky, cholesky_inverse,
    # cholesky), the same matrices; the largest difference of ours from GPTQ's inverted (float64) and column-scaled
    b, c = 8, args.hidden
    x = torch.cat([p[0] for p in parts])[:16384].float()
    base = (x.T @ x / x.shape[0]).expand(b, c, c).clone()
    base.diagonal(dim1=1, dim2=2).add_(0.01 * base.diagonal(dim1=1, dim2=2).mean(dim=1, keepdim=True))
    order = torch.arange(c, device=device).expand(b, c)

    def gptq_factor():
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(base)), upper=True)

    ours = ktgrid._feedback_factor(base.clone(), order, 0.0)[0][0].double()
    inverse = torch.linalg.inv(gptq_factor()[0].double())
    expected = inverse / inverse.diagonal()
    ours_s = timed(lambda: ktgrid._feedback_factor(base.clone(), order, 0.0))
    difference = (ours - expected).abs().max() / expected.abs().max()
    say(f"feedback factor, {b} x {c}^2: ktgrid {ours_s:.3f} s, GPTQ's inverse factor (cholesky + cholesky_inverse + "
        f"cholesky) {timed(gptq_factor):.3f} s, the copy alone {timed(base.clone):.3f} s; largest difference "
        f"{difference:.1e} of the largest entry")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
