"""Run kt-kernel 0.7.2's own MoE forward on a ktq output; started by tests/kt_kernel_check.py in a subprocess.

    PYTHONPATH=build/kt-kernel python tests/kt_kernel_forward.py WEIGHTS IN.pt OUT.pt --method AMXINT4 --numa 2 \
        --layer 1 --experts 8 --hidden 512 --intermediate 256

IN.pt holds {"batches": [(x bf16 [T, H], topk ids int64 [T, K], topk weights float32 [T, K]), ...]}; OUT.pt gets
{"out": [bf16 [T, H], ...], "variant": the kernel build kt-kernel picked for this CPU, "seconds": with --repeat N,
each batch's median forward time over N more runs}. One process loads the layer once and runs every batch through
it, as a server would.

Only this process imports kt_kernel (from build/kt-kernel, never the venv): its wheel pins torch 2.9.1 and ships
other top-level packages, so it is installed apart with --no-deps and run beside our torch.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

# KTMoEWrapper.forward hands the task to the CPU worker through a CUDA stream callback unless this is set; with it,
# it submits and waits on the host thread (its documented debugging path), the only one that works without a GPU.
os.environ["KT_FORCE_SYNC_SUBMIT"] = "1"


def _without_pinned_memory() -> None:
    """kt-kernel allocates its staging buffers and expert mask with `torch.zeros/empty/full(..., pin_memory=True)`
    (pinned pages speed up GPU copies); CPU-only torch refuses pin_memory=True. Dropping the keyword gives plain
    pageable tensors, the same bytes for a CPU-only forward. Patched here only, in this subprocess."""
    for name in ("zeros", "empty", "full"):
        factory = getattr(torch, name)

        def unpinned(*args, _factory=factory, pin_memory=False, **kwargs):
            return _factory(*args, **kwargs)

        setattr(torch, name, unpinned)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("weights")
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--method", required=True, choices=["AMXINT4", "AMXINT8", "RAWINT4"])
    parser.add_argument("--numa", type=int, required=True)
    parser.add_argument("--layer", type=int, required=True)
    parser.add_argument("--experts", type=int, required=True)
    parser.add_argument("--hidden", type=int, required=True)
    parser.add_argument("--intermediate", type=int, required=True)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeat", type=int, default=0, help="also time each batch: the median of this many runs")
    args = parser.parse_args(argv)

    _without_pinned_memory()
    import kt_kernel
    from kt_kernel import KTMoEWrapper

    batches = torch.load(args.input)["batches"]
    top_k = batches[0][1].shape[1]
    longest = max(x.shape[0] for x, _, _ in batches)
    wrapper = KTMoEWrapper(
        layer_idx=args.layer,
        num_experts=args.experts,
        num_experts_per_tok=top_k,
        hidden_size=args.hidden,
        moe_intermediate_size=args.intermediate,
        gpu_experts_mask=None,  # every expert on the CPU
        cpuinfer_threads=max(args.threads, args.numa),  # at least one thread per NUMA subpool
        threadpool_count=args.numa,  # must equal the NUMA parts baked into the files
        weight_path=args.weights,  # merged shards if any *.safetensors sits there, else the _layer_L/_numa_p tree
        # its per-expert activation buffers hold this many tokens and must be a multiple of 32 rows (M_STEP)
        chunked_prefill_size=max(32, -(-longest // 32) * 32),
        method=args.method,
    )
    wrapper.load_weights(torch.arange(args.experts, dtype=torch.int64))  # physical expert e is logical expert e
    outs = [wrapper.forward(x, ids, weights, 0).clone() for x, ids, weights in batches]  # stream 0: unused here
    seconds = [_median_seconds(lambda b=batch: wrapper.forward(*b, 0), args.repeat) for batch in batches] \
        if args.repeat else None
    torch.save({"out": outs, "variant": kt_kernel.__cpu_variant__, "seconds": seconds}, args.output)


def _median_seconds(run, repeat: int) -> float:
    import statistics
    import time

    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


if __name__ == "__main__":
    main(sys.argv[1:])
