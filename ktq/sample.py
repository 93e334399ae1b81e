"""Small synthetic checkpoints that look like real ones: HF key layout, config.json, local tokenizer, shards.

Each tensor's random values depend only on the seed and the tensor's name, so a sample is reproducible bit for
bit, whatever its sharding. Tensors are generated and written one at a time: a multi-GB sample needs little RAM.
A header-only sample has real headers and file sizes but no data (sparse files): it stands for a model of any size
in tests of what must never read tensor data, such as `ktq cpu --dry-run`.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ktq.checkpoint import INDEX_FILE
from ktq.errors import KtqError
from ktq.safetensors_io import ShardWriter, encode_header

# name, shape, init ("normal": std 0.02 linear weight, "ones": norm weight)
TensorSpec = tuple[str, tuple[int, ...], str]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class SampleShape:
    layers: int
    experts: int
    hidden: int
    moe_intermediate: int
    dense_layers: int
    vocab: int = 512
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    experts_per_token: int = 2

    @property
    def dense_intermediate(self) -> int:
        return 2 * self.moe_intermediate


def _attention(prefix: str, s: SampleShape) -> list[TensorSpec]:
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    return [
        (f"{prefix}.input_layernorm.weight", (s.hidden,), "ones"),
        (f"{prefix}.post_attention_layernorm.weight", (s.hidden,), "ones"),
        (f"{prefix}.self_attn.q_proj.weight", (q, s.hidden), "normal"),
        (f"{prefix}.self_attn.k_proj.weight", (kv, s.hidden), "normal"),
        (f"{prefix}.self_attn.v_proj.weight", (kv, s.hidden), "normal"),
        (f"{prefix}.self_attn.o_proj.weight", (s.hidden, q), "normal"),
        (f"{prefix}.self_attn.q_norm.weight", (s.head_dim,), "ones"),
        (f"{prefix}.self_attn.k_norm.weight", (s.head_dim,), "ones"),
    ]


def _mlp(prefix: str, intermediate: int, hidden: int) -> list[TensorSpec]:
    return [
        (f"{prefix}.gate_proj.weight", (intermediate, hidden), "normal"),
        (f"{prefix}.up_proj.weight", (intermediate, hidden), "normal"),
        (f"{prefix}.down_proj.weight", (hidden, intermediate), "normal"),
    ]


def qwen3_moe(s: SampleShape) -> tuple[dict, list[TensorSpec]]:
    config = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": s.vocab,
        "hidden_size": s.hidden,
        "intermediate_size": s.dense_intermediate,
        "moe_intermediate_size": s.moe_intermediate,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "head_dim": s.head_dim,
        "num_experts": s.experts,
        "num_experts_per_tok": s.experts_per_token,
        "decoder_sparse_step": 1,
        "mlp_only_layers": list(range(s.dense_layers)),
        "norm_topk_prob": True,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.001,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    }
    tensors: list[TensorSpec] = [("model.embed_tokens.weight", (s.vocab, s.hidden), "normal")]
    for layer in range(s.layers):
        prefix = f"model.layers.{layer}"
        tensors += _attention(prefix, s)
        if layer < s.dense_layers:
            tensors += _mlp(f"{prefix}.mlp", s.dense_intermediate, s.hidden)
            continue
        tensors.append((f"{prefix}.mlp.gate.weight", (s.experts, s.hidden), "normal"))
        for e in range(s.experts):
            tensors += _mlp(f"{prefix}.mlp.experts.{e}", s.moe_intermediate, s.hidden)
    tensors += [("model.norm.weight", (s.hidden,), "ones"), ("lm_head.weight", (s.vocab, s.hidden), "normal")]
    return config, tensors


ARCHS: dict[str, Callable[[SampleShape], tuple[dict, list[TensorSpec]]]] = {"qwen3_moe": qwen3_moe}
SAMPLE_DTYPES = {"bf16": "BF16", "fp16": "F16"}


def _values(name: str, shape: tuple[int, ...], init: str, seed: int) -> np.ndarray:
    if init == "ones":
        return np.ones(shape, np.float32)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)


def encode(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> raw bits of the safetensors dtype (bf16 by round-to-nearest-even)."""
    if dtype == "F16":
        return values.astype(np.float16).view(np.uint16)
    bits = values.view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def _shard_plan(tensors: list[TensorSpec], shards: int, width: int) -> list[list[TensorSpec]]:
    """Consecutive runs of tensors of about equal bytes (fewer shards when tensors are too few or too large)."""
    sizes = [width * int(np.prod(shape)) for _, shape, _ in tensors]
    total = sum(sizes)
    plan: list[list[TensorSpec]] = [[] for _ in range(shards)]
    filled = 0
    for spec, size in zip(tensors, sizes):
        plan[min(shards - 1, filled * shards // total)].append(spec)
        filled += size
    return [shard for shard in plan if shard]


def _write_sparse_shard(path: Path, entries: list[tuple[str, str, tuple[int, ...], int]],
                        metadata: dict[str, str]) -> None:
    """The shard's real header, then a hole up to its full size: the file looks complete and holds only zeros."""
    header = encode_header(entries, metadata)
    with open(path, "wb") as f:
        f.write(header)
    os.truncate(path, len(header) + sum(e[3] for e in entries))


def write_tokenizer(out: Path) -> None:
    """A byte-level BPE tokenizer trained on a built-in text, with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [
        "Mixture-of-Experts models route every token to a few experts out of many.",
        "Hot experts run on the GPU, cold experts on the CPU with AMX or AVX-512 kernels.",
        "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { }",
        "user assistant system: What is quantisation? It maps weights to fewer bits.",
    ] * 4
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
    }, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def write_sample(out: Path, arch: str = "qwen3_moe", layers: int = 2, experts: int = 8, hidden: int = 256,
                 moe_intermediate: int = 256, dense_layers: int = 0, dtype: str = "bf16", seed: int = 0,
                 shards: int = 2, on_tensor: Callable[[int], None] | None = None, header_only: bool = False) -> Path:
    if arch not in ARCHS:
        raise KtqError(f"unknown sample arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if dtype not in SAMPLE_DTYPES:
        raise KtqError(f"unknown sample dtype {dtype!r}; choose one of {', '.join(SAMPLE_DTYPES)}")
    if not 0 <= dense_layers < layers:
        raise KtqError(f"--dense-layers must be between 0 and {layers - 1} (at least one MoE layer)")
    if min(layers, experts, hidden, moe_intermediate, shards) < 1:
        raise KtqError("--layers, --experts, --hidden, --moe-intermediate and --shards must be positive")
    if out.exists() and any(out.iterdir()):
        raise KtqError(f"{out} already exists and is not empty; choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    config, tensors = ARCHS[arch](SampleShape(layers, experts, hidden, moe_intermediate, dense_layers))
    st_dtype = SAMPLE_DTYPES[dtype]
    config["torch_dtype"] = {"BF16": "bfloat16", "F16": "float16"}[st_dtype]
    width = 2
    plan = _shard_plan(tensors, shards, width)
    weight_map: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(plan, start=1):
        name = f"model-{k:05d}-of-{len(plan):05d}.safetensors"
        entries = [(t, st_dtype, shape, width * int(np.prod(shape))) for t, shape, _ in shard]
        weight_map.update((tensor, name) for tensor, _, _ in shard)
        total += sum(e[3] for e in entries)
        if header_only:
            _write_sparse_shard(out / name, entries, {"format": "pt"})
            continue
        writer = ShardWriter(out / name, entries, {"format": "pt"})
        for tensor, shape, init in shard:
            writer.write(tensor, encode(_values(tensor, shape, init, seed), st_dtype))
            if on_tensor:
                on_tensor(width * int(np.prod(shape)))
        writer.finish()
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                             indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 2}, indent=2) + "\n")
    write_tokenizer(out)
    return out


def sample_bytes(arch: str, layers: int, experts: int, hidden: int, moe_intermediate: int, dense_layers: int) -> int:
    _, tensors = ARCHS[arch](SampleShape(layers, experts, hidden, moe_intermediate, dense_layers))
    return sum(2 * int(np.prod(shape)) for _, shape, _ in tensors)
