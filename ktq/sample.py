"""Small synthetic checkpoints that look like real ones: HF key layout, config.json, local tokenizer, shards.

Each tensor's random values depend only on the seed and the tensor's name, so a sample is reproducible bit for
bit, whatever its sharding. Tensors are generated and written one at a time: a multi-GB sample needs little RAM.

Architectures (`--arch`) copy the key layout and config of a real model family; storage (`--dtype`) is bf16, fp16,
fp8 (block-scaled float8_e4m3fn + weight_scale_inv, as DeepSeek-V3 / MiniMax-M2 / Qwen3-FP8 publish) or int4
(compressed-tensors pack-quantized routed experts, as Kimi-K2-Thinking publishes). A header-only sample has real
headers and file sizes but no data (sparse files): it stands for a model of any size in tests of what must never
read tensor data, such as `ktq cpu --dry-run`.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ktq import hfformat
from ktq.errors import KtqError
from ktq.kernels.decode import E4M3_VALUES
from ktq.safetensors_io import ShardWriter, encode_header

# name, shape, role. Roles: "ones" (norm weight), "normal" (other weight, kept in the float dtype), "linear"
# (a Linear weight: FP8 in FP8 checkpoints), "expert" (a routed expert's Linear weight: FP8 or packed INT4),
# "fused" (all experts of a layer in one 3-D tensor: float dtypes only), "f32" (kept in float32).
TensorSpec = tuple[str, tuple[int, ...], str]
# one stored tensor: name, safetensors dtype, shape, bytes
Entry = tuple[str, str, tuple[int, ...], int]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SAMPLE_DTYPES = ("bf16", "fp16", "fp8", "int4")
FP8_BLOCK = (128, 128)  # quantization_config.weight_block_size of every FP8 release
INT4_GROUP = 32  # Kimi-K2-Thinking's group_size


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


# ---- building blocks of the architectures ------------------------------------------------------------------

def _attention(prefix: str, s: SampleShape, qk_norm: str = "head", q_gate: bool = False) -> list[TensorSpec]:
    """GQA attention; qk_norm "head" (per head_dim, Qwen3), "full" (over all heads, MiniMax-M2) or ""."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    tensors = [
        (f"{prefix}.input_layernorm.weight", (s.hidden,), "ones"),
        (f"{prefix}.post_attention_layernorm.weight", (s.hidden,), "ones"),
        (f"{prefix}.self_attn.q_proj.weight", (2 * q if q_gate else q, s.hidden), "linear"),
        (f"{prefix}.self_attn.k_proj.weight", (kv, s.hidden), "linear"),
        (f"{prefix}.self_attn.v_proj.weight", (kv, s.hidden), "linear"),
        (f"{prefix}.self_attn.o_proj.weight", (s.hidden, q), "linear"),
    ]
    if qk_norm:
        q_norm, k_norm = (s.head_dim, s.head_dim) if qk_norm == "head" else (q, kv)
        tensors += [(f"{prefix}.self_attn.q_norm.weight", (q_norm,), "ones"),
                    (f"{prefix}.self_attn.k_norm.weight", (k_norm,), "ones")]
    return tensors


# DeepSeek-V3 multi-head latent attention, scaled down. The kv_a_proj_with_mqa rows (kv_lora_rank + qk_rope_head_dim)
# are not a multiple of 128, so FP8 samples have partly filled scale blocks like the real kv_a_proj_with_mqa
# [576, 7168]; every Linear's input width is a multiple of 128, as in the real model, where FP8 block schemes
# quantise activations in groups of 128 of them.
MLA = {"q_lora_rank": 128, "kv_lora_rank": 128, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32}


def _mla(prefix: str, s: SampleShape) -> list[TensorSpec]:
    qk = MLA["qk_nope_head_dim"] + MLA["qk_rope_head_dim"]
    return [
        (f"{prefix}.input_layernorm.weight", (s.hidden,), "ones"),
        (f"{prefix}.post_attention_layernorm.weight", (s.hidden,), "ones"),
        (f"{prefix}.self_attn.q_a_proj.weight", (MLA["q_lora_rank"], s.hidden), "linear"),
        (f"{prefix}.self_attn.q_a_layernorm.weight", (MLA["q_lora_rank"],), "ones"),
        (f"{prefix}.self_attn.q_b_proj.weight", (s.heads * qk, MLA["q_lora_rank"]), "linear"),
        (f"{prefix}.self_attn.kv_a_proj_with_mqa.weight", (MLA["kv_lora_rank"] + MLA["qk_rope_head_dim"], s.hidden),
         "linear"),
        (f"{prefix}.self_attn.kv_a_layernorm.weight", (MLA["kv_lora_rank"],), "ones"),
        (f"{prefix}.self_attn.kv_b_proj.weight",
         (s.heads * (MLA["qk_nope_head_dim"] + MLA["v_head_dim"]), MLA["kv_lora_rank"]), "linear"),
        (f"{prefix}.self_attn.o_proj.weight", (s.hidden, s.heads * MLA["v_head_dim"]), "linear"),
    ]


def _mlp(prefix: str, intermediate: int, hidden: int, role: str = "linear",
         names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> list[TensorSpec]:
    gate, up, down = names
    return [
        (f"{prefix}.{gate}.weight", (intermediate, hidden), role),
        (f"{prefix}.{up}.weight", (intermediate, hidden), role),
        (f"{prefix}.{down}.weight", (hidden, intermediate), role),
    ]


def _experts(prefix: str, s: SampleShape, names: tuple[str, str, str] = hfformat.EXPERT_PROJECTION_NAMES["proj"]
             ) -> list[TensorSpec]:
    return [t for e in range(s.experts) for t in _mlp(f"{prefix}.{e}", s.moe_intermediate, s.hidden, "expert", names)]


def _fused_experts(prefix: str, s: SampleShape, in_by_out: bool) -> list[TensorSpec]:
    """[E, 2I, H] + [E, H, I] (Qwen3.5-MoE), or [E, H, 2I] + [E, I, H] when stored in x out (Qwen3-VL-MoE)."""
    e, h, i = s.experts, s.hidden, s.moe_intermediate
    gate_up, down = ((e, h, 2 * i), (e, i, h)) if in_by_out else ((e, 2 * i, h), (e, h, i))
    return [(f"{prefix}.gate_up_proj", gate_up, "fused"), (f"{prefix}.down_proj", down, "fused")]


def _vision(prefix: str, out_hidden: int) -> tuple[dict, list[TensorSpec]]:
    """A one-block Qwen3-VL vision tower: ktq never reads it, but VL checkpoints carry one."""
    dim, mlp, merge, positions = 64, 128, 2, 64
    config = {"depth": 1, "hidden_size": dim, "hidden_act": "gelu_pytorch_tanh", "intermediate_size": mlp,
              "num_heads": 2, "in_channels": 3, "patch_size": 16, "spatial_merge_size": merge,
              "temporal_patch_size": 2, "out_hidden_size": out_hidden, "num_position_embeddings": positions,
              "deepstack_visual_indexes": [], "initializer_range": 0.02}
    merged = dim * merge * merge
    tensors = [(f"{prefix}.patch_embed.proj.weight", (dim, 3, 2, 16, 16), "normal"),
               (f"{prefix}.patch_embed.proj.bias", (dim,), "normal"),
               (f"{prefix}.pos_embed.weight", (positions, dim), "normal")]
    for name, shape in (("blocks.0.norm1", (dim,)), ("blocks.0.norm2", (dim,)), ("blocks.0.attn.qkv", (3 * dim, dim)),
                        ("blocks.0.attn.proj", (dim, dim)), ("blocks.0.mlp.linear_fc1", (mlp, dim)),
                        ("blocks.0.mlp.linear_fc2", (dim, mlp)), ("merger.norm", (dim,)),
                        ("merger.linear_fc1", (merged, merged)), ("merger.linear_fc2", (out_hidden, merged))):
        tensors += [(f"{prefix}.{name}.weight", shape, "ones" if len(shape) == 1 else "normal"),
                    (f"{prefix}.{name}.bias", shape[:1], "normal")]
    return config, tensors


def _text_config(s: SampleShape) -> dict:
    """Config entries every architecture shares."""
    return {
        "vocab_size": s.vocab,
        "hidden_size": s.hidden,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "num_experts_per_tok": s.experts_per_token,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": 0,
        "eos_token_id": 2,
    }


def _no_dense_layers(arch: str, s: SampleShape) -> None:
    if s.dense_layers:
        raise KtqError(f"--dense-layers: {arch} has routed experts in every layer; use --dense-layers 0")


def _frame(s: SampleShape, layer_tensors: list[TensorSpec], prefix: str = "model") -> list[TensorSpec]:
    return [(f"{prefix}.embed_tokens.weight", (s.vocab, s.hidden), "normal"), *layer_tensors,
            (f"{prefix}.norm.weight", (s.hidden,), "ones"), ("lm_head.weight", (s.vocab, s.hidden), "normal")]


# ---- architectures -----------------------------------------------------------------------------------------

def _qwen3_moe_text(s: SampleShape, root: str, experts: Callable[[str], list[TensorSpec]]
                    ) -> tuple[dict, list[TensorSpec]]:
    """Qwen3-MoE's language model under root: dense MLPs in mlp_only_layers, else a router and experts(prefix)."""
    config = {
        **_text_config(s),
        "intermediate_size": s.dense_intermediate,
        "moe_intermediate_size": s.moe_intermediate,
        "head_dim": s.head_dim,
        "num_experts": s.experts,
        "decoder_sparse_step": 1,
        "mlp_only_layers": list(range(s.dense_layers)),
        "norm_topk_prob": True,
        "attention_bias": False,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.001,
    }
    tensors: list[TensorSpec] = []
    for layer in range(s.layers):
        prefix = f"{root}.layers.{layer}"
        tensors += _attention(prefix, s)
        if layer < s.dense_layers:
            tensors += _mlp(f"{prefix}.mlp", s.dense_intermediate, s.hidden)
            continue
        tensors.append((f"{prefix}.mlp.gate.weight", (s.experts, s.hidden), "normal"))
        tensors += experts(f"{prefix}.mlp.experts")
    return config, tensors


def qwen3_moe(s: SampleShape) -> tuple[dict, list[TensorSpec]]:
    text, tensors = _qwen3_moe_text(s, "model", lambda prefix: _experts(prefix, s))
    config = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", **text, "rope_theta": 1000000.0}
    return config, _frame(s, tensors)


def deepseek_v3(s: SampleShape) -> tuple[dict, list[TensorSpec]]:
    """DeepSeek-V3 / R1 (and Kimi-K2): MLA, leading dense layers, a shared expert, one MTP layer at the end."""
    config = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        **_text_config(s),
        "num_key_value_heads": s.heads,
        "intermediate_size": s.dense_intermediate,
        "moe_intermediate_size": s.moe_intermediate,
        "n_routed_experts": s.experts,
        "n_shared_experts": 1,
        "first_k_dense_replace": s.dense_layers,
        "moe_layer_freq": 1,
        "num_nextn_predict_layers": 1,
        **MLA,
        "n_group": 1,
        "topk_group": 1,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "attention_bias": False,
        "rope_theta": 10000.0,
        "rope_scaling": None,
    }
    tensors: list[TensorSpec] = []
    for layer in range(s.layers + 1):  # the last one is the multi-token-prediction layer
        prefix = f"model.layers.{layer}"
        if layer == s.layers:
            tensors += [(f"{prefix}.embed_tokens.weight", (s.vocab, s.hidden), "normal"),
                        (f"{prefix}.enorm.weight", (s.hidden,), "ones"),
                        (f"{prefix}.hnorm.weight", (s.hidden,), "ones"),
                        (f"{prefix}.eh_proj.weight", (s.hidden, 2 * s.hidden), "normal"),
                        (f"{prefix}.shared_head.norm.weight", (s.hidden,), "ones"),
                        (f"{prefix}.shared_head.head.weight", (s.vocab, s.hidden), "normal")]
        tensors += _mla(prefix, s)
        if layer < s.dense_layers:
            tensors += _mlp(f"{prefix}.mlp", s.dense_intermediate, s.hidden)
            continue
        tensors += [(f"{prefix}.mlp.gate.weight", (s.experts, s.hidden), "normal"),
                    (f"{prefix}.mlp.gate.e_score_correction_bias", (s.experts,), "f32")]
        tensors += _mlp(f"{prefix}.mlp.shared_experts", s.moe_intermediate, s.hidden)
        tensors += _experts(f"{prefix}.mlp.experts", s)
    return config, _frame(s, tensors)


def _block_sparse(s: SampleShape, qk_norm: str, router_bias: bool) -> list[TensorSpec]:
    tensors: list[TensorSpec] = []
    for layer in range(s.layers):
        prefix = f"model.layers.{layer}"
        tensors += _attention(prefix, s, qk_norm)
        tensors.append((f"{prefix}.block_sparse_moe.gate.weight", (s.experts, s.hidden), "normal"))
        if router_bias:
            tensors.append((f"{prefix}.block_sparse_moe.e_score_correction_bias", (s.experts,), "f32"))
        tensors += _experts(f"{prefix}.block_sparse_moe.experts", s, hfformat.EXPERT_PROJECTION_NAMES["w"])
    return _frame(s, tensors)


def mixtral(s: SampleShape) -> tuple[dict, list[TensorSpec]]:
    _no_dense_layers("mixtral", s)
    config = {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        **_text_config(s),
        "intermediate_size": s.moe_intermediate,  # Mixtral names the expert width intermediate_size
        "head_dim": s.head_dim,
        "num_local_experts": s.experts,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.02,
        "router_jitter_noise": 0.0,
    }
    return config, _block_sparse(s, qk_norm="", router_bias=False)


def minimax_m2(s: SampleShape) -> tuple[dict, list[TensorSpec]]:
    _no_dense_layers("minimax_m2", s)
    config = {
        "architectures": ["MiniMaxM2ForCausalLM"],
        "model_type": "minimax_m2",
        **_text_config(s),
        "intermediate_size": s.moe_intermediate,
        "head_dim": s.head_dim,
        "rotary_dim": s.head_dim // 2,
        "num_local_experts": s.experts,
        "scoring_func": "sigmoid",
        "use_routing_bias": True,
        "use_qk_norm": True,
        "qk_norm_type": "per_layer",
        "rope_theta": 5000000.0,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.001,
        "router_jitter_noise": 0.0,
    }
    return config, _block_sparse(s, qk_norm="full", router_bias=True)


def _vl_wrapper(s: SampleShape, model_type: str, architecture: str, text: dict,
                text_tensors: list[TensorSpec]) -> tuple[dict, list[TensorSpec]]:
    """The language model under model.language_model, its config under text_config, beside a vision tower."""
    vision, vision_tensors = _vision("model.visual", s.hidden)
    config = {"architectures": [architecture], "model_type": model_type, "text_config": text,
              "vision_config": {"model_type": model_type, **vision}, "image_token_id": 5, "video_token_id": 6,
              "vision_start_token_id": 3, "vision_end_token_id": 4, "tie_word_embeddings": False}
    return config, vision_tensors + _frame(s, text_tensors, "model.language_model")


def qwen3_vl_moe(s: SampleShape) -> tuple[dict, list[TensorSpec]]:
    """Qwen3-VL-MoE: fused experts stored in x out, [E, H, 2I] + [E, I, H]."""
    text, tensors = _qwen3_moe_text(s, "model.language_model",
                                    lambda prefix: _fused_experts(prefix, s, in_by_out=True))
    text = {"model_type": "qwen3_vl_moe_text", **text, "rope_theta": 5000000.0,
            "rope_scaling": {"rope_type": "default", "mrope_section": [8, 4, 4], "mrope_interleaved": True}}
    return _vl_wrapper(s, "qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration", text, tensors)


LINEAR_ATTENTION = {"linear_conv_kernel_dim": 4, "linear_key_head_dim": 32, "linear_value_head_dim": 32,
                    "linear_num_key_heads": 2, "linear_num_value_heads": 4}


def _gated_delta_net(prefix: str, s: SampleShape) -> list[TensorSpec]:
    la = LINEAR_ATTENTION
    key = la["linear_key_head_dim"] * la["linear_num_key_heads"]
    value = la["linear_value_head_dim"] * la["linear_num_value_heads"]
    heads = la["linear_num_value_heads"]
    return [
        (f"{prefix}.input_layernorm.weight", (s.hidden,), "ones"),
        (f"{prefix}.post_attention_layernorm.weight", (s.hidden,), "ones"),
        (f"{prefix}.linear_attn.in_proj_qkv.weight", (2 * key + value, s.hidden), "linear"),
        (f"{prefix}.linear_attn.in_proj_z.weight", (value, s.hidden), "linear"),
        (f"{prefix}.linear_attn.in_proj_b.weight", (heads, s.hidden), "linear"),
        (f"{prefix}.linear_attn.in_proj_a.weight", (heads, s.hidden), "linear"),
        (f"{prefix}.linear_attn.conv1d.weight", (2 * key + value, 1, la["linear_conv_kernel_dim"]), "normal"),
        (f"{prefix}.linear_attn.dt_bias", (heads,), "ones"),
        (f"{prefix}.linear_attn.A_log", (heads,), "normal"),
        (f"{prefix}.linear_attn.norm.weight", (la["linear_value_head_dim"],), "ones"),
        (f"{prefix}.linear_attn.out_proj.weight", (s.hidden, value), "linear"),
    ]


def qwen3_5_moe(s: SampleShape) -> tuple[dict, list[TensorSpec]]:
    """Qwen3.5-MoE: hybrid attention, a gated shared expert, fused experts stored out x in, [E, 2I, H] + [E, H, I]."""
    _no_dense_layers("qwen3_5_moe", s)
    layer_types = ["full_attention" if (layer + 1) % 4 == 0 else "linear_attention" for layer in range(s.layers)]
    text = {
        "model_type": "qwen3_5_moe_text",
        **_text_config(s),
        "head_dim": s.head_dim,
        "moe_intermediate_size": s.moe_intermediate,
        "shared_expert_intermediate_size": s.moe_intermediate,
        "num_experts": s.experts,
        "layer_types": layer_types,
        "full_attention_interval": 4,
        **LINEAR_ATTENTION,
        "attention_bias": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                            "mrope_section": [2, 1, 1], "mrope_interleaved": True},
    }
    tensors: list[TensorSpec] = []
    for layer, kind in enumerate(layer_types):
        prefix = f"model.language_model.layers.{layer}"
        tensors += _attention(prefix, s, q_gate=True) if kind == "full_attention" else _gated_delta_net(prefix, s)
        tensors += [(f"{prefix}.mlp.gate.weight", (s.experts, s.hidden), "normal"),
                    (f"{prefix}.mlp.shared_expert_gate.weight", (1, s.hidden), "normal")]
        tensors += _mlp(f"{prefix}.mlp.shared_expert", s.moe_intermediate, s.hidden)
        tensors += _fused_experts(f"{prefix}.mlp.experts", s, in_by_out=False)
    return _vl_wrapper(s, "qwen3_5_moe", "Qwen3_5MoeForConditionalGeneration", text, tensors)


ARCHS: dict[str, Callable[[SampleShape], tuple[dict, list[TensorSpec]]]] = {
    "qwen3_moe": qwen3_moe, "deepseek_v3": deepseek_v3, "mixtral": mixtral, "minimax_m2": minimax_m2,
    "qwen3_vl_moe": qwen3_vl_moe, "qwen3_5_moe": qwen3_5_moe}


# ---- storage -----------------------------------------------------------------------------------------------

FP8_QUANTIZATION = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                    "weight_block_size": list(FP8_BLOCK)}
INT4_QUANTIZATION = {  # Kimi-K2-Thinking's: only the routed experts are quantised
    "config_groups": {"group_0": {
        "input_activations": None, "output_activations": None, "targets": ["Linear"],
        "weights": {"actorder": None, "block_structure": None, "dynamic": False, "group_size": INT4_GROUP,
                    "num_bits": 4, "observer": "minmax", "observer_kwargs": {}, "strategy": "group",
                    "symmetric": True, "type": "int"}}},
    "format": "pack-quantized",
    "ignore": ["lm_head", r"re:.*self_attn.*", r"re:.*linear_attn.*", r"re:.*shared_experts?\..*",
               r"re:.*mlp\.(gate|up|down)_proj$", r"re:.*\.gate$", r"re:.*eh_proj$"],
    "kv_cache_scheme": None,
    "quant_method": "compressed-tensors",
    "quantization_status": "compressed",
}


def _storage(role: str, dtype: str) -> str:
    """How a tensor of this role is stored in a sample of this dtype: BF16, F16, F32, FP8 or INT4."""
    if role == "f32":
        return "F32"
    if dtype == "fp8" and role in ("linear", "expert"):
        return "FP8"
    if dtype == "int4" and role == "expert":
        return "INT4"
    return "F16" if dtype == "fp16" else "BF16"


def _entries(name: str, shape: tuple[int, ...], storage: str) -> list[Entry]:
    """The tensors one logical weight is stored as (FP8 and INT4 add their scales beside it)."""
    numel = int(np.prod(shape))
    if storage in ("BF16", "F16", "F32"):
        return [(name, storage, shape, (4 if storage == "F32" else 2) * numel)]
    base = name.removesuffix("weight")
    n, k = shape
    if storage == "FP8":
        blocks = (-(-n // FP8_BLOCK[0]), -(-k // FP8_BLOCK[1]))
        return [(name, "F8_E4M3", shape, numel), (f"{base}weight_scale_inv", "F32", blocks, 4 * blocks[0] * blocks[1])]
    groups = k // INT4_GROUP
    return [(f"{base}weight_packed", "I32", (n, k // 8), numel // 2),
            (f"{base}weight_scale", "BF16", (n, groups), 2 * n * groups),
            (f"{base}weight_shape", "I64", (2,), 16)]


def _values(name: str, shape: tuple[int, ...], role: str, seed: int) -> np.ndarray:
    if role == "ones":
        return np.ones(shape, np.float32)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)


def encode(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> raw bits of the safetensors dtype (bf16 by round-to-nearest-even)."""
    if dtype == "F16":
        return values.astype(np.float16).view(np.uint16)
    bits = values.view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def encode_e4m3(values: np.ndarray) -> np.ndarray:
    """float32 -> float8_e4m3fn bits, round to nearest even, saturating at +-448."""
    grid = E4M3_VALUES[:127]  # codes 0..126 hold 0 .. 448 in increasing order
    magnitude = np.minimum(np.abs(values), grid[-1])
    upper = np.clip(np.searchsorted(grid, magnitude), 1, 126)
    lower = upper - 1
    below, above = magnitude - grid[lower], grid[upper] - magnitude
    code = np.where((above < below) | ((above == below) & (upper % 2 == 0)), upper, lower)
    return (code | np.where(np.signbit(values), 0x80, 0)).astype(np.uint8)


def fp8_blocks(values: np.ndarray) -> list[np.ndarray]:
    """Per 128 x 128 block: scale_inv = amax / 448, weights = e4m3(w / scale_inv); edge blocks partly filled."""
    (n, k), (bn, bk) = values.shape, FP8_BLOCK
    rows, cols = -(-n // bn), -(-k // bk)
    padded = np.zeros((rows * bn, cols * bk), np.float32)
    padded[:n, :k] = np.abs(values)
    amax = padded.reshape(rows, bn, cols, bk).max(axis=(1, 3))
    scale_inv = np.where(amax > 0, amax / np.float32(448.0), np.float32(1.0)).astype(np.float32)
    per_value = np.repeat(np.repeat(scale_inv, bn, axis=0), bk, axis=1)[:n, :k]
    return [encode_e4m3(values / per_value), scale_inv]


def _int4_groups(values: np.ndarray) -> list[np.ndarray]:
    """compressed-tensors pack-quantized, symmetric, group 32: bf16 scale amax / 7.5 (its minmax observer),
    q = clamp(round(w / scale), -8, 7), stored q + 8 in 4-bit fields, 8 per int32, lowest bits first."""
    n, k = values.shape
    groups = values.reshape(n, k // INT4_GROUP, INT4_GROUP)
    amax = np.abs(groups).max(axis=2)
    scale = encode(np.where(amax > 0, amax / np.float32(7.5), np.float32(1.0)).astype(np.float32), "BF16")
    widened = (scale.astype(np.uint32) << np.uint32(16)).view(np.float32)
    q = np.clip(np.rint(groups / widened[..., None]), -8, 7).astype(np.int32).reshape(n, k // 8, 8)
    fields = (q + 8).astype(np.uint32) << (np.uint32(4) * np.arange(8, dtype=np.uint32))
    packed = np.bitwise_or.reduce(fields, axis=2).view(np.int32)
    return [packed, scale, np.array([n, k], np.int64)]


def _arrays(values: np.ndarray, storage: str) -> list[np.ndarray]:
    """The arrays of _entries, in the same order."""
    if storage == "F32":
        return [values]
    if storage == "FP8":
        return fp8_blocks(values)
    if storage == "INT4":
        return _int4_groups(values)
    return [encode(values, storage)]


def _shard_plan(tensors: list[list[Entry]], shards: int) -> list[list[list[Entry]]]:
    """Consecutive runs of tensors of about equal bytes (fewer shards when tensors are too few or too large);
    the entries of one logical tensor (a weight and its scales) stay together."""
    sizes = [sum(e[3] for e in entries) for entries in tensors]
    total = sum(sizes)
    plan: list[list[list[Entry]]] = [[] for _ in range(shards)]
    filled = 0
    for entries, size in zip(tensors, sizes):
        plan[min(shards - 1, filled * shards // total)].append(entries)
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


def _build(arch: str, shape: SampleShape, dtype: str) -> tuple[dict, list[TensorSpec]]:
    if arch not in ARCHS:
        raise KtqError(f"unknown sample arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if dtype not in SAMPLE_DTYPES:
        raise KtqError(f"unknown sample dtype {dtype!r}; choose one of {', '.join(SAMPLE_DTYPES)}")
    config, tensors = ARCHS[arch](shape)
    if dtype in ("fp8", "int4") and any(role == "fused" for _, _, role in tensors):
        raise KtqError(f"{arch} stores its experts fused: its samples are bf16 or fp16")
    if dtype == "int4" and (shape.hidden % INT4_GROUP or shape.moe_intermediate % INT4_GROUP):
        raise KtqError(f"--dtype int4 needs --hidden and --moe-intermediate divisible by its group of {INT4_GROUP}")
    if dtype in ("fp8", "int4"):
        config["quantization_config"] = FP8_QUANTIZATION if dtype == "fp8" else INT4_QUANTIZATION
    config["torch_dtype"] = "float16" if dtype == "fp16" else "bfloat16"
    return config, tensors


def write_sample(out: Path, arch: str = "qwen3_moe", layers: int = 2, experts: int = 8, hidden: int = 256,
                 moe_intermediate: int = 256, dense_layers: int = 0, dtype: str = "bf16", seed: int = 0,
                 shards: int = 2, on_tensor: Callable[[int], None] | None = None, header_only: bool = False) -> Path:
    if not 0 <= dense_layers < layers:
        raise KtqError(f"--dense-layers must be between 0 and {layers - 1} (at least one MoE layer)")
    if min(layers, experts, hidden, moe_intermediate, shards) < 1:
        raise KtqError("--layers, --experts, --hidden, --moe-intermediate and --shards must be positive")
    config, tensors = _build(arch, SampleShape(layers, experts, hidden, moe_intermediate, dense_layers), dtype)
    if out.exists() and any(out.iterdir()):
        raise KtqError(f"{out} already exists and is not empty; choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    storages = [_storage(role, dtype) for _, _, role in tensors]
    plan = _shard_plan([_entries(name, shape, storage) for (name, shape, _), storage in zip(tensors, storages)],
                       shards)
    specs = iter(zip(tensors, storages))
    weight_map: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(plan, start=1):
        name = hfformat.shard_name(k, len(plan))
        stored = [entry for entries in shard for entry in entries]
        weight_map.update((entry[0], name) for entry in stored)
        total += sum(entry[3] for entry in stored)
        if header_only:
            _write_sparse_shard(out / name, stored, {"format": "pt"})
            continue
        writer = ShardWriter(out / name, stored, {"format": "pt"})
        for entries in shard:
            (tensor, shape, role), storage = next(specs)
            for entry, array in zip(entries, _arrays(_values(tensor, shape, role, seed), storage)):
                writer.write(entry[0], array)
                if on_tensor:
                    on_tensor(entry[3])
        writer.finish()
    (out / hfformat.INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                             indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 2}, indent=2) + "\n")
    write_tokenizer(out)
    return out


def sample_bytes(arch: str, layers: int, experts: int, hidden: int, moe_intermediate: int, dense_layers: int,
                 dtype: str = "bf16") -> int:
    _, tensors = _build(arch, SampleShape(layers, experts, hidden, moe_intermediate, dense_layers), dtype)
    return sum(entry[3] for name, shape, role in tensors for entry in _entries(name, shape, _storage(role, dtype)))
