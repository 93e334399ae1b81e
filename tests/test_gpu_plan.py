"""The plan of the streaming engine, before any weight is read: per-layer memory on GPU and host, disk, time,
refusals; and planning for a GPU this machine does not have."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpu_models import chat_rows, deepseek_v3_config, run_ktq_capture, sample_moe, write_jsonl
from ktq.errors import KtqError
from ktq.gpu.budget import CUDA_HOST, pinned
from ktq.gpu.devices import Device
from ktq.gpu.layout import MoeLayout, ignore_rules
from ktq.gpu.model import meta_model
from ktq.gpu.options import GpuOptions, parse_size
from ktq.gpu.plan import GPU_OVERHEAD, check_source, make_plan, plan_table

GB = 10**9
HIDDEN = INTER = 128  # the sample's hidden and expert intermediate sizes
EXPERTS = 8


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    # 4 layers, layer 0 dense, 8 experts of hidden 128 -> moe_intermediate 128
    return sample_moe(tmp_path_factory.mktemp("plan") / "moe", layers=4, dense_layers=1)


@pytest.fixture(scope="module")
def parts(sample):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(sample)
    layout = MoeLayout.from_config(config.to_dict())
    return config, layout, meta_model(config, "bfloat16", False)


def plan_for(sample, parts, tmp_path, device, cpu=64 * GB, **options):
    config, layout, meta = parts
    opts = GpuOptions(model_id=str(sample), output_dir=tmp_path / "out", **options)
    return make_plan(opts, config.to_dict(), meta, layout, ignore_rules(layout, opts.ignore_patterns), device, cpu)


CPU = Device("cpu", "cpu", 0, 0)


def test_one_shared_gate_up_hessian_and_a_down_hessian_per_expert(sample, parts, tmp_path):
    from ktq.sample import sample_bytes

    plan = plan_for(sample, parts, tmp_path, CPU)
    assert plan.hessian_bytes == 4 * HIDDEN * HIDDEN + EXPERTS * 4 * INTER * INTER
    assert plan.quantized == 3 * EXPERTS * 3  # three MoE layers of 8 experts x gate/up/down
    assert plan.ignored == {"attention": 16, "dense MLP layer": 3, "lm_head": 1}
    assert [spec.experts for spec in plan.layers] == [0, EXPERTS, EXPERTS, EXPERTS] and plan.moe_layers == 3
    # every weight of the sample, in bf16, is in some layer or outside the layers (embeddings, norm, lm_head)
    outside = sum(p.numel() for name, p in parts[2].named_parameters() if ".layers." not in name) * 2
    layers = sum(spec.weight_bytes for spec in plan.layers)
    assert layers + outside == sample_bytes("qwen3_moe", 4, EXPERTS, HIDDEN, INTER, 1)


def test_rtn_needs_no_hessians_activations_or_hidden_states(sample, parts, tmp_path):
    plan = plan_for(sample, parts, tmp_path, CPU, quant_method="RTN")
    assert plan.hessian_bytes == 0 and plan.cache_bytes == 0 and plan.activation_bytes == 0
    assert plan.seconds()["calibrate"] == 0 and plan.seconds()["hessians"] == 0


def test_hidden_states_grow_with_samples_and_length(sample, parts, tmp_path):
    small = plan_for(sample, parts, tmp_path, CPU, num_calibration_samples=8, max_sequence_length=64)
    large = plan_for(sample, parts, tmp_path, CPU, num_calibration_samples=16, max_sequence_length=128)
    assert large.cache_bytes == 4 * small.cache_bytes
    assert large.activation_bytes == 2 * small.activation_bytes
    large.rates = small.rates  # measured on this (shared) machine: the same rates for both
    assert large.seconds()["hessians"] > small.seconds()["hessians"]


def test_output_size_counts_packed_weights_and_scales(sample, parts, tmp_path):
    w8 = plan_for(sample, parts, tmp_path, CPU, quant_type="W8A16", group_size=128)
    w4 = plan_for(sample, parts, tmp_path, CPU, quant_type="W4A16", group_size=128)
    projections = 3 * EXPERTS * 3
    assert w8.output_bytes - w4.output_bytes == projections * HIDDEN * INTER // 2
    # int8 codes and one bf16 scale per row and group of 128 inputs
    assert w8.packed_bytes == EXPERTS * 3 * (HIDDEN * INTER + 2 * INTER * (HIDDEN // 128))
    # groups of 32 (the default): four times the scales; per channel: one scale per row
    assert plan_for(sample, parts, tmp_path, CPU, quant_type="W8A16").packed_bytes == \
        EXPERTS * 3 * (HIDDEN * INTER + 2 * INTER * (HIDDEN // 32))
    assert plan_for(sample, parts, tmp_path, CPU, quant_type="W8A16", group_size=-1).packed_bytes == \
        EXPERTS * 3 * (HIDDEN * INTER + 2 * INTER)


def test_a_large_gpu_keeps_the_layer_every_sample_and_the_hidden_states(sample, parts, tmp_path):
    plan = plan_for(sample, parts, tmp_path, Device("cuda", "big", 80 * GB, 80 * GB))
    t = plan.terms
    assert plan.fits and plan.cache_on_gpu and plan.cache_device == "cuda:0"
    assert (plan.sizes.expert_chunk, plan.sizes.sample_group) == (EXPERTS, 512)
    assert t.expert == 3 * HIDDEN * INTER * 2 and t.per_sample == 2048 * (2 * HIDDEN * 2 + 12 * 2)
    assert plan.gpu_peak == (t.dense + EXPERTS * t.expert + plan.hessian_bytes + 512 * t.per_sample
                             + max(t.activations + t.products, plan.solve_bytes) + t.kwargs + plan.cache_bytes
                             + GPU_OVERHEAD)
    # the host holds this process with the CUDA context, this layer's and the next layer's experts as read (bf16
    # here, pinned: PyTorch rounds each pinned buffer up to a power of two) and one packed layer; never the hidden
    # states here
    assert plan.cpu_peak == (plan.terms.process + CUDA_HOST + 2 * pinned(plan.moe.expert_bytes)
                             + plan.packed_bytes)


def test_a_small_gpu_leaves_the_hidden_states_on_the_host(sample, parts, tmp_path):
    full = plan_for(sample, parts, tmp_path, Device("cuda", "big", 80 * GB, 80 * GB), num_calibration_samples=512,
                    max_sequence_length=1024)
    budget = full.gpu_peak - full.cache_bytes + 1000
    plan = plan_for(sample, parts, tmp_path, Device("cuda", "small", budget, budget), max_gpu_memory=budget,
                    num_calibration_samples=512, max_sequence_length=1024)
    assert not plan.cache_on_gpu and plan.cache_device == "cpu"
    assert plan.gpu_peak <= budget and plan.fits
    held = plan.terms.samples * pinned(plan.terms.sample_hidden)  # a pinned buffer per sample
    assert plan.cpu_peak == full.cpu_peak + held + plan.terms.process - full.terms.process


def test_a_gpu_too_small_for_the_layer_streams_its_experts_and_groups_the_samples(sample, parts, tmp_path):
    full = plan_for(sample, parts, tmp_path, Device("cuda", "big", 80 * GB, 80 * GB), num_calibration_samples=512,
                    max_sequence_length=1024)
    t = full.terms
    # one byte short of the whole layer's experts beside the smallest group of 16 samples
    budget = (t.dense + t.hessians + max(t.activations + t.products, t.gptq) + t.kwargs + GPU_OVERHEAD
              + EXPERTS * t.expert + 16 * t.per_sample - 1)
    plan = plan_for(sample, parts, tmp_path, Device("cuda", "small", budget, budget), max_gpu_memory=budget,
                    num_calibration_samples=512, max_sequence_length=1024)
    assert plan.fits and plan.gpu_peak <= budget and not plan.cache_on_gpu
    sizes = plan.sizes
    assert 1 <= sizes.expert_chunk < EXPERTS and 16 <= sizes.sample_group < 512 and sizes.sample_group % 16 == 0


def test_refuses_when_one_layer_cannot_be_calibrated(sample, parts, tmp_path):
    plan = plan_for(sample, parts, tmp_path, Device("cuda", "tiny", GB, GB), max_gpu_memory=10**5)
    assert not plan.fits
    least = plan.problems[0].split("needs at least ")[1].split(" ")[0]
    assert f"--max_gpu_memory {least}" in plan.problems[0] and "--force_cpu" in plan.problems[0]


def test_refuses_when_the_host_cannot_hold_the_hidden_states(sample, parts, tmp_path):
    roomy = plan_for(sample, parts, tmp_path, CPU)
    plan = plan_for(sample, parts, tmp_path, CPU, cpu=int((roomy.cpu_peak - roomy.cache_bytes / 2) / 0.85))
    assert not plan.fits
    assert plan.problems[0].startswith("the CPU must hold") and "--num_calibration_samples" in plan.problems[0]


def test_refuses_group_misaligned_experts(tmp_path):
    from transformers import AutoConfig

    from ktq.sample import write_sample

    src = write_sample(tmp_path / "odd", layers=2, experts=4, hidden=128, moe_intermediate=96, dense_layers=0)
    config = AutoConfig.from_pretrained(src)
    layout = MoeLayout.from_config(config.to_dict())
    opts = GpuOptions(model_id=str(src), output_dir=tmp_path / "out", group_size=128)
    plan = make_plan(opts, config.to_dict(), meta_model(config, "bfloat16", False), layout, ignore_rules(layout),
                     CPU, 64 * GB)
    assert any("128 / 96 input features" in p and "group size 128" in p for p in plan.problems)


def test_plan_table_shows_every_term(sample, parts, tmp_path):
    from rich.console import Console

    plan = plan_for(sample, parts, tmp_path, Device("cuda", "big", 80 * GB, 80 * GB))
    console = Console(record=True, width=240)
    console.print(plan_table(plan, GpuOptions(model_id=str(sample), output_dir=tmp_path / "o")))
    text = console.export_text()
    for row in ("layer outside its experts", "experts on the device", "experts on the host", "Hessians",
                "sample group", "activations", "expert products", "hidden states", "GPTQ working set",
                "packed layer", "this process", "output", "GPU peak", "CPU peak", "time", "H100 datasheet rates",
                "time on H200", "time on RTX 3090"):
        assert row in text
    assert "one shared gate/up 128^2 + 8 down 128^2" in text


def deepseek_v3_plan(tmp_path, gpu: str, host: str) -> tuple[int, dict]:
    folder = tmp_path / "DeepSeek-V3"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(deepseek_v3_config()))
    chat = write_jsonl(tmp_path / "chat.jsonl", chat_rows(4))
    code, out, _ = run_ktq_capture("gpu", "--model_id", folder, "--output_dir", tmp_path / "out", "--dataset", chat,
                                   "--quant_type", "W4A16", "--dry_run", "--json", "--max_gpu_memory", gpu,
                                   "--max_cpu_memory", host)
    return code, json.loads(out)


def test_deepseek_v3_fits_an_80_gib_gpu_and_64_gib_of_host_memory(tmp_path):
    """Planned on this machine, which has no GPU, from DeepSeek-V3's config.json alone (an FP8 release)."""
    code, plan = deepseek_v3_plan(tmp_path, "80GiB", "64GiB")
    assert plan["planned_gpu"] and plan["device_name"] == "a GPU of 85.90 GB" and not plan["rates_measured"]
    assert (plan["num_layers"], plan["moe_layers"], plan["experts"]) == (61, 58, 256)
    # 109.5 GB of per-projection Hessians as llm-compressor keeps them; 4.5 GB shared
    assert plan["hessian_bytes"] == 4 * (7168**2 + 256 * 2048**2)
    assert plan["gpu_peak_bytes"] <= 80 * 2**30 and plan["cpu_peak_bytes"] <= 64 * 2**30
    assert plan["cache_device"] == "cuda:0"  # 512 x 2048 hidden states of 7168 fit beside the layer
    assert (plan["expert_chunk"], plan["sample_group"]) == (256, 512)  # the whole layer, every sample
    assert [p for p in plan["problems"] if "disk" not in p and "output needs" not in p] == []
    assert plan["source"].startswith("config.json only") and 0 < plan["seconds_total"] < 2 * 3600
    assert code == (0 if plan["fits"] else 2)


@pytest.mark.parametrize("gpu, host, resident", [("48GiB", "64GiB", True), ("24GiB", "96GiB", False)])
def test_deepseek_v3_fits_the_gpus_users_own(tmp_path, gpu, host, resident):
    """24 GiB: the experts stream through in chunks and the samples in groups, the hidden states on the host; the
    host holds two layers of experts as stored (FP8), not decoded."""
    code, plan = deepseek_v3_plan(tmp_path, gpu, host)
    assert plan["gpu_peak_bytes"] <= parse_size(gpu, "") and plan["cpu_peak_bytes"] <= parse_size(host, "")
    assert [p for p in plan["problems"] if "output needs" not in p] == []
    assert (plan["expert_chunk"] == 256) == resident and plan["sample_group"] % 16 == 0
    # two layers of FP8 experts (11.3 GB each with their scales) in pinned buffers of the next power of two
    assert plan["cache_device"] == "cpu" and plan["host_experts_bytes"] == 2 * 2**34
    classes = plan["gpu_classes"]
    assert list(classes) == ["H200", "H100", "A100", "RTX 4090", "RTX 3090"]
    assert all(found["fits"] for found in classes.values())
    assert classes["H200"]["seconds"] < classes["A100"]["seconds"] < classes["RTX 3090"]["seconds"]


def test_a_run_that_fits_no_gpu_says_what_would(tmp_path):
    code, plan = deepseek_v3_plan(tmp_path, "4GiB", "96GiB")
    assert code == 2 and not plan["fits"]
    problem = next(p for p in plan["problems"] if "on the GPU" in p)
    assert "one expert at a time" in problem and "Hessians 4.50 GB" in problem and "--force_cpu" in problem
    assert "a GPU with" in problem and "--max_gpu_memory" in problem


def test_sources_the_engine_cannot_read_are_refused_before_loading(tmp_path):
    from ktq.sample import write_sample

    with pytest.raises(KtqError, match="not a local folder.*download it first"):
        check_source("some-org/some-model")
    src = write_sample(tmp_path / "src", layers=2, experts=4, hidden=128, moe_intermediate=128, dense_layers=0)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = next(iter(index["weight_map"].values()))
    index["weight_map"]["model.layers.1.mlp.experts.3.up_proj.weight"] = "missing.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(KtqError, match="missing.safetensors"):
        check_source(str(src))
    assert shard


@pytest.mark.parametrize("text, value", [("40GiB", 40 * 2**30), ("40GB", 40 * 10**9), ("1.5g", 1_500_000_000),
                                         ("512MiB", 512 * 2**20), ("1000", 1000)])
def test_parse_size(text, value):
    assert parse_size(text, "--max_gpu_memory") == value


@pytest.mark.parametrize("text", ["lots", "40 parsecs", "-3GB", "0"])
def test_parse_size_rejects(text):
    with pytest.raises(KtqError, match="--max_cpu_memory"):
        parse_size(text, "--max_cpu_memory")
