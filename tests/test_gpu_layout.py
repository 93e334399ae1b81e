"""What `ktq gpu` quantises and what it keeps: the rules from config.json, checked on real module names."""

from __future__ import annotations

import pytest

import gpu_models  # noqa: F401  (sets HF_HUB_OFFLINE before transformers loads)
from ktq.errors import KtqError
from ktq.gpu.layout import MoeLayout, dense_layer_rule, ignore_reason, ignore_rules
from ktq.serving import match_target


def qwen3(**extra) -> dict:
    return {"model_type": "qwen3_moe", "num_hidden_layers": 4, "num_experts": 8, **extra}


@pytest.mark.parametrize("config, dense", [
    (qwen3(), ()),
    (qwen3(mlp_only_layers=[0, 2]), (0, 2)),
    (qwen3(decoder_sparse_step=2), (0, 2)),  # MoE where (i + 1) % 2 == 0
    ({"model_type": "deepseek_v3", "num_hidden_layers": 14, "n_routed_experts": 256, "first_k_dense_replace": 11},
     tuple(range(11))),
    ({"model_type": "x", "num_hidden_layers": 8, "n_routed_experts": 4, "first_k_dense_replace": 2,
      "moe_layer_freq": 2}, (0, 1, 3, 5, 7)),
    # transformers 5 writes num_local_experts; multimodal configs nest the language model
    ({"model_type": "qwen3_vl_moe", "text_config": qwen3(num_local_experts=8, mlp_only_layers=[1])}, (1,)),
])
def test_dense_layers_follow_each_family_convention(config, dense):
    layout = MoeLayout.from_config(config)
    assert layout.dense_layers == dense
    assert layout.moe_layers == tuple(i for i in range(layout.num_layers) if i not in dense)


def test_a_dense_model_is_refused():
    with pytest.raises(KtqError, match="dense model .*qwen3.* Mixture-of-Experts"):
        MoeLayout.from_config({"model_type": "qwen3", "num_hidden_layers": 4, "hidden_size": 64})


def test_dense_rule_is_exact_past_nine_layers():
    """The reference built `layers\\.[0-10]`, a character class that ignores layers 0 and 1 only."""
    rule = dense_layer_rule(range(11))
    for layer in range(11):
        assert rule.matches(f"model.layers.{layer}.mlp.down_proj")
    for layer in (11, 12, 100, 110):
        assert not rule.matches(f"model.layers.{layer}.mlp.down_proj")
    assert not dense_layer_rule([1]).matches("model.layers.10.mlp.gate_proj")
    assert not dense_layer_rule([1]).matches("model.layers.1.self_attn.q_proj")  # attention has its own rule
    assert dense_layer_rule([]) is None


@pytest.mark.parametrize("name, reason", [
    ("lm_head", "lm_head"),
    ("model.layers.3.mlp.gate", "router"),
    ("model.layers.3.mlp.shared_expert_gate", "router"),
    ("model.layers.3.self_attn.q_proj", "attention"),
    ("model.layers.3.linear_attn.in_proj_qkvz", "attention"),
    ("model.layers.3.mlp.shared_experts.down_proj", "shared expert"),
    ("model.layers.3.mlp.shared_expert.up_proj", "shared expert"),
    ("model.layers.0.mlp.gate_proj", "dense MLP layer"),
    ("model.language_model.layers.0.mlp.up_proj", "dense MLP layer"),
    ("model.language_model.layers.3.mlp.gate", "router"),
    ("model.visual.blocks.0.mlp.linear_fc1", "vision/audio tower"),
    ("model.layers.3.mlp.experts.7.gate_proj", None),  # `mlp.gate` must not swallow `gate_proj`
    ("model.layers.3.mlp.experts.7.down_proj", None),
    ("model.language_model.layers.10.mlp.experts.0.up_proj", None),  # layer 10 is not dense layer 1 or 0
])
def test_default_rules_classify_names(name, reason):
    layout = MoeLayout("qwen3_moe", num_layers=12, num_experts=8, dense_layers=(0, 1))
    assert ignore_reason(ignore_rules(layout), name) == reason


def test_user_patterns_come_after_the_defaults():
    layout = MoeLayout("qwen3_moe", 4, 8, ())
    rules = ignore_rules(layout, ["re:.*experts\\.0\\..*", "model.layers.2.mlp.experts.1.up_proj"])
    assert ignore_reason(rules, "model.layers.2.mlp.experts.0.gate_proj") == "--ignore_patterns"
    assert ignore_reason(rules, "model.layers.2.mlp.experts.1.up_proj") == "--ignore_patterns"
    assert ignore_reason(rules, "model.layers.2.mlp.experts.1.down_proj") is None


def test_matching_agrees_with_compressed_tensors():
    """ktq's classifier must predict exactly what llm-compressor will skip."""
    from compressed_tensors.utils.match import match_name

    layout = MoeLayout("qwen3_moe", 12, 8, (0, 1, 10))
    patterns = [r.pattern for r in ignore_rules(layout, ["model.layers.5.mlp.experts.2.up_proj"])]
    names = [f"{p}layers.{i}.{m}" for p in ("model.", "model.language_model.", "")
             for i in (0, 1, 2, 10, 11) for m in ("mlp.gate", "mlp.gate_proj", "mlp.experts.2.up_proj",
                                                  "self_attn.o_proj", "mlp.shared_expert_gate")]
    names += ["lm_head", "model.layers.5.mlp.experts.2.up_proj", "model.visual.merger.linear_fc2"]
    for name in names:
        for pattern in patterns:
            assert match_target(pattern, name) == match_name(name, pattern), (pattern, name)


def _reasons_of(config) -> dict[str, str | None]:
    from ktq.gpu.model import linear_reasons, meta_model
    from ktq.hfformat import text_config

    layout = MoeLayout.from_config(config.to_dict())
    return linear_reasons(meta_model(config, "bfloat16", False), text_config(config.to_dict()), ignore_rules(layout))


def test_real_module_names_with_language_model_prefix():
    """qwen3_vl_moe as transformers builds it: text layers under model.language_model., a vision tower beside."""
    from transformers import Qwen3VLMoeConfig

    config = Qwen3VLMoeConfig(
        text_config={"num_hidden_layers": 12, "hidden_size": 128, "intermediate_size": 256,
                     "moe_intermediate_size": 128, "num_experts": 4, "num_experts_per_tok": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 512,
                     "mlp_only_layers": [1], "decoder_sparse_step": 1},
        vision_config={"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2,
                       "out_hidden_size": 128, "deepstack_visual_indexes": [1]})
    reasons = _reasons_of(config)
    quantized = {name for name, reason in reasons.items() if reason is None}
    expected = {f"model.language_model.layers.{layer}.mlp.experts.{e}.{proj}"
                for layer in range(12) if layer != 1 for e in range(4)
                for proj in ("gate_proj", "up_proj", "down_proj")}
    assert quantized == expected
    assert {"dense MLP layer", "attention", "vision/audio tower", "lm_head"} <= set(reasons.values())
    dense = {name for name, reason in reasons.items() if reason == "dense MLP layer"}
    assert dense == {f"model.language_model.layers.1.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}


def test_real_module_names_of_deepseek_with_eleven_dense_layers():
    """MLA attention, shared experts and first_k_dense_replace=11: only layer 11's routed experts are quantised."""
    from transformers import DeepseekV3Config

    config = DeepseekV3Config(vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
                              num_hidden_layers=12, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
                              n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=11, n_group=1,
                              topk_group=1, q_lora_rank=64, kv_lora_rank=32, qk_rope_head_dim=16,
                              qk_nope_head_dim=16, v_head_dim=32)
    by_reason: dict[str | None, set[str]] = {}
    for name, reason in _reasons_of(config).items():
        by_reason.setdefault(reason, set()).add(name)
    assert by_reason[None] == {
        f"model.layers.11.mlp.experts.{e}.{p}" for e in range(8) for p in ("gate_proj", "up_proj", "down_proj")}
    assert len(by_reason["dense MLP layer"]) == 11 * 3
    assert "model.layers.11.self_attn.kv_a_proj_with_mqa" in by_reason["attention"]
    assert by_reason["shared expert"] == {f"model.layers.11.mlp.shared_experts.{p}"
                                          for p in ("gate_proj", "up_proj", "down_proj")}
