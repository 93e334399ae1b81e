#!/usr/bin/env python
"""Perplexity of every format ktq writes, on a MoE model with trained weights (issue 25): AMXINT4 / AMXINT8 CPU
experts rounded to nearest and calibrated, W4A16 / W8A16 GPU checkpoints by RTN and GPTQ, and the W4A16 checkpoint in
groups of 32 served as RAWINT4 CPU experts, each made from the BF16 checkpoint and from its FP8 copy.

    .venv/bin/python benchmarks/trained_quality.py --bf16 MODEL --fp8 MODEL-FP8 --calibration calibration.jsonl \
        --heldout heldout.jsonl --work /tmp/ktq-trained-quality --out benchmarks/results/trained-quality-DATE \
        [--eval-tokens 32768] [--seq 512] [--threads N] [--formats amxint4-rtn amxint4-cal ...]

The inputs are what benchmarks/trained_moe.py writes (a Qwen3-MoE trained here, its FP8 block-scaled copy, and text
it never saw: calibration.jsonl and heldout.jsonl, {"text": ...} per line); --fp8 may be left out.

1. Conversions, each a child process timed whole (start-up included): `ktq cpu` RTN and `--calibrate --force_cpu`
   (INT4, INT8, --threadpool-count 1 by default), `ktq gpu --force_cpu` RTN and GPTQ (W4A16, W8A16, groups of 32,
   ktq's default and the group kt-kernel's RAWINT4 reads). Every calibrated run gets the same file and sizes
   (--calibration-samples x --calibration-seq). The W4A16 checkpoint is measured twice: dequantised on the GPU side,
   and as RAWINT4 CPU experts.
2. The held-out text: its documents tokenised, each followed by the EOS token, concatenated, the first --eval-tokens
   tokens cut into rows of --seq. The reference is the BF16 model computed in fp32 (bf16 weights widen exactly).
3. Each format replaces the routed experts of every MoE layer; router, attention, norms and embeddings stay the BF16
   model's. AMXINT4 / AMXINT8 / RAWINT4 are computed as kt-kernel 0.7.2 computes them: its real MoE forward on the
   converted files (int8 activations included), in a child process that holds every MoE layer (kt-kernel imports
   only beside its own packages: tests/kt_kernel_forward.py), called by each MoE block with the router's top-k ids
   and weights as sglang-kt passes them, the hidden states handed over in bf16. GPU checkpoints are dequantised with
   compressed-tensors (codes x scales, in fp32) into the model. The FP8 copy itself is measured too: every FP8 weight
   decoded (`bf16(fp32(w) * scale_inv[block])`), and its experts alone (the baseline of the formats made from it).
4. Measured with cpu_quality.py's Evaluator: perplexity and mean KL(BF16 || format) of the next-token distributions
   over the whole model; each MoE block's output error ||y_q - y||^2 / ||y||^2 on the BF16 model's own inputs to
   it (mean over layers in the table, per layer in the json); also top-1 agreement, tokens rerouted by earlier
   layers' errors, the experts' weight error. A unigram model of the calibration text (add-one) gives the perplexity
   of knowing token frequencies only.

Writes PREFIX.md (the table, the model, data and machine) and PREFIX.json (everything); prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import shutil
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Idle OpenMP workers sleep instead of spinning (as tests/conftest.py sets it): on a 2-core machine shared with other
# work, spinning workers made the evaluation 3-7x slower. Set before torch starts its OpenMP runtime; the conversions
# and kt-kernel's child inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
MARK = ".trained_quality"  # in --work: its out/ and logs/ are this script's to replace
sys.path.insert(0, str(HERE.parent / "tests"))

from cpu_quality import Evaluator, cpu_command, gpu_command, log, machine, read_experts, read_tensor, run  # noqa: E402
from trained_moe import read_jsonl, unigram_perplexity  # noqa: E402

from kt_kernel_check import _kt_env, kt_kernel_variant  # noqa: E402

GROUP = 32  # ktq gpu's default group size, and the only one kt-kernel's RAWINT4 computes right (serving-notes.md)


@dataclass(frozen=True)
class Format:
    key: str  # its name for --formats
    label: str
    bits: int
    conversion: str  # the output it is read from (CONVERSIONS)
    kt_method: str | None  # computed by kt-kernel with this --kt-method; None: dequantised into the model
    rtn: str | None = None  # for a calibrated / GPTQ format: the RTN format whose gap it is compared with


FORMATS = [
    Format("amxint4-rtn", "AMXINT4 RTN", 4, "cpu-int4-rtn", "AMXINT4"),
    Format("amxint4-cal", "AMXINT4 calibrated", 4, "cpu-int4-cal", "AMXINT4", "amxint4-rtn"),
    Format("amxint8-rtn", "AMXINT8 RTN", 8, "cpu-int8-rtn", "AMXINT8"),
    Format("amxint8-cal", "AMXINT8 calibrated", 8, "cpu-int8-cal", "AMXINT8", "amxint8-rtn"),
    Format("w4a16-rtn", "W4A16 RTN (GPU)", 4, "gpu-w4a16-rtn", None),
    Format("w4a16-gptq", "W4A16 GPTQ (GPU)", 4, "gpu-w4a16-gptq", None, "w4a16-rtn"),
    Format("w8a16-rtn", "W8A16 RTN (GPU)", 8, "gpu-w8a16-rtn", None),
    Format("w8a16-gptq", "W8A16 GPTQ (GPU)", 8, "gpu-w8a16-gptq", None, "w8a16-rtn"),
    Format("rawint4-rtn", "RAWINT4 RTN (W4A16 g32 on the CPU)", 4, "gpu-w4a16-rtn", "RAWINT4"),
    Format("rawint4-gptq", "RAWINT4 GPTQ (W4A16 g32 on the CPU)", 4, "gpu-w4a16-gptq", "RAWINT4", "rawint4-rtn"),
]
BY_KEY = {f.key: f for f in FORMATS}
# conversion -> (command, its quantisation, calibrated)
CONVERSIONS = {"cpu-int4-rtn": ("cpu", "int4", False), "cpu-int4-cal": ("cpu", "int4", True),
               "cpu-int8-rtn": ("cpu", "int8", False), "cpu-int8-cal": ("cpu", "int8", True),
               "gpu-w4a16-rtn": ("gpu", "W4A16", False), "gpu-w4a16-gptq": ("gpu", "W4A16", True),
               "gpu-w8a16-rtn": ("gpu", "W8A16", False), "gpu-w8a16-gptq": ("gpu", "W8A16", True)}


def conversion_command(name: str, src: Path, out: Path, args: argparse.Namespace) -> list[str]:
    tool, quant, calibrated = CONVERSIONS[name]
    data = args.calibration if calibrated else None
    if tool == "cpu":
        return cpu_command(src, out, quant, args, data, args.calibration_samples, args.calibration_seq)
    return gpu_command(src, out, data, args.calibration_samples, args.calibration_seq, quant_type=quant,
                       group_size=GROUP)


# ---- the text ------------------------------------------------------------------------------------------------

def token_stream(tokenizer, texts: list[str]) -> list[int]:
    """The documents' tokens, each document followed by the EOS token (the separator of packed training text)."""
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    return [t for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] for t in ids + eos]


def packed_rows(tokenizer, texts: list[str], tokens: int, seq: int) -> torch.Tensor:
    """The first `tokens` tokens of the documents (rounded down to whole rows), as rows of seq [rows, seq]."""
    stream = token_stream(tokenizer, texts)
    rows = min(tokens, len(stream)) // seq
    if rows < 2:
        raise SystemExit(f"the held-out text has {len(stream)} tokens: not 2 rows of --seq {seq}")
    if len(stream) < tokens:
        log(f"the held-out text has {len(stream)} tokens, fewer than --eval-tokens {tokens}: measuring {rows * seq}")
    return torch.tensor(stream[:rows * seq]).view(rows, seq)


# ---- reading the formats -------------------------------------------------------------------------------------

def fused_experts(layers: list[int], experts: int, weight) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (gate_up [E, 2I, H], down [E, H, I])}, the transformers model's layout, of weight(module name)."""
    out = {}
    for i in layers:
        prefix = f"model.layers.{i}.mlp.experts"
        gate_up = [torch.cat([weight(f"{prefix}.{e}.gate_proj"), weight(f"{prefix}.{e}.up_proj")])
                   for e in range(experts)]
        out[i] = (torch.stack(gate_up), torch.stack([weight(f"{prefix}.{e}.down_proj") for e in range(experts)]))
    return out


def compressed_weight(folder: Path):
    """weight(module) of a compressed-tensors pack-quantized checkpoint, dequantised by compressed-tensors (codes
    times the scales widened to fp32: the value the file stands for, exactly)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    groups = json.loads((folder / "config.json").read_text())["quantization_config"]["config_groups"].values()
    # the experts' scheme (an FP8 source's attention keeps a float-quantized group of its own)
    args = QuantizationArgs(**next(g for g in groups if g["format"] == "pack-quantized")["weights"])

    def weight(module: str) -> torch.Tensor:
        shape = torch.Size(read_tensor(folder, f"{module}.weight_shape").tolist())
        codes = unpack_from_int32(read_tensor(folder, f"{module}.weight_packed"), args.num_bits, shape)
        return dequantize(codes.float(), read_tensor(folder, f"{module}.weight_scale").float(), args=args,
                          dtype=torch.float32)

    return weight


def fp8_weight(folder: Path):
    """weight(module) of a block-scaled FP8 checkpoint: bf16(fp32(w) * scale_inv[r // bn, c // bk]), as ktq and
    DeepSeek's own dequantisation decode it."""
    bn, bk = json.loads((folder / "config.json").read_text())["quantization_config"]["weight_block_size"]

    def weight(module: str) -> torch.Tensor:
        w = read_tensor(folder, f"{module}.weight").float()
        scale = read_tensor(folder, f"{module}.weight_scale_inv").float()
        scale = scale.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:w.shape[0], :w.shape[1]]
        return (w * scale).to(torch.bfloat16).float()

    return weight


def fp8_modules(folder: Path) -> list[str]:
    """The modules whose weight the FP8 checkpoint stores in FP8 (those with a weight_scale_inv)."""
    from safetensors import safe_open

    names = []
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            names += [n.removesuffix(".weight_scale_inv") for n in f.keys() if n.endswith(".weight_scale_inv")]
    return sorted(names)


@contextlib.contextmanager
def fp8_dense_weights(model: torch.nn.Module, folder: Path):
    """The FP8 copy's decoded weights in place of the BF16 model's, for every FP8 module outside the routed experts
    (attention, dense MLPs); restored afterwards."""
    weight = fp8_weight(folder)
    params = dict(model.named_parameters())
    saved = {}
    try:
        for module in fp8_modules(folder):
            if ".mlp.experts." not in module:
                saved[module] = params[f"{module}.weight"].detach().clone()
                params[f"{module}.weight"].data.copy_(weight(module))
        yield len(saved)
    finally:
        for module, value in saved.items():
            params[f"{module}.weight"].data.copy_(value)


def check_fp8_copy(bf16: Path, fp8: Path) -> None:
    """The FP8 copy is this BF16 model's: every tensor it did not quantise (router, norms, embeddings) is equal."""
    from safetensors import safe_open

    quantised = set(fp8_modules(fp8))
    for shard in sorted(fp8.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():
                if name.removesuffix(".weight") in quantised or name.endswith(".weight_scale_inv"):
                    continue
                if not torch.equal(f.get_tensor(name), read_tensor(bf16, name)):
                    raise SystemExit(f"{fp8} is not an FP8 copy of {bf16}: {name} differs")


# ---- kt-kernel -----------------------------------------------------------------------------------------------

HEADER = struct.Struct("<3i")  # layer, tokens, top-k of one request to the kt-kernel child


class KtKernelExperts:
    """kt-kernel's MoE forward of every MoE layer of one converted output, in a child process (this file, run with
    `kt-worker` and PYTHONPATH=build/kt-kernel) that loads them once, as a server does. Requests go over its stdin:
    (layer, tokens, k), x bf16 [T, H], ids int64 [T, K], weights fp32 [T, K]; the answer, bf16 [T, H], over its
    stdout."""

    def __init__(self, folder: Path, method: str, layers: list[int], experts: int, hidden: int, inter: int,
                 top_k: int, numa: int, threads: int, chunk: int, log_path: Path):
        self.hidden, self.chunk = hidden, chunk
        self.tokens = 0  # token x layer forwards served: the proof that kt-kernel computed the experts
        cmd = [sys.executable, __file__, "kt-worker", json.dumps(
            {"weights": str(folder), "method": method, "layers": layers, "experts": experts, "hidden": hidden,
             "intermediate": inter, "top_k": top_k, "numa": numa, "threads": threads, "chunk": chunk})]
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     env=_kt_env())
        if self.proc.stdout.read(5) != b"ready":
            self.close()
            raise SystemExit(f"kt-kernel did not load {folder} ({method}): see {log_path}")

    def forward(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The layer's MoE output for x [T, H] (any float dtype, handed over in bf16), in chunks of at most
        `chunk` tokens (kt-kernel's buffers hold that many), in x's dtype."""
        outs = []
        x, weights = x.detach(), weights.detach()
        for xs, ks, ws in zip(x.split(self.chunk), ids.split(self.chunk), weights.split(self.chunk)):
            tokens, k = ks.shape
            self.proc.stdin.write(HEADER.pack(layer, tokens, k)
                                  + xs.to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()
                                  + ks.to(torch.int64).contiguous().numpy().tobytes()
                                  + ws.to(torch.float32).contiguous().numpy().tobytes())
            self.proc.stdin.flush()
            answer = self.proc.stdout.read(tokens * self.hidden * 2)
            if len(answer) != tokens * self.hidden * 2:
                raise SystemExit(f"kt-kernel's child stopped (exit {self.proc.poll()}): see {self.log.name}")
            outs.append(torch.frombuffer(bytearray(answer), dtype=torch.bfloat16).view(tokens, self.hidden))
        self.tokens += x.shape[0]
        return torch.cat(outs).to(x.dtype)

    @contextlib.contextmanager
    def installed(self, moe: dict[int, torch.nn.Module]):
        """Every MoE block's experts computed by kt-kernel (the router still the model's) while inside."""
        for i, mlp in moe.items():
            mlp.experts.forward = lambda x, ids, weights, i=i: self.forward(i, x, ids, weights)
        try:
            yield
        finally:
            for mlp in moe.values():
                del mlp.experts.forward  # the instance attribute: the class's forward again

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()
        self.log.close()


def kt_worker(spec: dict) -> None:
    """The child of KtKernelExperts: one KTMoEWrapper per MoE layer, then answer requests until stdin closes."""
    import kt_kernel_forward  # sets KT_FORCE_SYNC_SUBMIT: kt-kernel's host-thread path, which needs no GPU

    kt_kernel_forward._without_pinned_memory()
    from kt_kernel import KTMoEWrapper

    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever kt-kernel prints goes to the log; stdout carries only answers
    wrappers = {}
    for layer in spec["layers"]:
        wrappers[layer] = KTMoEWrapper(
            layer_idx=layer, num_experts=spec["experts"], num_experts_per_tok=spec["top_k"],
            hidden_size=spec["hidden"], moe_intermediate_size=spec["intermediate"], gpu_experts_mask=None,
            cpuinfer_threads=max(spec["threads"], spec["numa"]), threadpool_count=spec["numa"],
            weight_path=spec["weights"], chunked_prefill_size=-(-spec["chunk"] // 32) * 32, method=spec["method"])
        wrappers[layer].load_weights(torch.arange(spec["experts"], dtype=torch.int64))
    answers.write(b"ready")
    answers.flush()
    requests = sys.stdin.buffer

    def read(dtype: torch.dtype, rows: int, columns: int) -> torch.Tensor:
        size = rows * columns * dtype.itemsize
        return torch.frombuffer(bytearray(requests.read(size)), dtype=dtype).view(rows, columns)

    while header := requests.read(HEADER.size):
        layer, tokens, k = HEADER.unpack(header)
        x, ids, weights = read(torch.bfloat16, tokens, spec["hidden"]), read(torch.int64, tokens, k), \
            read(torch.float32, tokens, k)
        y = wrappers[layer].forward(x, ids, weights, 0)  # stream 0: unused on the host-thread path
        answers.write(y.contiguous().view(torch.int16).numpy().tobytes())
        answers.flush()


# ---- measuring -----------------------------------------------------------------------------------------------

def measure_format(fmt: Format, folder: Path, evaluator: Evaluator, args: argparse.Namespace, log_path: Path) -> dict:
    """One format's figures: its experts put into the model (the weight error counts them), and for a kt-kernel
    format kt-kernel computing every MoE block's experts from the files."""
    config = evaluator.model.config
    layers, experts = sorted(evaluator.moe), config.num_experts
    hidden, inter = config.hidden_size, config.moe_intermediate_size
    bad_codes = None
    if fmt.conversion.startswith("cpu-"):
        weights, bad_codes = read_experts(folder, fmt.bits, hidden, inter, experts)
    else:
        weights = fused_experts(layers, experts, compressed_weight(folder))
    if fmt.kt_method is None:
        return {**evaluator.measure(weights), "computed_by": "dequantised into the model (fp32)"}
    kt = KtKernelExperts(folder, fmt.kt_method, layers, experts, hidden, inter, config.num_experts_per_tok,
                         args.threadpool_count, args.threads, args.chunk, log_path)
    try:
        with kt.installed(evaluator.moe):
            figures = evaluator.measure(weights)
    finally:
        kt.close()
    return {**figures, "computed_by": f"kt-kernel {fmt.kt_method}", "kt_kernel_tokens": kt.tokens,
            "bad_codes": bad_codes}


def summarise(rows: list[dict]) -> None:
    """Perplexity; its gap to BF16's, with twice the standard error of the held-out rows' paired NLL differences
    (the rows are the independent units); the share of the RTN format's gap a calibrated one recovers, and each gap
    over AMXINT4 RTN's, both within one source."""
    by = {(r["source"], r["key"]): r for r in rows}
    bf16 = by["BF16", "bf16"]
    for r in rows:
        r["ppl"] = math.exp(r["nll"])
        r["ppl_gap"] = r["ppl"] - bf16["ppl"]
        r["ppl_gap_share"] = r["ppl_gap"] / bf16["ppl"]
        diffs = [a - b for a, b in zip(r["nll_rows"], bf16["nll_rows"])]
        r["nll_gap"] = statistics.fmean(diffs)
        r["nll_gap_2se"] = 2 * statistics.stdev(diffs) / len(diffs) ** 0.5
        r["moe_err_mean"] = statistics.fmean(r["layer_output_rel_err"].values()) if r["layer_output_rel_err"] else 0.0
    for r in rows:
        fmt = BY_KEY.get(r["key"])
        rtn = by.get((r["source"], fmt.rtn)) if fmt and fmt.rtn else None
        r["rtn_gap_recovered"] = 1 - r["ppl_gap"] / rtn["ppl_gap"] if rtn and rtn["ppl_gap"] else None
        r["rtn_gap_recovered_2se"] = share_2se(r, rtn, bf16) if rtn and rtn is not r else None
        # a share of a gap means something only where that gap stands out of the noise: the table says when not
        r["rtn_gap_significant"] = significant(rtn) if rtn else None
        r["kl_over_rtn"] = r["kl_mean"] / rtn["kl_mean"] if rtn and rtn["kl_mean"] else None
        amx = by.get((r["source"], "amxint4-rtn"))
        r["gap_over_amxint4_rtn"] = r["ppl_gap"] / amx["ppl_gap"] if fmt and amx and r is not amx else None
        r["amxint4_rtn_gap_significant"] = significant(amx) if amx else None


def share_2se(row: dict, rtn: dict, bf16: dict) -> float:
    """Twice the standard error of the share recovered, 1 - a / b with a and b the mean NLL gaps to BF16 of a
    format and of its RTN format over the held-out rows: the delta method, with their covariance (both are measured
    on the same rows, so much of their noise is shared)."""
    a = [x - z for x, z in zip(row["nll_rows"], bf16["nll_rows"])]
    b = [y - z for y, z in zip(rtn["nll_rows"], bf16["nll_rows"])]
    n, ma, mb = len(a), statistics.fmean(a), statistics.fmean(b)
    if mb == 0:
        return math.inf
    var = (statistics.variance(a) / mb ** 2 + ma ** 2 * statistics.variance(b) / mb ** 4
           - 2 * ma * statistics.covariance(a, b) / mb ** 3) / n
    return 2 * math.sqrt(max(var, 0.0))


def significant(row: dict) -> bool:
    """Whether a format's perplexity gap to BF16 is more than twice its standard error."""
    return row["nll_gap"] > row["nll_gap_2se"]


# ---- report --------------------------------------------------------------------------------------------------

def report(results: dict) -> str:
    a, m, d = results["args"], results["model"], results["data"]
    mc = results["machine"]
    lines = [f"# Perplexity of ktq's formats on a trained MoE ({results['date']})", "",
             f"Command: `{results['command']}` ({results['total_seconds']:.0f} s in all: conversions "
             f"{results['convert_seconds']:.0f} s, evaluation {results['eval_seconds']:.0f} s)", "",
             f"Machine: {mc['cpu']}, {mc['cores']} cores, kernel {mc['kernel']}; torch {mc['torch']}, transformers "
             f"{mc['transformers']}; kt-kernel 0.7.2 ({mc['kt_kernel_variant']} build), {a['threads']} threads, "
             f"threadpool count {a['threadpool_count']}; OMP_WAIT_POLICY={mc['omp_wait_policy']}; ktq at "
             f"{mc['commit']}", "",
             f"Model: {a['bf16']} ({m['model_type']}, {m['layers']} layers, {len(m['moe_layers'])} MoE, "
             f"{m['experts']} experts, top-{m['top_k']}, hidden {m['hidden']}, moe_intermediate {m['inter']}, "
             f"vocab {m['vocab']})" + (f"; FP8 copy {a['fp8']}" if a["fp8"] else ""), "",
             f"Held-out: the first {d['eval_tokens']} tokens of {a['heldout']} ({d['eval_rows']} rows of {a['seq']}; "
             f"documents joined by EOS); calibration: {a['calibration']} ({d['calibration_docs']} documents, "
             f"{d['calibration_tokens']} tokens, median {d['calibration_doc_tokens_median']} per document), "
             f"{a['calibration_samples']} documents of at most {a['calibration_seq']} tokens (~"
             f"{d['calibration_tokens_per_run']} tokens) for every calibrated conversion", "",
             "| format | source | bits | ppl | gap to BF16 (+- 2 s.e.) | share of RTN gap recovered | gap / AMXINT4 "
             "RTN's | mean KL (nats) | KL / RTN's | mean MoE-output error | top-1 | conversion s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def cell(value, fmt: str, meaningful: bool | None = True) -> str:
        """value, or "n/s" where the gap it divides by is within the noise."""
        return "" if value is None else fmt.format(value) if meaningful in (None, True) else "n/s"

    def share(r: dict) -> str:
        text = cell(r["rtn_gap_recovered"], "{:.0%}", r["rtn_gap_significant"])
        spread = r.get("rtn_gap_recovered_2se")  # absent from results measured before it was added
        return text + (f" +- {spread:.0%}" if spread is not None and text not in ("", "n/s") else "")

    for r in results["rows"]:
        gap = "" if r["key"] == "bf16" else \
            f"{r['ppl_gap']:+.4f} ({r['ppl_gap_share']:+.2%}, nll " \
            f"{r['nll_gap']:+.5f} +- {r['nll_gap_2se']:.5f})"
        lines.append(f"| {r['label']} | {r['source']} | {r['bits']} | {r['ppl']:.4f} | {gap} | "
                     f"{share(r)} | "
                     f"{cell(r['gap_over_amxint4_rtn'], '{:.2f}x', r['amxint4_rtn_gap_significant'])} | "
                     f"{r['kl_mean']:.3e} | {cell(r['kl_over_rtn'], '{:.3f}x')} | {r['moe_err_mean']:.3e} | "
                     f"{r['top1']:.2%} | "
                     f"{cell(r.get('seconds'), '{:.1f}')} |")
    lines += ["", f"Unigram perplexity (calibration text's token frequencies, add-one): {results['unigram_ppl']:.1f}",
              "", "Rows: CPU formats (AMXINT4, AMXINT8, RAWINT4) are kt-kernel's own forward on the files; GPU "
              "formats are dequantised into the fp32 model; every format replaces the routed experts only, and is "
              "compared with the BF16 model, also when made from the FP8 copy (whose own rows show what its FP8 "
              "experts, and its FP8 attention on top, cost). Gap: perplexity minus BF16's (its per-token NLL "
              "difference, +- twice the standard error over the held-out rows). Share recovered: 1 - gap / the "
              "RTN format's gap (same source), +- twice its standard error (paired rows, delta method); "
              "n/s: the gap it divides by is within 2 s.e. of zero, so the share is "
              "noise. KL / RTN's: the same comparison on the KL to BF16. Conversion seconds: the whole command, "
              "start-up included; a RAWINT4 row reads the W4A16 checkpoint of the row above it. Raw figures, "
              "per-layer errors included: the .json beside this file.", ""]
    return "\n".join(lines)


# ---- main ----------------------------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--bf16", type=Path, required=True, help="the BF16 checkpoint (the reference)")
    p.add_argument("--fp8", type=Path, help="its FP8 block-scaled copy (left out: BF16 source only)")
    p.add_argument("--calibration", type=Path, required=True, help="jsonl, a `text` per line")
    p.add_argument("--heldout", type=Path, required=True, help="jsonl, a `text` per line, never seen in training")
    p.add_argument("--work", type=Path, required=True,
                   help="conversions and logs (its out/ and logs/ are replaced when this script made them)")
    p.add_argument("--out", type=Path, required=True, help="PREFIX: writes PREFIX.md and PREFIX.json")
    p.add_argument("--formats", nargs="+", choices=list(BY_KEY), default=list(BY_KEY))
    p.add_argument("--eval-tokens", type=int, default=32768, help="held-out tokens (rounded down to whole rows)")
    p.add_argument("--seq", type=int, default=512, help="tokens per held-out row")
    p.add_argument("--batch", type=int, default=8, help="held-out rows per forward pass")
    p.add_argument("--calibration-samples", type=int, default=512,
                   help="documents per calibrated conversion (ktq's default; trained_moe.py's are paragraphs of ~55 "
                        "tokens: ~28k tokens in all)")
    p.add_argument("--calibration-seq", type=int, default=512, help="tokens per calibration document at most")
    p.add_argument("--threadpool-count", type=int, default=1, help="NUMA parts of the CPU experts (and kt-kernel's)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="kt-kernel's threads")
    p.add_argument("--chunk", type=int, default=4096, help="tokens per kt-kernel forward at most")
    return p.parse_args()


def convert(args: argparse.Namespace, sources: dict[str, Path], formats: list[Format]) -> dict:
    """Every conversion the formats read, from each source, each a timed child process."""
    # out/ and logs/ are replaced only where an earlier run of this script made them: nothing else is deleted
    mark = args.work / MARK
    if not mark.exists() and any((args.work / name).exists() for name in ("out", "logs")):
        raise SystemExit(f"{args.work} holds out/ or logs/ that this script did not make: give another --work")
    for name in ("out", "logs"):
        shutil.rmtree(args.work / name, ignore_errors=True)
        (args.work / name).mkdir(parents=True)
    mark.touch()
    times = {}
    for source, src in sources.items():
        for name in dict.fromkeys(f.conversion for f in formats):
            out = args.work / "out" / source / name
            cmd = conversion_command(name, src, out, args)
            times[source, name] = {"command": shlex.join(cmd),
                                   **run(cmd, out, args.work / "logs" / f"{source}-{name}.log")}
            log(f"{source} {name}: {times[source, name]['seconds']:.1f} s")
    return times


def evaluate(args: argparse.Namespace, sources: dict[str, Path], formats: list[Format], times: dict,
             evaluator: Evaluator) -> list[dict]:
    """The table's rows: BF16, then for each source (the FP8 copy itself first) every format made from it."""
    reference = evaluator.nll_rows(evaluator.reference)
    rows = [{"key": "bf16", "label": "BF16", "source": "BF16", "bits": 16, "nll": reference.mean().item(),
             "nll_rows": reference.tolist(), "kl_mean": 0.0, "top1": 1.0, "layer_output_rel_err": {}}]
    for source, src in sources.items():
        if source == "FP8":
            log("FP8 copy: its experts alone, then every FP8 weight")
            experts = fused_experts(sorted(evaluator.moe), evaluator.model.config.num_experts, fp8_weight(src))
            rows.append({"key": "fp8-experts", "label": "FP8 copy, experts only", "source": "FP8", "bits": 8,
                         **evaluator.measure(experts)})
            with fp8_dense_weights(evaluator.model, src) as dense:
                rows.append({"key": "fp8", "label": f"FP8 copy itself (+ {dense} attention matrices in FP8)",
                             "source": "FP8", "bits": 8, **evaluator.measure(experts)})
        for fmt in formats:
            log(f"{source} {fmt.label}")
            started = time.perf_counter()
            figures = measure_format(fmt, args.work / "out" / source / fmt.conversion, evaluator, args,
                                     args.work / "logs" / f"{source}-{fmt.key}-kt-kernel.log")
            rows.append({"key": fmt.key, "label": fmt.label, "source": source, "bits": fmt.bits,
                         "seconds": times[source, fmt.conversion]["seconds"], **figures,
                         "eval_seconds": time.perf_counter() - started})
    summarise(rows)
    return rows


def main() -> None:
    if sys.argv[1:2] == ["kt-worker"]:
        return kt_worker(json.loads(sys.argv[2]))
    args = parse_args()
    started = time.perf_counter()
    formats = [f for f in FORMATS if f.key in args.formats]
    if kt_kernel_variant() is None and any(f.kt_method for f in formats):
        raise SystemExit("kt-kernel 0.7.2 is not in build/kt-kernel (make kt-kernel): it computes the CPU formats")
    sources = {"BF16": args.bf16, **({"FP8": args.fp8} if args.fp8 else {})}
    if args.fp8:
        check_fp8_copy(args.bf16, args.fp8)
    times = convert(args, sources, formats)
    convert_seconds = time.perf_counter() - started

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the held-out documents are tokenised whole, longer than the model's context
    tokenizer = AutoTokenizer.from_pretrained(args.bf16)
    heldout = packed_rows(tokenizer, read_jsonl(args.heldout), args.eval_tokens, args.seq)
    calibration = read_jsonl(args.calibration)
    log(f"reference: the BF16 model on {heldout.numel()} held-out tokens")
    evaluator = Evaluator(args.bf16, heldout, args.batch)
    rows = evaluate(args, sources, formats, times, evaluator)

    config = evaluator.model.config
    lengths = [len(ids) for ids in tokenizer(calibration, add_special_tokens=False)["input_ids"]]
    # ktq draws the samples at random: on average each brings this many tokens (truncated at --calibration-seq)
    per_sample = statistics.fmean(min(n, args.calibration_seq) for n in lengths)
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "command": shlex.join([sys.executable, *sys.argv]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {**machine(), "kt_kernel_variant": kt_kernel_variant(),
                    "omp_wait_policy": os.environ["OMP_WAIT_POLICY"]},
        "model": {"model_type": config.model_type, "layers": config.num_hidden_layers,
                  "moe_layers": sorted(evaluator.moe), "experts": config.num_experts,
                  "top_k": config.num_experts_per_tok, "hidden": config.hidden_size,
                  "inter": config.moe_intermediate_size, "vocab": config.vocab_size},
        "data": {"eval_tokens": heldout.numel(), "eval_rows": heldout.shape[0], "calibration_docs": len(calibration),
                 "calibration_tokens": sum(lengths), "calibration_doc_tokens_median": statistics.median(lengths),
                 "calibration_tokens_per_run": round(min(args.calibration_samples, len(lengths)) * per_sample)},
        "unigram_ppl": unigram_perplexity(np.asarray(token_stream(tokenizer, calibration)),
                                          heldout[:, 1:].numpy().ravel(), config.vocab_size),
        "conversions": {f"{s} {n}": t for (s, n), t in times.items()},
        "rows": rows, "convert_seconds": convert_seconds,
        "eval_seconds": time.perf_counter() - started - convert_seconds,
        "total_seconds": time.perf_counter() - started}
    table = report(results)
    md, raw = Path(f"{args.out}.md"), Path(f"{args.out}.json")
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(table)
    raw.write_text(json.dumps(results, indent=2) + "\n")
    print(table)
    log(f"wrote {md} and {raw}")


if __name__ == "__main__":
    main()
