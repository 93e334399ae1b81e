"""ktq merge: a low-memory tree becomes exactly what a direct merged conversion writes, or nothing at all."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import GOLDEN, convert_in_process, sha256_records, tree_files
from faults import IoFaults
from test_cli_errors import assert_one_line_error

pytestmark = pytest.mark.usefixtures("two_numa_nodes")


def test_merge_equals_the_direct_merged_conversion(ktq, moe_sample, converted, tmp_path):
    result = ktq("merge", converted["kt"], tmp_path / "out", "--original-path", moe_sample, "--quiet")
    assert result.code == 0, result.stderr
    assert tree_files(tmp_path / "out") == tree_files(converted["merged"])  # shards, index, ktq.json, config, tokenizer


def test_without_source_the_shards_index_and_manifest_are_the_same(ktq, converted, tmp_path):
    result = ktq("merge", converted["kt"], tmp_path / "out")
    assert result.code == 0, result.stderr
    assert "config.json and the tokenizer files were not copied" in result.stdout
    direct = tree_files(converted["merged"])
    assert tree_files(tmp_path / "out") == {k: v for k, v in direct.items()
                                            if k.startswith(("model", "ktq.json"))}


def test_a_tree_without_manifest_needs_its_source(ktq, moe_sample, converted, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(converted["kt"], tree)
    (tree / "ktq.json").unlink()
    assert_one_line_error(ktq("merge", tree, tmp_path / "out"), "no ktq.json", "--original-path")
    assert not (tmp_path / "out").exists()
    assert ktq("merge", tree, tmp_path / "out", "--original-path", moe_sample, "-q").code == 0
    assert tree_files(tmp_path / "out") == tree_files(converted["merged"])


@pytest.mark.parametrize("case", ["small/kt-int4-numa2", "small/kt-int8-numa1", "wide/kt-int8-numa2"])
def test_kt_kernel_s_own_tree_merges_into_ktq_s_direct_output(ktq, tmp_path, case):
    """The golden trees were written by kt-kernel 0.7.2 (no ktq.json): merged, they equal ktq's merged form."""
    model, name = case.split("/")
    method, numa = name.split("-")[1], name.split("numa")[1]
    src = GOLDEN / model / "input"
    assert ktq("merge", GOLDEN / case, tmp_path / "merged", "--original-path", src, "-q").code == 0
    direct = convert_in_process(src, tmp_path / "direct", "--quant-method", method, "--threadpool-count", numa)
    assert tree_files(tmp_path / "merged") == tree_files(direct)


def _kt_file(tree: Path, layer: int, part: int, name: str) -> Path:
    return next((tree / f"_layer_{layer}" / f"_numa_{part}").glob(name))


@pytest.mark.parametrize("damage,needles", [
    (lambda t: _kt_file(t, 3, 1, "INT4_up_2_*scale_.kt").unlink(), ("layer 3: 1 files missing", "INT4_up_2_")),
    (lambda t: shutil.rmtree(t / "_layer_2" / "_numa_0"), ("layer 2: 24 files missing",)),
    (lambda t: shutil.rmtree(t / "_layer_3"), ("layer 3 is missing",)),
    (lambda t: _kt_file(t, 1, 0, "INT4_down_0_*quant_.kt").write_bytes(b"\0" * 100), ("wrong size",)),
    (lambda t: (t / "_layer_1" / "_numa_0" / "INT4_gate_4_16384Byte_quant_.kt").write_bytes(b"\0" * 16384),
     ("unexpected", "INT4_gate_4_")),
], ids=["scale-file", "numa-part", "layer", "truncated", "extra-expert"])
def test_an_incomplete_tree_is_refused_before_anything_is_written(ktq, converted, tmp_path, damage, needles):
    tree = tmp_path / "tree"
    shutil.copytree(converted["kt"], tree)
    damage(tree)
    assert_one_line_error(ktq("merge", tree, tmp_path / "out"), "incomplete or damaged, nothing was written",
                          *needles)
    assert not (tmp_path / "out").exists()


def test_changed_content_stops_at_that_layer_and_the_merge_resumes(ktq, moe_sample, converted, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(converted["kt"], tree)
    victim = _kt_file(tree, 2, 1, "INT4_down_3_*quant_.kt")
    original = victim.read_bytes()
    victim.write_bytes(original[:100] + bytes([original[100] ^ 1]) + original[101:])  # same size, one bit off
    out = tmp_path / "out"
    assert_one_line_error(ktq("merge", tree, out, "--original-path", moe_sample, "-q"), "layer 2 of",
                          "does not match its xxh3_128")
    assert sorted(json.loads((out / "ktq.json").read_text())["layers"]) == ["1"]
    assert not [p for p in out.iterdir() if p.name.endswith(".partial")]
    victim.write_bytes(original)
    result = ktq("merge", tree, out, "--original-path", moe_sample)
    assert result.code == 0 and "2 layers merged, 1 kept" in result.stdout
    assert tree_files(out) == tree_files(converted["merged"])


def test_a_tree_with_sha256_records_is_checked_with_sha256(ktq, moe_sample, converted, tmp_path):
    """A tree written before the switch to XXH3 merges, and its damage is still found."""
    tree = tmp_path / "tree"
    shutil.copytree(converted["kt"], tree)
    sha256_records("kt", tree)
    assert ktq("merge", tree, tmp_path / "out", "--original-path", moe_sample, "-q").code == 0
    assert tree_files(tmp_path / "out") == tree_files(converted["merged"])
    victim = _kt_file(tree, 3, 0, "INT4_gate_0_*quant_.kt")
    data = bytearray(victim.read_bytes())
    data[-1] ^= 1
    victim.write_bytes(bytes(data))
    assert_one_line_error(ktq("merge", tree, tmp_path / "out2", "--original-path", moe_sample, "-q"), "layer 3 of",
                          "does not match its sha256")


def test_disk_full_during_a_merge_resumes(ktq, moe_sample, converted, tmp_path):
    probe, out = tmp_path / "probe", tmp_path / "out"
    with IoFaults(probe, at=None) as counter:
        assert ktq("merge", converted["kt"], probe, "--original-path", moe_sample, "-q").code == 0
    with IoFaults(out, at=counter.events // 2, action="enospc"):  # past the first of three layers
        assert_one_line_error(ktq("merge", converted["kt"], out, "--original-path", moe_sample, "-q"), "disk is full")
    assert ktq("merge", converted["kt"], out, "--original-path", moe_sample, "-q").code == 0
    assert tree_files(out) == tree_files(converted["merged"])


def test_wrong_inputs_are_refused(ktq, converted, tmp_path):
    from ktq.sample import write_sample

    other = write_sample(tmp_path / "other", layers=4, experts=4, hidden=256, moe_intermediate=256, dense_layers=1,
                         seed=3)
    assert_one_line_error(ktq("merge", converted["kt"], tmp_path / "a", "--original-path", other),
                          "is not the checkpoint", "fingerprint")
    assert_one_line_error(ktq("merge", converted["merged"], tmp_path / "b"), "already merged")
    assert_one_line_error(ktq("merge", other, tmp_path / "c"), "is a checkpoint")
    assert_one_line_error(ktq("merge", converted["kt"], converted["kt"] / "inside"), "must not be")
    for name in "abc":
        assert not (tmp_path / name).exists()
