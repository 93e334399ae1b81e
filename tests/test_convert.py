"""ktq cpu end to end on samples: input dtypes, key layouts, skipped layers, threads, progress output."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import rewrite_checkpoint, tree_files
from ktq.sample import encode

SAMPLE = ("--layers", "3", "--experts", "4", "--hidden", "256", "--moe-intermediate", "256", "--dense-layers", "1")


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory):
    from ktq.sample import write_sample

    return write_sample(tmp_path_factory.mktemp("sample") / "bf16", layers=3, experts=4, hidden=256,
                        moe_intermediate=256, dense_layers=1, shards=2)


def convert(ktq, src, out, *extra):
    result = ktq("cpu", "-i", src, "-o", out, "--threadpool-count", "2", "--quiet", *extra)
    assert result.code == 0, result.stderr
    return tree_files(out)


def without_manifest(files: dict) -> dict:
    return {k: v for k, v in files.items() if k != "ktq.json"}


def test_merged_output_shape(ktq, sample_dir, tmp_path):
    files = convert(ktq, sample_dir, tmp_path / "out")
    assert {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
            "config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "generation_config.json", "ktq.json"} == set(files)
    manifest = json.loads(files["ktq.json"])
    assert manifest["complete"] and manifest["numa"] == 2 and manifest["moe_layers"] == [1, 2]
    assert {k: r["path"] for k, r in manifest["layers"].items()} == {"1": "model-00001-of-00002.safetensors",
                                                                      "2": "model-00002-of-00002.safetensors"}
    index = json.loads(files["model.safetensors.index.json"])
    assert "blk.1.ffn_down_exps.3.numa.1.scale" in index["weight_map"]
    assert not any(name.startswith("blk.0.") for name in index["weight_map"])  # the dense layer is skipped


def test_fp16_input_equals_its_bf16_rounding(ktq, tmp_path):
    from ktq.sample import write_sample

    fp16 = write_sample(tmp_path / "fp16", layers=2, experts=4, hidden=256, moe_intermediate=256, dtype="fp16")

    def to_bf16(name, bits, dtype):
        return [(name, encode(bits.view(np.float16).astype(np.float32), "BF16"), "BF16")]

    bf16 = rewrite_checkpoint(fp16, tmp_path / "bf16", to_bf16)
    a = convert(ktq, fp16, tmp_path / "a", "--no-merge-safetensor")
    b = convert(ktq, bf16, tmp_path / "b", "--no-merge-safetensor")
    assert without_manifest(a) == without_manifest(b)
    assert json.loads(a["ktq.json"])["input_type"] == "fp16"


def test_vl_wrapper_keys_and_text_config(ktq, sample_dir, tmp_path):
    def rename(name, bits, dtype):
        return [(name.replace("model.layers.", "model.language_model.layers."), bits, dtype)]

    def wrap(config):
        return {"model_type": "qwen3_vl_moe", "architectures": ["Qwen3VLMoeForConditionalGeneration"],
                "text_config": config, "vision_config": {"depth": 2}}

    vl = rewrite_checkpoint(sample_dir, tmp_path / "vl", rename, wrap)
    a = convert(ktq, sample_dir, tmp_path / "a", "--no-merge-safetensor")
    b = convert(ktq, vl, tmp_path / "b", "--no-merge-safetensor")
    assert without_manifest(a) == without_manifest(b)


def test_layers_beyond_num_hidden_layers_are_ignored(ktq, sample_dir, tmp_path):
    """DeepSeek's MTP layer sits at index num_hidden_layers and has experts of its own: not converted."""
    def add_mtp(name, bits, dtype):
        extra = [(name.replace("layers.2.", "layers.3."), bits, dtype)] if name.startswith("model.layers.2.") else []
        return [(name, bits, dtype), *extra]

    mtp = rewrite_checkpoint(sample_dir, tmp_path / "mtp", add_mtp)
    files = convert(ktq, mtp, tmp_path / "out", "--no-merge-safetensor")
    assert sorted({name.split("/")[0] for name in files if name != "ktq.json"}) == ["_layer_1", "_layer_2"]


def test_thread_count_does_not_change_output(ktq, sample_dir, tmp_path):
    one = convert(ktq, sample_dir, tmp_path / "one", "--cpuinfer-threads", "1")
    two = convert(ktq, sample_dir, tmp_path / "two", "--cpuinfer-threads", "2")
    assert without_manifest(one) == without_manifest(two)


def test_plain_progress_lines_and_summary(ktq, sample_dir, tmp_path):
    result = ktq("cpu", "-i", sample_dir, "-o", tmp_path / "out", "--threadpool-count", "1")
    assert result.code == 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("layer 1 done (1/2 layers): 4 experts")
    assert "--kt-method AMXINT4" in result.stdout and "--kt-threadpool-count 1" in result.stdout
    quiet = ktq("cpu", "-i", sample_dir, "-o", tmp_path / "quiet", "--threadpool-count", "1", "--quiet")
    assert quiet.code == 0 and quiet.stderr == "" and quiet.stdout == ""
