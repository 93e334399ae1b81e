#!/usr/bin/env python
"""Quality of calibrated CPU experts (`ktq cpu --calibrate`) against round-to-nearest ones, read from the files
they write, with the time of each conversion next to the GPU pass (`ktq gpu` GPTQ, here on the CPU).

    .venv/bin/python benchmarks/cpu_quality.py [--out benchmarks/results/cpu-quality-DATE.md] [--work DIR]
        [--arch qwen3_moe|deepseek_v3] [--layers 4] [--experts 32] [--top-k 4] [--hidden 512]
        [--moe-intermediate 256] [--text venv|synthetic] [--calibration-samples 64] [--eval-samples 32]
        [--seq 256] [--threadpool-count 2] [--repeat 1]
        [--variants [NAME ...]] [--variant NAME KEY=VALUE ...] [--variant-methods int4 ...]
        [--variant-sizes 8x64 ...]

Everything is built here and measured in the same run; nothing is downloaded:

- the model: `ktq sample` (random bf16 weights, the real key layout, a local tokenizer), then made to look like an
  LLM where it matters for quantisation: each layer's post_attention_layernorm weight gets heavy-tailed per-channel
  gains (lognormal, plus a few outlier channels x10-50), so the experts' inputs have outlier channels as real LLMs'
  do; routers stay random (routing is not uniform: the load per expert is reported); the final norm is scaled so
  that the logits have a realistic spread (near-uniform predictions would make KL and top-1 meaningless);
- the text: paragraphs of the licence / README / METADATA files shipped in this venv's site-packages (real English,
  deduplicated, shuffled with the seed), or with --text synthetic a Zipfian bigram text over a fixed word list; a
  calibration set and a held-out set that share no paragraph, as jsonl with a `text` column;
- the conversions, each timed whole as a child process (start-up included): `ktq cpu` RTN and `ktq cpu --calibrate`
  for INT4 and INT8 with the same --threadpool-count, and `ktq gpu --quant_method GPTQ --quant_type W4A16
  --force_cpu` on the same calibration set (`ktq cpu --calibrate` gets --force_cpu too, so that both calibrate
  on the same device).

Measured from the output files alone (merged shards, `blk.L.ffn_{gate,up,down}_exps.E.numa.P.{weight,scale}`,
dequantised by ktq.kernels.amx.unpack_dequantize and put back into the transformers model), on the held-out text:

- per MoE layer, ||y_q - y||^2 / ||y||^2 of the MoE block output, both fed the reference model's own inputs to that
  block (captured with a hook), so each layer's error is its own, not what earlier layers passed on;
- the whole model with every expert replaced: KL(reference || quantised) of the next-token distribution (mean over
  tokens) and top-1 agreement;
- the experts' weight error and the codes kt-kernel would serve wrongly (INT4 -8, INT8 -128; kt-format.md sect. 2).

Ablation (--variants): the calibrated command again with some of ktq's design constants overridden in the child
process (VARIANTS: ROUTING_WEIGHTED, DOWN_AFTER_ROUNDED_GATE_UP, GENERIC_WEIGHT, DAMPENING of ktq.calibrated.solve,
CLIP_RATIOS of ktq.calibrated.ktgrid), each into its own output and measured as the others, for --variant-methods and at
each of --variant-sizes (samples x tokens; the first rows ktq picks from the same calibration file, so every size
is measured on the same held-out text against the same RTN output).

The reference is the bf16 checkpoint computed in fp32 (bf16 values widen exactly), and so are the quantised
models: the dequantised values are exact in fp32, while bf16 compute would round them again and add an error of
the order of INT8's own. kt-kernel also quantises activations to int8 at serve time; that is not modelled here.

Writes the markdown table to --out and the raw figures beside it (.json); prints the table last.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import platform
import random
import re
import shlex
import shutil
import statistics
import struct
import subprocess
import sys
import sysconfig
import time
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from safetensors import safe_open

from ktq.calibrated import ktgrid, solve
from ktq.kernels.amx import unpack_dequantize
from ktq.sample import write_sample

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KTQ = [sys.executable, "-m", "ktq"]
METHODS = {"int4": 4, "int8": 8}
GOALS = {"int4": 0.5, "int8": 0.9}  # calibrated / RTN of each layer's output error
TIME_GOAL = 1.5  # calibrated `ktq cpu` / the GPU pass
EXPERT_KEY = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.(\d+)\.numa\.(\d+)\.(weight|scale)$")

# Calibrated variants for --variants: ktq's design constants overridden in the child (ktq.calibrated.solve's, and
# CLIP_RATIOS of ktq.calibrated.ktgrid). `plain` is plain GPTQ with act-order and per-row scales on the routed
# tokens; the `no-*` ones take one of the choices above it away at a time.
PLAIN = {"ROUTING_WEIGHTED": False, "DOWN_AFTER_ROUNDED_GATE_UP": False, "GENERIC_WEIGHT": 0.0, "CLIP_RATIOS": (1.0,)}
VARIANTS: dict[str, dict] = {
    "default": {},
    "plain": PLAIN,
    "no-clip": {"CLIP_RATIOS": (1.0,)},
    "no-weighting": {"ROUTING_WEIGHTED": False},
    "no-sequential": {"DOWN_AFTER_ROUNDED_GATE_UP": False},
    "no-blend": {"GENERIC_WEIGHT": 0.0},
    "damp-0.1": {"DAMPENING": 0.1},
    "blend-0.2": {"GENERIC_WEIGHT": 0.2},
    # not in the standard set: more regularisation for small calibration sets
    "blend-0.5": {"GENERIC_WEIGHT": 0.5},
    "blend-1.0": {"GENERIC_WEIGHT": 1.0},
    "damp-0.1-no-clip": {"DAMPENING": 0.1, "CLIP_RATIOS": (1.0,)},
    "blend-0.2-no-clip": {"GENERIC_WEIGHT": 0.2, "CLIP_RATIOS": (1.0,)},
}
STANDARD_VARIANTS = ("plain", "no-clip", "no-weighting", "no-sequential", "no-blend", "damp-0.1", "blend-0.2")
CONSTANT_MODULES = {"c": solve, "g": ktgrid}  # the child's names for the modules that hold the constants


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- the model -----------------------------------------------------------------------------------------------

def overwrite_bf16(shard: Path, name: str, values: np.ndarray) -> None:
    """Rewrite one bf16 tensor's bytes in place (same dtype and size): the rest of the shard stays byte for byte
    what `ktq sample` wrote, so no safetensors writer of ours can change how ktq reads it."""
    bits = torch.from_numpy(values.astype(np.float32)).to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    with open(shard, "r+b") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        entry = json.loads(f.read(size))[name]
        begin, end = entry["data_offsets"]
        if entry["dtype"] != "BF16" or entry["shape"] != list(values.shape) or end - begin != len(bits):
            raise SystemExit(f"{shard.name}: {name} is {entry['dtype']} {entry['shape']}, not bf16 {values.shape}")
        f.seek(8 + size + begin)
        f.write(bits)


def channel_gains(args: argparse.Namespace, name: str) -> np.ndarray:
    """Heavy-tailed per-channel gains: lognormal(0, sigma) for every channel, a few outliers multiplied by 10-50,
    the pattern of real LLMs' norm weights that puts outlier channels into the experts' inputs."""
    rng = np.random.default_rng([args.seed, zlib.crc32(name.encode())])
    gains = rng.lognormal(0.0, args.gain_sigma, args.hidden)
    hot = rng.choice(args.hidden, args.outliers, replace=False)
    gains[hot] *= rng.uniform(args.outlier_gain[0], args.outlier_gain[1], args.outliers)
    return gains


def build_model(folder: Path, args: argparse.Namespace, small: bool = False) -> dict:
    """`ktq sample` of the geometry asked for (or a tiny one for warming up), then top-k, gains and logit scale."""
    tiny_inter = 128 * args.threadpool_count  # the smallest width INT4 takes with this NUMA count
    geometry = dict(layers=args.dense_layers + 1, experts=4, hidden=256, moe_intermediate=tiny_inter) if small else \
        dict(layers=args.layers, experts=args.experts, hidden=args.hidden, moe_intermediate=args.moe_intermediate)
    write_sample(folder, arch=args.arch, dense_layers=args.dense_layers, seed=args.seed, shards=2, **geometry)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["num_experts_per_tok"] = min(args.top_k, geometry["experts"])  # `ktq sample` always routes to 2
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    if small:
        return {}
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    gains = {}
    for name in sorted(weight_map):
        if name.endswith("post_attention_layernorm.weight"):  # every layer's, DeepSeek's MTP layer included
            gains[name] = channel_gains(args, name)
            overwrite_bf16(folder / weight_map[name], name, gains[name])
    norm_scale = 1.0
    if args.logit_std > 0:
        # The final norm's output has unit RMS per token, so the logits' spread is its gain * std(lm_head) *
        # sqrt(hidden): one constant gain gives them the std asked for (ktq sample's 0.02 std alone gives ~0.45).
        with safe_open(folder / weight_map["lm_head.weight"], framework="pt") as f:
            head_std = f.get_tensor("lm_head.weight").float().std().item()
        norm_scale = args.logit_std / (head_std * args.hidden ** 0.5)
        overwrite_bf16(folder / weight_map["model.norm.weight"], "model.norm.weight",
                       np.full(args.hidden, norm_scale, np.float32))
    every = np.concatenate(list(gains.values()))
    return {"gain_layers": len(gains), "gain_median": float(np.median(every)), "gain_max": float(every.max()),
            "final_norm_gain": norm_scale}


# ---- the text ------------------------------------------------------------------------------------------------

TEXT_FILES = re.compile(r"^(LICEN[CS]E|COPYING|NOTICE|AUTHORS|README|METADATA)([.-].*)?$", re.IGNORECASE)
TEXT_SUFFIXES = ("", ".txt", ".md", ".rst")


def venv_paragraphs(seed: int) -> tuple[Iterator[str], dict]:
    """The venv's shipped prose, split at blank lines, whitespace normalised, mostly-letter paragraphs of 8+ words
    kept once each (many packages ship the same licence), in a seeded order."""
    root = Path(sysconfig.get_paths()["purelib"])
    files = sorted(p for p in root.rglob("*") if TEXT_FILES.match(p.name) and p.suffix.lower() in TEXT_SUFFIXES
                   and p.is_file())
    unique: dict[str, None] = {}
    for path in files:
        for block in re.split(r"\n\s*\n", path.read_text(errors="replace")):
            paragraph = " ".join(block.split())
            letters = sum(c.isalpha() or c == " " for c in paragraph)
            if len(paragraph.split()) >= 8 and letters >= 0.8 * len(paragraph):
                unique.setdefault(paragraph, None)
    paragraphs = list(unique)
    random.Random(seed).shuffle(paragraphs)
    return iter(paragraphs), {"source": f"venv: {len(files)} licence/README/METADATA files under {root}",
                              "paragraphs_available": len(paragraphs)}


WORDS = """the of and to a in is that for it as was with be by on not he this are or his from at which but have an
they you were her she there been one all we their has would when if so no will more can who out some its into them
only two time could my than first may do any like other then now these our over such new most also made after did
many before must through back years where much your way well down should because each just those people how too
little state good very make world still own see men work long get here between both life being under never day same
another know while last might us great old year off come since against go came right used take three place small
found part again without country system number every water general point house end large put home read hand few
hard high thing light order name word form line""".split()


def synthetic_paragraphs(seed: int) -> tuple[Iterator[str], dict]:
    """English-like text without any file: Zipfian word frequencies (rank^-1.1), and a bigram structure (after each
    word, the next one's rank order is that word's own permutation of the list), 5-18 word sentences, 3-6 per
    paragraph. Endless; the same seed gives the same text."""
    rng = random.Random(seed)
    n = len(WORDS)
    cumulative = list(np.cumsum([1.0 / (rank + 1) ** 1.1 for rank in range(n)]))
    successors = [rng.sample(range(n), n) for _ in range(n)]

    def rank() -> int:
        return rng.choices(range(n), cum_weights=cumulative)[0]

    def paragraphs() -> Iterator[str]:
        seen: set[str] = set()
        while True:
            sentences = []
            for _ in range(rng.randint(3, 6)):
                word = rank()
                words = [WORDS[word]]
                for _ in range(rng.randint(4, 17)):
                    word = successors[word][rank()]
                    words.append(WORDS[word])
                sentences.append(" ".join(words).capitalize() + ".")
            paragraph = " ".join(sentences)
            if paragraph not in seen:
                seen.add(paragraph)
                yield paragraph

    return paragraphs(), {"source": f"synthetic: Zipfian bigram text over {n} words, seed {seed}"}


def text_rows(paragraphs: Iterator[str], tokenizer, rows: int, seq: int) -> list[list[str]]:
    """`rows` rows of whole paragraphs, each row at least `seq` tokens long, so that every sample fills the
    sequence length (ktq truncates at it); each paragraph goes into one row only. The paragraphs' own token counts
    decide first; a row whose joined text still comes out shorter (tokens merge across the joins) takes more."""
    out = []
    for _ in range(rows):
        row: list[str] = []
        tokens = 0
        while tokens < seq or len(tokenizer("\n\n".join(row))["input_ids"]) < seq:
            paragraph = next(paragraphs, None)
            if paragraph is None:
                raise SystemExit(f"not enough text for {rows} rows of {seq} tokens; lower the sample counts or "
                                 "--seq, or use --text synthetic")
            row.append(paragraph)
            tokens += len(tokenizer(paragraph, add_special_tokens=False)["input_ids"]) + 1
        out.append(row)
    return out


def build_text(folder: Path, model: Path, args: argparse.Namespace) -> tuple[Path, Path, list[str], dict]:
    """calibration.jsonl and heldout.jsonl (`text` column), disjoint: no paragraph is in both."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    paragraphs, info = (venv_paragraphs if args.text == "venv" else synthetic_paragraphs)(args.seed)
    calibration = text_rows(paragraphs, tokenizer, args.calibration_samples, args.seq)
    heldout = text_rows(paragraphs, tokenizer, args.eval_samples, args.seq)
    shared = {p for row in calibration for p in row} & {p for row in heldout for p in row}
    assert not shared, "calibration and held-out text share paragraphs"
    folder.mkdir(parents=True)
    paths = []
    for name, rows in (("calibration", calibration), ("heldout", heldout)):
        paths.append(folder / f"{name}.jsonl")
        with open(paths[-1], "w") as f:
            for row in rows:
                f.write(json.dumps({"text": "\n\n".join(row)}) + "\n")
    info.update(calibration_rows=len(calibration), heldout_rows=len(heldout), shared_paragraphs=0,
                calibration_chars=sum(len(p) for row in calibration for p in row),
                heldout_chars=sum(len(p) for row in heldout for p in row))
    return paths[0], paths[1], ["\n\n".join(row) for row in heldout], info


# ---- the commands --------------------------------------------------------------------------------------------

def cpu_command(src: Path, out: Path, method: str, args: argparse.Namespace, data: Path | None, samples: int,
                seq: int) -> list[str]:
    cmd = [*KTQ, "cpu", "-i", str(src), "-o", str(out), "--quant-method", method,
           "--threadpool-count", str(args.threadpool_count)]
    if data is not None:
        cmd += ["--calibrate", str(data), "--num_calibration_samples", str(samples), "--max_sequence_length",
                str(seq), "--text_column", "text"]
        cmd.append("--force_cpu")  # on the CPU as the GPU pass is, also on a machine with a GPU
    return cmd


def gpu_command(src: Path, out: Path, data: Path | None, samples: int, seq: int, quant_type: str = "W4A16",
                group_size: int | None = None) -> list[str]:
    """`ktq gpu` on the CPU: GPTQ on data, or RTN (no data) when data is None; ktq's group size unless given."""
    cmd = [*KTQ, "gpu", "--model_id", str(src), "--output_dir", str(out), "--quant_type", quant_type]
    if group_size is not None:
        cmd += ["--group_size", str(group_size)]
    if data is None:
        return cmd + ["--quant_method", "RTN", "--force_cpu"]
    return cmd + ["--quant_method", "GPTQ", "--dataset", str(data), "--num_calibration_samples", str(samples),
                  "--max_sequence_length", str(seq), "--text_column", "text", "--force_cpu"]


def owner(constant: str) -> str:
    """The child's name (CONSTANT_MODULES) of the module that holds `constant`: a misspelt one fails here, rather
    than being set unread in the child."""
    for alias, module in CONSTANT_MODULES.items():
        if hasattr(module, constant) and constant.isupper():
            return alias
    raise SystemExit(f"{constant}: not a constant of {', '.join(m.__name__ for m in CONSTANT_MODULES.values())}")


def with_overrides(cmd: list[str], overrides: dict) -> list[str]:
    """A `python -m ktq ...` command as `python -c` that sets the constants first, then runs ktq's own main."""
    if not overrides:
        return cmd
    assert cmd[:3] == KTQ
    modules = ", ".join(f"{m.__name__} as {alias}" for alias, m in CONSTANT_MODULES.items())
    sets = "".join(f"{owner(k)}.{k} = {v!r}; " for k, v in overrides.items())
    return [sys.executable, "-c", f"import sys, {modules}; {sets}from ktq.cli import main; main(sys.argv[1:])",
            *cmd[3:]]


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine so far, in clock ticks (/proc/stat; steal counts as busy)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields) - fields[3] - fields[4], sum(fields)  # all but idle and iowait


def wait_quiet(min_idle: float, timeout: float) -> float:
    """Wait until the CPUs are at least min_idle idle over 2 s, at most timeout seconds (this machine is shared
    with other people's processes, not all of them visible here); returns the idle fraction it got."""
    deadline = time.monotonic() + timeout
    while True:
        busy0, total0 = cpu_jiffies()
        time.sleep(2.0)
        busy1, total1 = cpu_jiffies()
        idle = 1 - (busy1 - busy0) / max(1, total1 - total0)
        if idle >= min_idle or time.monotonic() > deadline:
            return idle


def run(cmd: list[str], out: Path, log_path: Path) -> dict:
    """Seconds of the whole command (a fresh output folder each time: ktq continues an existing one), and the
    share of the machine's CPU time that other processes took meanwhile (all busy time less the child's own)."""
    shutil.rmtree(out, ignore_errors=True)
    with open(log_path, "a") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        busy0, total0 = cpu_jiffies()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        busy1, total1 = cpu_jiffies()
        code = os.waitstatus_to_exitcode(status)
        f.write(f"[exit {code}, {seconds:.2f} s]\n\n")
    if code != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-15:])
        raise SystemExit(f"failed (exit {code}): {shlex.join(cmd)}\n{tail}")
    tick = os.sysconf("SC_CLK_TCK")
    others = max(0.0, (busy1 - busy0) / tick - usage.ru_utime - usage.ru_stime)
    return {"seconds": seconds, "child_cpu_s": usage.ru_utime + usage.ru_stime,
            "others_cpu_share": others / max(1e-9, (total1 - total0) / tick)}


# ---- reading the outputs -------------------------------------------------------------------------------------

def read_experts(folder: Path, bits: int, hidden: int, inter: int, experts: int
                 ) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], int]:
    """Every layer's experts from a merged output, as kt-kernel finds them (every *.safetensors at the top,
    by tensor name), dequantised: {layer: (gate_up [E, 2I, H], down [E, H, I])} in the transformers model's
    layout, and the number of codes kt-kernel would decode wrongly (INT4 nibble 8 = -8, INT8 byte -128)."""
    pieces: dict[tuple[int, str, int], dict[int, dict[str, np.ndarray]]] = defaultdict(lambda: defaultdict(dict))
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, framework="numpy") as f:
            for name in f.keys():
                match = EXPERT_KEY.match(name)
                if match:
                    layer, proj, expert, part, kind = match.groups()
                    pieces[int(layer), proj, int(expert)][int(part)][kind] = f.get_tensor(name)
    if not pieces:
        raise SystemExit(f"{folder}: no blk.*.ffn_*_exps tensors in its *.safetensors")
    numa = 1 + max(part for parts in pieces.values() for part in parts)
    inter_tp = inter // numa  # gate/up: rows p*I_tp.. of [I, H]; down: columns p*I_tp.. of [H, I]
    layers = sorted({layer for layer, _, _ in pieces})
    bad_codes = 0
    out = {}
    for layer in layers:
        gate_up = torch.empty(experts, 2 * inter, hidden)
        down = torch.empty(experts, hidden, inter)
        for expert in range(experts):
            for proj in ("gate", "up", "down"):
                parts = pieces.get((layer, proj, expert))
                if parts is None or sorted(parts) != list(range(numa)):
                    raise SystemExit(f"{folder}: layer {layer} expert {expert} {proj}: NUMA parts "
                                     f"{sorted(parts or [])}, not 0..{numa - 1}")
                n, k = (inter_tp, hidden) if proj != "down" else (hidden, inter_tp)
                for part, tensors in parts.items():
                    body = tensors["weight"].view(np.uint8)
                    scale = tensors["scale"].astype(np.float32)
                    if body.size != n * k * bits // 8 or scale.size != n:
                        raise SystemExit(f"{folder}: blk.{layer}.ffn_{proj}_exps.{expert}.numa.{part}: {body.size} B "
                                         f"and {scale.size} scales, not INT{bits} [{n}, {k}]")
                    bad_codes += int((body == 0x80).sum()) if bits == 8 else \
                        int(((body & 0xF) == 8).sum() + ((body >> 4) == 8).sum())
                    values = torch.from_numpy(unpack_dequantize(body, scale, n, k, bits))
                    span = slice(part * inter_tp, (part + 1) * inter_tp)
                    if proj == "down":
                        down[expert, :, span] = values
                    else:  # the fused tensor holds gate's I rows, then up's
                        offset = 0 if proj == "gate" else inter
                        gate_up[expert, offset + span.start:offset + span.stop] = values
        out[layer] = (gate_up, down)
    return out, bad_codes


# ---- measuring -----------------------------------------------------------------------------------------------

def read_tensor(folder: Path, name: str) -> torch.Tensor:
    """One tensor of a checkpoint: from the shard its index names, or from its single model.safetensors (what
    transformers saves of a small model, with no index)."""
    index = folder / "model.safetensors.index.json"
    shard = json.loads(index.read_text())["weight_map"][name] if index.exists() else "model.safetensors"
    with safe_open(folder / shard, framework="pt") as f:
        return f.get_tensor(name)


def token_rows(src: Path, texts: list[str], seq: int) -> torch.Tensor:
    """The first seq tokens of each text, one row each [texts, seq] (special tokens as the tokenizer adds them)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src)
    ids = [tokenizer(t, add_special_tokens=True, truncation=True, max_length=seq)["input_ids"] for t in texts]
    assert all(len(row) == seq for row in ids), "a held-out row is shorter than --seq"
    return torch.tensor(ids)


class Evaluator:
    """The reference model on the held-out text: its MoE blocks' inputs and outputs, and its next-token
    log-probabilities, kept to compare every quantised variant with."""

    def __init__(self, src: Path, rows: torch.Tensor, batch: int):
        """rows: the held-out token ids [rows, seq] (token_rows), run through the model `batch` rows at a time."""
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # DeepSeek's MTP layer is "unexpected": transformers does not model it
        self.batches = rows.split(batch)
        # eager: the experts one at a time; transformers' default grouped_mm is ~5x slower on the CPU
        self.model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32,
                                                          experts_implementation="eager").eval()
        layers = self.model.model.layers
        self.moe = {i: layer.mlp for i, layer in enumerate(layers) if hasattr(layer.mlp, "experts")}
        self.original = {i: (mlp.experts.gate_up_proj.detach().clone(), mlp.experts.down_proj.detach().clone())
                         for i, mlp in self.moe.items()}
        self._check_layout(src)
        self.inputs: dict[int, list[torch.Tensor]] = defaultdict(list)
        self.outputs: dict[int, list[torch.Tensor]] = defaultdict(list)
        self.load: dict[int, torch.Tensor] = {}
        self.routes: dict[int, list[torch.Tensor]] = defaultdict(list)  # each token's expert set, per layer
        hooks = []
        for i, mlp in self.moe.items():
            hooks.append(mlp.register_forward_pre_hook(lambda _m, a, i=i: self.inputs[i].append(a[0].detach())))
            hooks.append(mlp.register_forward_hook(lambda _m, _a, y, i=i: self.outputs[i].append(y.detach())))
            hooks.append(mlp.experts.register_forward_pre_hook(lambda _m, a, i=i: self._count(i, a[1])))
        self.reference = self._log_probs()
        for hook in hooks:
            hook.remove()

    def input_stats(self) -> dict[int, dict]:
        """What the experts see, per MoE layer: the largest channel's RMS over the median channel's (the outliers)
        and how many directions hold 99% of the inputs' correlation spectrum (the fewer, the more GPTQ can push
        the rounding error into directions the inputs do not use; real LLMs' inputs are far from full rank too)."""
        stats = {}
        for i, xs in self.inputs.items():
            x = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).double()
            hessian = x.T @ x
            rms = hessian.diagonal().div(x.shape[0]).sqrt()
            corr = hessian / torch.outer(rms, rms).mul(x.shape[0])
            spectrum = torch.linalg.eigvalsh(corr).flip(0)
            dims = int((spectrum.cumsum(0) < 0.99 * spectrum.sum()).sum()) + 1
            stats[i] = {"max_over_median_channel_rms": (rms.max() / rms.median()).item(), "dims_99": dims}
        return stats

    def _check_layout(self, src: Path) -> None:
        """The fused [E, 2I, H] gate_up / [E, H, I] down tensors hold the checkpoint's experts as read_experts
        assumes (gate first; with hidden == 2 * intermediate the shapes alone cannot tell)."""
        for i, (gate_up, down) in self.original.items():
            inter = down.shape[2]
            for e in (0, gate_up.shape[0] - 1):
                for proj, mine in (("gate", gate_up[e, :inter]), ("up", gate_up[e, inter:]), ("down", down[e])):
                    name = f"model.layers.{i}.mlp.experts.{e}.{proj}_proj.weight"
                    assert torch.equal(read_tensor(src, name).float(), mine), f"{name} is not where it is expected"

    def _count(self, layer: int, top_k_index: torch.Tensor) -> None:
        experts = self.original[layer][0].shape[0]
        counts = torch.bincount(top_k_index.flatten(), minlength=experts)
        self.load[layer] = self.load.get(layer, torch.zeros(experts, dtype=torch.long)) + counts
        self.routes[layer].append(top_k_index.sort(-1).values)

    @torch.no_grad()
    def _log_probs(self) -> torch.Tensor:
        return torch.cat([torch.log_softmax(self.model(ids).logits.float(), -1) for ids in self.batches])

    def nll_rows(self, log_probs: torch.Tensor) -> torch.Tensor:
        """Each row's mean negative log-likelihood of its next tokens under log_probs (the rows have one length:
        their mean is the text's, and its exp the perplexity)."""
        ids = torch.cat(self.batches)
        return -log_probs[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1).mean(-1)

    @torch.no_grad()
    def measure(self, experts: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> dict:
        if sorted(experts) != sorted(self.moe):
            raise SystemExit(f"the output holds MoE layers {sorted(experts)}, the model has {sorted(self.moe)}")
        weight_err = weight_norm = 0.0
        for i, (gate_up, down) in experts.items():
            self.moe[i].experts.gate_up_proj.copy_(gate_up)
            self.moe[i].experts.down_proj.copy_(down)
            for mine, ref in zip((gate_up, down), self.original[i]):
                weight_err += (mine.double() - ref.double()).pow(2).sum().item()
                weight_norm += ref.double().pow(2).sum().item()
        try:
            layers, per_token = {}, {}
            for i, mlp in self.moe.items():  # each block on the reference model's inputs to it
                err = norm = 0.0
                token_errs = []
                for x, y in zip(self.inputs[i], self.outputs[i]):
                    diff = (mlp(x).double() - y.double()).pow(2).sum(-1)
                    ref = y.double().pow(2).sum(-1)
                    err += diff.sum().item()
                    norm += ref.sum().item()
                    token_errs.append((diff / ref).flatten())
                layers[i] = err / norm
                # Each token's own relative error, averaged: the next norm rescales every token, so a token with a
                # small output but a large relative error counts as much as any other in the logits.
                per_token[i] = torch.cat(token_errs).mean().item()
            routes: dict[int, list[torch.Tensor]] = defaultdict(list)
            hooks = [mlp.experts.register_forward_pre_hook(
                lambda _m, a, i=i: routes[i].append(a[1].sort(-1).values)) for i, mlp in self.moe.items()]
            try:
                quantised = self._log_probs()  # the whole model, every expert replaced
            finally:
                for hook in hooks:
                    hook.remove()
            # Where an earlier layer's error changed which experts a token goes to: a jump, not a small error,
            # and what dominates KL when the per-layer errors are small (INT8)
            rerouted = statistics.fmean(
                (torch.cat(routes[i]) != torch.cat(self.routes[i])).any(-1).double().mean().item() for i in self.moe)
            p = self.reference.exp()
            kl = (p * (self.reference - quantised)).sum(-1)
            top1 = (self.reference.argmax(-1) == quantised.argmax(-1)).double()
            nll = self.nll_rows(quantised)
        finally:
            for i, (gate_up, down) in self.original.items():
                self.moe[i].experts.gate_up_proj.copy_(gate_up)
                self.moe[i].experts.down_proj.copy_(down)
        return {"layer_output_rel_err": layers, "layer_output_rel_err_token_mean": per_token,
                "nll": nll.mean().item(), "nll_rows": nll.tolist(), "kl_mean": kl.mean().item(),
                "kl_rows": kl.mean(-1).tolist(), "top1": top1.mean().item(), "rerouted": rerouted,
                "weight_rel_err": weight_err / weight_norm}


# ---- report --------------------------------------------------------------------------------------------------

def machine() -> dict:
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True)
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "kernel": platform.release(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "commit": git.stdout.strip() + (" (tracked files modified)" if dirty.stdout.strip() else "")}


def constants() -> dict:
    """ktq's values of every constant a variant overrides (as this process imports them), and the two files'
    hashes: ktq may be edited between runs."""
    names = dict.fromkeys(k for overrides in VARIANTS.values() for k in overrides)
    return {"values": {k: getattr(CONSTANT_MODULES[owner(k)], k) for k in names},
            "sha256": {m.__name__: hashlib.sha256(Path(m.__file__).read_bytes()).hexdigest()[:16]
                       for m in CONSTANT_MODULES.values()}}


def ratio_cell(value: float, goal: float | None) -> str:
    return f"{value:.2f}x" + ("" if goal is None else (" (met)" if value <= goal else " (not met)"))


def report(results: dict) -> str:
    a, m = results["args"], results["model"]
    cal = "calibrated"
    methods = a["methods"]
    lines = [f"# ktq cpu: calibrated vs RTN experts ({results['date']})", "",
             f"Command: `{results['command']}` ({results['total_seconds']:.0f} s in all)", "",
             f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, kernel "
             f"{results['machine']['kernel']}; torch {results['machine']['torch']}, transformers "
             f"{results['machine']['transformers']}; ktq at {results['machine']['commit']}", "",
             f"Model: `ktq sample --arch {a['arch']}` with random weights, {a['layers']} layers "
             f"({len(m['moe_layers'])} MoE), {a['experts']} experts, top-{a['top_k']}, hidden {a['hidden']}, "
             f"moe_intermediate {a['moe_intermediate']}, bf16; post_attention_layernorm gains lognormal(0, "
             f"{a['gain_sigma']}) with "
             f"{a['outliers']} outlier channels x{a['outlier_gain'][0]:g}-{a['outlier_gain'][1]:g} (median gain "
             f"{m['gain_median']:.2f}, max {m['gain_max']:.1f}); final norm gain {m['final_norm_gain']:.2f} for a "
             f"logit std of {a['logit_std']:g}; expert load on the held-out text, busiest / idlest expert: "
             + ", ".join(f"layer {i} {hi:.1f}x / {lo:.2f}x of uniform" for i, (hi, lo) in m["expert_load"].items()),
             "",
             "Expert inputs (held-out): largest / median channel RMS, directions holding 99% of their correlation "
             f"spectrum (of {a['hidden']}): " + ", ".join(
                 f"layer {i} {v['max_over_median_channel_rms']:.0f}x, {v['dims_99']}"
                 for i, v in m["expert_inputs"].items()), "",
             f"Text: {results['text']['source']}; calibration {a['calibration_samples']} x {a['seq']} tokens, "
             f"held-out {a['eval_samples']} x {a['seq']} tokens, no paragraph in both", ""]
    head = "| measure (held-out text) |"
    rule = "|---|"
    for method in methods:
        head += f" {method.upper()} RTN | {method.upper()} {cal} | {cal.split(' ')[0]} / RTN |"
        rule += "---:|---:|---:|"
    lines += ["## Quality", "",
              "MoE block output error ||y_q - y||^2 / ||y||^2, each block fed the bf16 model's own inputs; goals "
              "for calibrated / RTN: " + ", ".join(f"{k.upper()} <= {GOALS[k]}x" for k in methods) + ".", "",
              head, rule]
    q = results["quality"]

    def row(label: str, get, fmt: str, goal_of=None) -> str:
        cells = f"| {label} |"
        for method in methods:
            rtn, calibrated = get(q[method]["rtn"]), get(q[method]["calibrated"])
            ratio = calibrated / rtn if rtn else float("nan")
            goal = goal_of(method) if goal_of else None
            cells += f" {fmt.format(rtn)} | {fmt.format(calibrated)} | {ratio_cell(ratio, goal)} |"
        return cells

    for i in m["moe_layers"]:
        lines.append(row(f"layer {i} MoE output rel. error", lambda r, i=i: r["layer_output_rel_err"][i], "{:.3e}",
                         GOALS.get))
    lines.append(row("mean over MoE layers", lambda r: statistics.fmean(r["layer_output_rel_err"].values()),
                     "{:.3e}", GOALS.get))
    lines.append(row("mean over MoE layers, each token's own rel. error averaged",
                     lambda r: statistics.fmean(r["layer_output_rel_err_token_mean"].values()), "{:.3e}"))
    lines.append(row("logits KL to bf16, mean per token (nats)", lambda r: r["kl_mean"], "{:.3e}"))
    lines.append(row("top-1 agreement with bf16", lambda r: 100 * r["top1"], "{:.2f}%"))
    lines.append(row("tokens x MoE layers routed to another expert set", lambda r: 100 * r["rerouted"], "{:.2f}%"))
    lines.append(row("expert weight rel. error", lambda r: r["weight_rel_err"], "{:.3e}"))
    codes = "| codes kt-kernel serves wrongly (INT4 -8, INT8 -128; must be 0) |"
    for method in methods:
        codes += f" {q[method]['rtn']['bad_codes']} | {q[method]['calibrated']['bad_codes']} | |"
    lines += [codes, ""]
    t = results["times"]
    gpu, gpu_cpu = t["gpu"]["seconds"], t["gpu"]["cpu_seconds"]
    lines += ["## Time", "",
              f"Whole commands as child processes, start-up included, median of {a['repeat']}; `--threadpool-count "
              f"{a['threadpool_count']}`; the GPU pass is `ktq gpu --quant_method GPTQ --quant_type W4A16 --force_cpu` "
              f"on the same calibration set. Goal: calibrated / GPU pass <= {TIME_GOAL}x.", "",
              "| command | seconds | / GPU pass | CPU-seconds of the command | / GPU pass | other processes' share of "
              "the CPUs meanwhile (max) |", "|---|---:|---:|---:|---:|---:|"]
    for method in methods:
        for kind in ("rtn", "calibrated"):
            label = f"ktq cpu {method.upper()} " + ("RTN" if kind == "rtn" else "--calibrate")
            run_ = t[f"{method}-{kind}"]
            lines.append(f"| {label} | {run_['seconds']:.1f} | "
                         f"{ratio_cell(run_['seconds'] / gpu, TIME_GOAL if kind == 'calibrated' else None)} | "
                         f"{run_['cpu_seconds']:.1f} | {run_['cpu_seconds'] / gpu_cpu:.2f}x | "
                         f"{100 * run_['others_cpu_share']:.0f}% |")
    lines += [f"| ktq gpu GPTQ W4A16 --force_cpu | {gpu:.1f} | 1.00x | {gpu_cpu:.1f} | 1.00x | "
              f"{100 * t['gpu']['others_cpu_share']:.0f}% |", "",
              "The goal is on wall time; CPU-seconds (user + system of the child) are less sensitive to what else "
              "runs on the machine and show how well each command uses the cores.", "",
              "Notes: the reference and every quantised model compute in fp32 (bf16 weights widen exactly; bf16 "
              "compute would round the dequantised weights again, an error of INT8's order). kt-kernel's int8 "
              "activations are not modelled. Raw figures: the .json beside this file.", ""]
    if results["variants"]:
        lines += variant_report(results)
    return "\n".join(lines)


def overrides_text(overrides: dict) -> str:
    return ", ".join(f"{k}={v!r}".replace("|", "\\|") for k, v in overrides.items()) or "ktq's own"


def variant_report(results: dict) -> list[str]:
    q, constants = results["quality"], results["constants"]
    lines = ["## Ablation: calibrated variants", "",
             "Each variant is `ktq cpu --calibrate` with some of ktq's constants set in the child process first "
             "(`python -c \"import sys, ktq.calibrated.solve as c, ktq.calibrated.ktgrid as g; c.NAME = VALUE; ...; "
             "from ktq.cli import main; main(sys.argv[1:])\" cpu ...`), written to its own output and measured as the "
             "others: the same held-out text, the same RTN output. Smaller calibration sizes are the first rows ktq "
             "picks from the same calibration file, truncated. ktq's own constants in this run: "
             + overrides_text(constants["values"]) + ".", "",
             "| calibration | method | variant | overrides | MoE output error / RTN, mean of the layers' ratios | "
             "mean MoE output rel. error | KL to bf16 (nats) | KL / RTN, +- 2 s.e. | top-1 agreement | rerouted | "
             "seconds |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]

    def kl_cell(r: dict, rtn: dict) -> str:
        """KL / RTN's, +- twice its standard error from the held-out rows' paired differences (the rows are the
        independent units: a jump of one token's routing moves its whole row)."""
        ratio = r["kl_mean"] / rtn["kl_mean"]
        diffs = [a - b for a, b in zip(r["kl_rows"], rtn["kl_rows"])]
        spread = 2 * statistics.stdev(diffs) / len(diffs) ** 0.5 / rtn["kl_mean"]
        return f"{ratio:.2f}x +- {spread:.2f}" + (" (worse than RTN)" if ratio - spread > 1 else "")

    def layer_ratio(r: dict, rtn: dict) -> float:
        return statistics.fmean(r["layer_output_rel_err"][i] / rtn["layer_output_rel_err"][i]
                                for i in rtn["layer_output_rel_err"])

    for method in dict.fromkeys(v["method"] for v in results["variants"]):
        rtn = q[method]["rtn"]
        lines.append(f"| - | {method.upper()} | RTN | | 1.00x | "
                     f"{statistics.fmean(rtn['layer_output_rel_err'].values()):.3e} | {rtn['kl_mean']:.3e} | 1.00x | "
                     f"{100 * rtn['top1']:.2f}% | {100 * rtn['rerouted']:.2f}% | "
                     f"{results['times'][f'{method}-rtn']['seconds']:.1f} |")
    verdicts = []
    by_case: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for v in results["variants"]:
        rtn = q[v["method"]]["rtn"]
        by_case[tuple(v["size"]), v["method"]][v["variant"]] = v
        lines.append(f"| {v['size'][0]} x {v['size'][1]} | {v['method'].upper()} | {v['variant']} | "
                     f"{overrides_text(v['overrides']) if v['overrides'] else ''} | {layer_ratio(v, rtn):.3f}x | "
                     f"{statistics.fmean(v['layer_output_rel_err'].values()):.3e} | {v['kl_mean']:.3e} | "
                     f"{kl_cell(v, rtn)} | {100 * v['top1']:.2f}% | "
                     f"{100 * v['rerouted']:.2f}% | {v['seconds']:.1f} |")
    for (size, method), named in by_case.items():
        if "default" in named and "plain" in named:
            rtn = q[method]["rtn"]
            d, b = layer_ratio(named["default"], rtn), layer_ratio(named["plain"], rtn)
            kd, kb = named["default"]["kl_mean"], named["plain"]["kl_mean"]
            verdicts.append(f"- {method.upper()} at {size[0]} x {size[1]}: default {d:.3f}x RTN's error against "
                            f"plain GPTQ's {b:.3f}x ({d / b:.2f} of plain's): the default "
                            f"{'beats' if d < b else 'does not beat'} plain; KL {kd:.3e} against {kb:.3e}.")
    return lines + ([""] + verdicts if verdicts else []) + [""]


# ---- main ----------------------------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=HERE / "results" / f"cpu-quality-{time.strftime('%Y-%m-%d')}.md",
                   help="markdown results; the raw JSON goes beside it")
    p.add_argument("--work", type=Path, default=Path("/tmp/ktq-cpu-quality"),
                   help="model, text and outputs (its model/, data/, out/, logs/ are replaced each run)")
    p.add_argument("--arch", choices=("qwen3_moe", "deepseek_v3"), default="qwen3_moe")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dense-layers", type=int, default=0, help="leading dense layers (deepseek_v3)")
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512, help="a multiple of 128")
    p.add_argument("--moe-intermediate", type=int, default=256,
                   help="a multiple of 128 x --threadpool-count (INT4's alignment of each NUMA part)")
    p.add_argument("--gain-sigma", type=float, default=1.0, help="sigma of the lognormal channel gains")
    p.add_argument("--outliers", type=int, default=4, help="outlier channels per layer")
    p.add_argument("--outlier-gain", type=float, nargs=2, default=(10.0, 50.0), metavar=("LOW", "HIGH"))
    p.add_argument("--logit-std", type=float, default=3.0, help="std of the logits (0: leave the final norm at 1)")
    p.add_argument("--text", choices=("venv", "synthetic"), default="venv")
    p.add_argument("--calibration-samples", type=int, default=64)
    p.add_argument("--eval-samples", type=int, default=32)
    p.add_argument("--seq", type=int, default=256, help="tokens per sample (calibration and held-out)")
    p.add_argument("--threadpool-count", type=int, default=2)
    p.add_argument("--methods", nargs="+", choices=tuple(METHODS), default=list(METHODS))
    p.add_argument("--repeat", type=int, default=1, help="timed runs of each command (the median is reported)")
    p.add_argument("--min-idle", type=float, default=0.9,
                   help="before each timed command, wait for the CPUs to be this idle over 2 s ...")
    p.add_argument("--max-wait", type=float, default=120.0, help="... for at most this many seconds")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip the untimed run of each command on a tiny model (Numba caches, imports)")
    p.add_argument("--batch", type=int, default=8, help="held-out rows per forward pass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", nargs="*", choices=tuple(VARIANTS), metavar="NAME",
                   help="calibrated variants of the VARIANTS table to run too (no name: "
                        f"{' '.join(STANDARD_VARIANTS)}); the default calibration is always among them")
    p.add_argument("--variant", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE"),
                   help="one more variant, its constants given as Python literals, e.g. --variant mine "
                        "GENERIC_WEIGHT=0.3 'CLIP_RATIOS=(1.0, 0.95)'")
    p.add_argument("--variant-methods", nargs="+", choices=tuple(METHODS), default=["int4"],
                   help="the variants' quantisation methods (each among --methods)")
    p.add_argument("--variant-sizes", nargs="+", metavar="SAMPLESxTOKENS",
                   help="calibration sizes of the variants, each at most --calibration-samples x --seq "
                        "(none given: that size)")
    args = p.parse_args()
    if args.hidden % 128 or args.moe_intermediate % (128 * args.threadpool_count):
        p.error("--hidden must be a multiple of 128 and --moe-intermediate of 128 x --threadpool-count")
    table = {name: VARIANTS[name] for name in
             (STANDARD_VARIANTS if args.variants == [] else args.variants or ())}
    for name, *pairs in args.variant:
        try:
            table[name] = {k: ast.literal_eval(v) for k, v in (pair.split("=", 1) for pair in pairs)}
        except (ValueError, SyntaxError):
            p.error(f"--variant {name}: give KEY=VALUE pairs with Python literal values")
    for overrides in table.values():
        for constant in overrides:
            owner(constant)
    args.variant_table = {"default": {}, **table} if table else {}
    main_size = (args.calibration_samples, args.seq)
    try:
        args.variant_sizes = [tuple(int(n) for n in size.split("x")) for size in args.variant_sizes or []] or \
            [main_size]
    except ValueError:
        p.error("--variant-sizes: give SAMPLESxTOKENS, e.g. 8x64")
    if any(len(size) != 2 or not (0 < size[0] <= main_size[0] and 0 < size[1] <= main_size[1])
           for size in args.variant_sizes):
        p.error("--variant-sizes: each SAMPLESxTOKENS at most --calibration-samples x --seq")
    if args.variant_table and not set(args.variant_methods) <= set(args.methods):
        p.error("--variant-methods must be among --methods (their RTN is what they are compared with)")
    return args


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    ktq_constants = constants()
    torch.manual_seed(args.seed)

    work = args.work
    for name in ("model", "warmup", "data", "out", "logs"):
        shutil.rmtree(work / name, ignore_errors=True)
    (work / "out").mkdir(parents=True)
    (work / "logs").mkdir()
    model = work / "model"
    log(f"building the model in {model}")
    model_info = build_model(model, args)
    calibration, heldout, heldout_texts, text_info = build_text(work / "data", model, args)
    log(f"text: {text_info['source']}")

    def cpu_cmd(src: Path, out: Path, method: str, kind: str, data: Path, samples: int, seq: int) -> list[str]:
        return cpu_command(src, out, method, args, data if kind == "calibrated" else None, samples, seq)

    kinds = ("rtn", "calibrated")
    if not args.no_warmup:  # untimed: Numba's compiled kernels and the imports' files warm for every command
        log("warming up on a tiny model")
        tiny = work / "warmup"
        build_model(tiny / "model", args, small=True)
        for method in args.methods:
            for kind in kinds:
                run(cpu_cmd(tiny / "model", tiny / "out", method, kind, calibration, 4, 32), tiny / "out",
                    work / "logs" / "warmup.log")
        run(gpu_command(tiny / "model", tiny / "gpu", calibration, 4, 32), tiny / "gpu", work / "logs" / "warmup.log")

    jobs = [(f"{method}-{kind}", cpu_cmd(model, work / "out" / f"{method}-{kind}", method, kind, calibration,
                                         args.calibration_samples, args.seq))
            for method in args.methods for kind in kinds]
    jobs.append(("gpu", gpu_command(model, work / "out" / "gpu", calibration, args.calibration_samples, args.seq)))
    measured: dict[str, list[dict]] = defaultdict(list)
    for _ in range(args.repeat):  # repeats interleaved, so that a slow spell of the machine hits every command
        for name, cmd in jobs:
            idle = wait_quiet(args.min_idle, args.max_wait)
            measured[name].append({**run(cmd, work / "out" / name, work / "logs" / f"{name}.log"),
                                   "idle_before": idle})
            log(f"{name}: {measured[name][-1]['seconds']:.1f} s")
    times = {name: {"command": shlex.join(cmd), "seconds": statistics.median(r["seconds"] for r in measured[name]),
                    "cpu_seconds": statistics.median(r["child_cpu_s"] for r in measured[name]),
                    "others_cpu_share": max(r["others_cpu_share"] for r in measured[name]), "runs": measured[name]}
             for name, cmd in jobs}

    # (job, variant, overrides, method, size) of every variant; the default at the main size is the run above
    variants = []
    for samples, seq in args.variant_sizes:
        for method in args.variant_methods:
            for name, overrides in args.variant_table.items():
                main_run = name == "default" and (samples, seq) == (args.calibration_samples, args.seq)
                job = f"{method}-calibrated" if main_run else f"{method}-{name}-{samples}x{seq}"
                variants.append((job, name, overrides, method, (samples, seq)))
                if main_run:
                    continue
                out = work / "out" / job
                cmd = with_overrides(cpu_cmd(model, out, method, "calibrated", calibration, samples, seq), overrides)
                wait_quiet(args.min_idle, args.max_wait)
                times[job] = {"command": shlex.join(cmd), **run(cmd, out, work / "logs" / f"{job}.log")}
                log(f"{job}: {times[job]['seconds']:.1f} s")

    log("reference model on the held-out text")
    evaluator = Evaluator(model, token_rows(model, heldout_texts, args.seq), args.batch)
    experts = args.experts
    tokens = sum(b.numel() for b in evaluator.batches)
    model_info["moe_layers"] = sorted(evaluator.moe)
    uniform = tokens * args.top_k / experts
    model_info["expert_inputs"] = evaluator.input_stats()
    model_info["expert_load"] = {i: (load.max().item() / uniform, load.min().item() / uniform)
                                 for i, load in sorted(evaluator.load.items())}
    quality: dict = {}
    for method, bits in METHODS.items():
        if method not in args.methods:
            continue
        for kind in kinds:
            log(f"measuring {method}-{kind}")
            dequantised, bad = read_experts(work / "out" / f"{method}-{kind}", bits, args.hidden,
                                            args.moe_intermediate, experts)
            quality.setdefault(method, {})[kind] = {**evaluator.measure(dequantised), "bad_codes": bad}
    variant_quality = []
    for job, name, overrides, method, size in variants:
        if job == f"{method}-calibrated":
            figures = quality[method]["calibrated"]
        else:
            log(f"measuring {job}")
            dequantised, bad = read_experts(work / "out" / job, METHODS[method], args.hidden, args.moe_intermediate,
                                            experts)
            figures = {**evaluator.measure(dequantised), "bad_codes": bad}
        variant_quality.append({"job": job, "variant": name, "overrides": overrides, "method": method,
                                "size": list(size), "seconds": times[job]["seconds"], **figures})

    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": shlex.join([sys.executable, *sys.argv]),
               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "machine": machine(),
               "model": model_info, "text": text_info, "heldout_tokens": tokens, "times": times, "quality": quality,
               "variants": variant_quality, "constants": ktq_constants, "total_seconds": time.perf_counter() - started}
    if constants() != ktq_constants:
        ktq_constants["changed_during_run"] = True
        log("warning: ktq's constants or the files holding them changed during the run")
    table = report(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    print(table)
    log(f"wrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
