"""Calibrated CPU experts (ktq cpu --calibrate, ktq gpu --cpu-output): kt-kernel's format with codes chosen on the
layer's real inputs, better than round to nearest on held-out text, resumable to the same bytes, and the placement
file sglang-kt reads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import mtimes, tree_files
from faults import ForkServer
from gpu_models import chat_rows, run_ktq, run_ktq_capture, write_jsonl
from ktq.calibrated import grid_kernels
from ktq.calibrated.ktgrid import (
    _feedback_factor,
    _round_block,
    clipped_steps,
    quantize_to_grid,
    warm_up,
)
from ktq.calibrated.output import dequantized_layer
from ktq.cpu.layout import Layout
from ktq.cpu.scan import recognise
from ktq.kernels import ktformat as fmt

LEVELS = {m.bits: m.max_code for m in fmt.METHODS.values()}  # the codes kt-kernel serves right: [-LEVELS, LEVELS]
STEP = {m.bits: m.code_step for m in fmt.METHODS.values()}  # value = code x STEP x scale

SAMPLES = ("--num_calibration_samples", 12, "--max_sequence_length", 64)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("calibrated")


@pytest.fixture(scope="module")
def chat(work) -> Path:
    return write_jsonl(work / "chat.jsonl", chat_rows(24))


@pytest.fixture(scope="module")
def src(work) -> Path:
    """qwen3_moe, 3 layers (one dense), 8 experts, intermediate 256 (two INT4 NUMA parts), with heavy-tailed
    per-channel gains on the post-attention norms: the experts' inputs have outlier channels, as in real models."""
    from safetensors.torch import load_file, save_file

    from ktq.sample import write_sample

    folder = write_sample(work / "src", layers=3, experts=8, hidden=128, moe_intermediate=256, dense_layers=1,
                          seed=3)
    generator = torch.Generator().manual_seed(0)
    for shard in folder.glob("*.safetensors"):
        tensors = load_file(shard)
        for name, tensor in tensors.items():
            if name.endswith("post_attention_layernorm.weight"):
                gains = torch.exp(torch.randn(tensor.shape, generator=generator))
                tensors[name] = (tensor.float() * gains).to(tensor.dtype)
        save_file(tensors, shard, metadata={"format": "pt"})
    return folder


def calibrate(src: Path, out: Path, chat: Path, *extra: object) -> list[object]:
    return ["cpu", "-i", src, "-o", out, "--calibrate", chat, *SAMPLES, "--force_cpu", "--quiet", *extra]


@pytest.fixture(scope="module")
def int4(src, chat, work) -> Path:
    assert run_ktq(*calibrate(src, work / "int4", chat, "--quant-method", "int4", "--threadpool-count", 2)) == 0
    return work / "int4"


def rtn(src: Path, out: Path, method: str, numa: int, *extra: object) -> Path:
    if not out.exists():
        assert run_ktq("cpu", "-i", src, "-o", out, "--quant-method", method, "--threadpool-count", numa, "--quiet",
                       *extra) == 0
    return out


def header_and_sizes(folder: Path) -> dict[str, object]:
    """Every file's size, and for shards their safetensors header: what must equal between RTN and calibrated."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name not in ("ktq.json", "init_expert_location.pt"):
            head = path.read_bytes()[:8 + int.from_bytes(path.read_bytes()[:8], "little")] \
                if path.suffix == ".safetensors" else b""
            found[str(path.relative_to(folder))] = (path.stat().st_size, head)
    return found


@pytest.mark.parametrize("method, numa, form", [("int4", 2, "merged"), ("int8", 1, "kt")])
def test_calibrated_output_has_the_names_sizes_and_headers_of_round_to_nearest(src, chat, work, int4, method, numa,
                                                                              form):
    extra = () if form == "merged" else ("--no-merge-safetensor",)
    out = int4 if (method, numa, form) == ("int4", 2, "merged") else work / f"{method}-{form}"
    if not out.exists():
        assert run_ktq(*calibrate(src, out, chat, "--quant-method", method, "--threadpool-count", numa, *extra)) == 0
    reference = rtn(src, work / f"rtn-{method}-{numa}-{form}", method, numa, *extra)
    assert header_and_sizes(out) == header_and_sizes(reference)
    code, stdout, stderr = run_ktq_capture("inspect", out, "--verify")
    assert code == 0, stderr
    assert "no problem" in stdout and "calibrated" in stdout and "hottest experts" in stdout
    manifest = json.loads((out / "ktq.json").read_text())
    assert manifest["complete"] and manifest["calibration"]["samples"] == 12
    assert manifest["calibration"]["tokens"] > 12 * 32
    # the codes are not round to nearest's, and stay inside what both kt-kernel kernels decode
    found = recognise(out)
    bits = fmt.METHODS[method].bits
    for layer in found.layout.layers:
        mine, theirs = dequantized_layer(out, found.layout, layer), dequantized_layer(reference, found.layout, layer)
        assert not all(torch.equal(a, b) for a, b in zip(mine, theirs))
        for values in mine:
            assert torch.isfinite(values).all()
    body = next(p for p in sorted(out.rglob("*")) if p.is_file() and (p.suffix == ".safetensors" or "quant" in p.name))
    assert codes_within(body, found.layout, bits)


def codes_within(path: Path, layout: Layout, bits: int) -> bool:
    """No INT4 nibble 8 (-8) and no INT8 byte 0x80 (-128) anywhere in the file's weight bytes."""
    data = np.fromfile(path, np.uint8)
    if path.suffix == ".safetensors":
        header = int.from_bytes(data[:8].tobytes(), "little")
        meta = json.loads(data[8:8 + header].tobytes())
        data = np.concatenate([data[8 + header + v["data_offsets"][0]:8 + header + v["data_offsets"][1]]
                               for k, v in meta.items() if k.endswith(".weight")])
    if bits == 8:
        return not (data == 0x80).any()
    return not ((data & 0xF) == 8).any() and not ((data >> 4) == 8).any()


def moe_errors(src: Path, outputs: list[Path], texts: list[str]) -> list[list[float]]:
    """Per output and MoE layer: ||y_q - y||^2 / ||y||^2 of the routed experts' output on the bf16 model's own
    inputs to them (held-out texts), y_q computed with the output's dequantised experts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    caught: dict[int, list] = {}
    for i, layer in enumerate(model.model.layers):
        if hasattr(layer.mlp, "experts"):
            layer.mlp.experts.register_forward_pre_hook(
                lambda module, args, i=i: caught.setdefault(i, []).append([a.detach() for a in args]))
    with torch.no_grad():
        for text in texts:
            model(**tokenizer(text, return_tensors="pt"))

    def moe(x, ids, w, gate, up, down):
        y = torch.zeros_like(x)
        for slot in range(ids.shape[1]):
            for e in ids[:, slot].unique().tolist():
                rows = ids[:, slot] == e
                h = torch.nn.functional.silu(x[rows] @ gate[e].T) * (x[rows] @ up[e].T)
                y[rows] += w[rows, slot, None] * (h @ down[e].T)
        return y

    errors = []
    for out in outputs:
        layout = recognise(out).layout
        per_layer = []
        for i, batches in caught.items():
            experts = model.model.layers[i].mlp.experts
            inter = experts.gate_up_proj.shape[1] // 2
            original = (experts.gate_up_proj[:, :inter], experts.gate_up_proj[:, inter:], experts.down_proj)
            quantised = dequantized_layer(out, layout, i)
            num = den = 0.0
            for x, ids, w in batches:
                reference = moe(x, ids, w, *(t.detach() for t in original))
                num += (moe(x, ids, w, *quantised) - reference).square().sum().item()
                den += reference.square().sum().item()
            per_layer.append(num / den)
        errors.append(per_layer)
    return errors


def held_out_texts(src: Path) -> list[str]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src)
    return [tokenizer.apply_chat_template(row["messages"], tokenize=False) for row in chat_rows(8, seed=99)]


def test_calibrated_experts_beat_round_to_nearest_on_held_out_text(src, chat, work, int4):
    int8 = work / "int8-merged"
    assert run_ktq(*calibrate(src, int8, chat, "--quant-method", "int8", "--threadpool-count", 1)) == 0
    outputs = [int4, rtn(src, work / "rtn-int4-2-merged", "int4", 2), int8, rtn(src, work / "rtn-int8-1", "int8", 1)]
    calibrated4, rtn4, calibrated8, rtn8 = moe_errors(src, outputs, held_out_texts(src))
    for mine, theirs, bound in ((calibrated4, rtn4, 0.8), (calibrated8, rtn8, 0.9)):
        for layer_mine, layer_theirs in zip(mine, theirs):
            assert layer_mine < bound * layer_theirs, (mine, theirs)


def test_placement_file_holds_the_routed_counts_of_every_decoder_layer(int4):
    placement = torch.load(int4 / "init_expert_location.pt")
    assert set(placement) == {"logical_count"}
    counts = placement["logical_count"]
    assert counts.shape == (1, 3, 8) and counts.dtype == torch.int64
    assert counts[0, 0].eq(0).all()  # the dense layer
    manifest = json.loads((int4 / "ktq.json").read_text())
    tokens = manifest["calibration"]["tokens"]
    for layer in (1, 2):
        assert counts[0, layer].tolist() == manifest["layers"][str(layer)]["routed"]
        assert counts[0, layer].sum() == 2 * tokens  # top-2 routing: every token reaches two experts


def test_killed_anywhere_the_rerun_ends_with_the_same_bytes(src, chat, work, int4, tmp_path_factory):
    forks = ForkServer(tmp_path_factory.mktemp("calibrated-forks"), "gpu")
    args = ["--quant-method", "int4", "--threadpool-count", 2]
    try:
        root = work / "kills"
        reference = forks.run(calibrate(src, root / "reference", chat, *args), root)
        assert reference.code == 0, reference.log
        expected = tree_files(root / "reference")
        assert expected == tree_files(int4)  # deterministic: the same bytes as the fixture's run
        for point in (2, reference.events // 2, reference.events - 3):
            out = root / f"killed-at-{point}"
            killed = forks.run(calibrate(src, out, chat, *args), root, kill_at=point)
            assert killed.killed, killed.log
            rerun = forks.run(calibrate(src, out, chat, *args), root)
            assert rerun.code == 0, rerun.log
            assert tree_files(out) == expected, point
    finally:
        forks.close()


def one_pass(src: Path, out: Path, chat: Path) -> list[object]:
    """ktq gpu writing both artifacts: out/gpu and, calibrated in the same pass, out/cpu."""
    return ["gpu", "--model_id", src, "--output_dir", out / "gpu", "--cpu-output", out / "cpu", "--dataset", chat,
            *SAMPLES, "--quant_type", "W4A16", "--threadpool-count", 2, "--force_cpu", "--quiet"]


def both_artifacts(out: Path) -> dict[str, bytes]:
    """Every file of both artifacts but the GPU run's log and report (they hold times)."""
    files = {f"gpu/{name}": data for name, data in tree_files(out / "gpu").items()
             if name not in ("ktq_gpu.log", "ktq_gpu_report.json")}
    return files | {f"cpu/{name}": data for name, data in tree_files(out / "cpu").items()}


def test_one_pass_killed_at_every_kind_of_moment_ends_with_the_same_bytes(src, chat, work, tmp_path_factory):
    """SIGKILL after a layer was calibrated and solved but before anything of it was written; between the GPU shard
    and the CPU layer of one layer; in the middle of a CPU layer's shard; once the GPU checkpoint is complete and
    the CPU experts are not: the same command then ends with both artifacts byte-identical to an uninterrupted
    run. Re-run once more, a complete run writes nothing (no file's mtime changes) and says so."""
    forks = ForkServer(tmp_path_factory.mktemp("one-pass-forks"), "gpu")
    try:
        root = work / "one-pass-kills"
        reference = forks.run(one_pass(src, root / "reference", chat), root)
        assert reference.code == 0, reference.log
        expected = both_artifacts(root / "reference")
        trace = reference.trace

        def event(entry: str, last: bool = False) -> int:
            """The number of the (first or last) event `entry` of the reference run, under out/."""
            found = [n for n, seen in enumerate(trace, 1) if seen == entry.format(out="reference")]
            assert found, entry
            return found[-1] if last else found[0]

        gpu_shard = event("open {out}/gpu/.model-00002-of-00004.safetensors.partial")  # layer 1, the first MoE
        cpu_shard = event("open {out}/cpu/.model-00001-of-00002.safetensors.partial")  # its CPU experts
        cpu_committed = event("replace {out}/cpu/model-00001-of-00002.safetensors.pending")
        points = {
            "calibrated, nothing of the layer written": gpu_shard,
            "between the GPU shard and the CPU layer": cpu_shard,
            "inside the CPU layer's shard": (cpu_shard + cpu_committed) // 2,
            "after the GPU checkpoint is complete": event("replace {out}/gpu/ktq_gpu.json", last=True) + 1,
        }
        for moment, point in points.items():
            out = root / f"killed-at-{point}"
            killed = forks.run(one_pass(src, out, chat), root, kill_at=point)
            assert killed.killed, (moment, killed.log)
            gpu_before = mtimes(out / "gpu")
            rerun = forks.run(one_pass(src, out, chat), root)
            assert rerun.code == 0, (moment, rerun.log)
            assert both_artifacts(out) == expected, moment
            if moment == "after the GPU checkpoint is complete":  # continued without touching it
                assert mtimes(out / "gpu") == gpu_before
        before = mtimes(root / "reference")
        again = forks.run([a for a in one_pass(src, root / "reference", chat) if a != "--quiet"], root)
        assert again.code == 0 and again.events == 0, again.log
        assert again.log.count("is complete already: nothing to do") == 2, again.log
        assert mtimes(root / "reference") == before
    finally:
        forks.close()


def test_a_complete_calibrated_output_re_run_writes_nothing(src, chat, work, int4, tmp_path):
    out = tmp_path / "int4"
    shutil.copytree(int4, out)  # mtimes kept
    before = mtimes(out)
    code, _, stderr = run_ktq_capture(*[a for a in calibrate(src, out, chat, "--quant-method", "int4",
                                                             "--threadpool-count", 2) if a != "--quiet"])
    assert code == 0 and f"{out} is complete already: nothing to do" in stderr, stderr
    assert mtimes(out) == before


def test_other_calibration_data_does_not_continue_an_output(src, chat, work, int4):
    other = work / "other"
    assert run_ktq(*calibrate(src, other, chat, "--quant-method", "int4", "--threadpool-count", 2)) == 0
    code, _, stderr = run_ktq_capture(*calibrate(src, other, chat, "--quant-method", "int4", "--threadpool-count", 2,
                                                 "--num_calibration_samples", 6))
    assert code != 0 and "calibration" in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert run_ktq(*calibrate(src, other, chat, "--quant-method", "int4", "--threadpool-count", 2,
                              "--num_calibration_samples", 6, "--force")) == 0
    assert json.loads((other / "ktq.json").read_text())["calibration"]["samples"] == 6


def test_one_pass_writes_both_artifacts_and_the_gpu_one_is_unchanged(src, chat, work):
    gpu = ["gpu", "--model_id", src, "--dataset", chat, *SAMPLES, "--quant_type", "W4A16", "--force_cpu", "--quiet"]
    assert run_ktq(*gpu, "--output_dir", work / "gpu-alone") == 0
    assert run_ktq(*gpu, "--output_dir", work / "gpu-both", "--cpu-output", work / "cpu-both", "--cpu-method", "int8",
                   "--threadpool-count", 1) == 0
    alone, both = tree_files(work / "gpu-alone"), tree_files(work / "gpu-both")
    for name in alone:
        if name.endswith(".safetensors") or name == "config.json":
            assert both[name] == alone[name], name
    report = json.loads(both["ktq_gpu_report.json"])
    placement = torch.load(work / "gpu-both" / "init_expert_location.pt")["logical_count"]
    cpu_placement = torch.load(work / "cpu-both" / "init_expert_location.pt")["logical_count"]
    assert torch.equal(placement, cpu_placement)
    for name, counts in report["routed_tokens"].items():
        assert placement[0, int(name.split(".")[2])].tolist() == counts
    code, stdout, stderr = run_ktq_capture("inspect", work / "cpu-both", "--verify")
    assert code == 0 and "no problem" in stdout, stderr


@pytest.mark.parametrize("args, message", [
    (("--resume-layer", 1), "resumes by itself"),
    (("--threadpool-count", 3), "--threadpool-count"),
])
def test_refusals_are_one_line(src, chat, work, args, message):
    code, _, stderr = run_ktq_capture(*calibrate(src, work / "refused", chat, *args))
    assert code != 0 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not (work / "refused").exists()


def test_cpu_output_needs_calibration_data(src, work):
    code, _, stderr = run_ktq_capture("gpu", "--model_id", src, "--output_dir", work / "rtn-gpu", "--quant_method",
                                      "RTN", "--cpu-output", work / "rtn-cpu", "--force_cpu")
    assert code != 0 and "--quant_method GPTQ" in stderr and len(stderr.strip().splitlines()) == 1, stderr


# --- the grid solver itself -----------------------------------------------------------------------------------

def test_with_independent_columns_gptq_is_round_to_nearest_on_the_clipped_steps():
    """An identity Hessian carries no error between columns: GPTQ's codes are plain rounding, in any order."""
    generator = torch.Generator().manual_seed(1)
    weights = torch.randn((3, 64, 256), generator=generator)
    for bits in (4, 8):
        gptq = quantize_to_grid(weights, torch.eye(256).expand(3, 256, 256).clone(), bits)
        plain = quantize_to_grid(weights, None, bits)
        assert torch.equal(gptq.scales, plain.scales)
        assert torch.equal(gptq.codes, plain.codes)
        assert gptq.codes.abs().max() == LEVELS[bits]
        steps = (gptq.scales * STEP[bits]).repeat_interleave(256, dim=2)
        assert torch.equal(gptq.codes.float(), torch.clamp(torch.round(weights / steps), -LEVELS[bits], LEVELS[bits]))
        assert not gptq.rounded.any() and plain.rounded.all()


def test_a_hessian_that_is_zero_gives_round_to_nearest():
    weights = torch.randn((2, 32, 128))
    result = quantize_to_grid(weights, torch.zeros((2, 128, 128)), 4)
    assert torch.equal(result.codes, quantize_to_grid(weights, None, 4).codes)


def test_grid_codes_lower_the_error_on_correlated_inputs():
    generator = torch.Generator().manual_seed(2)
    mix = torch.randn((128, 128), generator=generator) * torch.exp(torch.randn(128, generator=generator))
    x = torch.randn((4096, 128), generator=generator) @ mix
    held_out = torch.randn((4096, 128), generator=generator) @ mix
    weights = torch.randn((1, 96, 128), generator=generator)
    hessian = (x.T @ x / len(x))[None]
    for bits in (4, 8):
        gptq = quantize_to_grid(weights, hessian.clone(), bits).dequantize(bits)
        plain = quantize_to_grid(weights, None, bits).dequantize(bits)
        error = [(held_out @ (q[0] - weights[0]).T).square().sum() for q in (gptq, plain)]
        assert error[0] < 0.7 * error[1], error


def _textbook_gptq(weights: torch.Tensor, hessians: torch.Tensor, bits: int, dampening: float = 0.01) -> torch.Tensor:
    """GPTQ as its paper writes it, in float64: one column at a time, no lazy blocks, the inverse factor from
    cholesky, cholesky_inverse, cholesky; ktgrid's clipped steps and activation order."""
    out = []
    for w, h in zip(weights, hessians):
        steps = clipped_steps(w[None], torch.diagonal(h)[None], bits, 1)[0, :, 0].double()
        order = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        h, w = h.double()[order][:, order], w.double()[:, order].clone()
        h.diagonal().add_(dampening * h.diagonal().mean())
        factor = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
        codes = torch.empty_like(w)
        for i in range(w.shape[1]):
            codes[:, i] = torch.clamp(torch.round(w[:, i] / steps), -LEVELS[bits], LEVELS[bits])
            error = (w[:, i] - codes[:, i] * steps) / factor[i, i]
            w[:, i:] -= error[:, None] * factor[i, i:][None]
        out.append(torch.empty_like(codes).index_copy_(1, order, codes))
    return torch.stack(out)


def test_block_loop_gives_the_codes_of_textbook_gptq():
    """The lazy blocks, the column-major layout and the feedback from the Hessian's own Cholesky factor change the
    order of the sums only: on a well-conditioned problem every code equals float64 GPTQ's (300 columns: a partial
    last block)."""
    generator = torch.Generator().manual_seed(3)
    mix = torch.randn((300, 300), generator=generator) * torch.exp(torch.randn(300, generator=generator))
    x = torch.randn((4096, 300), generator=generator) @ mix
    hessians = torch.stack([x[i::2].T @ x[i::2] / len(x[i::2]) for i in range(2)])
    weights = torch.randn((2, 48, 300), generator=generator)
    for bits in (4, 8):
        codes = quantize_to_grid(weights, hessians.clone(), bits).codes
        assert torch.equal(codes.double(), _textbook_gptq(weights, hessians, bits))


@pytest.mark.skipif(not torch.cuda.is_available() or grid_kernels.triton is None, reason="needs a GPU and Triton")
def test_triton_kernels_compute_what_ktgrids_pytorch_loops_do():
    """On a GPU: the column loop's kernel gives PyTorch's codes and errors to the bit, on a whole block and a
    narrower one of strided views as the solve passes them; the clipping search's kernel the same steps, but for
    rows whose best ratios tie to the last bits (its sums run in another order: at most 1 in 1000 rows)."""
    generator = torch.Generator().manual_seed(8)
    hessian = torch.randn((300, 300), generator=generator)
    hessian = (hessian @ hessian.T / 300 + torch.eye(300)).expand(3, 300, 300).contiguous()
    feedback = _feedback_factor(hessian, torch.arange(300).expand(3, 300), 0.01)[0].cuda()
    weights = torch.randn((3, 300, 600), generator=generator).cuda()
    with_feedback = weights + 0.1 * torch.randn((3, 300, 600), generator=generator).cuda()
    steps = (torch.rand((3, 300, 600), generator=generator) * 0.1 + 0.05).cuda()
    for bits, (i1, i2) in zip((4, 8), ((0, 128), (256, 300))):
        levels = LEVELS[bits]
        out = []
        for round_block in (grid_kernels.round_block, _round_block):
            codes = torch.empty((3, 300, 600), dtype=torch.int8, device="cuda")
            errors = torch.empty((3, 128, 600), device="cuda")
            round_block(with_feedback[:, i1:i2].clone(), weights[:, i1:i2], feedback[:, i1:i2, i1:i2],
                        steps[:, i1:i2] * 7 / levels, levels, codes[:, i1:i2], errors[:, :i2 - i1])
            out.append((codes[:, i1:i2], errors[:, :i2 - i1]))
        assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
        assert out[0][0].abs().max() == levels
    # 640 columns: row-groups of 640 and 320, neither a whole number of the kernel's 256-column steps; a zero row
    weights = torch.randn((4, 512, 640), generator=generator) * torch.rand((4, 512, 1), generator=generator)
    weights[0, 0] = 0
    weights, importance = weights.cuda(), torch.exp(torch.randn((4, 640), generator=generator)).cuda()
    for bits, groups in ((4, 1), (8, 2)):
        kernel = clipped_steps(weights, importance, bits, groups)
        torch_loops = clipped_steps(weights, importance, bits, groups, kernels=False)
        assert kernel.shape == torch_loops.shape == (4, 512, groups)
        assert (kernel != torch_loops).float().mean() <= 1e-3
    warm_up(4, 2, "cuda")  # the engine's compile while samples are captured: the kernels for 1 and 2 groups


def test_dead_columns_and_an_indefinite_hessian_in_the_batch():
    """bf16 weights; a Hessian with columns no token reached (rounded as they are, with the mean energy: textbook
    GPTQ on that Hessian), one that is not positive definite (round to nearest on its steps, flagged) and a plain
    one, solved together: each as if alone."""
    generator = torch.Generator().manual_seed(9)
    mix = torch.randn((160, 160), generator=generator) * torch.exp(torch.randn(160, generator=generator))
    x = torch.randn((2048, 160), generator=generator) @ mix
    good = x.T @ x / len(x)
    dead = good.clone()
    for column in (5, 77, 150):
        dead[column, :] = dead[:, column] = 0
    treated = dead.clone()
    alive = treated.diagonal() != 0
    treated.diagonal()[~alive] = treated.diagonal()[alive].mean()
    weights = torch.randn((3, 40, 160), generator=generator).bfloat16()
    result = quantize_to_grid(weights, torch.stack([dead, -torch.eye(160), good]), 4)
    assert result.rounded.tolist() == [False, True, False]
    assert torch.equal(result.codes[0].double(), _textbook_gptq(weights[:1].float(), treated[None], 4)[0])
    assert torch.equal(result.codes[2].double(), _textbook_gptq(weights[2:].float(), good[None], 4)[0])
    steps = (result.scales[1] * STEP[4]).expand(40, 160)
    assert torch.equal(result.codes[1].float(), torch.clamp(torch.round(weights[1].float() / steps), -7, 7))


def test_feedback_factor_is_the_inverse_of_gptqs_and_gives_up_on_indefinite_matrices():
    """The feedback factor is A = U^-1 (U GPTQ's upper Cholesky factor of H^-1) with each column divided by its
    diagonal, reached from one Cholesky factorisation of the reordered, dampened Hessian."""
    generator = torch.Generator().manual_seed(4)
    x = torch.randn((512, 64), generator=generator) * torch.exp(torch.randn(64, generator=generator))
    good = x.T @ x / 512
    bad = -torch.eye(64)  # no dampening makes it positive definite
    order = torch.stack([torch.randperm(64, generator=generator), torch.arange(64)])
    factor, fallback = _feedback_factor(torch.stack([good, bad]), order, 0.01)
    h = good[order[0]][:, order[0]].double()
    h.diagonal().add_(0.01 * h.diagonal().mean())
    inverse = torch.linalg.inv(torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True))
    expected = inverse / inverse.diagonal()
    assert torch.allclose(factor[0].double(), expected, rtol=0, atol=1e-5 * expected.abs().max())
    assert torch.equal(factor[0].diagonal(), torch.ones(64)) and torch.equal(factor[0].tril(-1), torch.zeros(64, 64))
    assert torch.equal(factor[1], torch.eye(64)) and fallback.tolist() == [False, True]


@pytest.mark.parametrize("extra, message", [
    (("--cpu-output", "{out}/cpu"), "must not be --output_dir"),
    (("--cpu-output", "{src}/cpu"), "must not be --model_id"),
    (("--cpu-output", "{work}/c", "--nproc", 2), "one process"),
    (("--cpu-output", "{work}/c", "--threadpool-count", 3), "--threadpool-count"),
])
def test_gpu_cpu_output_refusals_are_one_line_and_write_nothing(src, chat, work, extra, message):
    out = work / "refused-gpu"
    extra = [str(a).format(out=out, src=src, work=work) for a in extra]
    code, _, stderr = run_ktq_capture("gpu", "--model_id", src, "--output_dir", out, "--dataset", chat, *SAMPLES,
                                      "--force_cpu", "--quiet", *extra)
    assert code != 0 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not out.exists() and not (work / "c").exists() and not (src / "cpu").exists()
