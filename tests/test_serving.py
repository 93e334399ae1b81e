"""What ktq's outputs promise the loaders that serve them (docs/serving-rules.md): serve lines that start sglang-kt,
from every command; the GPU checkpoint's quantization_config against the loader rules, checked on modules found
independently of ktq's own bookkeeping; the tensor-parallel sizes; ignore rules a loader cannot honour refused."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from gpu_models import run_ktq_capture, sample_moe, tensors
from ktq.serving import UNKNOWN_MODEL, config_problems, tp_problem, working_tp_sizes

pytestmark = pytest.mark.usefixtures("two_numa_nodes")

KT_METHODS = {"AMXINT4", "AMXINT8", "RAWINT4", "BF16", "FP8"}
REQUIRED = {"--model-path", "--kt-weight-path", "--kt-method", "--kt-cpuinfer", "--kt-threadpool-count",
            "--kt-num-gpu-experts"}


def serve_flags(line: str) -> dict[str, str]:
    """A `serve with:` line parsed as a shell would split it: sglang's launcher and every flag sglang-kt needs to
    start (kt-kernel divides --kt-cpuinfer by --kt-threadpool-count; the placement file is read only with the
    frequency strategy, by torch.load with weights_only as sglang-kt loads it)."""
    import torch

    assert line.startswith("serve with: "), line
    argv = shlex.split(line.removeprefix("serve with: "))
    assert argv[:3] == ["python", "-m", "sglang.launch_server"], line
    names, values = argv[3::2], argv[4::2]
    assert len(names) == len(values) and all(n.startswith("--") and not v.startswith("--")
                                             for n, v in zip(names, values)), line
    flags = dict(zip(names, values))
    assert REQUIRED <= flags.keys(), line
    assert flags["--kt-method"] in KT_METHODS
    assert int(flags["--kt-cpuinfer"]) >= int(flags["--kt-threadpool-count"]) >= 1
    assert int(flags["--kt-num-gpu-experts"]) >= 0
    assert Path(flags["--kt-weight-path"]).is_dir()
    if "--init-expert-location" in flags:
        assert flags["--kt-expert-placement-strategy"] == "frequency"
        counts = torch.load(flags["--init-expert-location"], weights_only=True)["logical_count"]
        assert counts.dim() == 3 and counts.shape[0] == 1 and counts.sum() > 0
    else:
        assert "--kt-expert-placement-strategy" not in flags
    return flags


def serves(text: str) -> list[dict[str, str]]:
    return [serve_flags(line) for line in text.splitlines() if line.startswith("serve with:")]


def test_every_command_prints_serve_lines_that_start_a_server(ktq, moe_sample, gpu_outputs, tmp_path):
    cpu = ktq("cpu", "-i", moe_sample, "-o", tmp_path / "cpu", "--threadpool-count", 2)
    (line,) = serves(cpu.stdout)
    assert (line["--model-path"], line["--kt-method"], line["--kt-threadpool-count"]) == \
        (str(moe_sample), "AMXINT4", "2")

    assert ktq("cpu", "-i", moe_sample, "-o", tmp_path / "tree", "--threadpool-count", 2, "--quiet",
               "--no-merge-safetensor").code == 0
    merged = ktq("merge", tmp_path / "tree", tmp_path / "merged", "--original-path", moe_sample)
    (line,) = serves(merged.stdout)
    assert line["--model-path"] == str(moe_sample)
    assert Path(line["--kt-weight-path"]).resolve() == (tmp_path / "merged").resolve()
    unknown = ktq("merge", tmp_path / "tree", tmp_path / "merged-alone")
    (line,) = serves(unknown.stdout)
    assert line["--model-path"] == UNKNOWN_MODEL and f"note: {UNKNOWN_MODEL} stands for" in unknown.stdout

    (line,) = serves(ktq("inspect", tmp_path / "cpu").stdout)
    assert line["--kt-weight-path"] == str((tmp_path / "cpu").resolve())

    gpu, printed = gpu_outputs("gptq32")  # GPTQ W4A16 in groups of 32, with calibrated AMXINT4 CPU experts
    cpu_out = gpu.parent / "gptq32-cpu"
    for text in (printed, ktq("inspect", gpu).stdout):
        amx, raw = serves(text)
        assert amx["--model-path"] == raw["--model-path"] == str(gpu.resolve())
        assert (amx["--kt-method"], amx["--kt-weight-path"], amx["--kt-threadpool-count"]) == \
            ("AMXINT4", str(cpu_out.resolve()), "1")
        assert amx["--init-expert-location"] == str(cpu_out.resolve() / "init_expert_location.pt")
        assert (raw["--kt-method"], raw["--kt-weight-path"]) == ("RAWINT4", str(gpu.resolve()))
        assert raw["--init-expert-location"] == str(gpu.resolve() / "init_expert_location.pt")
        assert "counted over all layers together" in text  # what the frequency strategy does


def test_no_rawint4_line_for_groups_kt_kernel_computes_wrongly(ktq, moe_sample, gpu_outputs):
    """Groups of 128: the experts' CPU side is offered from the source as stored (kt-kernel's BF16), never RAWINT4,
    and ktq says why."""
    out, printed = gpu_outputs("rtn128")
    for text in (printed, ktq("inspect", out).stdout):
        (line,) = serves(text)
        assert (line["--kt-method"], line["--kt-weight-path"]) == ("BF16", str(moe_sample.resolve()))
        assert "no RAWINT4 line: kt-kernel 0.7.2 computes RAWINT4 right only for int4 weights in groups of 32" in \
            " ".join(text.split())


@pytest.mark.parametrize("hidden, intermediate, group, working", [
    (2048, 768, 128, [1, 2]),  # Qwen3-30B-A3B: shares of 192 and 96 hold no whole group of 128
    (2048, 768, 32, [1, 2, 4, 8]),
    (4096, 1536, 128, [1, 2, 4]),  # Qwen3-235B-A22B
    (7168, 2048, 128, [1, 2, 4, 8]),  # DeepSeek-V3, Kimi-K2
    (5120, 1408, 32, [1, 2, 4]),  # GLM-4.5: 176 columns at TP 8
    (5120, 1408, -1, [1, 2, 4, 8]),  # one scale per channel: any whole number of int32 words
])
def test_tp_sizes_follow_sglangs_share_of_each_expert(hidden, intermediate, group, working):
    assert working_tp_sizes(hidden, intermediate, 4, group) == working


def test_tp_problems_name_what_does_not_divide():
    assert tp_problem(1, 100, 96, 4, 32) == "hidden_size 100 is not a whole number of int32 words of 4-bit codes"
    assert tp_problem(8, 2048, 768, 4, 128) == "a share of 96 is not a multiple of the group size 128"
    assert tp_problem(3, 2048, 1408, 8, 32) == "moe_intermediate_size 1408 does not split into 3 shares"


def test_the_plan_and_inspect_say_which_tp_sizes_serve(ktq, moe_sample, gpu_outputs, tmp_path):
    """moe_sample's experts have 256 intermediate columns: groups of 128 leave a share of 64 at TP 4."""
    plan = ktq("gpu", "--model_id", moe_sample, "--output_dir", tmp_path / "out", "--quant_method", "RTN",
               "--group_size", 128, "--dry_run", "--json", "--force_cpu")
    assert json.loads(plan.stdout)["tp_sizes"] == [1, 2]
    table = ktq("gpu", "--model_id", moe_sample, "--output_dir", tmp_path / "out", "--quant_method", "RTN",
                "--group_size", 128, "--dry_run", "--force_cpu")
    assert "serves with" in table.stderr and "TP 1, 2 (not 4:" in table.stderr
    out, _ = gpu_outputs("rtn128")
    inspected = json.loads(ktq("inspect", out, "--json").stdout)
    assert inspected["kind"] == "gpu-checkpoint" and inspected["tp_sizes"] == [1, 2]
    assert inspected["tp"].startswith("TP 1, 2 (not 4: a share of 64 is not a multiple of the group size 128")


# --- the written quantization_config against the loader rules ----------------------------------------------------

def linear_modules(folder: Path) -> set[str]:
    """The Linears transformers builds for this config (names as the checkpoint stores them)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    return {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def loader_view(src: Path, out: Path) -> tuple[dict, int, int, dict[str, list[str]], list[str], list[str]]:
    """What the loaders find in a ktq gpu output, from its files and transformers' model, not from ktq: the config,
    hidden and moe_intermediate sizes, each MoE layer's expert projections, the Linears kept as the source stores them
    and the FP8 ones, each under every name a loader looks it up by. DeepSeek's MTP layer (index num_hidden_layers)
    is built by sglang's NextN draft under `model.decoder` (its own eh_proj under `model`)."""
    config = json.loads((out / "config.json").read_text())
    written = tensors(out)
    experts: dict[str, list[str]] = {}
    for name in written:
        found = re.match(r"^(.*\.experts)\.\d+\.(gate|up|down)_proj\.weight(_packed)?$", name)
        if found:
            experts.setdefault(found[1], []).append(name.rsplit(".", 1)[0])
    mtp = f"model.layers.{config['num_hidden_layers']}"
    linears = linear_modules(src) | {name.removesuffix(".weight") for name in written if name.startswith(mtp + ".")
                                     and name.endswith(".weight") and len(written[name].shape) == 2
                                     and "embed_tokens" not in name and ".experts." not in name}

    def names(module: str) -> list[str]:
        if not module.startswith(mtp + "."):
            return [module]
        rest = module[len(mtp) + 1:]
        return [module, f"model.{rest}" if rest == "eh_proj" else f"model.decoder.{rest}"]

    quantised = {m for layer in experts.values() for m in layer if f"{m}.weight_packed" in written}
    kept, fp8 = [], []
    for module in sorted(linears - quantised):
        stored = written.get(f"{module}.weight")
        if stored is not None:
            (fp8 if stored.dtype == "F8_E4M3" else kept).extend(names(module))
    return (config["quantization_config"], config["hidden_size"], config["moe_intermediate_size"], experts, kept,
            fp8)


@pytest.fixture(scope="module")
def deepseek_fp8(tmp_path_factory) -> tuple[Path, Path]:
    """An FP8 deepseek_v3 sample (MLA, shared experts, MTP layer) and its RTN W4A16 checkpoint."""
    from ktq.sample import write_sample

    work = tmp_path_factory.mktemp("deepseek-fp8")
    src = write_sample(work / "src", arch="deepseek_v3", dtype="fp8", layers=3, experts=4, hidden=256,
                       moe_intermediate=128, dense_layers=1, seed=5)
    code, _, err = run_ktq_capture("gpu", "--model_id", src, "--output_dir", work / "out", "--quant_method", "RTN",
                                   "--quant_type", "W4A16", "--force_cpu", "--quiet")
    assert code == 0, err
    return src, work / "out"


def test_an_fp8_checkpoint_passes_the_loader_rules(deepseek_fp8):
    src, out = deepseek_fp8
    qc, hidden, intermediate, experts, kept, fp8 = loader_view(src, out)
    assert config_problems(qc, hidden, intermediate, experts, kept, fp8) == []
    mtp = experts["model.layers.3.mlp.experts"]  # the MTP layer's experts, quantised like the others
    assert len(mtp) == 4 * 3 and all(f"{m}.weight_packed" in tensors(out) for m in mtp)
    assert {"model.decoder.self_attn.kv_b_proj", "model.decoder.mlp.shared_experts.down_proj"} <= set(fp8)
    assert {"model.eh_proj", "lm_head", "model.decoder.mlp.gate"} <= set(kept)
    weights = next(g for g in qc["config_groups"].values() if "Linear" in g["targets"])["weights"]
    assert (weights["actorder"], weights["symmetric"], weights["group_size"]) == (None, True, 32)
    assert qc["linear_fp8_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                       "weight_block_size": [128, 128]}


def test_a_bf16_gptq_checkpoint_passes_the_loader_rules(moe_sample, gpu_outputs):
    out, _ = gpu_outputs("gptq32")
    qc, hidden, intermediate, experts, kept, fp8 = loader_view(moe_sample, out)
    assert fp8 == [] and "linear_fp8_config" not in qc and len(qc["config_groups"]) == 1
    assert config_problems(qc, hidden, intermediate, experts, kept, fp8) == []


def test_the_rule_check_finds_each_broken_rule(deepseek_fp8):
    """The check above can fail: each rule broken on its own is reported."""
    src, out = deepseek_fp8
    qc, hidden, intermediate, experts, kept, fp8 = loader_view(src, out)
    group = next(name for name, g in qc["config_groups"].items() if "Linear" in g["targets"])

    def broken(change) -> list[str]:
        copy = json.loads(json.dumps(qc))
        change(copy)
        return config_problems(copy, hidden, intermediate, experts, kept, fp8)

    assert "actorder is 'static'" in broken(lambda c: c["config_groups"][group]["weights"].update(actorder="static"))[0]
    assert "not symmetric" in broken(lambda c: c["config_groups"][group]["weights"].update(symmetric=False))[0]
    assert "group size 48" in broken(lambda c: c["config_groups"][group]["weights"].update(group_size=48))[0]
    one = "model.layers.1.mlp.experts.0.gate_proj"
    assert "1 of its 12 expert projections are ignored" in broken(lambda c: c["ignore"].append(one))[0]
    gate = "model.decoder.mlp.gate"
    assert f"not in ignore, e.g. {gate}" in broken(lambda c: c["ignore"].remove(gate))[0]
    assert "without linear_fp8_config" in broken(lambda c: c.pop("linear_fp8_config"))[0]
    assert "have no FP8 scheme" in broken(lambda c: c["ignore"].append("model.decoder.self_attn.o_proj"))[0]


# --- ignore rules a loader cannot honour --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("ignores")
    return sample_moe(work / "src", layers=3, dense_layers=1, experts=4), work


def test_ignoring_some_of_a_layers_experts_is_refused_in_one_line(small):
    src, work = small
    code, out, err = run_ktq_capture("gpu", "--model_id", src, "--output_dir", work / "some", "--quant_method", "RTN",
                                     "--ignore_patterns", r"re:.*experts\.0\.", "--force_cpu", "--quiet")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("ktq: error: --ignore_patterns keeps 3 of the 12 expert projections of "
                          "model.layers.1.mlp.experts unquantised (e.g. model.layers.1.mlp.experts.0.gate_proj)")
    assert not (work / "some").exists()


def test_ignoring_a_whole_layers_experts_is_served(small, tmp_path):
    src, work = small
    code, _, err = run_ktq_capture("gpu", "--model_id", src, "--output_dir", work / "layer", "--quant_method", "RTN",
                                   "--ignore_patterns", r"re:.*layers\.1\.mlp\.experts\..*", "--force_cpu", "--quiet")
    assert code == 0, err
    written = tensors(work / "layer")
    assert written["model.layers.1.mlp.experts.3.down_proj.weight"].dtype == "BF16"
    assert "model.layers.2.mlp.experts.3.down_proj.weight_packed" in written
    qc, hidden, intermediate, experts, kept, fp8 = loader_view(src, work / "layer")
    assert config_problems(qc, hidden, intermediate, experts, kept + experts["model.layers.1.mlp.experts"], fp8) == []


def test_inspect_verifies_a_gpu_checkpoint_against_its_digests(ktq, gpu_outputs, tmp_path):
    import shutil

    src, _ = gpu_outputs("rtn32")
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    assert json.loads(ktq("inspect", out, "--verify", "--json").stdout)["verified"] is True
    shard = sorted(out.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-7] ^= 1  # one bit of the last tensor's data
    shard.write_bytes(bytes(data))
    result = ktq("inspect", out, "--verify")
    assert result.code == 2 and "serve with: nothing" in result.stdout
    assert result.stderr == (f"ktq: error: {out}: {shard.name} does not match its xxh3_128 in ktq_gpu.json "
                             "(damaged or changed)\n")
