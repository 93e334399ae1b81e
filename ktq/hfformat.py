"""What a Hugging Face checkpoint says about itself, read the same way by `ktq cpu` and `ktq gpu`.

Pure Python over config.json's dict and file names (no torch, no numpy): where a multimodal config keeps the
language model's part, which key gives the routed-expert count, which families neither pipeline converts and why
(`refusal`), which decoder layers hold routed experts, what an expert's projections are called, and the names of
the safetensors index and shards.

Which layers hold experts is decided by per-key rules (MOE_LAYER_RULES): a decoder layer holds routed experts when
every rule whose key the config sets allows it. Each rule is the condition of the modeling code that gives the key
its meaning, so supporting a new family's key is one more entry there.

Values are checked before either pipeline uses them (checked_text_config, count): a key set to a value of the
wrong type or range is an error that names the key and the value, never read as unset or replaced by another key.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from ktq.errors import KtqError

INDEX_NAME = "model.safetensors.index.json"

# Where multimodal configs keep the language model's config, in the order they are tried.
TEXT_CONFIG_KEYS = ("text_config", "language_config", "llm_config", "thinker_config")

# Config keys that hold the number of routed experts, by family: DeepSeek-V2/V3, Kimi-K2 and GLM-4.5
# (n_routed_experts); Qwen-MoE (num_experts); Mixtral, MiniMax and transformers 5's Qwen3-VL-MoE
# (num_local_experts); DBRX and Step (moe_num_experts). The first one set to a positive count wins.
EXPERT_COUNT_KEYS = ("n_routed_experts", "num_experts", "num_local_experts", "moe_num_experts")

# How a checkpoint may store its expert weights (--input-type), and what each kind is
INPUT_TYPES = {
    "bf16": "BF16",
    "fp16": "F16",
    "fp8": "F8_E4M3 with weight_scale_inv (block-scaled FP8)",
    "int4": "compressed-tensors pack-quantized INT4 (weight_packed + weight_scale)",
}

# The names of one expert's gate, up and down projections (in that order: ktq.kernels.ktformat.PROJECTIONS), by
# naming: `experts.E.gate_proj` (most families, and llm-compressor's per-expert names for fused sources), and
# `experts.E.w1` / `w3` / `w2` (Mixtral, MiniMax, LFM2-MoE, and the names SGLang's GraniteMoe loader splits
# Granite-MoE's fused input_linear into).
EXPERT_PROJECTION_NAMES = {
    "proj": ("gate_proj", "up_proj", "down_proj"),
    "w": ("w1", "w3", "w2"),
}


def shard_name(index: int, count: int) -> str:
    """The name of shard `index` (1-based) of `count`, as transformers' save_pretrained writes it."""
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def text_config(config: dict) -> dict:
    """The language model's part of a (possibly multimodal, possibly nested) config; the config itself when it has
    none. A nested config counts only when it describes decoder layers (has num_hidden_layers)."""
    for key in TEXT_CONFIG_KEYS:
        nested = config.get(key)
        if isinstance(nested, dict) and "num_hidden_layers" in nested:
            return text_config(nested)
    return config


def shown(value: object) -> str:
    """A config value as JSON (true, not True; NaN as NaN), cut short: a hostile one may be huge."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def count(text: dict, *keys: str) -> int | None:
    """The value of the first of keys that text sets, which must be a positive integer; None when none is set (a
    null is unset, as in Hugging Face configs). A key set to anything else is an error that names it and its value:
    taking the next key instead would convert the model as another one (a negative moe_intermediate_size is not
    intermediate_size)."""
    for key in keys:
        value = text.get(key)
        if value is not None:
            if not _positive_int(value):
                raise KtqError(f"config.json: {key} is {shown(value)}, not an integer of at least 1")
            return value
    return None


def expert_count(text: dict) -> int:
    """Routed experts per MoE layer (the first of EXPERT_COUNT_KEYS set to a positive int), 0 when none is set."""
    return next((text[key] for key in EXPERT_COUNT_KEYS if _positive_int(text.get(key))), 0)


# --- architectures neither pipeline converts ---------------------------------------------------------------------
# kt-kernel's AMX experts compute down(SiLU(gate x) * up x) per expert, without biases, and weight each expert's
# output by its routing weight. These families' experts (as transformers 5.17's modeling code computes them) do
# something else, so `ktq cpu` and `ktq gpu` both refuse them up front rather than write weights that would serve
# another model. Keyed by model_type, the language model's or the wrapper's.
_CLAMPED_SWIGLU = "its experts clamp the SwiGLU (gate <= swiglu_limit, |up| <= swiglu_limit)"
_WEIGHTED_INPUT = ("its router scales each expert's input by the routing weight (routed_in = hidden * score), not the "
                   "expert's output")
REFUSED: dict[str, str] = {
    "gpt_oss": "its experts add biases (gate_up_proj_bias, down_proj_bias), interleave gate and up along "
               "gate_up_proj's last axis and compute (clamp(up) + 1) * g * sigmoid(1.702 g) with g = clamp(gate)",
    "deepseek_v4": _CLAMPED_SWIGLU,
    "hy_v4": _CLAMPED_SWIGLU,
    "minimax_m3_vl": _CLAMPED_SWIGLU + " and compute (up + 1) * gate * sigmoid(swiglu_alpha * gate)",
    "minimax_m3_vl_text": _CLAMPED_SWIGLU + " and compute (up + 1) * gate * sigmoid(swiglu_alpha * gate)",
    "nemotron_h": "its experts have no gate projection: they compute down(ReLU(up x)^2)",
    "llama4": _WEIGHTED_INPUT,
    "llama4_text": _WEIGHTED_INPUT,
    "jetmoe": "its attention is itself a mixture of experts (self_attention.experts) and its MoE adds a bias to "
              "the experts' sum",
    "doge": "its routed experts are rows of two embedding tables (up_embed, down_embed: one vector per expert), not "
            "gate / up / down matrices",
    "longcat_flash": "its router also picks zero-computation (identity) experts, zero_expert_num of them, beside the "
                     "routed ones",
}
KT_KERNEL_EXPERTS = "kt-kernel's experts compute down(SiLU(gate x) * up x) without biases, weighted by the router"
# Families kt-kernel could serve whose experts ktq does not read (yet).
_ARIA = ("ktq does not read Aria's experts (mlp.experts.fc1 / fc2, a module that routes the tokens itself from the "
         "router's logits)")
UNREAD: dict[str, str] = {
    "dbrx": "ktq does not read DBRX's experts (ffn.experts.mlp.{w1,v1,w2}, each [E x I, H])",
    "aria": _ARIA,
    "aria_text": _ARIA,
}
# The config keys that name the experts' activation, by family (hidden_activation: Gemma; mlp_hidden_act:
# Nemotron-H; activation_function: JetMoE); kt-kernel computes SiLU, which transformers also calls swish.
ACTIVATION_KEYS = ("hidden_act", "hidden_activation", "mlp_hidden_act", "activation_function")
SILU = ("silu", "swish")


def refusal(config: dict) -> str | None:
    """Why neither pipeline converts this checkpoint (REFUSED, UNREAD, or an activation other than SiLU), in words
    that name the model_type; None when nothing is known against it."""
    text = text_config(config)
    kinds = [k for k in (text.get("model_type"), config.get("model_type")) if isinstance(k, str)]
    for kind in kinds:
        if kind in REFUSED:
            return f"model_type {kind!r}: {REFUSED[kind]}; {KT_KERNEL_EXPERTS}"
        if kind in UNREAD:
            return f"model_type {kind!r}: {UNREAD[kind]}"
    for key in ACTIVATION_KEYS:
        act = text.get(key)
        if isinstance(act, str) and act not in SILU:
            return f"model_type {(kinds or ['unknown'])[0]!r}: its experts use {key} {act!r}; {KT_KERNEL_EXPERTS}"
    return None


def num_layers(text: dict) -> int:
    """The decoder layers of the model proper, 0 when num_hidden_layers is missing or invalid."""
    count = text.get("num_hidden_layers")
    return count if _positive_int(count) else 0


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# --- which decoder layers hold routed experts ---------------------------------------------------------------------
# Each rule: (the key's value, a decoder layer index, the whole text config) -> whether the key lets that layer hold
# routed experts. A value the rule cannot use (the wrong type, a step of 0) allows every layer, as the key's absence
# would; both pipelines read configs through checked_text_config, which refuses such values first (RULE_VALUES). The
# config is there for the keys whose meaning depends on a companion key (Jamba's period and offset).

def _not_listed(dense: object, layer: int, text: dict) -> bool:
    """Qwen2/3-MoE, Qwen3-Next: `layer_idx not in config.mlp_only_layers` (transformers' Qwen*DecoderLayer)."""
    return not isinstance(dense, list) or layer not in dense


def _every_step(step: object, layer: int, text: dict) -> bool:
    """Qwen2/3-MoE, Qwen3-Next: `(layer_idx + 1) % config.decoder_sparse_step == 0`."""
    return not _positive_int(step) or (layer + 1) % step == 0


def _after_first_k(first_k: object, layer: int, text: dict) -> bool:
    """DeepSeek-V2/V3, Kimi-K2, GLM-4.5, dots1: `layer_idx >= config.first_k_dense_replace`; AFMoE and LFM2-MoE say
    the same with `num_dense_layers`; ERNIE-4.5 with `moe_layer_start_index`."""
    return not isinstance(first_k, int) or layer >= first_k


def _every_freq(freq: object, layer: int, text: dict) -> bool:
    """DeepSeek-V2/V3, Kimi-K2 (and the SGLang / vLLM models KTransformers serves them with):
    `layer_idx % config.moe_layer_freq == 0`, beside the first_k_dense_replace rule.

    transformers' own DeepseekV2/V3 classes do not read the key (every released config sets 1, where the rule
    allows every layer), so with another value they would build a model other than the one the checkpoint was
    trained and saved as; the checkpoint's own modeling code, and the engines that serve it, honour it."""
    return not _positive_int(freq) or layer % freq == 0


def _typed_sparse(types: object, layer: int, text: dict) -> bool:
    """GLM-4.7-Flash (glm4_moe_lite), HunYuan-V3, Kimi-Linear, Step-3.7, MiMo-V2-Flash, Laguna, Mellum, EXAONE-MoE,
    Cohere2-MoE: `config.mlp_layer_types[layer_idx] == "sparse"` (one entry per decoder layer, "dense" for the
    others)."""
    return not isinstance(types, list) or layer >= len(types) or types[layer] == "sparse"


def _up_to_end(end: object, layer: int, text: dict) -> bool:
    """ERNIE-4.5-MoE: `layer_idx <= config.moe_layer_end_index`, where -1 (the default) means the last layer."""
    return not isinstance(end, int) or end < 0 or layer <= end


def _on_period(period: object, layer: int, text: dict) -> bool:
    """Jamba: `layer_idx % config.expert_layer_period == config.expert_layer_offset` (the offset defaults to 1)."""
    offset = text.get("expert_layer_offset", 1)
    return not _positive_int(period) or not isinstance(offset, int) or layer % period == offset


MOE_LAYER_RULES: dict[str, Callable[[object, int, dict], bool]] = {
    "mlp_only_layers": _not_listed,
    "decoder_sparse_step": _every_step,
    "first_k_dense_replace": _after_first_k,
    "num_dense_layers": _after_first_k,
    "moe_layer_start_index": _after_first_k,
    "moe_layer_end_index": _up_to_end,
    "moe_layer_interval": _every_step,  # ERNIE-4.5-MoE: `(layer_idx + 1) % config.moe_layer_interval == 0`
    "moe_layer_freq": _every_freq,
    "mlp_layer_types": _typed_sparse,
    "expert_layer_period": _on_period,
}


def _layer_index(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# What the key of each rule must hold when set, and how to say it
RULE_VALUES: dict[str, tuple[Callable[[object], bool], str]] = {
    "mlp_only_layers": (lambda v: isinstance(v, list) and all(map(_layer_index, v)), "a list of layer indices"),
    "decoder_sparse_step": (_positive_int, "an integer of at least 1"),
    "first_k_dense_replace": (_layer_index, "an integer of at least 0"),
    "moe_layer_freq": (_positive_int, "an integer of at least 1"),
    "mlp_layer_types": (lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v),
                        "a list of layer types (\"dense\", \"sparse\")"),
    "num_dense_layers": (_layer_index, "an integer of at least 0"),
    "moe_layer_start_index": (_layer_index, "an integer of at least 0"),
    "moe_layer_end_index": (lambda v: _layer_index(v) or (isinstance(v, int) and v == -1),
                            "a layer index or -1 (the last layer)"),
    "moe_layer_interval": (_positive_int, "an integer of at least 1"),
    "expert_layer_period": (_positive_int, "an integer of at least 1"),
    "expert_layer_offset": (_layer_index, "an integer of at least 0"),
}


def checked_text_config(config: dict) -> dict:
    """text_config(config), refusing a wrapper key (text_config, ...) that holds something other than an object and
    a rule key (RULE_VALUES) of the wrong type or range, with an error that names the key and its value: read as
    unset, such a value would make every layer a MoE layer."""
    for key in TEXT_CONFIG_KEYS:
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise KtqError(f"config.json: {key} is {shown(config[key])}, not an object")
    text = text_config(config)
    for key, (usable, what) in RULE_VALUES.items():
        if text.get(key) is not None and not usable(text[key]):
            raise KtqError(f"config.json: {key} is {shown(text[key])}, not {what}")
    return text


def moe_layers(text: dict) -> tuple[int, ...]:
    """The decoder layers that hold routed experts, ascending.

    Only layers below num_hidden_layers count: DeepSeek-V3's multi-token-prediction layers (num_nextn_predict_layers
    of them, at index num_hidden_layers and up) hold experts too, but they are no part of the model the modeling
    code builds (transformers drops their weights on load) and KTransformers does not serve them from kt-kernel,
    so neither pipeline converts them."""
    rules = [(rule, text[key]) for key, rule in MOE_LAYER_RULES.items() if text.get(key) is not None]
    return tuple(layer for layer in range(num_layers(text))
                 if all(rule(value, layer, text) for rule, value in rules))


def dense_layers(text: dict) -> tuple[int, ...]:
    """The decoder layers below num_hidden_layers whose MLP is dense: the complement of moe_layers."""
    moe = set(moe_layers(text))
    return tuple(layer for layer in range(num_layers(text)) if layer not in moe)
