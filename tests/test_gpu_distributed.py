"""`ktq gpu --nproc N` and `ktq gpu` inside torchrun, on the CPU with gloo: the distributed output against the
single-process one, the report, rank-0-only output, and a failing rank ending the whole job with one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ktq_subprocess
from gpu_models import chat_rows, report, run_ktq, sample_moe, tensors, write_jsonl
from ktq.gpu.launch import in_torchrun, options_from_json, options_to_json
from ktq.gpu.options import CpuExpertsOptions, GpuOptions
from ktq.safetensors_io import TensorReader

RUN = ("--num_calibration_samples", 8, "--max_sequence_length", 64, "--quant_type", "W4A16")
TIMEOUT = 120  # a rank left waiting in a collective would hang the test run instead of failing it


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ddp")


@pytest.fixture(scope="module")
def src(work) -> Path:
    return sample_moe(work / "src", layers=3, dense_layers=1, experts=8)


@pytest.fixture(scope="module")
def chat(work) -> Path:
    return write_jsonl(work / "chat.jsonl", chat_rows(16))


@pytest.fixture(scope="module")
def single(src, chat, work) -> Path:
    out = work / "single"
    assert run_ktq("gpu", "--model_id", src, "--output_dir", out, "--dataset", chat, "--quiet", *RUN) == 0
    return out


@pytest.fixture(scope="module")
def two_ranks(src, chat, work):
    """Two gloo processes; not quiet, so what each rank prints shows."""
    out = work / "two"
    result = ktq_subprocess("gpu", "--model_id", src, "--output_dir", out, "--dataset", chat, "--force_cpu",
                            "--nproc", 2, *RUN, timeout=TIMEOUT)
    assert result.code == 0, result.stderr
    return out, result


def test_two_gloo_ranks_write_what_one_process_writes(single, two_ranks):
    """Calibration is split between the ranks and the Hessians summed, so the quantised words may differ in
    rounding (summation order) but routing, the modules, the kept tensors and the quality are the single run's."""
    import numpy as np

    out, _ = two_ranks
    a, b = tensors(single), tensors(out)
    assert a.keys() == b.keys()
    same = far = total = 0
    with TensorReader() as ra, TensorReader() as rb:
        for name in a:
            x, y = ra.read(a[name]), rb.read(b[name])
            if name.endswith("weight_packed"):
                # 8 int4 values per int32 word: compare the values themselves
                xs = (x.view(np.uint32)[..., None] >> np.arange(0, 32, 4, dtype=np.uint32)) & 0xF
                ys = (y.view(np.uint32)[..., None] >> np.arange(0, 32, 4, dtype=np.uint32)) & 0xF
                steps = np.abs(xs.astype(int) - ys.astype(int))
                same, far, total = same + int((steps == 0).sum()), far + int((steps > 1).sum()), total + xs.size
            elif ".experts." not in name:
                assert x.tobytes() == y.tobytes(), name  # untouched tensors, bit for bit
    assert same / total > 0.97
    # one rounding decision that flips moves GPTQ's error feedback onto the next columns, which may then round two
    # steps apart (seen in one run of three on a 2-core box): rare, never the rule
    assert far / total < 1e-3, far
    one, two = report(single), report(out)
    routed_one, routed_two = one["routed_tokens"], two["routed_tokens"]
    assert routed_two.keys() == routed_one.keys()
    # every sample seen once, none twice: each layer routes as many tokens as in the single run
    assert {k: sum(v) for k, v in routed_two.items()} == {k: sum(v) for k, v in routed_one.items()}
    # the first MoE layer sees only unquantised layers: identical routing; later layers see the quantised
    # experts above them, whose rounding may differ (Hessian summation order), so a token may switch expert
    by_depth = sorted(routed_one, key=lambda name: int(name.split(".layers.")[1].split(".")[0]))
    assert routed_two[by_depth[0]] == routed_one[by_depth[0]]
    for name in by_depth[1:]:
        tokens = sum(routed_one[name])
        assert max(abs(a - b) for a, b in zip(routed_one[name], routed_two[name])) <= 0.01 * tokens, name
    assert two["gptq_loss"].keys() == one["gptq_loss"].keys()
    for name, loss in one["gptq_loss"].items():
        assert two["gptq_loss"][name] == pytest.approx(loss, rel=0.05, abs=1e-3), name


def test_two_gloo_ranks_logits_match_the_single_run(single, two_ranks, src):
    import torch
    from transformers import AutoModelForCausalLM

    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        logits = [AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)(ids).logits.float().flatten()
                  for folder in (src, single, two_ranks[0])]
    cosine = torch.nn.functional.cosine_similarity
    assert cosine(logits[1], logits[2], dim=0).item() > 0.999
    assert cosine(logits[0], logits[2], dim=0).item() == pytest.approx(cosine(logits[0], logits[1], dim=0).item(),
                                                                      abs=2e-3)


def test_report_has_the_world_and_each_ranks_stages(two_ranks, single):
    out, _ = two_ranks
    rep = report(out)
    assert rep["world_size"] == 2 and report(single)["world_size"] == 1 and report(single)["rank_stages"] == []
    assert [list(stages) for stages in rep["rank_stages"]] == [["plan", "load", "dataset", "quantize"]] * 2
    assert list(rep["stages"]) == ["plan", "load", "dataset", "quantize", "save"]
    assert rep["calibration_samples"] == 8 and rep["quantized_modules"] == 48
    assert rep["warnings"] == report(single)["warnings"]


def test_only_rank_0_prints_and_writes(two_ranks, work):
    out, result = two_ranks
    assert result.stdout == ""
    err = result.stderr
    for once in ("ktq gpu plan: GPTQ W4A16 on cpu", "layer 2 done (3/3 layers)", f"wrote {out}", "ranks: 2; quantize"):
        assert err.count(once) == 1, err
    assert "Rank" not in err and "%|" not in err  # no per-rank log lines, no llm-compressor progress bars
    assert not list(work.glob(".two.*"))  # no staging folder left


def test_a_failing_rank_ends_the_job_with_one_line(src, chat, tmp_path):
    """One sample cannot be shared by two ranks: rank 0 fails while rank 1 goes on into calibration, where it would
    wait for rank 0 for ever; the launcher stops it and says what rank 0 said."""
    result = ktq_subprocess("gpu", "--model_id", src, "--output_dir", tmp_path / "out", "--dataset", chat,
                            "--force_cpu", "--nproc", 2, "--num_calibration_samples", 1, "--quiet", timeout=TIMEOUT)
    assert result.code == 2, result.stderr
    assert result.stderr.strip() == ("ktq: error: rank 0 of 2 failed: 1 calibration samples cannot be shared between "
                                     "2 processes; use at least 2 samples or fewer processes")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_a_rank_that_dies_without_a_word_ends_the_job(src, chat, tmp_path):
    """Rank 1 exits before it reaches the rendezvous (as a killed or crashed process would); rank 0 is stopped."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text("import os\nif os.environ.get('RANK') == '1':\n    os._exit(9)\n")
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])}
    result = ktq_subprocess("gpu", "--model_id", src, "--output_dir", tmp_path / "out", "--dataset", chat,
                            "--force_cpu", "--nproc", 2, "--quiet", *RUN, timeout=TIMEOUT, env=env)
    assert result.code == 2, result.stderr
    assert result.stderr.strip() == ("ktq: error: rank 1 ended with exit code 9 without an error message "
                                     "(killed? out of memory?)")
    assert not (tmp_path / "out").exists()


def test_inside_torchrun_ktq_joins_the_job(src, chat, work, single):
    """torchrun starts the ranks; `ktq gpu` (no --nproc) sees RANK/WORLD_SIZE/LOCAL_RANK and joins."""
    out = work / "torchrun"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                           "-m", "ktq", "gpu", "--model_id", str(src), "--output_dir", str(out), "--dataset", str(chat),
                           "--force_cpu", "--quant_method", "RTN", "--quant_type", "W4A16", "--quiet"],
                          capture_output=True, text=True, timeout=TIMEOUT, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    rep = report(out)
    assert rep["world_size"] == 2 and len(rep["rank_stages"]) == 2 and rep["quantized_modules"] == 48
    # round to nearest needs no data: each rank quantises its share of the modules, the output is the same bits
    rtn = work / "rtn-single"
    assert run_ktq("gpu", "--model_id", src, "--output_dir", rtn, "--dataset", chat, "--quant_method", "RTN",
                   "--quant_type", "W4A16", "--quiet") == 0
    a, b = tensors(rtn), tensors(out)
    assert a.keys() == b.keys()
    with TensorReader() as ra, TensorReader() as rb:
        for name in a:
            assert ra.read(a[name]).tobytes() == rb.read(b[name]).tobytes(), name


def test_the_process_group_does_not_outlive_leave(src):
    """Modules a run imports after joining (transformers imports torch.distributed.nn, whose functions take the
    default group as a default argument) must not keep the process group alive past `leave`: it would then be torn
    down during the interpreter's shutdown, where gloo aborts now and then on a busy machine ("terminate called
    without an active exception", a rank ending with exit code -6: what made a first CI run fail)."""
    import socket

    code = ("import gc, sys, weakref\n"
            "from ktq.gpu.world import join, leave\n"
            "join(force_cpu=True)\n"
            "import torch.distributed as dist\n"
            "group = weakref.ref(dist.group.WORLD)\n"
            "from transformers import AutoConfig\n"
            "AutoConfig.from_pretrained(sys.argv[1])\n"
            "leave()\n"
            "gc.collect()\n"
            "print('alive' if group() is not None else 'freed')\n")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = os.environ | {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port)}
    proc = subprocess.run([sys.executable, "-c", code, str(src)], capture_output=True, text=True, env=env,
                          timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["freed"]


def test_torchrun_environment_is_detected(monkeypatch):
    for variable in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(variable, raising=False)
    assert not in_torchrun()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not in_torchrun()
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert in_torchrun()


def test_every_option_reaches_the_workers():
    """The workers get the launcher's options as JSON: every field, none at its default, comes back equal."""
    opts = GpuOptions(model_id="/m", output_dir=Path("/o"), quant_method="RTN", quant_type="W4A16", group_size=64,
                      num_calibration_samples=7, max_sequence_length=33, dampening_frac=0.2, dataset="/d.jsonl",
                      dataset_split="test", text_column="txt", ignore_patterns=("re:.*gate$", "lm_head"),
                      torch_dtype="float16", trust_remote_code=True, random_seed=3, max_gpu_memory=10**9,
                      max_cpu_memory=2 * 10**9, force_cpu=True, dry_run=True, as_json=True, overwrite=True,
                      no_memory_check=True, quiet=True, expert_chunk=3, sample_group=32,
                      cpu_experts=CpuExpertsOptions(Path("/c"), "int8", 2, merge=False, force=True))
    defaults = GpuOptions(model_id="", output_dir=Path())
    assert all(getattr(opts, f) != getattr(defaults, f) for f in opts.__dataclass_fields__)
    assert options_from_json(options_to_json(opts)) == opts
