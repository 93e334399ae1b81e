#!/usr/bin/env python
"""A small Mixture-of-Experts LM with trained weights, for quality figures that do not come from random weights
(issue 25): the text, the training, the checkpoint in the release layout, and its FP8 twin, all reproducible.

    .venv/bin/python benchmarks/trained_moe.py corpus --out benchmarks/.corpus [--site SITE_PACKAGES] [--no-comments]
    python3 benchmarks/trained_moe.py train --corpus benchmarks/.corpus --out OUT [--preset small|tiny]
        [--device cuda|cpu] [--minutes M | --steps N] [--batch B] [--max-epochs E] [--experts auto|...] [--pack]
    .venv/bin/python benchmarks/trained_moe.py pack --bf16 OUT/bf16 --out PARTS
    .venv/bin/python benchmarks/trained_moe.py unpack --parts PARTS --out DIR       # DIR/bf16
    .venv/bin/python benchmarks/trained_moe.py fp8 --bf16 DIR/bf16 --out DIR/fp8

corpus: the plain text this venv ships in site-packages (versions pinned by constraints.txt), nothing downloaded:
`*.md`, `*.rst`, `*.txt`, licence files and the package descriptions in `*.dist-info/METADATA`, and from every `*.py`
that parses the docstrings of its module, classes and functions plus its comment blocks (`--no-comments`: docstrings
only; ktq's own editable install is left out: its README is not pinned). Files in sorted path order, split at blank
lines, whitespace collapsed; a paragraph is kept if it looks like prose (>= 80 characters, >= 80% letters and spaces)
and the first time it is seen (licences repeat). Each paragraph goes to train / calibration / heldout (94 / 3 / 3 %) by
the sha256 of its text, so the split depends on no order and no paragraph is in two splits. Writes train.jsonl.gz,
calibration.jsonl and heldout.jsonl (one paragraph a line, {"text": ...}, what `ktq gpu --dataset` and `ktq cpu
--calibrate` read) and corpus.json (packages and versions, files read, paragraphs, bytes and sha256 per split).

train: a byte-level BPE tokenizer trained on the train split, then transformers' Qwen3MoeForCausalLM (softmax top-k
router, norm_topk_prob, load-balancing aux loss) trained from scratch on the packed train text (EOS after every
paragraph) with AdamW, linear warm-up and cosine decay, bf16 autocast on CUDA, for a time budget (--minutes: tokenizer
and tokenisation included; the step count is fixed from the speed of the first 20 steps, at most --max-epochs passes
over the text) or a fixed --steps (the deterministic run: on the CPU the same bytes every time). Held-out loss on the
first tokens of heldout.jsonl at the start, a few times during and at the end, against a unigram model (add-one
smoothing, train counts) on the same tokens; the run fails if it does not beat it clearly. Writes OUT/bf16 (config.json,
tokenizer, safetensors shards of <= 15 MiB in the release key layout:
`model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight`, router `model.layers.N.mlp.gate.weight`), checked by loading
it back with transformers (no missing or unexpected key, logits equal to the trained model's in bf16), plus
OUT/curve.json and OUT/train.md. --pack then replaces OUT/bf16 by one uncompressed tar in parts of <= 15 MiB
(OUT/ckpt.tar.00, ...): at most 8 files under OUT for the small preset, as the device machine returns them.

fp8: the bf16 checkpoint as DeepSeek-V3 / Qwen3-FP8 publish theirs: every attention and expert Linear in
float8_e4m3fn with float32 `weight_scale_inv` per 128 x 128 block (ktq sample's encoder), embeddings, norms and
routers in BF16, quantization_config {"quant_method": "fp8", ...}.

Presets: small (8 layers, 32 experts top-4, hidden 256, moe_intermediate 128, vocab 4096, 28M parameters; for an
H100) and tiny (2 layers, 8 experts top-2, hidden 128, vocab 1024; trains on 2 CPU cores in under a minute, for CI).
The train command imports neither ktq nor anything outside torch, transformers, tokenizers, safetensors and numpy:
it runs from a bare copy of the repository.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import io
import json
import math
import os
import platform
import re
import shutil
import sys
import sysconfig
import tarfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

MiB = 1 << 20
SHARD_BYTES = 15 * MiB  # each file the device machine returns, and each shard
EOS = "<|endoftext|>"
SPLITS = ("train", "calibration", "heldout")


# ---- corpus ----------------------------------------------------------------------------------------------------

TEXT_SUFFIXES = (".md", ".rst", ".txt")
LICENCE_FILE = re.compile(r"^(LICEN[CS]E|COPYING|NOTICE|AUTHORS)([.-].*)?$", re.IGNORECASE)
MIN_CHARS = 80
MIN_PROSE = 0.8  # share of letters and spaces: keeps sentences, drops code, tables and reprs
HELDOUT_PER_MILLE = 30
CALIBRATION_PER_MILLE = 30
TRAIN_GZ_LIMIT = 40 * 10**6  # the train split travels in the device machine's 64 MiB working tree
# ktq's own editable install: its METADATA holds this repository's README, which is not pinned
OWN_PACKAGE = re.compile(r"^(ktq[-_.]|__editable__)")


def prose(block: str) -> str | None:
    """The block with its whitespace collapsed, if it reads like prose; else None."""
    text = " ".join(block.split())
    if len(text) < MIN_CHARS or sum(c.isalpha() or c == " " for c in text) < MIN_PROSE * len(text):
        return None
    return text


def is_source(path: Path, site: Path) -> bool:
    if not path.is_file() or OWN_PACKAGE.match(path.relative_to(site).parts[0]):
        return False
    return (path.suffix.lower() in TEXT_SUFFIXES or path.suffix == ".py" or bool(LICENCE_FILE.match(path.name))
            or (path.name == "METADATA" and path.parent.name.endswith(".dist-info")))


def blocks_of_text(path: Path) -> list[str]:
    text = path.read_text(errors="replace")
    if path.name == "METADATA":  # the long description follows the first blank line, after the headers
        text = text.partition("\n\n")[2]
    return re.split(r"\n\s*\n", text)


def blocks_of_python(path: Path, comments: bool) -> list[str] | None:
    """Docstrings (one block per blank-line paragraph) and runs of full-line comments; None if it does not parse."""
    source = path.read_bytes()
    try:
        with warnings.catch_warnings():  # invalid escape sequences in old files: not our business
            warnings.simplefilter("ignore")
            tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    blocks = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                blocks += re.split(r"\n\s*\n", doc)
    if comments:
        run: list[str] = []
        for line in source.decode(errors="replace").splitlines() + [""]:
            line = line.strip()
            if line.startswith("#") and not line.startswith("#!"):
                run.append(line.lstrip("#"))
            elif run:
                blocks.append(" ".join(run))
                run = []
    return blocks


def split_of(paragraph: str) -> str:
    """train / calibration / heldout from the text alone."""
    bucket = int.from_bytes(hashlib.sha256(paragraph.encode()).digest()[:8], "big") % 1000
    if bucket < HELDOUT_PER_MILLE:
        return "heldout"
    return "calibration" if bucket < HELDOUT_PER_MILLE + CALIBRATION_PER_MILLE else "train"


def jsonl(paragraphs: list[str]) -> bytes:
    return "".join(json.dumps({"text": p}, ensure_ascii=False) + "\n" for p in paragraphs).encode()


def gzip_bytes(data: bytes) -> bytes:
    """gzip with no name and no time in its header: the same data gives the same bytes."""
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=9) as f:
        f.write(data)
    return buffer.getvalue()


def cmd_corpus(args: argparse.Namespace) -> None:
    from importlib import metadata

    started = time.perf_counter()
    site = Path(args.site or sysconfig.get_paths()["purelib"]).resolve()
    files = sorted(p for p in site.rglob("*") if is_source(p, site))
    seen: set[str] = set()
    splits: dict[str, list[str]] = {name: [] for name in SPLITS}
    read = {"text": 0, "python": 0, "python_unparsed": 0}
    for path in files:
        if path.suffix == ".py":
            blocks = blocks_of_python(path, comments=not args.no_comments)
            read["python" if blocks is not None else "python_unparsed"] += 1
        else:
            blocks = blocks_of_text(path)
            read["text"] += 1
        for block in blocks or []:
            paragraph = prose(block)
            if paragraph is not None and paragraph not in seen:
                seen.add(paragraph)
                splits[split_of(paragraph)].append(paragraph)

    data = {name: jsonl(paragraphs) for name, paragraphs in splits.items()}
    train_gz = gzip_bytes(data["train"])
    capped = None
    while len(train_gz) > TRAIN_GZ_LIMIT:  # keep the leading paragraphs (file order) in proportion, 2% under
        capped = capped or {"paragraphs_before": len(splits["train"]), "gz_bytes_before": len(train_gz),
                            "rule": "the first paragraphs in file order, as many as the limit's share of them"}
        splits["train"] = splits["train"][:int(len(splits["train"]) * TRAIN_GZ_LIMIT / len(train_gz) * 0.98)]
        data["train"] = jsonl(splits["train"])
        train_gz = gzip_bytes(data["train"])

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.jsonl.gz").write_bytes(train_gz)
    (out / "calibration.jsonl").write_bytes(data["calibration"])
    (out / "heldout.jsonl").write_bytes(data["heldout"])
    packages = sorted({(d.metadata["Name"], d.version) for d in metadata.distributions(path=[str(site)])
                       if d.metadata["Name"] and d.metadata["Name"] != "ktq"}, key=lambda nv: nv[0].lower())
    info = {
        "site_packages": str(site),
        "python": platform.python_version(),
        "packages": {name: version for name, version in packages},
        "sources": ["*.md, *.rst, *.txt, licence files, *.dist-info/METADATA descriptions",
                    "docstrings of *.py modules, classes and functions"] + ([] if args.no_comments else
                                                                             ["full-line comment blocks of *.py"]),
        "files_read": read,
        "filter": {"min_chars": MIN_CHARS, "min_letters_and_spaces": MIN_PROSE, "deduplicated": "exact paragraphs"},
        "split_rule": f"sha256(text)[:8] % 1000: < {HELDOUT_PER_MILLE} heldout, "
                      f"< {HELDOUT_PER_MILLE + CALIBRATION_PER_MILLE} calibration, else train",
        "train_cap": capped or f"none needed (limit {TRAIN_GZ_LIMIT} gzipped bytes)",
        "splits": {name: {"file": "train.jsonl.gz" if name == "train" else f"{name}.jsonl",
                          "paragraphs": len(splits[name]),
                          "text_bytes": sum(len(p.encode()) for p in splits[name]),
                          "jsonl_bytes": len(data[name]),
                          "gz_bytes": len(train_gz) if name == "train" else None,
                          "jsonl_sha256": hashlib.sha256(data[name]).hexdigest()} for name in SPLITS},
    }
    (out / "corpus.json").write_text(json.dumps(info, indent=2) + "\n")
    s = info["splits"]
    print(f"corpus {out}: {len(packages)} packages, {sum(read.values())} files; paragraphs train "
          f"{s['train']['paragraphs']} ({s['train']['text_bytes'] / 1e6:.1f} MB text, {len(train_gz) / 1e6:.1f} MB "
          f"gz), calibration {s['calibration']['paragraphs']} ({s['calibration']['text_bytes'] / 1e6:.2f} MB), "
          f"heldout {s['heldout']['paragraphs']} ({s['heldout']['text_bytes'] / 1e6:.2f} MB)"
          f"{', train capped' if capped else ''}; {time.perf_counter() - started:.0f} s")


def read_jsonl(path: Path) -> list[str]:
    """The `text` of each line of a jsonl file (gzip-compressed when it ends in .gz); blank lines are skipped."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


# ---- presets and the model's config ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Preset:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    experts: int
    top_k: int
    moe_intermediate: int
    vocab: int
    seq: int
    batch: int
    lr: float
    warmup: int
    minutes: float
    max_epochs: float
    eval_tokens: int  # the held-out slice: the first tokens of heldout.jsonl
    evals: int  # held-out evaluations during training, besides the first and the last
    log_every: int
    tail_seconds: float  # kept from --minutes for the final evaluation, the writes and the checks
    train_bytes: int | None = None  # use only this much of the train split (every k-th paragraph)


PRESETS = {
    "small": Preset(hidden=256, layers=8, heads=4, kv_heads=2, experts=32, top_k=4, moe_intermediate=128, vocab=4096,
                    seq=512, batch=64, lr=2e-3, warmup=100, minutes=8.0, max_epochs=20, eval_tokens=65536, evals=5,
                    log_every=20, tail_seconds=45),
    "tiny": Preset(hidden=128, layers=2, heads=4, kv_heads=2, experts=8, top_k=2, moe_intermediate=128, vocab=1024,
                   seq=128, batch=16, lr=1e-2, warmup=20, minutes=0.75, max_epochs=100, eval_tokens=8192, evals=2,
                   log_every=10, tail_seconds=5, train_bytes=2 * 10**6),
}
MIN_LR_RATIO = 0.1
BEAT_UNIGRAM = 0.8  # the trained model's held-out perplexity must be at most this share of the unigram model's
AUX_LOSS_COEF = 0.01


def release_config(p: Preset) -> dict:
    """config.json as a Qwen3-MoE release writes it (num_experts, head_dim, torch_dtype), every layer MoE."""
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": p.vocab,
        "hidden_size": p.hidden,
        "intermediate_size": 4 * p.moe_intermediate,  # the dense MLP's: unused, every layer is MoE
        "moe_intermediate_size": p.moe_intermediate,
        "num_hidden_layers": p.layers,
        "num_attention_heads": p.heads,
        "num_key_value_heads": p.kv_heads,
        "head_dim": p.hidden // p.heads,
        "num_experts": p.experts,
        "num_experts_per_tok": p.top_k,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "hidden_act": "silu",
        "max_position_embeddings": 1024,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "rms_norm_eps": 1e-6,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "output_router_logits": False,
        "router_aux_loss_coef": AUX_LOSS_COEF,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": 0,
        "pad_token_id": 0,
        "torch_dtype": "bfloat16",
    }


def parameter_counts(p: Preset) -> tuple[int, int]:
    """(total, active per token): the routed experts a token does not use are not active; embedding tied."""
    head = p.hidden // p.heads
    attention = 2 * p.hidden * p.heads * head + 2 * p.hidden * p.kv_heads * head + 2 * head + 2 * p.hidden
    expert = 3 * p.hidden * p.moe_intermediate
    layer = attention + p.experts * p.hidden + p.experts * expert
    total = p.vocab * p.hidden + p.layers * layer + p.hidden
    return total, total - p.layers * (p.experts - p.top_k) * expert


# ---- tokenizer and tokens --------------------------------------------------------------------------------------

def train_tokenizer(texts: list[str], vocab: int, folder: Path):
    """A byte-level BPE tokenizer (as ktq sample builds one) on the train text, saved as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer, length=len(texts))
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS,
        "pad_token": EOS,
        "model_max_length": 1024,
        "clean_up_tokenization_spaces": False,
    }, indent=2) + "\n")
    return tokenizer


def token_stream(tokenizer, texts: list[str], eos: int):
    """Every paragraph's tokens followed by EOS, as one int32 array."""
    import numpy as np

    ids = [e.ids for e in tokenizer.encode_batch_fast(texts)]
    lengths = np.fromiter((len(i) + 1 for i in ids), np.int64, len(ids))
    stream = np.full(int(lengths.sum()), eos, np.int32)
    ends = np.cumsum(lengths)
    for row, end in zip(ids, ends):
        stream[end - 1 - len(row):end - 1] = row
    return stream


def unigram_perplexity(train, targets, vocab: int) -> float:
    """Add-one smoothed token frequencies of the train stream, scored on the held-out targets."""
    import numpy as np

    counts = np.bincount(train, minlength=vocab).astype(np.float64) + 1.0
    log_p = np.log(counts / counts.sum())
    return float(np.exp(-log_p[targets].mean()))


# ---- experts implementation ------------------------------------------------------------------------------------

class _Bf16Experts:
    """An experts module seen with its gate_up_proj and down_proj cast to bf16 (autograd flows back to the fp32
    masters); every other attribute is the module's."""

    def __init__(self, module, dtype):
        self._module = module
        self.gate_up_proj = module.gate_up_proj.to(dtype)
        self.down_proj = module.down_proj.to(dtype)

    def __getattr__(self, name):
        return getattr(self._module, name)


def grouped_mm_bf16(self, hidden_states, top_k_index, top_k_weights):
    """transformers' grouped_mm experts in bf16. torch's grouped GEMM has a fused kernel for bf16 only (other dtypes
    loop over the experts), autocast does not reach it, and transformers casts the input to the weights' dtype: with
    fp32 master weights it would take the slow loop."""
    import torch
    from transformers.integrations.moe import grouped_mm_experts_forward

    out = grouped_mm_experts_forward(_Bf16Experts(self, torch.bfloat16), hidden_states.to(torch.bfloat16),
                                     top_k_index, top_k_weights.to(torch.bfloat16))
    return out.to(hidden_states.dtype)


def choose_experts(model, requested: str, device: str, batch, autocast) -> tuple[str, dict]:
    """The experts implementation to train with: the one asked for; on the CPU eager (grouped_mm is several times
    slower there); on CUDA the fastest forward + backward on a real batch among bf16 grouped_mm, grouped_mm and eager
    (each tried; one that fails is skipped)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register("grouped_mm_bf16", grouped_mm_bf16)
    if requested != "auto" or device == "cpu":
        name = "eager" if requested == "auto" else requested
        model.set_experts_implementation(name)
        return name, {}
    timings = probe_experts(model, ("grouped_mm_bf16", "grouped_mm", "eager"), batch, autocast)
    working = {name: t for name, t in timings.items() if isinstance(t, float)}
    if not working:
        raise SystemExit(f"no experts implementation works here: {timings}")
    best = min(working, key=working.get)
    model.set_experts_implementation(best)
    return best, timings


def probe_experts(model, names, batch, autocast) -> dict:
    """Seconds per forward + backward with each experts implementation (the mean of two calls after a warm-up
    one), or why it failed. Gradients are cleared after: the model's weights do not change."""
    import torch

    def sync():
        if batch.is_cuda:
            torch.cuda.synchronize()

    timings: dict[str, float | str] = {}
    for name in names:
        try:
            model.set_experts_implementation(name)
            for repeat in range(3):
                if repeat == 1:
                    sync()
                    started = time.perf_counter()
                with autocast():
                    out = model(input_ids=batch[:, :-1], output_router_logits=True)
                    loss = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), batch[:, 1:].flatten())
                (loss + AUX_LOSS_COEF * out.aux_loss).backward()
            sync()
            timings[name] = round((time.perf_counter() - started) / 2, 4)
        except Exception as exc:  # an implementation this torch / GPU lacks: try the next one
            timings[name] = f"failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
        model.zero_grad(set_to_none=True)
    return timings


# ---- training --------------------------------------------------------------------------------------------------

def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up, then cosine decay to MIN_LR_RATIO of the peak at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress)))


def evaluate(model, windows, batch: int, autocast) -> float:
    """Mean next-token loss over the held-out windows (each window predicts its tokens 1..seq)."""
    import torch

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(windows), batch):
            chunk = windows[start:start + batch]
            with autocast():
                logits = model(input_ids=chunk[:, :-1]).logits
            total += torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), chunk[:, 1:].flatten(),
                                                       reduction="sum").item()
            count += chunk[:, 1:].numel()
    model.train(was_training)
    return total / count


def release_tensors(model, config: dict) -> dict:
    """The trained weights in bf16 under the release's names: each expert's gate / up / down projection on its own
    (transformers keeps them fused as gate_up_proj [E, 2I, H] and down_proj [E, H, I]), no lm_head when tied."""
    import torch

    inter = config["moe_intermediate_size"]
    out = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu", torch.bfloat16)
        if name == "lm_head.weight" and config["tie_word_embeddings"]:
            continue
        if name.endswith(".mlp.experts.gate_up_proj"):
            prefix = name.removesuffix("gate_up_proj")
            for e in range(tensor.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = tensor[e, :inter].contiguous()
                out[f"{prefix}{e}.up_proj.weight"] = tensor[e, inter:].contiguous()
        elif name.endswith(".mlp.experts.down_proj"):
            prefix = name.removesuffix("down_proj")
            for e in range(tensor.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = tensor[e].contiguous()
        else:
            out[name] = tensor.contiguous()
    return out


def _release_order(name: str) -> tuple:
    """Embedding, then layer by layer (experts by number), then the final norm: the order releases list them in."""
    numbers = [int(n) for n in re.findall(r"\.(\d+)\.", name)]
    return (0 if "embed_tokens" in name else 2 if not numbers else 1, tuple(numbers), name)


def write_shards(tensors: dict, folder: Path, max_bytes: int = SHARD_BYTES) -> list[str]:
    """safetensors shards of at most max_bytes each (header included) and model.safetensors.index.json."""
    from safetensors.torch import save_file

    names = sorted(tensors, key=_release_order)
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = tensors[name].numel() * tensors[name].element_size()
        header = 160 + len(name)  # a header entry's JSON: name, dtype, shape, offsets
        if shards[-1] and size + nbytes + header > max_bytes - 4096:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes + header
    files = []
    weight_map = {}
    for k, shard in enumerate(shards, start=1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file({name: tensors[name] for name in shard}, str(folder / file), metadata={"format": "pt"})
        if (folder / file).stat().st_size > max_bytes:
            raise SystemExit(f"{file} is larger than {max_bytes} bytes")
        weight_map.update((name, file) for name in shard)
        files.append(file)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files


def check_tokenizer(folder: Path) -> None:
    """transformers' AutoTokenizer loads the saved tokenizer, with its EOS, and a sentence round-trips."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    probe = "Mixture-of-Experts models route every token to a few experts."
    if tokenizer.decode(tokenizer(probe)["input_ids"]) != probe or tokenizer.eos_token != EOS:
        raise SystemExit(f"the tokenizer in {folder} does not round-trip through AutoTokenizer")


def check_checkpoint(folder: Path, model, windows) -> None:
    """Load the written folder with transformers (AutoTokenizer, AutoModelForCausalLM) and check that nothing is
    missing or unexpected and that its logits equal the trained model's cast to bf16, both on the CPU."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    check_tokenizer(folder)
    loaded, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, experts_implementation="eager",
                                                        output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise SystemExit(f"transformers loads {folder} with problems: {problems}")
    # the trained weights in bf16; buffers (rotary frequencies) stay fp32 as from_pretrained keeps them
    reference = copy.deepcopy(model).to("cpu")
    for param in reference.parameters():
        param.data = param.data.to(torch.bfloat16)
    reference.set_experts_implementation("eager")
    reference.eval()
    batch = windows[:2, :-1].cpu()
    with torch.no_grad():
        expected, got = reference(input_ids=batch).logits, loaded(input_ids=batch).logits
    if not torch.equal(expected, got):
        raise SystemExit(f"logits of the saved checkpoint differ from the trained model's: max |diff| "
                         f"{(expected.float() - got.float()).abs().max().item():.3g}")


def cmd_train(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    # idle OpenMP workers sleep instead of spinning (read once, before torch loads): on a small shared CPU spinning
    # workers made steps up to 6x slower
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import numpy as np
    import torch
    import transformers
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars between our lines
    p = PRESETS[args.preset]
    overrides = {"batch": args.batch, "max_epochs": args.max_epochs, "eval_tokens": args.eval_tokens}
    p = Preset(**{**asdict(p), **{k: v for k, v in overrides.items() if v is not None}})
    minutes = args.minutes if args.minutes is not None else p.minutes
    deadline = started + 60 * minutes - p.tail_seconds
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    folder = out / "bf16"
    if folder.exists() and any(folder.iterdir()):
        raise SystemExit(f"{folder} is not empty")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for what autocast leaves in fp32

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", flush=True)

    # the text and the tokens
    corpus = Path(args.corpus)
    train_text = read_jsonl(corpus / "train.jsonl.gz")
    if p.train_bytes:  # every k-th paragraph: a sample of the whole split, not of its first packages
        stride = max(1, math.ceil(sum(len(t.encode()) for t in train_text) / p.train_bytes))
        train_text = train_text[::stride]
    heldout_text = read_jsonl(corpus / "heldout.jsonl")
    tokenizer = train_tokenizer(train_text, p.vocab, folder)
    check_tokenizer(folder)  # here, not after the training: a bad tokenizer wastes no GPU time
    eos = tokenizer.token_to_id(EOS)
    tokenizer_seconds = time.perf_counter() - started
    train_tokens = token_stream(tokenizer, train_text, eos)
    heldout_tokens = token_stream(tokenizer, heldout_text, eos)
    window = p.seq + 1
    n_eval = p.eval_tokens // window
    if len(heldout_tokens) < n_eval * window:
        raise SystemExit(f"heldout.jsonl has {len(heldout_tokens)} tokens, fewer than the {n_eval * window} needed")
    eval_windows = torch.from_numpy(heldout_tokens[:n_eval * window].astype(np.int64)).view(n_eval, window)
    unigram = unigram_perplexity(train_tokens, eval_windows[:, 1:].numpy().ravel(), p.vocab)
    chunks = torch.from_numpy(train_tokens[:len(train_tokens) // window * window].astype(np.int64)).view(-1, window)
    steps_per_epoch = len(chunks) // p.batch
    if steps_per_epoch < 1:
        raise SystemExit(f"the train split has {len(chunks)} sequences of {window} tokens, fewer than one batch")
    log(f"tokenizer {p.vocab} trained in {tokenizer_seconds:.1f} s; train {len(train_tokens):,} tokens "
        f"({len(train_text):,} paragraphs, {steps_per_epoch} steps of {p.batch} x {p.seq} an epoch), held-out slice "
        f"{eval_windows[:, 1:].numel():,} tokens; unigram perplexity {unigram:.1f}")

    # the model
    config = release_config(p)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig.from_pretrained(folder)).to(device)  # built on the CPU: same init
    model.train()
    total_params, active_params = parameter_counts(p)
    if sum(t.numel() for t in model.parameters()) != total_params:
        raise SystemExit("the parameter count does not match the preset's")
    chunks, eval_windows = chunks.to(device), eval_windows.to(device)
    decay = [t for t in model.parameters() if t.dim() >= 2]  # no weight decay on norms
    keep = [t for t in model.parameters() if t.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": keep, "weight_decay": 0.0}],
                                  lr=p.lr, betas=(0.9, 0.95), eps=1e-8, fused=device == "cuda")
    experts, probe = choose_experts(model, args.experts, device, chunks[:p.batch], autocast)
    log(f"model: {total_params / 1e6:.2f}M parameters, {active_params / 1e6:.2f}M active; experts "
        f"implementation {experts}{f' (forward + backward: {probe})' if probe else ''}")

    # the loop: the step count is --steps, or fixed after the first steps from their speed and the time left
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(chunks), generator=generator)
    curve: dict = {"train": [], "eval": []}
    total_steps = args.steps

    def eval_steps(total: int) -> set[int]:  # evenly spaced inside the run; the last one is the final evaluation
        return {round(total * k / (p.evals + 1)) for k in range(1, p.evals + 1)} - {0, total}

    scheduled = eval_steps(total_steps) if total_steps else set()
    estimate_at = 20
    loss_sum = torch.zeros((), device=device)
    aux_sum = torch.zeros((), device=device)
    step, stopped_by = 0, "steps"
    problems: list[str] = []  # what went wrong after training started: reported, and the command fails at the end

    def held_out(step: int) -> float:
        t = time.perf_counter()
        loss = evaluate(model, eval_windows, p.batch, autocast)
        curve["eval"].append({"step": step, "tokens": step * p.batch * p.seq, "seconds": round(t - started, 2),
                              "loss": round(loss, 5), "perplexity": round(math.exp(loss), 3)})
        log(f"held-out at step {step}: loss {loss:.4f}, perplexity {math.exp(loss):.2f} (unigram {unigram:.1f}; "
            f"{time.perf_counter() - t:.1f} s)")
        return time.perf_counter() - t

    eval_seconds = held_out(0)
    train_started = time.perf_counter()
    while total_steps is None or step < total_steps:
        if time.perf_counter() > deadline:
            stopped_by = "deadline"
            break
        position = step % steps_per_epoch
        if position == 0 and step:
            order = torch.randperm(len(chunks), generator=generator)
        batch = chunks[order[position * p.batch:(position + 1) * p.batch].to(device)]
        lr = lr_at(step, total_steps or 10**9, p.warmup, p.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        try:
            with autocast():
                result = model(input_ids=batch[:, :-1], output_router_logits=True)
                ce = torch.nn.functional.cross_entropy(result.logits.float().flatten(0, 1), batch[:, 1:].flatten())
            (ce + AUX_LOSS_COEF * result.aux_loss).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        except Exception as exc:  # one run on a lent machine: keep what was trained, report, fail at the end
            stopped_by = f"error at step {step + 1}: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
            problems.append(stopped_by)
            log(stopped_by)
            break
        optimizer.zero_grad(set_to_none=True)
        loss_sum += ce.detach()
        aux_sum += result.aux_loss.detach()
        step += 1
        if step == 5 and device == "cuda":
            torch.cuda.synchronize()
        if step == 5:
            timed_from = time.perf_counter()  # the first steps warm up kernels and the allocator
        if total_steps is None and (step == estimate_at or time.perf_counter() > train_started + 0.25 * (
                deadline - train_started)):
            if device == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            per_step = (now - timed_from) / (step - 5) if step > 5 else (now - train_started) / step
            evals_left = p.evals + 1
            fit = step + int(0.9 * (deadline - now - evals_left * eval_seconds) / per_step)  # 10% spare
            total_steps = max(step + 1, min(fit, int(p.max_epochs * steps_per_epoch)))
            scheduled = eval_steps(total_steps)
            log(f"{per_step * 1000:.0f} ms a step: {total_steps} steps ({total_steps / steps_per_epoch:.1f} epochs"
                f"{', capped by --max-epochs' if fit > total_steps else ''})")
        if step % p.log_every == 0 or step == total_steps:
            n = step % p.log_every or p.log_every
            row = {"step": step, "tokens": step * p.batch * p.seq, "seconds": round(time.perf_counter() - started, 2),
                   "loss": round(loss_sum.item() / n, 5), "aux_loss": round(aux_sum.item() / n, 5), "lr": lr}
            curve["train"].append(row)
            loss_sum.zero_()
            aux_sum.zero_()
            log(f"step {step}/{total_steps or '?'} loss {row['loss']:.4f} aux {row['aux_loss']:.4f} lr {lr:.2e} "
                f"{row['tokens'] / (time.perf_counter() - train_started):,.0f} tokens/s")
        if step in scheduled:
            held_out(step)
    train_seconds = time.perf_counter() - train_started
    final = evaluate(model, eval_windows, p.batch, autocast)
    if not curve["eval"] or curve["eval"][-1]["step"] != step:
        curve["eval"].append({"step": step, "tokens": step * p.batch * p.seq,
                              "seconds": round(time.perf_counter() - started, 2), "loss": round(final, 5),
                              "perplexity": round(math.exp(final), 3)})
    log(f"trained {step} steps in {train_seconds:.0f} s (stopped by {stopped_by}); held-out perplexity "
        f"{math.exp(final):.2f}, unigram {unigram:.1f}")

    # the checkpoint in the release layout, checked by loading it back
    files = write_shards(release_tensors(model, config), folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 0, "pad_token_id": 0}, indent=2)
                                                   + "\n")
    bf16_loss, problems_before = math.nan, len(problems)
    try:  # a failed check must not keep the files from coming back: recorded, and the command fails at the end
        check_checkpoint(folder, model, eval_windows)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.bfloat16,
            experts_implementation="grouped_mm" if experts == "grouped_mm_bf16" else experts).to(device)
        bf16_loss = evaluate(loaded, eval_windows, p.batch, lambda: torch.autocast(device, enabled=False))
        del loaded
    except (Exception, SystemExit) as exc:
        problems.append(f"checkpoint check: {type(exc).__name__}: {exc}")
        log(problems[-1])
    checked = "CHECK FAILED" if len(problems) > problems_before else "loads back with equal logits"
    log(f"wrote {folder}: {len(files)} shards, {sum((folder / f).stat().st_size for f in files) / 1e6:.1f} MB; "
        f"{checked}; bf16 held-out perplexity {math.exp(bf16_loss):.2f}")

    summary = {
        "preset": args.preset, "preset_values": asdict(p), "seed": args.seed, "device": device,
        "machine": machine(device), "versions": versions(),
        "parameters": {"total": total_params, "active": active_params},
        "experts_implementation": experts, "experts_probe": probe,
        "train_tokens_in_corpus": int(len(train_tokens)), "train_paragraphs": len(train_text),
        "steps": step, "planned_steps": total_steps, "stopped_by": stopped_by,
        "tokens_seen": step * p.batch * p.seq, "epochs": round(step / steps_per_epoch, 2),
        "heldout_tokens": int(eval_windows[:, 1:].numel()),
        "heldout_perplexity": math.exp(final), "heldout_perplexity_bf16_checkpoint": math.exp(bf16_loss),
        "unigram_perplexity": unigram,
        "beats_unigram": math.exp(bf16_loss) <= BEAT_UNIGRAM * unigram,  # False when nan
        "problems": problems,
        "seconds": {"tokenizer": round(tokenizer_seconds, 1), "training": round(train_seconds, 1),
                    "total": round(time.perf_counter() - started, 1)},
    }
    curve["summary"] = summary
    if args.pack:
        summary["checkpoint_tar"] = pack(folder, out)
        shutil.rmtree(folder)
    summary["seconds"]["total"] = round(time.perf_counter() - started, 1)
    (out / "curve.json").write_text(json.dumps(curve, indent=1) + "\n")
    (out / "train.md").write_text(report(summary, curve))
    log(f"done: {', '.join(sorted(f.name for f in out.iterdir()))}")
    if problems:  # checked last, so that the files are there to look at
        raise SystemExit("FAILED: " + "; ".join(problems))
    if not summary["beats_unigram"]:
        raise SystemExit(f"FAILED: held-out perplexity {math.exp(bf16_loss):.2f} is not clearly below the unigram "
                         f"model's {unigram:.1f} (at most {BEAT_UNIGRAM:g}x): the training did not work")


def machine(device: str) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f"{torch.cuda.get_device_name()}, " if device == "cuda" else ""
    return f"{gpu}{cpu}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"


def versions() -> dict:
    import tokenizers
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__}


def report(s: dict, curve: dict) -> str:
    p = s["preset_values"]
    lines = [
        f"# Trained MoE: preset {s['preset']}", "",
        f"- machine: {s['machine']}; " + ", ".join(f"{k} {v}" for k, v in s["versions"].items()),
        f"- model: Qwen3MoeForCausalLM, {p['layers']} layers, {p['experts']} experts top-{p['top_k']}, hidden "
        f"{p['hidden']}, moe_intermediate {p['moe_intermediate']}, vocab {p['vocab']}; "
        f"{s['parameters']['total'] / 1e6:.2f}M parameters, {s['parameters']['active'] / 1e6:.2f}M active per token",
        f"- experts implementation: {s['experts_implementation']}"
        + (f" (probe, seconds per forward + backward: {s['experts_probe']})" if s["experts_probe"] else ""),
        f"- training: {s['steps']} steps of {p['batch']} x {p['seq']} tokens (planned {s['planned_steps']}, stopped "
        f"by {s['stopped_by']}), {s['tokens_seen']:,} tokens seen, {s['epochs']} epochs of "
        f"{s['train_tokens_in_corpus']:,} train tokens; AdamW peak lr {p['lr']}, warm-up {p['warmup']}, cosine to "
        f"{MIN_LR_RATIO:g}x; seed {s['seed']}",
        f"- held-out perplexity ({s['heldout_tokens']:,} tokens): {s['heldout_perplexity']:.2f} at the end of "
        f"training, {s['heldout_perplexity_bf16_checkpoint']:.2f} from the bf16 checkpoint; unigram (add-one) "
        f"{s['unigram_perplexity']:.1f}" + ("" if s["beats_unigram"] else f" (FAILED: not below {BEAT_UNIGRAM:g}x)"),
        f"- time: tokenizer {s['seconds']['tokenizer']} s, training {s['seconds']['training']} s, whole command "
        f"{s['seconds']['total']} s",
    ]
    if s["problems"]:
        lines.append(f"- PROBLEMS: {'; '.join(s['problems'])}")
    if "checkpoint_tar" in s:
        tar = s["checkpoint_tar"]
        lines.append(f"- checkpoint: {tar['bytes']:,} bytes of tar in {len(tar['parts'])} parts, sha256 "
                     f"{tar['sha256']}")
    lines += ["", "| step | tokens | seconds | held-out loss | perplexity |", "|---|---|---|---|---|"]
    lines += [f"| {e['step']} | {e['tokens']:,} | {e['seconds']} | {e['loss']:.4f} | {e['perplexity']:.2f} |"
              for e in curve["eval"]]
    return "\n".join(lines) + "\n"


# ---- pack / unpack ---------------------------------------------------------------------------------------------

def pack(folder: Path, out: Path, part_bytes: int = SHARD_BYTES) -> dict:
    """The folder as one uncompressed tar (bf16/NAME, fixed times and owners: the same files give the same bytes),
    in parts OUT/ckpt.tar.00, .01, ... of at most part_bytes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for path in sorted(folder.iterdir()):
            info = tarfile.TarInfo(f"bf16/{path.name}")
            info.size, info.mtime, info.mode = path.stat().st_size, 0, 0o644
            with open(path, "rb") as f:
                tar.addfile(info, f)
    data = buffer.getvalue()
    parts = []
    for k, start in enumerate(range(0, len(data), part_bytes)):
        parts.append(f"ckpt.tar.{k:02d}")
        (out / parts[-1]).write_bytes(data[start:start + part_bytes])
    return {"parts": parts, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def cmd_pack(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(json.dumps(pack(Path(args.bf16), out)))


def cmd_unpack(args: argparse.Namespace) -> None:
    parts = sorted(Path(args.parts).glob("ckpt.tar.[0-9][0-9]"))
    if not parts:
        raise SystemExit(f"no ckpt.tar.NN in {args.parts}")
    data = b"".join(part.read_bytes() for part in parts)
    curve = Path(args.parts) / "curve.json"
    if curve.is_file():  # the digest train recorded
        expected = json.loads(curve.read_text())["summary"].get("checkpoint_tar", {}).get("sha256")
        if expected and hashlib.sha256(data).hexdigest() != expected:
            raise SystemExit("the parts do not make the tar train wrote (sha256 differs)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(out, filter="data")
    print(f"{out / 'bf16'}: {len(list((out / 'bf16').iterdir()))} files from {len(parts)} parts")


# ---- fp8 -------------------------------------------------------------------------------------------------------

FP8_LINEAR = re.compile(r"\.(self_attn\.[qkvo]_proj|mlp\.experts\.\d+\.(gate|up|down)_proj)\.weight$")


def cmd_fp8(args: argparse.Namespace) -> None:
    """Attention and expert Linears to float8_e4m3fn with 128 x 128 block scales, as ktq sample --dtype fp8 stores
    them (ktq.sample's encoder); the rest copied in bf16."""
    import torch
    from safetensors import safe_open

    from ktq.sample import FP8_QUANTIZATION, fp8_blocks

    source, out = Path(args.bf16), Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty")
    out.mkdir(parents=True, exist_ok=True)
    index = json.loads((source / "model.safetensors.index.json").read_text())
    tensors = {}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(source / file, "pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                if not FP8_LINEAR.search(name):
                    tensors[name] = tensor
                    continue
                codes, scale_inv = fp8_blocks(tensor.float().numpy())
                tensors[name] = torch.from_numpy(codes).view(torch.float8_e4m3fn)
                tensors[name.removesuffix("weight") + "weight_scale_inv"] = torch.from_numpy(scale_inv)
    files = write_shards(tensors, out)
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = dict(FP8_QUANTIZATION)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    fp8 = sum(1 for name in tensors if name.endswith("weight_scale_inv"))
    print(f"{out}: {fp8} FP8 Linears with 128 x 128 block scales, {len(files)} shards, "
          f"{sum((out / f).stat().st_size for f in files) / 1e6:.1f} MB")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("corpus", help="build the text from this venv's site-packages")
    c.add_argument("--out", required=True)
    c.add_argument("--site", help="a site-packages folder (default: the running interpreter's)")
    c.add_argument("--no-comments", action="store_true", help="docstrings only from *.py, no comment blocks")
    c.set_defaults(run=cmd_corpus)
    t = commands.add_parser("train", help="train the tokenizer and the model, write the checkpoint")
    t.add_argument("--corpus", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--preset", choices=sorted(PRESETS), default="small")
    t.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda if there is one")
    t.add_argument("--minutes", type=float, help="time budget of the whole command (default: the preset's)")
    t.add_argument("--steps", type=int, help="train exactly this many steps (deterministic; the budget still stops)")
    t.add_argument("--batch", type=int, help="sequences per step (default: the preset's)")
    t.add_argument("--max-epochs", type=float, help="train at most this many epochs (default: the preset's)")
    t.add_argument("--eval-tokens", type=int, help="size of the held-out slice (default: the preset's)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 is steadier on a busy machine)")
    t.add_argument("--experts", default="auto", choices=("auto", "grouped_mm_bf16", "grouped_mm", "eager"),
                   help="experts implementation (auto: eager on the CPU, the fastest that works on CUDA)")
    t.add_argument("--pack", action="store_true", help="replace OUT/bf16 by OUT/ckpt.tar.NN parts of <= 15 MiB")
    t.set_defaults(run=cmd_train)
    k = commands.add_parser("pack", help="a bf16 folder as ckpt.tar.NN parts")
    k.add_argument("--bf16", required=True)
    k.add_argument("--out", required=True)
    k.set_defaults(run=cmd_pack)
    u = commands.add_parser("unpack", help="ckpt.tar.NN parts back into DIR/bf16")
    u.add_argument("--parts", required=True)
    u.add_argument("--out", required=True)
    u.set_defaults(run=cmd_unpack)
    f = commands.add_parser("fp8", help="the bf16 checkpoint in FP8 with 128 x 128 block scales")
    f.add_argument("--bf16", required=True)
    f.add_argument("--out", required=True)
    f.set_defaults(run=cmd_fp8)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # fp8 imports ktq from this checkout if need be
    main()
