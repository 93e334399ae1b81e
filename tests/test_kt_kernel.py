"""kt-kernel 0.7.2 itself serves ktq's output: its MoE forward equals ktq's reference computed from the same files.

kt-kernel runs in a subprocess from build/kt-kernel (tests/kt_kernel_check.py says how and what it computes); the
sample is conftest's moe_sample (4 experts, top-2, hidden 256, moe_intermediate 256: INT4 and INT8 split into 2
NUMA parts of 128), converted with ktq cpu RTN.
"""

from __future__ import annotations

import pytest

from kt_kernel_check import (
    agreement,
    assert_kt_kernel_agrees,
    kt_kernel_available,
    kt_kernel_forward_batches,
    kt_kernel_variant,
    make_inputs,
    read_layer_codes,
    reference_forward,
    small_batch_limit,
    with_extreme_codes,
)

pytestmark = pytest.mark.skipif(not kt_kernel_available(),
                                reason="kt-kernel 0.7.2 is not installed in build/kt-kernel (make kt-kernel) "
                                       "or does not import")

GEOMETRY = {"experts": 4, "hidden": 256, "intermediate": 256}  # moe_sample's
TOP_K = 2


@pytest.fixture(scope="module")
def output(tmp_path_factory, moe_sample, converted):
    """output(method, numa, form) -> a conversion of moe_sample: conftest's where it has one, else made once here."""
    from ktq.cli import main

    made = {("int4", 2, "merged"): converted["merged"], ("int4", 2, "kt"): converted["kt"],
            ("int8", 2, "kt"): converted["int8"]}
    base = tmp_path_factory.mktemp("kt-kernel")

    def get(method: str, numa: int, form: str):
        if (method, numa, form) not in made:
            out = base / f"{method}-{numa}-{form}"
            extra = ["--no-merge-safetensor"] if form == "kt" else []
            with pytest.raises(SystemExit) as done:
                main(["cpu", "-i", str(moe_sample), "-o", str(out), "--quant-method", method,
                      "--threadpool-count", str(numa), "--quiet", *extra])
            assert done.value.code == 0
            made[method, numa, form] = out
        return made[method, numa, form]

    return get


@pytest.mark.parametrize("method, numa, form, layer", [
    ("int4", 1, "merged", 1), ("int4", 2, "merged", 2), ("int4", 2, "kt", 3),
    ("int8", 1, "merged", 3), ("int8", 2, "merged", 1), ("int8", 2, "kt", 2),
])
def test_kt_kernel_computes_the_reference(output, method, numa, form, layer):
    """Batches of 1, 3, 8 tokens (small-batch kernel) and 9, 256 (large-batch kernel), in both on-disk forms."""
    assert_kt_kernel_agrees(output(method, numa, form), method, numa, layer, top_k=TOP_K, **GEOMETRY)


@pytest.mark.parametrize("method", ["int4", "int8"])
def test_kt_kernel_serves_the_lowest_code_wrongly(output, tmp_path, method):
    """Why codes chosen by calibration must stay in INT4 [-7, 7] and INT8 [-127, 127] (kt-format.md §2): with 1% of
    the weight codes set to INT4 -8 / INT8 -128, kt-kernel multiplies them by |activation| (losing its sign) in
    its small-batch kernel, and on its AVX-512 builds in the large-batch kernel too; only the AMX build's large
    batches (AMX tiles) get them right. Each case equals, bit for bit, the reference with the rule it follows."""
    layer, numa = 1, 1
    dst = with_extreme_codes(output(method, numa, "merged"), tmp_path / "extreme", method, numa, layer, **GEOMETRY)
    limit = small_batch_limit(GEOMETRY["experts"], TOP_K)
    tokens = (1, limit, limit + 1, 256)
    batches = [make_inputs(t, GEOMETRY["hidden"], GEOMETRY["experts"], TOP_K, seed=t) for t in tokens]
    outs = kt_kernel_forward_batches(dst, method, numa, layer, batches=batches, **GEOMETRY)
    codes = read_layer_codes(dst, method, numa, layer, **GEOMETRY)
    for t, (x, ids, weights), got in zip(tokens, batches, outs):
        wrong = t <= limit or kt_kernel_variant() != "amx"

        def reference(minus128_as_abs):
            return reference_forward(dst, method, numa, layer, x=x, ids=ids, weights=weights, codes=codes,
                                     minus128_as_abs=minus128_as_abs, **GEOMETRY)

        assert agreement(got, reference(minus128_as_abs=wrong))["equal"] == 1.0, f"{t} tokens"
        assert agreement(got, reference(minus128_as_abs=not wrong))["max_rel"] > 0.1, f"{t} tokens"


@pytest.mark.parametrize("method, numa, form", [("int4", 2, "merged"), ("int8", 1, "kt")])
def test_kt_kernel_computes_the_reference_on_calibrated_experts(moe_sample, tmp_path, method, numa, form):
    """Codes chosen by ktq cpu --calibrate (GPTQ, not round to nearest) are served as ktq computes them, through
    both kernels: every code inside the range both decode correctly."""
    from gpu_models import chat_rows, run_ktq, write_jsonl

    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(8))
    out = tmp_path / "calibrated"
    extra = ["--no-merge-safetensor"] if form == "kt" else []
    assert run_ktq("cpu", "-i", moe_sample, "-o", out, "--quant-method", method, "--threadpool-count", numa,
                   "--calibrate", data, "--num_calibration_samples", 8, "--max_sequence_length", 64, "--force_cpu",
                   "--quiet", *extra) == 0
    codes = read_layer_codes(out, method, numa, 2, **GEOMETRY)  # INT8 q or INT4 16 m: -128 is the code to avoid
    assert min(float(c.min()) for c, _ in codes.values()) > -128
    assert_kt_kernel_agrees(out, method, numa, 2, top_k=TOP_K, **GEOMETRY)


@pytest.mark.parametrize("kind, numa", [("gptq32", 2), ("rtn32", 1)])
def test_kt_kernel_serves_a_group_32_gpu_checkpoint_as_rawint4(gpu_outputs, kind, numa):
    """The `ktq gpu --group_size 32` checkpoint is CPU experts too: kt-kernel's RAWINT4 reads its compressed-tensors
    experts as they are and computes what ktq computes from the same files (kt_kernel_check: int8 activations per
    group of 32 columns), through its small-batch and its large-batch kernel, GPTQ and round to nearest alike, with
    any thread-pool count (no NUMA split is baked into these files)."""
    out, _ = gpu_outputs(kind)
    assert_kt_kernel_agrees(out, "RAWINT4", numa, 2, top_k=TOP_K, **GEOMETRY)


def test_kt_kernel_rawint4_does_not_compute_groups_of_128(gpu_outputs):
    """Why ktq offers RAWINT4 for groups of 32 only (ktq.serving.RAWINT4_GROUP): kt-kernel 0.7.2 loads groups of
    128 without an error, then crashes or returns values far from what the files hold (NaN for large batches)."""
    import torch

    out, _ = gpu_outputs("rtn128")
    batches = [make_inputs(t, GEOMETRY["hidden"], GEOMETRY["experts"], TOP_K, seed=t) for t in (3, 256)]
    try:
        outs = kt_kernel_forward_batches(out, "RAWINT4", 1, 2, batches=batches, **GEOMETRY)
    except RuntimeError as exc:  # the process died (a segmentation fault here)
        assert "kt-kernel forward failed" in str(exc)
        return
    for (x, ids, weights), got in zip(batches, outs):
        plain = reference_forward(out, "RAWINT4", 1, 2, x=x, ids=ids, weights=weights, act_quant=False, **GEOMETRY)
        assert torch.isnan(got.float()).any() or agreement(got, plain)["cos"] < 0.9
