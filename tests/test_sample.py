"""ktq sample writes a checkpoint that looks like a real one and is reproducible per seed."""

from __future__ import annotations

import json

from conftest import tree_files
from ktq.cpu.checkpoint import open_checkpoint
from ktq.cpu.experts import find_experts

ARGS = ("--layers", "3", "--experts", "4", "--hidden", "256", "--moe-intermediate", "128", "--dense-layers", "1",
        "--shards", "3")


def test_same_seed_same_bytes_other_seed_other_weights(ktq, tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert ktq("sample", tmp_path / name, *ARGS, "--seed", seed).code == 0
    a, b, c = (tree_files(tmp_path / n) for n in "abc")
    assert a == b
    assert a.keys() == c.keys()
    assert a["model-00001-of-00003.safetensors"] != c["model-00001-of-00003.safetensors"]


def test_layout_config_index_and_tokenizer(ktq, tmp_path):
    out = tmp_path / "s"
    assert ktq("sample", out, *ARGS).code == 0
    ckpt = open_checkpoint(out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ckpt.tensors)
    assert len(ckpt.files) == 3
    assert index["metadata"]["total_size"] == sum(i.nbytes for i in ckpt.tensors.values())
    names = set(ckpt.tensors)
    assert "model.layers.0.mlp.gate_proj.weight" in names  # the dense layer
    assert not any(n.startswith("model.layers.0.mlp.experts") for n in names)
    assert "model.layers.2.mlp.gate.weight" in names and "model.layers.2.self_attn.q_norm.weight" in names
    assert ckpt.tensors["model.layers.1.mlp.experts.3.down_proj.weight"].shape == (256, 128)
    model = find_experts(ckpt)
    assert [layer.index for layer in model.layers] == [1, 2]
    assert model.input_type == "bf16"

    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    ids = tokenizer.encode("<|im_start|>user\nHot experts run on the GPU<|im_end|>").ids
    assert tokenizer.token_to_id("<|im_start|>") in ids
    assert max(ids) < json.loads((out / "config.json").read_text())["vocab_size"]
    assert "<|im_start|>" in (out / "chat_template.jinja").read_text()


def test_transformers_reads_config_and_chat_template(ktq, tmp_path):
    out = tmp_path / "s"
    assert ktq("sample", out, *ARGS).code == 0
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(out)
    assert config.model_type == "qwen3_moe" and config.num_experts == 4 and config.mlp_only_layers == [0]
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_bad_sample_options(ktq, tmp_path):
    result = ktq("sample", tmp_path / "s", "--arch", "nonesuch")
    assert result.code == 2 and "unknown sample arch 'nonesuch'" in result.stderr
    result = ktq("sample", tmp_path / "s", "--layers", "2", "--dense-layers", "2")
    assert result.code == 2 and "--dense-layers" in result.stderr
