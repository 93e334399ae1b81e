"""The checkpoint facts both pipelines read from config.json (ktq.hfformat), and that ktq cpu and ktq gpu agree."""

from __future__ import annotations

import json

import pytest

from ktq import hfformat
from ktq.cpu.checkpoint import open_checkpoint
from ktq.cpu.experts import find_experts, moe_layer_indices
from ktq.gpu.layout import MoeLayout
from ktq.sample import ARCHS, write_sample

# ktq sample refuses dense layers for the architectures that have none
DENSE_LAYERS = {"qwen3_moe": 1, "deepseek_v3": 1, "qwen3_vl_moe": 1}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_cpu_and_gpu_agree_on_the_moe_layers_of_every_sample(arch, tmp_path):
    path = write_sample(tmp_path / arch, arch=arch, layers=4, experts=4, hidden=128, moe_intermediate=128,
                        dense_layers=DENSE_LAYERS.get(arch, 0), header_only=True)
    cpu = tuple(layer.index for layer in find_experts(open_checkpoint(path)).layers)
    gpu = MoeLayout.from_config(json.loads((path / "config.json").read_text())).moe_layers
    assert cpu == gpu == tuple(range(DENSE_LAYERS.get(arch, 0), 4))


def test_moe_layer_freq_follows_deepseek_s_modeling_code():
    """DeepSeek's modeling code (and SGLang's, which serves it): `i >= first_k_dense_replace and i % moe_layer_freq
    == 0`. transformers' native DeepseekV3 class ignores the key, which released configs set to 1."""
    config = {"num_hidden_layers": 8, "first_k_dense_replace": 1, "moe_layer_freq": 2}
    assert moe_layer_indices(config) == [2, 4, 6]
    assert MoeLayout.from_config({**config, "n_routed_experts": 4}).moe_layers == (2, 4, 6)


@pytest.mark.parametrize("config, moe", [
    ({"num_hidden_layers": 4}, (0, 1, 2, 3)),
    ({"num_hidden_layers": 4, "mlp_only_layers": [0, 2]}, (1, 3)),
    ({"num_hidden_layers": 4, "decoder_sparse_step": 2}, (1, 3)),
    ({"num_hidden_layers": 4, "decoder_sparse_step": 2, "mlp_only_layers": [1]}, (3,)),
    ({"num_hidden_layers": 6, "first_k_dense_replace": 3}, (3, 4, 5)),
    ({"num_hidden_layers": 6, "moe_layer_freq": 3}, (0, 3)),  # applied without first_k_dense_replace too
    ({"num_hidden_layers": 3, "mlp_layer_types": ["dense", "sparse", "sparse"]}, (1, 2)),
    ({"num_hidden_layers": 4, "num_dense_layers": 2}, (2, 3)),  # AFMoE, LFM2-MoE
    # ERNIE-4.5-MoE: start <= layer <= end and (layer + 1) % interval == 0; an end of -1 is the last layer
    ({"num_hidden_layers": 6, "moe_layer_start_index": 1, "moe_layer_end_index": 4, "moe_layer_interval": 2},
     (1, 3)),
    ({"num_hidden_layers": 4, "moe_layer_start_index": 1, "moe_layer_end_index": -1, "moe_layer_interval": 1},
     (1, 2, 3)),
    ({"num_hidden_layers": 8, "expert_layer_period": 2}, (1, 3, 5, 7)),  # Jamba: layer % period == offset (1)
    ({"num_hidden_layers": 8, "expert_layer_period": 4, "expert_layer_offset": 2}, (2, 6)),
    ({"num_hidden_layers": 4, "first_k_dense_replace": None, "mlp_only_layers": None}, (0, 1, 2, 3)),
    ({"num_hidden_layers": 0}, ()),
    ({}, ()),
])
def test_moe_layers(config, moe):
    assert hfformat.moe_layers(config) == moe
    assert hfformat.dense_layers(config) == tuple(i for i in range(config.get("num_hidden_layers") or 0)
                                                  if i not in moe)


def test_mtp_layers_are_not_moe_layers():
    """DeepSeek-V3's MTP layer is decoder layer num_hidden_layers: beyond the model both pipelines convert."""
    assert hfformat.moe_layers({"num_hidden_layers": 4, "num_nextn_predict_layers": 1}) == (0, 1, 2, 3)


def test_text_config_is_found_under_each_wrapper_key():
    text = {"num_hidden_layers": 2, "num_experts": 4}
    for key in hfformat.TEXT_CONFIG_KEYS:
        assert hfformat.text_config({"model_type": "vl", key: text}) is text
    assert hfformat.text_config({"thinker_config": {"text_config": text, "num_hidden_layers": 9}}) is text
    no_layers = {"text_config": {"vocab_size": 10}, "num_hidden_layers": 2}
    assert hfformat.text_config(no_layers) is no_layers


@pytest.mark.parametrize("key", hfformat.EXPERT_COUNT_KEYS)
def test_expert_count_keys(key):
    assert hfformat.expert_count({key: 8}) == 8
    assert hfformat.expert_count({key: 0}) == 0
    assert hfformat.expert_count({key: True}) == 0


def test_shard_names():
    assert hfformat.shard_name(3, 12) == "model-00003-of-00012.safetensors"
    assert hfformat.INDEX_NAME == "model.safetensors.index.json"


@pytest.mark.parametrize("config, needle", [
    ({"model_type": "gpt_oss"}, "interleave gate and up"),
    ({"model_type": "llama4", "text_config": {"model_type": "llama4_text", "num_hidden_layers": 2}},
     "model_type 'llama4_text': its router scales each expert's input"),
    ({"model_type": "dbrx"}, "does not read DBRX's experts"),
    ({"model_type": "new_moe", "hidden_act": "gelu"}, "model_type 'new_moe': its experts use hidden_act 'gelu'"),
    ({"model_type": "nemotron_h", "mlp_hidden_act": "relu2"}, "no gate projection"),
])
def test_refusals_name_the_family_and_the_reason(config, needle):
    assert needle in hfformat.refusal(config)


@pytest.mark.parametrize("config", [{"model_type": "qwen3_moe", "hidden_act": "silu"},
                                    {"model_type": "mixtral", "hidden_act": "swish"}, {}])
def test_silu_families_are_not_refused(config):
    assert hfformat.refusal(config) is None
