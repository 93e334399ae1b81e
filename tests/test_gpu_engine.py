"""The streaming engine of `ktq gpu` on the CPU: what `oneshot` computes, from FP8 too, killed and resumed to the same
bytes, in memory that does not grow with the model's depth."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import interrupt_when, ktq_subprocess, layers_recorded, tree_files
from faults import ForkServer
from gpu_models import chat_rows, report, run_ktq, sample_moe, tensors, write_jsonl
from ktq.safetensors_io import TensorReader


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("engine")


@pytest.fixture(scope="module")
def chat(work) -> Path:
    return write_jsonl(work / "chat.jsonl", chat_rows(32))


@pytest.fixture(scope="module")
def src(work) -> Path:
    return sample_moe(work / "src", layers=3, dense_layers=1, experts=8)


def gpu_args(src: Path, out: Path, chat: Path, *extra: object) -> list[object]:
    return ["gpu", "--model_id", src, "--output_dir", out, "--dataset", chat, "--num_calibration_samples", 16,
            "--max_sequence_length", 64, "--quant_type", "W4A16", "--force_cpu", "--quiet", *extra]


def read_all(folder: Path) -> dict[str, np.ndarray]:
    with TensorReader() as reader:
        return {name: reader.read(info) for name, info in tensors(folder).items()}


def causal_oneshot(src: Path, out: Path, chat: Path) -> dict[str, float]:
    """llm-compressor's oneshot with the same scheme, ignore rules and samples, and transformers' own attention
    kept during calibration (oneshot 0.14.0.1 forces eager attention, which takes the None mask it then gets as
    bidirectional: see benchmarks/bare_oneshot.py); returns its GPTQ losses."""
    import contextlib

    import llmcompressor.utils.helpers as helpers
    from compressed_tensors.utils import patch_attr
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.utils.metric_logging import CompressionLogger
    from transformers import AutoConfig, AutoTokenizer

    from ktq.gpu.data import calibration_dataset
    from ktq.gpu.layout import MoeLayout, ignore_rules

    tokenizer = AutoTokenizer.from_pretrained(src)
    data = calibration_dataset(str(chat), "train", None, tokenizer, 16, 64, 42)
    rules = ignore_rules(MoeLayout.from_config(AutoConfig.from_pretrained(src).to_dict()))
    modifier = GPTQModifier(targets="Linear", scheme="W4A16", dampening_frac=0.1,
                            ignore=[rule.pattern for rule in rules])
    losses: dict[str, float] = {}
    set_results = CompressionLogger.set_results

    def record(logger, name=None, loss=None):
        set_results(logger, name=name, loss=loss)
        if loss is not None:
            losses[modifier._module_names[logger.module]] = float(loss)

    with patch_attr(helpers, "use_eager_attention", lambda model: contextlib.nullcontext()), \
            patch_attr(CompressionLogger, "set_results", record):
        oneshot(model=str(src), dataset=data, recipe=modifier, num_calibration_samples=len(data), max_seq_length=64,
                shuffle_calibration_samples=False, moe_calibrate_all_experts=True, output_dir=str(out))
    return losses


def test_the_engine_writes_what_oneshot_writes(src, chat, work):
    assert run_ktq(*gpu_args(src, work / "engine", chat, "--group_size", 128)) == 0  # the W4A16 preset's groups
    losses = causal_oneshot(src, work / "oneshot", chat)
    ours, theirs = read_all(work / "engine"), read_all(work / "oneshot")
    assert ours.keys() == theirs.keys()
    words = same = 0
    for name, value in theirs.items():
        if name.endswith("weight_packed"):
            words += value.size
            same += int((ours[name] == value).sum())
        else:
            assert np.array_equal(ours[name], value), name  # scales, shapes and every kept weight
    assert same / words >= 0.999, same / words
    ours_losses = report(work / "engine")["gptq_loss"]
    assert ours_losses.keys() == losses.keys() and len(losses) == 48
    for name, loss in losses.items():
        assert ours_losses[name] == pytest.approx(loss, rel=1e-3), name
    config = json.loads((work / "engine" / "config.json").read_text())["quantization_config"]
    expected = json.loads((work / "oneshot" / "config.json").read_text())["quantization_config"]
    # oneshot writes the solve's activation order ("static") though it writes no g_idx; ktq writes what the files hold
    assert expected["config_groups"]["group_0"]["weights"]["actorder"] == "static"
    expected["config_groups"]["group_0"]["weights"]["actorder"] = None
    assert config == expected


def test_one_shared_hessian_solves_as_one_hessian_per_module():
    import torch
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

    from ktq.gpu.gptq import SharedSolver, qparams, weight_scheme

    torch.manual_seed(0)
    args = weight_scheme("W4A16", "GPTQ").weights
    x = torch.randn(512, 256) * torch.linspace(0.1, 3, 256)  # uneven activations: act-order matters
    hessian = 2 * x.T @ x / 512
    weights = torch.randn(6, 64, 256).to(torch.bfloat16)  # six matrices sharing the inputs
    rows = weights.reshape(-1, 256)
    scale, zp = qparams(rows, args)
    stacked, row_losses = SharedSolver(hessian.clone(), args, 0.1).solve(rows, scale, zp)
    each, losses, _ = quantize_weight(weights.float(), hessian.expand(6, -1, -1).clone(), scale.view(6, 64, -1),
                                      zp.view(6, 64, -1), None, args, blocksize=128, percdamp=0.1)
    assert torch.equal(stacked.view(6, 64, 256), each)
    assert torch.allclose(row_losses.view(6, 64).sum(-1), losses, rtol=1e-5)


def test_an_fp8_deepseek_converts_and_loads(work, chat):
    """Block-scaled FP8 straight in (MLA, shared experts, router bias, MTP layer): routed experts packed, the MTP
    layer's too (rounded to nearest), every other FP8 tensor written with the source's name and bytes (weights and
    scales), the rest as stored; transformers reads the FP8 Linears through compressed-tensors' FP8 block scheme once
    their scales take its name, logits close to the source's decoded by torch."""
    import torch
    from transformers import AutoModelForCausalLM

    from ktq.cpu.checkpoint import open_checkpoint
    from ktq.sample import write_sample
    from test_archs import fp8_decoded_by_torch

    src = write_sample(work / "ds-fp8", arch="deepseek_v3", dtype="fp8", layers=3, experts=8, hidden=256,
                       moe_intermediate=128, dense_layers=1, seed=3)
    out = work / "ds-fp8-w8"
    assert run_ktq(*gpu_args(src, out, chat, "--quant_type", "W8A16")) == 0
    written, source = read_all(out), read_all(src)
    fp8 = [name for name, info in tensors(src).items() if info.dtype == "F8_E4M3" and ".experts." not in name]
    assert any(".layers.3.self_attn." in name for name in fp8)  # the MTP layer's attention too
    for name in fp8:
        for stored in (name, f"{name}_scale_inv"):
            assert tensors(out)[stored].dtype == tensors(src)[stored].dtype, stored
            assert np.array_equal(written[stored], source[stored]), stored
    assert np.array_equal(written["model.layers.3.eh_proj.weight"], source["model.layers.3.eh_proj.weight"])
    assert sum(name.endswith("weight_packed") for name in written) == 2 * 8 * 3 + 8 * 3  # MoE layers 1, 2 and MTP
    assert open_checkpoint(out).tensors  # headers of every shard valid
    ids = torch.arange(3, 60).unsqueeze(0)
    logits = []
    for folder, options in ((fp8_decoded_by_torch(src, work / "ds-fp8-bf16"), {}),
                            (out, {"key_mapping": {r"weight_scale_inv$": "weight_scale"}})):
        model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True,
                                                           **options)
        assert not info["missing_keys"] and all(".layers.3." in key for key in info["unexpected_keys"])
        with torch.no_grad():
            logits.append(model(ids).logits.float().flatten())
    assert torch.nn.functional.cosine_similarity(*logits, dim=0).item() >= 0.99


def checkpoint_files(folder: Path) -> dict[str, bytes]:
    """Every file but the log and the report's timings: what loaders read, byte for byte."""
    files = tree_files(folder)
    del files["ktq_gpu.log"]
    rep = json.loads(files.pop("ktq_gpu_report.json"))
    files["report"] = json.dumps({k: rep[k] for k in ("gptq_loss", "routed_tokens", "calibration_tokens")}).encode()
    return files


def test_killed_anywhere_the_rerun_ends_with_the_same_bytes(src, chat, work, tmp_path_factory):
    forks = ForkServer(tmp_path_factory.mktemp("gpu-forks"), "gpu")
    try:
        root = work / "kills"
        reference = forks.run(gpu_args(src, root / "reference", chat), root)
        assert reference.code == 0, reference.log
        expected = checkpoint_files(root / "reference")
        assert reference.events > 20, reference.events
        for point in (3, reference.events // 3, reference.events // 2, reference.events - 5):
            out = root / f"killed-at-{point}"
            killed = forks.run(gpu_args(src, out, chat), root, kill_at=point)
            assert killed.killed, killed.log
            rerun = forks.run(gpu_args(src, out, chat), root)
            assert rerun.code == 0, rerun.log
            assert checkpoint_files(out) == expected, point
            assert "replayed" in (out / "ktq_gpu.log").read_text() or point < 10, point
    finally:
        forks.close()


def test_ctrl_c_says_the_same_command_continues_and_it_does(src, chat, work):
    out, clean = work / "interrupted", work / "uninterrupted"
    stopped = interrupt_when(gpu_args(src, out, chat), lambda: layers_recorded(out / "ktq_gpu.json", "units") > 0)
    assert stopped.code == 130, stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1] == \
        "ktq: interrupted: run the same command again to continue; finished layers are kept"
    assert not (out / "config.json").exists()  # an unfinished output is no checkpoint to a loader
    rerun = ktq_subprocess(*[a for a in gpu_args(src, out, chat) if a != "--quiet"])
    assert rerun.code == 0 and f"continuing {out}: " in rerun.stderr, rerun.stderr
    assert run_ktq(*gpu_args(src, clean, chat)) == 0
    assert checkpoint_files(out) == checkpoint_files(clean)


def peak_rss(args: list[object]) -> int:
    """Peak resident memory of `ktq ARGS` in a process of its own, in bytes."""
    code = ("import resource, sys\nfrom ktq.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code\nprint(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n")
    # a fixed mmap threshold: glibc's adaptive one keeps freed blocks of a few MB in the heap, where allocation
    # order (threads) decides how much of it a tiny model's peak holds; gigabyte-sized layers are mapped anyway
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    result = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[-1])


def test_host_memory_does_not_grow_with_the_number_of_layers(work, chat):
    """4 and 8 layers of 32 experts (a layer's experts are 25 MB of bf16): the peaks differ by less than a layer."""
    from ktq.sample import write_sample

    peaks, layer_bytes = [], 32 * 3 * 256 * 512 * 2
    for layers in (4, 8):
        src = write_sample(work / f"deep{layers}", layers=layers, experts=32, hidden=256, moe_intermediate=512,
                           dense_layers=1, seed=4)
        peaks.append(peak_rss(gpu_args(src, work / f"deep{layers}-out", chat, "--num_calibration_samples", 1,
                                       "--max_sequence_length", 16)))
    assert abs(peaks[1] - peaks[0]) < layer_bytes, peaks


def test_any_chunk_of_experts_and_group_of_samples_writes_the_same_bytes(src, chat, work):
    """The plan's sizes decide only what the device holds at once: one expert at a time and two groups of 16
    samples give both artifacts byte for byte as the whole layer and every sample at once (every product has
    the same rows either way)."""
    outputs = []
    for name, sizes in (("whole", ()), ("chunked", ("--expert_chunk", 1, "--sample_group", 16))):
        out = work / f"sizes-{name}"
        assert run_ktq(*gpu_args(src, out, chat, "--num_calibration_samples", 32, "--cpu-output", f"{out}-cpu",
                                 *sizes)) == 0
        plan = report(out)["plan"]
        assert (plan["expert_chunk"], plan["sample_group"], plan["cpu_chunk"]) == \
            ((8, 32, 8) if not sizes else (1, 16, 1))
        # the plan's time for the layers, from rates measured on this machine, within 4x of the run's: its
        # start-up is a nominal constant (this in-process run has paid for most of it already), and a shared
        # 2-core machine's timings swing by 2x; this catches a model off by an order of magnitude
        stages, estimate = report(out)["stages"], plan["seconds_total"] - plan["seconds"]["start-up"]
        assert 0.25 <= estimate / (stages["quantize"] + stages["save"]) <= 4, (plan["seconds"], stages)
        outputs.append((checkpoint_files(out), tree_files(Path(f"{out}-cpu"))))
    assert outputs[0][0] == outputs[1][0]
    assert outputs[0][1] == outputs[1][1]
