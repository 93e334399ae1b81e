"""benchmarks/trained_moe.py end to end on the CPU (issue 25): the corpus from one package's prose, the tiny preset
trained for a fixed number of steps, packed as the device machine returns it and unpacked, read back in the release
key layout, and its FP8 copy converted by `ktq cpu --input-type fp8`. About 40 seconds on 2 cores.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "trained_moe.py"
MiB = 1 << 20


def python(*args: object) -> str:
    run = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True)
    assert run.returncode == 0, f"{' '.join(map(str, args))} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return run.stdout


def lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="module")
def built(tiny_trained_moe) -> Path:
    """The shared tiny model (conftest.tiny_trained_moe), its corpus built again, and its FP8 copy."""
    import networkx

    python(SCRIPT, "corpus", "--out", tiny_trained_moe / "corpus-again", "--site", Path(networkx.__file__).parent)
    python(SCRIPT, "fp8", "--bf16", tiny_trained_moe / "model" / "bf16", "--out", tiny_trained_moe / "model" / "fp8")
    return tiny_trained_moe


def test_corpus_is_reproducible_and_split_by_paragraph(built):
    corpus = built / "corpus"
    for name in ("train.jsonl.gz", "calibration.jsonl", "heldout.jsonl", "corpus.json"):
        assert (corpus / name).read_bytes() == (built / "corpus-again" / name).read_bytes(), name
    splits = {name: lines(corpus / file) for name, file in (("train", "train.jsonl.gz"),
                                                            ("calibration", "calibration.jsonl"),
                                                            ("heldout", "heldout.jsonl"))}
    info = json.loads((corpus / "corpus.json").read_text())
    for name, paragraphs in splits.items():
        assert info["splits"][name]["paragraphs"] == len(paragraphs) == len(set(paragraphs)) > 0
        assert all(len(p) >= 80 for p in paragraphs)
    assert not set(splits["train"]) & set(splits["heldout"])
    assert not set(splits["train"]) & set(splits["calibration"])
    assert not set(splits["calibration"]) & set(splits["heldout"])
    assert len(splits["heldout"]) < 0.06 * len(splits["train"])


def test_returned_files_fit_the_device_channel(built):
    files = sorted((built / "returned").iterdir())
    assert [f.name for f in files] == ["ckpt.tar.00", "curve.json", "train.md"]
    assert all(f.is_file() and f.stat().st_size <= 15 * MiB for f in files)
    summary = json.loads((built / "returned" / "curve.json").read_text())["summary"]
    assert summary["steps"] == 150 and summary["stopped_by"] == "steps"
    assert summary["beats_unigram"]
    assert summary["heldout_perplexity_bf16_checkpoint"] < 0.6 * summary["unigram_perplexity"]


def test_checkpoint_has_the_release_layout(built):
    from transformers import AutoModelForCausalLM

    folder = built / "model" / "bf16"
    config = json.loads((folder / "config.json").read_text())
    assert config["num_experts"] == 8 and config["norm_topk_prob"] and config["torch_dtype"] == "bfloat16"
    names = set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"])
    for layer in range(config["num_hidden_layers"]):
        assert f"model.layers.{layer}.mlp.gate.weight" in names
        for e in range(config["num_experts"]):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight" in names
    assert not any("gate_up_proj" in n or n.endswith("experts.down_proj") or n == "lm_head.weight" for n in names)
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_fp8_copy(built):
    import torch
    from safetensors import safe_open

    bf16, fp8 = built / "model" / "bf16", built / "model" / "fp8"
    config = json.loads((fp8 / "config.json").read_text())
    assert config["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                             "weight_block_size": [128, 128]}
    source = {}
    for file in bf16.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            source.update((name, f.get_tensor(name)) for name in f.keys())
    stored = {}
    for file in fp8.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            stored.update((name, f.get_tensor(name)) for name in f.keys())
    scaled = 0
    for name, weight in source.items():
        is_fp8 = ".self_attn." in name and name.endswith("_proj.weight") or ".experts." in name
        if not is_fp8:  # embeddings, norms, routers: kept as they are
            assert torch.equal(stored[name], weight), name
            continue
        scale = stored[name.removesuffix("weight") + "weight_scale_inv"]
        assert stored[name].dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
        rows, cols = weight.shape
        assert scale.shape == (-(-rows // 128), -(-cols // 128))
        decoded = stored[name].float() * scale.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
        assert (decoded - weight.float()).abs().max() <= weight.float().abs().max() / 16, name
        scaled += 1
    assert scaled == 2 * (4 + 3 * 8)  # 2 layers: q, k, v, o and 8 experts' gate, up, down

    run = subprocess.run([sys.executable, "-m", "ktq", "cpu", "-i", fp8, "-o", built / "amx", "--quant-method", "int4",
                          "--input-type", "fp8", "--threadpool-count", "1", "--quiet"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert (built / "amx" / "ktq.json").is_file()
