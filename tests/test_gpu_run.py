"""`ktq gpu` end to end on CPU: the checkpoint it writes, what transformers makes of it, and the report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import mtimes
from gpu_models import chat_rows, deepseek_moe, report, run_ktq, run_ktq_capture, sample_moe, tensors, write_jsonl
from ktq.safetensors_io import TensorReader

EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")
MOE_LAYERS = (1, 2)  # the sample has 3 layers, layer 0 dense
EXPERTS = 8
EXPERT_LINEARS = {f"model.layers.{layer}.mlp.experts.{e}.{p}" for layer in MOE_LAYERS for e in range(EXPERTS)
                  for p in EXPERT_PROJS}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gpu_run")


@pytest.fixture(scope="module")
def src(work) -> Path:
    return sample_moe(work / "src", layers=3, dense_layers=1, experts=EXPERTS)


@pytest.fixture(scope="module")
def chat(work) -> Path:
    return write_jsonl(work / "chat.jsonl", chat_rows(32))


def quantize(src: Path, out: Path, dataset: Path, *extra: object) -> Path:
    code = run_ktq("gpu", "--model_id", src, "--output_dir", out, "--dataset", dataset,
                   "--num_calibration_samples", 16, "--max_sequence_length", 64, "--quiet", *extra)
    assert code == 0
    return out


@pytest.fixture(scope="module")
def gptq_w8(src, chat, work) -> Path:
    return quantize(src, work / "gptq-w8", chat, "--quant_method", "GPTQ", "--quant_type", "W8A16")


@pytest.fixture(scope="module")
def rtn_w4(src, chat, work) -> Path:
    return quantize(src, work / "rtn-w4", chat, "--quant-method", "RTN", "--quant-type", "W4A16")


@pytest.mark.parametrize("scheme, bits", [("gptq_w8", 8), ("rtn_w4", 4)])
def test_quantization_config(scheme, bits, request, src):
    out = request.getfixturevalue(scheme)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed"
    (group,) = qc["config_groups"].values()
    assert group["weights"] | {"observer": None, "observer_kwargs": None} == group["weights"] | {
        "num_bits": bits, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32, "dynamic": False,
        "observer": None, "observer_kwargs": None, "actorder": None}  # no g_idx written, GPTQ or not
    assert group["input_activations"] is None and group["format"] == "pack-quantized"
    ignored = set(qc["ignore"])
    attention = {f"model.layers.{i}.self_attn.{p}" for i in range(3) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    dense = {f"model.layers.0.mlp.{p}" for p in EXPERT_PROJS}
    assert attention | dense | {"lm_head"} <= ignored
    assert not ignored & EXPERT_LINEARS


@pytest.mark.parametrize("scheme, bits", [("gptq_w8", 8), ("rtn_w4", 4)])
def test_experts_packed_everything_else_bit_identical(scheme, bits, request, src):
    out = request.getfixturevalue(scheme)
    written, source = tensors(out), tensors(src)
    for name in EXPERT_LINEARS:
        assert f"{name}.weight" not in written
        assert written[f"{name}.weight_packed"].shape == (128, 128 * bits // 32)  # int32 words of 32/bits values
        assert written[f"{name}.weight_scale"].shape == (128, 4)  # one scale per row and group of 32
        assert written[f"{name}.weight_shape"].shape == (2,)
    kept = [name for name in source if ".experts." not in name]
    assert any(".mlp.gate." in n for n in kept) and any("layers.0.mlp.down_proj" in n for n in kept)
    with TensorReader() as a, TensorReader() as b:
        for name in kept:
            assert written[name].dtype == source[name].dtype == "BF16"
            assert a.read(written[name]).tobytes() == b.read(source[name]).tobytes(), name


def _load(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info  # nothing left randomly initialised
    return model


def relative_error(a, b) -> float:
    return ((a.float() - b.float()).norm() / a.float().norm()).item()


@pytest.mark.parametrize("scheme, min_cosine, max_error", [("gptq_w8", 0.99, 0.02), ("rtn_w4", 0.95, 0.2)])
def test_transformers_loads_the_output_offline_and_logits_stay_close(scheme, min_cosine, max_error, request, src):
    import torch
    from transformers import AutoTokenizer

    out = request.getfixturevalue(scheme)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(["experts route tokens to a few of many, the quick brown fox"], return_tensors="pt").input_ids
    original, quantized = _load(src), _load(out)
    with torch.no_grad():
        reference, logits = original(ids).logits.flatten(), quantized(ids).logits.flatten()
    assert torch.nn.functional.cosine_similarity(reference.float(), logits.float(), dim=0).item() > min_cosine
    # the experts read back are the originals up to quantisation error (not equal, not random); attention is exact
    for layer in MOE_LAYERS:
        for fused in ("gate_up_proj", "down_proj"):
            a = getattr(original.model.layers[layer].mlp.experts, fused)
            b = getattr(quantized.model.layers[layer].mlp.experts, fused)
            assert 0 < relative_error(a, b) < max_error
    attention = original.model.layers[1].self_attn.q_proj.weight, quantized.model.layers[1].self_attn.q_proj.weight
    assert torch.equal(*attention)


def test_report_of_a_gptq_run(gptq_w8):
    rep = report(gptq_w8)
    assert list(rep["stages"]) == ["plan", "load", "dataset", "quantize", "save"]
    assert rep["quantized_modules"] == len(EXPERT_LINEARS) == 48
    assert rep["ignored_modules"] == {"attention": 12, "dense MLP layer": 3, "lm_head": 1}
    assert set(rep["gptq_loss"]) == EXPERT_LINEARS
    assert all(loss >= 0 for loss in rep["gptq_loss"].values()) and max(rep["gptq_loss"].values()) > 0
    assert rep["calibration_samples"] == 16 and 0 < rep["calibration_tokens"] <= 16 * 64
    routed = rep["routed_tokens"]
    assert set(routed) == {f"model.layers.{layer}.mlp.experts" for layer in MOE_LAYERS}
    for counts in routed.values():
        assert len(counts) == EXPERTS and sum(counts) == 2 * rep["calibration_tokens"]  # top-2 routing
    assert rep["unrouted_experts"] == {k: [e for e, n in enumerate(c) if n == 0] for k, c in routed.items()
                                       if 0 in c}
    assert rep["plan"]["quantized_linears"] == 48 and rep["plan"]["device"] == "cpu"
    assert (gptq_w8 / "ktq_gpu.log").stat().st_size > 0


def test_tokenizer_files_copied_byte_for_byte(gptq_w8, src):
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (gptq_w8 / name).read_bytes() == (src / name).read_bytes()


def test_rtn_needs_no_calibration(rtn_w4):
    rep = report(rtn_w4)
    assert list(rep["stages"]) == ["plan", "load", "quantize", "save"]
    assert rep["gptq_loss"] == {} and rep["routed_tokens"] == {} and rep["calibration_samples"] == 0
    assert rep["quantized_modules"] == 48


def test_experts_without_routed_tokens_are_reported_and_still_quantized(src, work, ktq):
    """One sample of two tokens reaches at most 4 of 8 experts per layer; every expert is still calibrated (all
    tokens go through all experts), so every one has a GPTQ loss. The run is not quiet: the plan, progress and
    summary go to stderr, nothing to stdout."""
    one = write_jsonl(work / "one.jsonl", chat_rows(1))
    out = work / "unrouted"
    result = ktq("gpu", "--model_id", src, "--output_dir", out, "--dataset", one, "--num_calibration_samples", 1,
                 "--max_sequence_length", 2, "--quant_type", "W4A16")
    assert result.code == 0, result.stderr
    rep = report(out)
    assert rep["calibration_tokens"] == 2
    for layer in MOE_LAYERS:
        counts = rep["routed_tokens"][f"model.layers.{layer}.mlp.experts"]
        assert sum(counts) == 4
        assert len(rep["unrouted_experts"][f"model.layers.{layer}.mlp.experts"]) >= EXPERTS - 4
    assert set(rep["gptq_loss"]) == EXPERT_LINEARS
    assert result.stdout == ""
    unrouted = sum(len(v) for v in rep["unrouted_experts"].values())
    for text in ("ktq gpu plan", "Hessians", "layer 2 done (3/3 layers)",
                 f"routing: {unrouted} of 16 experts got no routed calibration token", f"wrote {out}"):
        assert text in result.stderr


def test_trust_remote_code_reaches_config_tokenizer_and_model(src, chat, work, monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    seen: dict[str, object] = {}

    def spy(owner, method, label, key="trust_remote_code"):
        original = getattr(owner, method)

        def wrapper(*args, **kwargs):
            seen[label] = kwargs.get(key)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, method, wrapper)

    spy(AutoConfig, "from_pretrained", "config")
    spy(AutoTokenizer, "from_pretrained", "tokenizer")
    spy(AutoModelForCausalLM, "from_config", "meta model")
    quantize(src, work / "remote", chat, "--quant_method", "RTN", "--trust_remote_code")
    assert seen == {"config": True, "tokenizer": True, "meta model": True}


def test_overwrite_starts_over_other_settings_deleting_only_what_ktq_wrote(src, chat, work):
    out = quantize(src, work / "again", chat, "--quant_method", "RTN")
    (out / "notes.txt").write_text("the user's")
    old_shard = (out / "model-00002-of-00004.safetensors").read_bytes()  # layer 1, MoE
    code, _, stderr = run_ktq_capture("gpu", "--model_id", src, "--output_dir", out, "--quant_method", "RTN",
                                      "--quant_type", "W4A16", "--quiet")
    assert code == 2 and "other settings" in stderr and "quant_type" in stderr and "--overwrite" in stderr, stderr
    quantize(src, out, chat, "--quant_method", "RTN", "--quant_type", "W4A16", "--overwrite")
    assert (out / "notes.txt").read_text() == "the user's"
    assert json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"][
        "weights"]["num_bits"] == 4
    assert (out / "model-00002-of-00004.safetensors").read_bytes() != old_shard
    assert not list(work.glob(".again*"))  # nothing written beside the output folder


def test_a_complete_output_of_an_older_ktq_re_run_writes_nothing(src, chat, work, rtn_w4, tmp_path):
    """Older versions renamed a finished staging folder into place: their ktq_gpu.json (format ktq-gpu-stream/1, no
    `complete`) marks a complete output, which the same command leaves as it is."""
    out = tmp_path / "older"
    shutil.copytree(rtn_w4, out)
    manifest = json.loads((out / "ktq_gpu.json").read_text())
    older = {"format": "ktq-gpu-stream/1", "run": manifest["run"], "units": manifest["units"]}
    (out / "ktq_gpu.json").write_text(json.dumps(older))
    before = mtimes(out)
    code, _, stderr = run_ktq_capture("gpu", "--model_id", src, "--output_dir", out, "--dataset", chat,
                                      "--num_calibration_samples", 16, "--max_sequence_length", 64,
                                      "--quant-method", "RTN", "--quant-type", "W4A16")
    assert code == 0 and f"{out} is complete already: nothing to do" in stderr, stderr
    assert mtimes(out) == before


def test_deepseek_shared_experts_mla_and_eleven_dense_layers(work, chat):
    src = deepseek_moe(work / "deepseek", layers=12, first_k_dense=11)
    out = quantize(src, work / "deepseek-w4", chat, "--quant_type", "W4A16", "--num_calibration_samples", 4)
    rep = report(out)
    assert set(rep["gptq_loss"]) == {f"model.layers.11.mlp.experts.{e}.{p}" for e in range(8) for p in EXPERT_PROJS}
    assert rep["ignored_modules"]["dense MLP layer"] == 33 and rep["ignored_modules"]["shared expert"] == 3
    names = tensors(out)
    assert "model.layers.11.mlp.experts.5.down_proj.weight_packed" in names
    assert "model.layers.10.mlp.down_proj.weight" in names  # dense layer 10 untouched (the reference quantised it)
    assert "model.layers.11.self_attn.kv_a_proj_with_mqa.weight" in names
    original, quantized = _load(src), _load(out)
    assert 0 < relative_error(original.model.layers[11].mlp.experts.gate_up_proj,
                              quantized.model.layers[11].mlp.experts.gate_up_proj) < 0.2


def test_language_model_prefix_and_vision_tower(work, chat):
    """qwen3_vl_moe from `ktq sample`: text layers under model.language_model., a vision tower beside them."""
    from ktq.sample import write_sample

    src = write_sample(work / "vl", arch="qwen3_vl_moe", layers=3, experts=8, hidden=128, moe_intermediate=128,
                       dense_layers=1, seed=2)
    out = quantize(src, work / "vl-w8", chat, "--num_calibration_samples", 4)
    rep = report(out)
    assert set(rep["gptq_loss"]) == {f"model.language_model.layers.{layer}.mlp.experts.{e}.{p}"
                                     for layer in MOE_LAYERS for e in range(EXPERTS) for p in EXPERT_PROJS}
    assert rep["ignored_modules"]["dense MLP layer"] == 3 and rep["ignored_modules"]["vision/audio tower"] > 0
    names = tensors(out)
    assert "model.language_model.layers.2.mlp.experts.7.up_proj.weight_packed" in names
    assert not any(name.startswith("model.visual.") and name.endswith("weight_packed") for name in names)
    # the source fuses experts in 3-D tensors; the per-expert output layout is said, not hidden
    assert any("fused in 3-D tensors" in warning for warning in rep["warnings"])
