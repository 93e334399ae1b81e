"""How long a run takes: each layer's arithmetic, transfers and calls over the rates of the device it runs on (measured
here in a fraction of a second), or of a GPU class from its public specification (datasheet peaks, dense, without
sparsity, times the share of them ktq reached on an H200).

Per MoE layer, with T calibration tokens, E experts, top-k K, hidden H, expert intermediate I:
    forwards   the layer outside its experts, per sample: recorded while calibrating, recorded again to propagate
               (unless one group holds every sample) and once more with the experts' output
    products   every expert on every token (4 T E H I in bf16) and the down Hessians (2 T E I^2, TF32 on a GPU)
    solve      GPTQ, 2 E (2 I H^2 + H I^2) at the share of the FP32 rate its column loop reaches
    propagate  the routed experts (6 T K H I)
    transfers  the layer's experts to the device once per group and pass when they do not all fit; the hidden
               states to and from the device each pass when the host holds them; the CPU experts' routed rows
               twice when the host holds them (several groups)
    read       the next layer read ahead from the disk meanwhile (only what outlasts the computation counts)
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass

from ktq.gpu.streamed_experts import SAMPLES_PER_PRODUCT
from ktq.precision import tf32_products

REACHED = 0.8  # of the datasheet peaks: an H200 reached 790 of its 989 TFLOP/s bf16 in ktq's benchmark
GPTQ_SHARE = 0.25  # of the FP32 rate, GPTQ's column loop (7 s for a DeepSeek-V3 layer on an H200)
READ = 2e9  # bytes per second from the disk, nominal
STARTUP = 2.0  # seconds of start-up: the plan itself, the model skeleton, the tokenizer (nominal)
TOKENIZE = 3e-6  # seconds per calibration token: reading, rendering and tokenising the dataset (nominal)
CALL = {"cuda": 2e-3, "cpu": 6e-3}  # seconds of one decoder layer call beyond its arithmetic (kernel launches)
LAUNCH = {"cuda": 1.5e-5, "cpu": 4e-5}  # seconds of one small kernel


@dataclass(frozen=True)
class GpuClass:
    bf16: float  # FLOP/s, tensor cores, dense, FP32 accumulation
    tf32: float
    fp32: float
    link: float  # host link, bytes per second per direction
    memory: int  # bytes

    def rates(self) -> dict[str, float]:
        return {"bf16": REACHED * self.bf16, "tf32": REACHED * self.tf32, "fp32": REACHED * self.fp32,
                "link": REACHED * self.link, "read": READ, "kind": "cuda"}


# datasheets: NVIDIA H200 / H100 SXM (PCIe 5.0 x16), A100 SXM 80GB (PCIe 4.0 x16), GeForce RTX 4090 and RTX 3090
# (Ada and Ampere whitepapers: tensor rates with FP32 accumulation; PCIe 4.0 x16)
GPU_CLASSES = {
    "H200": GpuClass(989e12, 494e12, 67e12, 64e9, 141 * 10**9),
    "H100": GpuClass(989e12, 494e12, 67e12, 64e9, 80 * 10**9),
    "A100": GpuClass(312e12, 156e12, 19.5e12, 32e9, 80 * 10**9),
    "RTX 4090": GpuClass(165e12, 82.6e12, 82.6e12, 32e9, 24 * 10**9),
    "RTX 3090": GpuClass(71e12, 35.6e12, 35.6e12, 32e9, 24 * 10**9),
}


def measured_rates(torch_device: str) -> dict[str, float]:
    """Matrix-product rates of this device in bf16, TF32 and FP32 and its host link, from a fraction of a second."""
    import torch

    gpu = torch_device != "cpu"
    size = 4096 if gpu else 512
    rates: dict[str, float] = {"read": READ, "kind": "cuda" if gpu else "cpu"}
    for label, dtype, precision in (("bf16", torch.bfloat16, nullcontext), ("tf32", torch.float32, tf32_products),
                                    ("fp32", torch.float32, nullcontext)):
        if not gpu and label == "tf32":
            continue
        a = torch.randn(size, size, device=torch_device, dtype=dtype)
        with precision():
            rates[label] = 2 * size**3 / _seconds(lambda: torch.mm(a, a), gpu)
    if gpu:
        host = torch.empty(64 * 2**20, dtype=torch.uint8, pin_memory=True)
        rates["link"] = host.numel() / _seconds(lambda: host.to(torch_device, non_blocking=True), gpu)
    else:
        rates["tf32"], rates["link"] = rates["fp32"], float("inf")
    return rates


def _seconds(work, gpu: bool) -> float:
    """Seconds of one call of work, over at least 50 ms after one warm-up call."""
    import torch

    work()
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.05 or runs < 2:
        work()
        runs += 1
        if gpu:
            torch.cuda.synchronize()
    return (time.perf_counter() - start) / runs


def seconds(plan, rates: dict[str, float], sizes) -> dict[str, float]:
    """Time per stage over the whole run (see the module's docstring), for `plan` with `sizes` on `rates`."""
    kind = rates["kind"]
    on_host = kind == "cpu"
    tokens, samples = plan.samples * plan.seq_len, plan.samples
    groups = -(-samples // sizes.sample_group) if samples else 0
    batches = -(-samples // SAMPLES_PER_PRODUCT) if samples else 0
    stages = {"start-up": STARTUP + tokens * TOKENIZE, "read": 0.0, "calibrate": 0.0, "hessians": 0.0,
              "solve": 0.0, "cpu experts": 0.0, "propagate": 0.0, "transfers": 0.0}
    hessian_rate = rates["tf32"] if not on_host else rates["fp32"]
    for index, spec in enumerate(plan.layers):
        dense_flops = 2 * plan.seq_len * spec.dense_bytes / plan.dtype_bytes
        forward = CALL[kind] + dense_flops / rates["bf16"]
        read = (spec.experts * plan.terms.expert_host + spec.dense_bytes) / rates["read"]
        last = index == len(plan.layers) - 1
        if not spec.experts or plan.method != "GPTQ":
            stages["propagate"] += 0 if last or not samples else samples * forward
            stages["read"] += read
            continue
        h, i, e, k = spec.hidden, spec.intermediate, spec.experts, plan.top_k
        forwards, products, hessians = samples * forward, 0.0, 0.0  # recorded while calibrating
        if plan.gpu_artifact:
            products = (tokens * e * 4 * h * i) / rates["bf16"] + e * batches * 4 * LAUNCH[kind]
            hessians = tokens * 2 * (h * h + e * i * i) / hessian_rate + samples * e * LAUNCH[kind]
            stages["solve"] += 2 * e * (2 * i * h * h + h * i * i) / (GPTQ_SHARE * rates["fp32"])
        stages["calibrate"] += forwards + products
        stages["hessians"] += hessians
        compute = forwards + products + hessians
        if plan.cpu_experts:
            routed = tokens * k
            stages["cpu experts"] += (routed * 2 * (h * h + i * i + 2 * h * i) / hessian_rate
                                      + 2 * e * (2 * i * h * h + h * i * i) / (GPTQ_SHARE * rates["fp32"]))
            if not on_host and groups > 1:  # the routed rows come from the host, twice (gate/up, then down)
                stages["transfers"] += 2 * routed * h * plan.dtype_bytes / rates["link"]
        if not last:
            passes = (2 if groups > 1 else 1) * samples
            stages["propagate"] += passes * forward + 6 * tokens * k * h * i / rates["bf16"] \
                + e * batches * 8 * LAUNCH[kind]
        if not on_host:
            resident = sizes.expert_chunk >= e
            loads = 1 if resident else (groups * plan.gpu_artifact + plan.gpu_artifact + bool(plan.cpu_experts)
                                        + (0 if last else groups))
            stages["transfers"] += loads * e * plan.terms.expert_host / rates["link"]
            if not sizes.cache_on_device:
                stages["transfers"] += 3 * plan.terms.cache / rates["link"]
        stages["read"] += max(0.0, read - compute)  # read ahead while the layer before computes
    return stages
