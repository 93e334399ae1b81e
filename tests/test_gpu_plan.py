"""The memory plan from config.json alone: Hessians, weights, device map, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpu_models import sample_moe
from ktq.errors import KtqError
from ktq.gpu.devices import Device
from ktq.gpu.layout import MoeLayout, ignore_rules
from ktq.gpu.options import GpuOptions, parse_size
from ktq.gpu.plan import GPU_OVERHEAD, make_plan, meta_model, plan_table

GB = 10**9


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


def test_hessians_are_those_of_one_moe_layer(sample, parts, tmp_path):
    plan = plan_for(sample, parts, tmp_path, CPU)
    # 8 experts x (gate 128 + up 128 + down 128 input features): 24 Linears of 4 * 128^2 bytes
    assert len(plan.target.quantized) == 24
    assert plan.hessian_bytes == 24 * 4 * 128 * 128
    assert plan.quantized == 3 * 24  # three MoE layers
    assert plan.ignored == {"attention": 16, "dense MLP layer": 3, "lm_head": 1}
    # the sample's bf16 weights as ktq sample counts them, plus at most the rotary embedding's fp32 buffers
    from ktq.sample import sample_bytes

    weights = sample_bytes("qwen3_moe", 4, 8, 128, 128, 1)
    buffers = sum(b.numel() * b.element_size() for b in parts[2].buffers())
    assert weights < plan.weight_bytes <= weights + buffers


def test_rtn_needs_no_hessians_or_activation_cache(sample, parts, tmp_path):
    plan = plan_for(sample, parts, tmp_path, CPU, quant_method="RTN")
    assert plan.hessian_bytes == 0 and plan.cache_bytes == 0 and plan.activation_bytes == 0


def test_activation_cache_grows_with_samples_and_length(sample, parts, tmp_path):
    small = plan_for(sample, parts, tmp_path, CPU, num_calibration_samples=8, max_sequence_length=64)
    large = plan_for(sample, parts, tmp_path, CPU, num_calibration_samples=16, max_sequence_length=128)
    assert large.cache_bytes == 4 * small.cache_bytes
    assert large.activation_bytes == 2 * small.activation_bytes


def test_output_size_counts_packed_weights_and_scales(sample, parts, tmp_path):
    w8 = plan_for(sample, parts, tmp_path, CPU, quant_type="W8A16")
    w4 = plan_for(sample, parts, tmp_path, CPU, quant_type="W4A16")
    expert_params = 72 * 128 * 128  # 72 quantised Linears of 128 x 128
    scales = 72 * 128 * 1 * 2  # one bf16 scale per output row and group of 128 inputs
    assert w8.weight_bytes - w8.output_bytes == expert_params * 2 - expert_params - scales
    assert w8.output_bytes - w4.output_bytes == expert_params // 2


def test_whole_model_on_a_large_gpu(sample, parts, tmp_path):
    plan = plan_for(sample, parts, tmp_path, Device("cuda", "big", 80 * GB, 80 * GB))
    assert plan.fits
    assert plan.gpu_layers == 4 and plan.cpu_weight_bytes == 0 and plan.onload_bytes == 0
    assert plan.gptq_batch == 24  # every same-shape expert Linear of a layer in one GPTQ batch
    assert plan.cache_on_gpu and plan.cache_device == "cuda:0"  # room to spare: no copies per sample and layer
    assert plan.gpu_peak == (plan.weight_bytes + plan.hessian_bytes + max(plan.activation_bytes, plan.gptq_batch_bytes)
                             + plan.cache_bytes + GPU_OVERHEAD)
    assert plan.cpu_peak == plan.output_bytes  # only the save buffer is left on the CPU


def test_small_gpu_offloads_layers_to_the_cpu(sample, parts, tmp_path):
    """Room for the GPTQ working set and about three layers: the last layers stay on the CPU, one of them is onloaded
    at a time (accelerate keeps room for it)."""
    full = plan_for(sample, parts, tmp_path, CPU)
    module, group = full.target.largest_batch_group()
    budget = full.hessian_bytes + group * module.gptq_bytes + 3 * full.target.weight_bytes + GPU_OVERHEAD + 300_000
    plan = plan_for(sample, parts, tmp_path, Device("cuda", "small", budget, budget), max_gpu_memory=budget,
                    num_calibration_samples=512, max_sequence_length=1024)
    assert plan.gptq_batch == group == 24
    assert 0 < plan.gpu_layers < 4
    assert plan.cpu_weight_bytes > 0 and plan.onload_bytes == full.target.weight_bytes
    assert set(plan.device_map.values()) == {0, "cpu"}
    assert not plan.cache_on_gpu and plan.cache_bytes > budget  # 512 x 1024 tokens of activations stay on the CPU
    assert plan.gpu_peak <= budget and plan.fits


def test_refuses_when_one_layer_cannot_be_calibrated(sample, parts, tmp_path):
    plan = plan_for(sample, parts, tmp_path, Device("cuda", "tiny", GB, GB), max_gpu_memory=10**5)
    assert not plan.fits
    assert "--max_gpu_memory" in plan.problems[0] and "--max_sequence_length" in plan.problems[0]


def test_refuses_when_the_cpu_cannot_hold_the_activation_cache(sample, parts, tmp_path):
    plan = plan_for(sample, parts, tmp_path, CPU, cpu=10**6)
    assert not plan.fits
    assert "--num_calibration_samples" in plan.problems[0]


def test_refuses_group_misaligned_inputs(tmp_path):
    from transformers import AutoConfig

    from ktq.sample import write_sample

    src = write_sample(tmp_path / "odd", layers=2, experts=4, hidden=128, moe_intermediate=96, dense_layers=0)
    config = AutoConfig.from_pretrained(src)
    layout = MoeLayout.from_config(config.to_dict())
    opts = GpuOptions(model_id=str(src), output_dir=tmp_path / "out")
    plan = make_plan(opts, config.to_dict(), meta_model(config, "bfloat16", False), layout, ignore_rules(layout),
                     CPU, 64 * GB)
    assert any("96 input features" in p and "group size 128" in p for p in plan.problems)


def test_plan_table_shows_every_term(sample, parts, tmp_path):
    from rich.console import Console

    plan = plan_for(sample, parts, tmp_path, Device("cuda", "big", 80 * GB, 80 * GB))
    console = Console(record=True, width=160)
    console.print(plan_table(plan, GpuOptions(model_id=str(sample), output_dir=tmp_path / "o")))
    text = console.export_text()
    for row in ("weights", "Hessians", "activations", "GPTQ batch", "activation cache", "GPU peak", "CPU peak"):
        assert row in text
    assert "24 Linears of model.layers.1" in text


@pytest.mark.parametrize("text, value", [("40GiB", 40 * 2**30), ("40GB", 40 * 10**9), ("1.5g", 1_500_000_000),
                                         ("512MiB", 512 * 2**20), ("1000", 1000)])
def test_parse_size(text, value):
    assert parse_size(text, "--max_gpu_memory") == value


@pytest.mark.parametrize("text", ["lots", "40 parsecs", "-3GB", "0"])
def test_parse_size_rejects(text):
    with pytest.raises(KtqError, match="--max_cpu_memory"):
        parse_size(text, "--max_cpu_memory")
