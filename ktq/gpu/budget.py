"""What the streaming engine holds for one layer, on the device and on the host, and the sizes that fit a budget:
how many experts the device holds at once (the whole layer when it fits), how many samples' expert inputs (a
group), whether the calibration hidden states stay on the device, and how many CPU experts are solved together.

    device = the largest layer outside its experts (in the model dtype)
           + the experts on the device: the whole layer, or two chunks (one computing, the next arriving) and the
             next chunk as the host holds it
           + GPTQ's Hessians (one shared gate/up H^2 and a down I^2 per expert, fp32)
           + one group of samples: each token's input to the experts, the experts' output and the routing
           + the largest of: one sample's pass through the layer and one batch of expert products (calibrating,
             propagating), GPTQ's working set, the CPU experts' solve of one chunk
           + the hidden states of every sample, when they fit beside the rest (else the host holds them)
           + CUDA library workspaces
    host   = this process (and, on a GPU, the CUDA context and libraries) + two layers of experts as read (the
             current one, the next one read ahead)
           + the layer's packed GPU experts and CPU codes on their way to the disk
           + the hidden states when the device does not hold them (and, for calibrated CPU experts, every token's
             input to the experts, twice while they are joined)
    (on a GPU the host buffers are pinned, and PyTorch's pinned allocator rounds each up to a power of two;
    calibrating on the CPU, the device's terms are host memory too)
"""

from __future__ import annotations

from dataclasses import dataclass

from ktq.gpu.model import DTYPE_BYTES, LayerSpec
from ktq.gpu.options import GpuOptions
from ktq.gpu.streamed_experts import SAMPLES_PER_PRODUCT

GPU_OVERHEAD = 256 * 2**20  # cuBLAS / cuSOLVER workspaces and allocator slack beyond the terms above
# host memory a GPU run adds after the plan: CUDA context, cuBLAS, Triton, llm-compressor (measured on an H100)
CUDA_HOST = 1200 * 2**20
WEIGHT_BITS = {"W4A16": 4, "W8A16": 8}
# each routing entry (token x top-k): an int64 index (the expert's id in a group and on the host; the token's, once
# the CPU experts' solve has sorted them by expert: ktq.calibrated.routed.RoutedRows) and an fp32 weight at most
INDEX_BYTES, WEIGHT_BYTES = 8, 4
EXPERTS_SHARE = 1 / 3  # of the memory left for experts and samples, what streamed chunks of experts may take


@dataclass(frozen=True)
class Terms:
    """One layer's memory terms, in bytes, per unit where the plan chooses the count."""

    dense: int  # the largest layer outside its routed experts
    expert: int  # one expert (gate, up, down) in the model dtype
    expert_host: int  # one expert as the host holds it: FP8 bytes and block scales, or bf16
    experts: int  # routed experts per layer
    hessians: int  # GPTQ's shared gate/up Hessian and one down Hessian per expert
    activations: int  # one sample's pass through the layer, its experts aside
    products: int  # one batch of expert products (SAMPLES_PER_PRODUCT samples)
    per_sample: int  # one sample's share of a group: its expert inputs, their output, its routing
    samples: int  # calibration samples (0 without calibration)
    gptq: int  # GPTQ's working set of one solve
    cpu_expert: int  # the calibrated CPU experts' solve, per expert of a chunk (0: none written)
    cpu_fixed: int  # ... and per chunk
    cache: int  # the hidden states of every sample
    sample_hidden: int  # one sample's hidden states (a pinned buffer of its own on the host)
    routed: int  # for calibrated CPU experts, every token's input to the experts ...
    routing: int  # ... its top-k expert ids and weights (entries) ...
    staging: int  # ... and a batch of routed rows on its way to the device, when the host holds them
    kwargs: int  # each sample's rotary embeddings, on the device
    packed: int  # one layer as the GPU checkpoint writes it
    codes: int  # one layer's CPU codes and scales
    process: int  # this process before the run
    overhead: int = GPU_OVERHEAD


@dataclass(frozen=True)
class Sizes:
    expert_chunk: int  # experts on the device at once
    sample_group: int  # samples whose expert inputs the device holds at once
    cache_on_device: bool
    cpu_chunk: int = 1  # calibrated CPU experts solved together


def experts_on_device(t: Terms, chunk: int) -> int:
    if chunk >= t.experts:
        return t.experts * t.expert
    return chunk * (2 * t.expert + t.expert_host)


def solve_bytes(t: Terms, cpu_chunk: int) -> int:
    return max(t.gptq, t.cpu_fixed + cpu_chunk * t.cpu_expert if t.cpu_expert else 0)


def working_set(t: Terms, cpu_chunk: int) -> int:
    """The largest of what one step holds at a time: a sample through the layer and a product, or a solve."""
    return max(t.activations + t.products, solve_bytes(t, cpu_chunk))


def cpu_chunk_for(t: Terms, room: int, chunk: int) -> int:
    """As many CPU experts solved together as `room` holds, within one chunk of `chunk` experts."""
    return max(1, min(chunk, t.experts, (room - t.cpu_fixed) // t.cpu_expert))


def device_peak(t: Terms, s: Sizes) -> int:
    working = working_set(t, s.cpu_chunk)
    return (t.dense + experts_on_device(t, s.expert_chunk) + t.hessians + s.sample_group * t.per_sample + working
            + t.kwargs + (t.cache if s.cache_on_device else 0) + t.overhead)


def pinned(nbytes: int) -> int:
    """What PyTorch's pinned-memory allocator takes for one buffer: the next power of two."""
    return 1 << (nbytes - 1).bit_length() if nbytes > 0 else 0


def host_experts(t: Terms, device_is_host: bool) -> int:
    """Two layers of experts as read (this one and the next): pinned buffers when a GPU computes."""
    return 2 * (t.experts * t.expert_host if device_is_host else pinned(t.experts * t.expert_host))


def host_peak(t: Terms, s: Sizes, device_is_host: bool) -> int:
    if not device_is_host:  # pinned buffers (two layers of experts, the codes, each sample's hidden states)
        cache = 0 if s.cache_on_device else t.samples * pinned(t.sample_hidden)
        return (t.process + CUDA_HOST + host_experts(t, False) + t.packed
                + (3 * pinned(t.codes // 3) if t.codes else 0) + cache + routed_on_host(t, s, pin=True))
    # calibrating on the CPU: the experts as read serve as they are unless they are decoded (FP8) into a copy
    decoded = 0 if t.expert_host == t.expert else experts_on_device(t, s.expert_chunk)
    return (t.process + host_experts(t, True) + t.packed + t.codes + t.cache + routed_on_host(t, s, pin=False)
            + t.dense + decoded
            + t.hessians + s.sample_group * t.per_sample + t.kwargs + working_set(t, s.cpu_chunk))


def routed_on_host(t: Terms, s: Sizes, pin: bool) -> int:
    """The calibrated CPU experts' copy of every token's input to the experts, held on the host (with two staging
    buffers when a GPU solves) when the samples pass in several groups; one group holding every sample serves as it
    is (ktq.calibrated.routed)."""
    if not t.routed or s.sample_group >= t.samples:
        return 0
    ids, weights = INDEX_BYTES * t.routing, WEIGHT_BYTES * t.routing
    if not pin:
        return t.routed + ids + weights
    return pinned(t.routed) + pinned(ids) + pinned(weights) + 2 * pinned(t.staging)


def round_group(samples: int, fit: int) -> int:
    """Samples in a group: all of them, or a whole number of SAMPLES_PER_PRODUCT (at least one)."""
    if fit >= samples:
        return max(samples, 1)
    return max(SAMPLES_PER_PRODUCT, fit // SAMPLES_PER_PRODUCT * SAMPLES_PER_PRODUCT)


def fit(t: Terms, budget: int, chunk: int | None = None, group: int | None = None) -> Sizes:
    """The largest sizes whose device peak fits `budget` (as much of the layer's experts as fits, then as many
    samples), or the smallest sizes when nothing fits; `chunk` / `group` force a size."""
    base = t.dense + t.hessians + working_set(t, 1) + t.kwargs + t.overhead
    free = budget - base
    smallest_group = min(SAMPLES_PER_PRODUCT, max(t.samples, 1)) * t.per_sample
    if chunk is None:
        if t.experts * t.expert + smallest_group <= free:
            chunk = t.experts
        else:
            per_expert = 2 * t.expert + t.expert_host
            chunk = max(1, min(t.experts - 1, int(free * EXPERTS_SHARE) // per_expert,
                               (free - smallest_group) // per_expert))
    room = free - experts_on_device(t, chunk)
    if group is None:
        group = round_group(t.samples, room // t.per_sample if t.per_sample else t.samples)
    room -= group * t.per_sample
    cache = group >= t.samples and t.cache <= room
    room -= t.cache if cache else 0
    cpu_chunk = 1
    if t.cpu_expert:  # as many CPU experts as the working set's slot and what is left hold, within one chunk
        slot = max(t.activations + t.products, t.gptq) + max(room, 0)
        cpu_chunk = cpu_chunk_for(t, slot, chunk)
    return Sizes(chunk, group, cache, cpu_chunk)


def activation_bytes(text: dict, seq_len: int, dtype_bytes: int, spec: LayerSpec) -> int:
    """GPU memory of one calibration sample passing one decoder layer, an upper estimate: hidden states in, out and
    residual (3 L H), attention's q, k, v and output (L (2 q + 2 kv)), one expert's gate, up and their product
    (3 L I) at a time, the router's logits and softmax in fp32 (2 L E 4), and the Hessian update, which casts the
    input to fp32 and scales it (2 L d_in 4)."""
    hidden = int(text["hidden_size"])
    heads = int(text.get("num_attention_heads") or 1)
    head_dim = int(text.get("head_dim") or hidden // heads)
    kv = int(text.get("num_key_value_heads") or heads) * head_dim
    per_token = (dtype_bytes * (4 * hidden + 2 * heads * head_dim + 2 * kv + 3 * spec.intermediate)
                 + 8 * spec.experts + 8 * max(hidden, spec.intermediate))
    return seq_len * per_token


def cache_bytes(text: dict, samples: int, seq_len: int, dtype_bytes: int) -> int:
    """The calibration hidden states of every sample (one layer's outputs replace its inputs sample by sample)."""
    return samples * seq_len * dtype_bytes * int(text["hidden_size"])


def kwargs_bytes(text: dict, samples: int, seq_len: int) -> int:
    """What the model hands every layer besides the hidden states, kept on the device: each sample's rotary cos and
    sin in fp32."""
    hidden = int(text["hidden_size"])
    rotary = int(text.get("qk_rope_head_dim") or text.get("head_dim")
                 or hidden // int(text.get("num_attention_heads") or 1))
    return samples * seq_len * 2 * 4 * rotary


def packed_bytes(spec: LayerSpec, quant_type: str, group_size: int, dtype_bytes: int) -> int:
    """One layer's experts as written: packed integers and one scale per row and group of inputs (per row for
    group_size -1)."""
    bits = WEIGHT_BITS[quant_type]
    h, i = spec.hidden, spec.intermediate

    def groups(columns: int) -> int:
        return -(-columns // group_size) if group_size > 0 else 1

    per_expert = 3 * h * i * bits // 8 + dtype_bytes * (2 * i * groups(h) + h * groups(i))
    return spec.experts * per_expert


def layer_terms(opts: GpuOptions, text: dict, spec: LayerSpec | None, dense: int, fp8: bool, samples: int,
                seq: int, process: int) -> Terms:
    """The memory terms of the largest MoE layer for `samples` of `seq` tokens (dense: the largest layer outside
    its experts; fp8: the experts are stored as block-scaled FP8, which the host keeps as it is)."""
    from ktq.calibrated.solve import ROWS_PER_BATCH, chunk_solve_bytes, expert_solve_bytes
    from ktq.gpu.gptq import working_set_bytes  # llm-compressor's solver: imported when a plan is made

    width = DTYPE_BYTES[opts.torch_dtype]
    gptq, gpu, cpu = opts.calibrated, opts.output_dir is not None, opts.cpu_experts
    if spec is None:
        return Terms(dense, 0, 0, 0, 0, 0, 0, 0, samples, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, process)
    h, i, e, k = spec.hidden, spec.intermediate, spec.experts, int(text.get("num_experts_per_tok") or 1)
    blocks = 3 * -(-h // 128) * -(-i // 128)  # FP8 scales of one expert (128 x 128 blocks)
    return Terms(
        dense=dense, expert=3 * h * i * width, expert_host=3 * h * i + 4 * blocks if fp8 else 3 * h * i * 2,
        experts=e, hessians=4 * (h * h + e * i * i) if gptq and gpu else 0,
        activations=activation_bytes(text, seq, width, spec) if gptq else 0,
        # one batch: gate|up and their product in the model dtype; one sample's fp32 rows for its Hessians
        products=(SAMPLES_PER_PRODUCT * seq * 3 * i * width + seq * 4 * (h + i)) if gptq else 0,
        per_sample=seq * (2 * h * width + (INDEX_BYTES + WEIGHT_BYTES) * k) if gptq else 0, samples=samples,
        gptq=working_set_bytes(e, h, i, width) if gpu else 0,
        cpu_expert=expert_solve_bytes(h, i) if cpu else 0,
        cpu_fixed=chunk_solve_bytes(h, i) + (INDEX_BYTES + WEIGHT_BYTES) * samples * seq * k if cpu else 0,
        cache=cache_bytes(text, samples, seq, width) if gptq else 0,
        sample_hidden=cache_bytes(text, 1, seq, width) if gptq else 0,
        routed=cache_bytes(text, samples, seq, width) if gptq and cpu else 0,
        routing=samples * seq * k if gptq and cpu else 0,
        staging=ROWS_PER_BATCH * h * width if gptq and cpu else 0,
        kwargs=kwargs_bytes(text, samples, seq) if gptq else 0,
        packed=packed_bytes(spec, opts.quant_type, opts.group_size, width) if gpu else 0,
        codes=e * (3 * h * i + 4 * (2 * i + h * cpu.numa)) if cpu else 0, process=process)
