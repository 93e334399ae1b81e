"""`ktq gpu` as a user runs it: one-line errors with exit code 2 and no traceback, --dry_run, --force_cpu.

Failures found before torch is imported run in a real process; those found later run in-process (the `ktq`
fixture), which shares the session's imports and takes a fraction of the time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ktq_subprocess
from gpu_models import chat_rows, python_with_ktq, sample_moe, write_jsonl
from ktq.errors import KtqError


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return sample_moe(tmp_path_factory.mktemp("cli") / "src", layers=2, dense_layers=0)


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", chat_rows(4))


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ktq: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_unknown_dataset_path(src, tmp_path):
    result = ktq_subprocess("gpu", "--model_id", src, "--output_dir", tmp_path / "out",
                            "--dataset", tmp_path / "calib.jsonl")
    assert_one_line_error(result, "--dataset", "calib.jsonl: no such file or folder")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("overwrite", [(), ("--overwrite",)])
def test_a_folder_ktq_did_not_write_is_refused_and_kept(src, chat, tmp_path, overwrite):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    result = ktq_subprocess("gpu", "--model_id", src, "--output_dir", tmp_path / "out", "--dataset", chat, *overwrite)
    assert_one_line_error(result, "already holds files ktq did not write", "notes.txt")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


OFFLINE = """
import socket, sys, time
def unreachable(*args, **kwargs):
    print("ktq tried the network", file=sys.stderr)
    raise OSError("network is unreachable")
socket.socket.connect = socket.socket.connect_ex = socket.create_connection = socket.getaddrinfo = unreachable
started, cpu = time.perf_counter(), time.process_time()
from ktq.cli import main
try:
    main(sys.argv[1:])
finally:
    print(f"took {time.perf_counter() - started:.2f} {time.process_time() - cpu:.2f}", file=sys.stderr)
"""


@pytest.mark.parametrize("model, dataset, message", [
    ("nope", "{chat}", "--model_id nope is no folder here; as a Hugging Face hub id, download it first "
                       "(ktq reads no network): `hf download nope --local-dir DIR`"),
    ("org/name", "{chat}", "`hf download org/name --local-dir DIR`, then pass --model_id DIR"),
    ("model/shard.safetensors", "{chat}", "--model_id model/shard.safetensors: no such folder"),
    ("./modle", "{chat}", "--model_id ./modle: no such folder"),
    ("{src}", "calib.jsonl", "--dataset calib.jsonl: no such file or folder"),
    ("{src}", "data/calib", "--dataset data/calib is no file or folder here, and as a Hugging Face hub id it is not "
                            "in the local cache"),
])
def test_a_mistyped_path_or_a_hub_id_fails_at_once_without_the_network(src, chat, tmp_path, model, dataset,
                                                                       message):
    """The network made unreachable (and HF_HUB_OFFLINE unset): one line, no socket opened, under 2 s of CPU time
    from the import of ktq on (0.9 s wall on an idle machine; a CI box busy with other work stretches the wall
    time, so that is only bounded against waiting: retries of a network call would take tens of seconds)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    argv = ["gpu", "--model_id", model.format(src=src), "--output_dir", tmp_path / "out", "--dataset",
            dataset.format(chat=chat)]
    proc = subprocess.run([sys.executable, "-c", OFFLINE, *map(str, argv)], capture_output=True, text=True,
                          cwd=tmp_path, env={**env, "HF_HUB_CACHE": str(tmp_path / "hub")})
    *lines, took = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("ktq: error: "), proc.stderr
    assert message in lines[0]
    wall, cpu = map(float, took.split()[1:])
    assert cpu < 2.0 and wall < 10.0, took
    assert not (tmp_path / "out").exists()


def test_missing_model_folder(tmp_path, chat):
    result = ktq_subprocess("gpu", "--model_id", tmp_path / "nothing", "--output_dir", tmp_path / "out",
                            "--dataset", chat)
    assert_one_line_error(result, "--model_id", "no such folder")


def test_non_moe_model(tmp_path, chat, ktq):
    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "config.json").write_text(json.dumps({
        "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "num_hidden_layers": 2, "hidden_size": 128,
        "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512}))
    result = ktq("gpu", "--model_id", dense, "--output_dir", tmp_path / "out", "--dataset", chat)
    assert_one_line_error(result, "dense model (qwen3", "Mixture-of-Experts")


@pytest.mark.parametrize("option, value, fragment", [
    ("--max_gpu_memory", "lots", "--max_gpu_memory 'lots' is not a size"),
    ("--ignore_patterns", "re:(unclosed", "is not a valid regular expression"),
    ("--dampening_frac", "1.5", "--dampening_frac must be between 0 and 1"),
    ("--num_calibration_samples", "0", "--num_calibration_samples must be at least 1"),
    ("--nproc", "0", "--nproc must be at least 1"),
])
def test_bad_option_values(src, chat, tmp_path, option, value, fragment):
    result = ktq_subprocess("gpu", "--model_id", src, "--output_dir", tmp_path / "out", "--dataset", chat,
                            option, value)
    assert_one_line_error(result, fragment)


def test_plan_refusal_names_what_to_change(src, chat, tmp_path, ktq):
    result = ktq("gpu", "--model-id", src, "--output-dir", tmp_path / "out", "--dataset", chat,
                            "--max-cpu-memory", "1MB", "--quiet")
    assert_one_line_error(result, "the CPU must hold", "--num-calibration-samples", "--force runs anyway")


def test_debug_shows_the_traceback(tmp_path, chat):
    result = ktq_subprocess("--debug", "gpu", "--model_id", tmp_path / "nothing", "--output_dir", tmp_path / "o",
                            "--dataset", chat)
    assert result.code != 0 and "Traceback" in result.stderr and "KtqError" in result.stderr


def test_force_cpu_hides_gpus_even_when_torch_was_imported_first(src, chat, tmp_path):
    """torch imported before ktq, CUDA not yet initialised: the plan runs on the CPU and torch sees no GPU."""
    code = (
        "import torch, sys\n"
        "from ktq.cli import main\n"
        "try:\n"
        f"    main(['gpu', '--model_id', {str(src)!r}, '--output_dir', {str(tmp_path / 'o')!r},\n"
        f"          '--dataset', {str(chat)!r}, '--force_cpu', '--dry_run'])\n"
        "except SystemExit as exc:\n"
        "    visible = __import__('os').environ['CUDA_VISIBLE_DEVICES']\n"
        "    print('exit', exc.code, 'cuda', torch.cuda.is_available(), repr(visible))\n")
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    proc = subprocess.run(python_with_ktq(code), capture_output=True, text=True, env=env)
    assert proc.stdout.strip().endswith("exit 0 cuda False ''"), proc.stdout + proc.stderr
    assert "GPTQ W8A16 on cpu" in proc.stderr


def test_force_cpu_refuses_when_cuda_is_already_initialised(monkeypatch):
    import torch

    from ktq.gpu.devices import hide_gpus

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # what an initialised CUDA keeps answering
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(KtqError, match="cannot hide the GPUs: CUDA was already initialised"):
        hide_gpus()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""


def test_dry_run_writes_nothing(src, chat, tmp_path, ktq):
    result = ktq("gpu", "--model-id", src, "--output-dir", tmp_path / "out", "--dataset", chat,
                            "--dry-run", "--quant-type", "W4A16")
    assert result.code == 0, result.stderr
    assert "ktq gpu plan: GPTQ W4A16 on cpu" in result.stderr and "Hessians" in result.stderr
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_dry_run_json_is_the_plan_on_stdout(src, chat, tmp_path, ktq):
    result = ktq("gpu", "--model-id", src, "--output-dir", tmp_path / "out", "--dataset", chat, "--dry-run", "--json",
                 "--quant-type", "W4A16")
    assert result.code == 0, result.stderr
    plan = json.loads(result.stdout)
    assert (plan["command"], plan["model_id"], plan["quant_method"], plan["quant_type"]) == \
        ("gpu", str(src), "GPTQ", "W4A16")
    # 2 MoE layers of 8 experts x gate/up/down, hidden = moe_intermediate = 128: one layer's Hessians at a time,
    # one shared by every gate and up projection and one per down projection
    assert plan["num_layers"] == 2 and plan["quantized_linears"] == 2 * 24
    assert plan["hessians"] == 9 and plan["hessian_bytes"] == 9 * 4 * 128 * 128
    assert plan["ignored_linears"] == {"attention": 8, "lm_head": 1}
    assert plan["device"] == "cpu" and plan["fits"] and plan["problems"] == []
    assert plan["cpu_peak_bytes"] <= plan["cpu_budget_bytes"] and plan["source"].startswith("safetensors headers")
    assert "ktq gpu plan" not in result.stderr  # the JSON instead of the table
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_dry_run_json_that_does_not_fit_prints_the_plan_and_exits_2(src, chat, tmp_path, ktq):
    result = ktq("gpu", "--model-id", src, "--output-dir", tmp_path / "out", "--dataset", chat, "--dry-run", "--json",
                 "--max-cpu-memory", "1MB")
    assert_one_line_error(result, "the CPU must hold", "--force runs anyway")
    plan = json.loads(result.stdout)
    assert not plan["fits"] and plan["cpu_budget_bytes"] == 10**6 and plan["cpu_peak_bytes"] > 10**6
    assert plan["problems"][0].startswith("the CPU must hold")


def test_json_goes_with_dry_run(src, chat, tmp_path):
    result = ktq_subprocess("gpu", "--model_id", src, "--output_dir", tmp_path / "out", "--dataset", chat, "--json")
    assert_one_line_error(result, "--json prints the plan of --dry-run")
    assert not (tmp_path / "out").exists()
