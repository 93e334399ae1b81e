"""ktq inspect: recognises every kind of folder, says how to serve it, and fails on any damaged byte."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import GOLDEN, sha256_records
from test_cli_errors import assert_one_line_error

pytestmark = pytest.mark.usefixtures("two_numa_nodes")


@pytest.fixture(params=["merged", "kt"])
def output(request, converted, tmp_path) -> tuple[str, Path]:
    """A private copy of a clean output, to damage."""
    copy = tmp_path / request.param
    shutil.copytree(converted[request.param], copy)
    return request.param, copy


def report(ktq, *args) -> dict:
    result = ktq("inspect", *args, "--json")
    assert result.code == 0, result.stderr
    return json.loads(result.stdout)


def test_a_clean_output_is_described_and_verified(ktq, output):
    form, out = output
    data = report(ktq, out, "--verify")
    assert data["kind"] == "ktq-output" and data["form"] == form and data["verified"] is True
    assert (data["method"], data["numa"], data["layers"], data["experts"]) == ("int4", 2, [1, 2, 3], 4)
    assert data["projections"]["down"] == {"shape": [256, 128], "weight_bytes": 16384, "scale_bytes": 1024}
    assert data["serve"] == {"kt_method": "AMXINT4", "kt_weight_path": str(out.resolve()), "kt_threadpool_count": 2}
    assert data["manifest"]["complete"] and data["manifest"]["layers_done"] == 3 and data["problems"] == []
    table = ktq("inspect", out)
    assert table.code == 0
    assert f"--kt-method AMXINT4 --kt-weight-path {out.resolve()} --kt-threadpool-count 2" in table.stdout
    assert data["machine_numa_nodes"] == 2 and data["warnings"] == []
    assert "NUMA parts" in table.stdout and "2 (this machine: 2 NUMA nodes)" in table.stdout
    assert "warning" not in table.stdout


@pytest.mark.parametrize("machine", [1, 4])
def test_an_output_split_for_another_numa_count_than_this_machines_warns(ktq, converted, monkeypatch, machine):
    import ktq.inspect as inspect_module

    monkeypatch.setattr(inspect_module, "numa_nodes", lambda: machine)
    out = converted["kt"]
    data = report(ktq, out)
    assert (data["numa"], data["machine_numa_nodes"], data["serve"]["kt_threadpool_count"]) == (2, machine, 2)
    nodes = "1 NUMA node" if machine == 1 else f"{machine} NUMA nodes"
    warning = (f"this output is split into 2 NUMA parts and this machine has {nodes}: serve it here with "
               f"--kt-threadpool-count 2 all the same (any other count reads it wrongly), or convert again with "
               f"--threadpool-count {machine}")
    assert data["warnings"] == [warning] and data["problems"] == []
    table = ktq("inspect", out)
    assert table.code == 0  # a warning, not a problem
    assert f"(this machine: {nodes})" in table.stdout
    assert " ".join(f"warning: {warning}".split()) in " ".join(table.stdout.split())


def _body_byte(form: str, out: Path) -> tuple[Path, int]:
    """A file and an offset inside the packed body of layer 2."""
    if form == "kt":
        return next((out / "_layer_2" / "_numa_1").glob("INT4_up_1_*quant_.kt")), 777
    from ktq.safetensors_io import read_header

    shard = out / "model-00002-of-00003.safetensors"
    return shard, read_header(shard)[0]["blk.2.ffn_up_exps.1.numa.1.weight"].offset + 777


def test_verify_fails_on_a_single_flipped_bit(ktq, output):
    form, out = output
    path, offset = _body_byte(form, out)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))
    assert ktq("inspect", out).code == 0  # sizes and names are all right: only the hash can tell
    result = ktq("inspect", out, "--verify")
    assert_one_line_error(result, "layer 2", "does not match its xxh3_128")
    assert "layer 1" not in result.stderr and "layer 3" not in result.stderr


def test_outputs_with_sha256_records_are_still_verified(ktq, output):
    """Outputs of ktq before the switch to XXH3 record sha256: they verify, and damage is still found."""
    form, out = output
    sha256_records(form, out)
    assert ktq("inspect", out, "--verify").code == 0
    path, offset = _body_byte(form, out)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))
    assert_one_line_error(ktq("inspect", out, "--verify"), "layer 2", "does not match its sha256")


def test_a_truncated_file_fails_even_without_verify(ktq, output):
    form, out = output
    path, _ = _body_byte(form, out)
    path.write_bytes(path.read_bytes()[:-1])
    for args in ((), ("--verify",)):
        assert_one_line_error(ktq("inspect", out, *args), path.name, "truncated" if form == "merged" else "wrong size")


def test_an_unfinished_output_is_a_problem(ktq, output):
    _, out = output
    manifest = json.loads((out / "ktq.json").read_text())
    del manifest["layers"]["3"]
    manifest["complete"] = False
    (out / "ktq.json").write_text(json.dumps(manifest))
    assert_one_line_error(ktq("inspect", out), "unfinished conversion: 2 of 3 layers", "re-run")


@pytest.mark.parametrize("case", ["small/kt-int4-numa2", "wide/kt-int8-numa2"])
def test_kt_kernel_s_own_tree_is_recognised_without_manifest(ktq, case):
    data = report(ktq, GOLDEN / case, "--verify")
    method, numa = case.split("-")[1], int(case.split("numa")[1])
    assert (data["kind"], data["form"], data["method"], data["numa"], data["layers"]) == \
        ("kt-output", "kt", method, numa, [0])
    assert data["manifest"] is None and data["verified"] is True


def test_without_manifest_verify_checks_sizes_and_scales(ktq, output, tmp_path):
    form, out = output
    (out / "ktq.json").unlink()
    if form == "merged":
        (out / "model.safetensors.index.json").unlink()
    data = report(ktq, out, "--verify")
    assert (data["kind"], data["form"], data["method"], data["numa"], data["layers"], data["experts"]) == \
        ("kt-output", form, "int4", 2, [1, 2, 3], 4)
    # a NaN scale: sizes stay right, the scale check catches it
    if form == "kt":
        path, offset = next((out / "_layer_3" / "_numa_0").glob("INT4_gate_2_*scale_.kt")), 8
    else:
        from ktq.safetensors_io import read_header

        shard = out / "model-00003-of-00003.safetensors"
        path, offset = shard, read_header(shard)[0]["blk.3.ffn_gate_exps.2.numa.0.scale"].offset + 8
    data = bytearray(path.read_bytes())
    data[offset:offset + 4] = np.array([np.nan], np.float32).tobytes()
    path.write_bytes(bytes(data))
    assert ktq("inspect", out).code == 0
    assert_one_line_error(ktq("inspect", out, "--verify"), "Inf or NaN scales", "layer 3 expert 2 gate part 0")


def test_files_that_would_confuse_kt_kernel_are_problems(ktq, converted, tmp_path):
    tree = tmp_path / "kt"
    shutil.copytree(converted["kt"], tree)
    (tree / "extra.safetensors").write_bytes((8).to_bytes(8, "little") + b"{}      ")
    assert_one_line_error(ktq("inspect", tree), "switch kt-kernel to the merged form")
    merged = tmp_path / "merged"
    shutil.copytree(converted["merged"], merged)
    (merged / "old").mkdir()
    shutil.copy(merged / "model-00001-of-00003.safetensors", merged / "old" / "stray.safetensors")
    assert_one_line_error(ktq("inspect", merged), "safetensors files ktq did not write", "old/stray.safetensors")


def test_a_checkpoint_is_described_with_what_it_converts_to(ktq, moe_sample):
    data = report(ktq, moe_sample, "--verify")
    assert (data["kind"], data["layers"], data["experts"], data["hidden"], data["intermediate"]) == \
        ("checkpoint", [1, 2, 3], 4, 256, 256)
    assert data["input_type"] == "bf16" and data["expert_shapes"]["down"] == [256, 256]
    conversions = {c["method"]: c for c in data["conversions"]}
    assert conversions["int4"]["threadpool_counts"] == [1, 2] and conversions["int8"]["threadpool_counts"] == [1, 2, 4]


def test_a_folder_that_is_neither_is_refused(ktq, tmp_path):
    assert_one_line_error(ktq("inspect", tmp_path), "neither a ktq / kt-kernel output nor a safetensors checkpoint")


def _reference_error(source: Path, layer: int, proj: str, bits: int, numa: int) -> tuple[float, float]:
    """Relative RMS and max abs error of one layer's projection, straight from kt-format.md §2 in numpy."""
    from ktq.cpu.checkpoint import open_checkpoint
    from ktq.safetensors_io import TensorReader

    ckpt = open_checkpoint(source)
    w2 = e2 = worst = 0.0
    with TensorReader() as reader:
        for e in range(4):
            bits16 = reader.read(ckpt.tensors[f"model.layers.{layer}.mlp.experts.{e}.{proj}_proj.weight"])
            full = (bits16.astype(np.uint32) << 16).view(np.float32)
            per = full.shape[1 if proj == "down" else 0] // numa
            for p in range(numa):
                w = full[:, p * per:(p + 1) * per] if proj == "down" else full[p * per:(p + 1) * per]
                amax = np.abs(w).max(axis=1, keepdims=True)
                if bits == 8:
                    d = (amax * np.float32(1 / 127)).astype(np.float32)
                else:
                    d = (amax.astype(np.float64) / 112).astype(np.float32)
                q = np.clip(np.rint((w * (np.float32(1) / d)).astype(np.float32)), -128, 127)
                deq = q * d if bits == 8 else np.sign(q) * ((np.abs(q) + 8) // 16) * 16 * d
                err = deq.astype(np.float64) - w
                w2, e2 = w2 + float((w.astype(np.float64) ** 2).sum()), e2 + float((err ** 2).sum())
                worst = max(worst, float(np.abs(err).max()))
    return math.sqrt(e2 / w2), worst


@pytest.mark.parametrize("name,bits", [("kt", 4), ("merged", 4), ("int8", 8)])
def test_compare_measures_the_error_against_the_source(ktq, moe_sample, converted, name, bits):
    data = report(ktq, converted[name], "--compare", moe_sample)
    rows = data["compare"]["rows"]
    assert [(r["layer"], r["projection"]) for r in rows] == [(L, p) for L in (1, 2, 3) for p in ("gate", "up", "down")]
    for row in rows:
        rel, worst = _reference_error(moe_sample, row["layer"], row["projection"], bits, 2)
        assert row["relative_rms"] == pytest.approx(rel, rel=1e-5)
        assert row["max_abs"] == pytest.approx(worst, rel=1e-5)
        assert row["snr_db"] == pytest.approx(-20 * math.log10(rel), rel=1e-5)


def test_compare_against_another_source_fails(ktq, converted, tmp_path):
    from ktq.sample import write_sample

    other = write_sample(tmp_path / "other", layers=4, experts=4, hidden=256, moe_intermediate=256, dense_layers=1,
                         seed=5)
    result = ktq("inspect", converted["kt"], "--compare", other)
    assert_one_line_error(result, "is not the checkpoint this output was converted from")
    assert "more than the format's rounding allows" in result.stdout  # every layer and projection is off
    tree = tmp_path / "no-manifest"
    shutil.copytree(converted["kt"], tree)
    (tree / "ktq.json").unlink()
    assert_one_line_error(ktq("inspect", tree, "--compare", other), "layer 1 gate",
                          "more than the format's rounding allows")
