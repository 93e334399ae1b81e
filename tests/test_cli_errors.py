"""Bad input ends in one line on stderr, exit code 2, no traceback, and nothing that looks like a finished output."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import GOLDEN, ktq_subprocess, rewrite_checkpoint
from ktq.safetensors_io import read_header


def assert_one_line_error(result, *needles: str) -> None:
    assert result.code == 2, (result.code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ktq: error: ")
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def golden_input(tmp_path) -> Path:
    src = tmp_path / "input"
    shutil.copytree(GOLDEN / "small" / "input", src)
    return src


def test_missing_config(ktq, golden_input, tmp_path):
    (golden_input / "config.json").unlink()
    result = ktq("cpu", "-i", golden_input, "-o", tmp_path / "out")
    assert_one_line_error(result, "no config.json", str(golden_input))
    assert not (tmp_path / "out").exists()


def test_no_moe_experts(ktq, tmp_path):
    src = tmp_path / "dense"
    ktq("sample", src, "--layers", "2", "--dense-layers", "1")
    dense = rewrite_checkpoint(src, tmp_path / "dense-only",
                               lambda name, array, dtype: [] if ".experts." in name else [(name, array, dtype)])
    result = ktq("cpu", "-i", dense, "-o", tmp_path / "out")
    assert_one_line_error(result, "no routed-expert tensors", "not a MoE checkpoint")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method,numa,working", [("int4", 3, "1, 2, 4"), ("int4", 8, "1, 2, 4"),
                                                  ("int8", 16, "1, 2, 4, 8")])
def test_misaligned_numa_count_names_working_counts(ktq, golden_input, tmp_path, method, numa, working):
    result = ktq("cpu", "-i", golden_input, "-o", tmp_path / "out", "--quant-method", method,
                 "--threadpool-count", numa)
    assert_one_line_error(result, f"into {numa} NUMA parts", f"use --threadpool-count {working}")
    assert not (tmp_path / "out").exists()


def test_output_folder_with_foreign_files(ktq, golden_input, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = ktq("cpu", "-i", golden_input, "-o", out, "--threadpool-count", "1")
    assert_one_line_error(result, "already holds files ktq did not write", "notes.txt")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("value", [np.inf, np.nan])
@pytest.mark.parametrize("merge", [True, False], ids=["merged", "kt"])
def test_non_finite_weight_names_tensor_and_row(ktq, golden_input, tmp_path, value, merge):
    path = golden_input / "model.safetensors"
    info = read_header(path)[0]["model.layers.0.mlp.experts.2.down_proj.weight"]
    row, col = 100, 7
    with open(path, "r+b") as f:  # poke one bf16 value in place
        f.seek(info.offset + 2 * (row * info.shape[1] + col))
        f.write((np.array([value], np.float32).view(np.uint32) >> 16).astype("<u2").tobytes())
    out = tmp_path / "out"
    result = ktq("cpu", "-i", golden_input, "-o", out, "--threadpool-count", "1",
                 *([] if merge else ["--no-merge-safetensor"]))
    assert_one_line_error(result, "model.layers.0.mlp.experts.2.down_proj.weight", f"row {row}", "Inf or NaN")
    assert not out.exists()  # no layer was finished: nothing is left behind


def test_real_process_exit_code_and_single_line(tmp_path):
    result = ktq_subprocess("cpu", "-i", tmp_path / "missing", "-o", tmp_path / "out")
    assert_one_line_error(result, "is not a folder")


def test_input_type_contradicted(ktq, golden_input, tmp_path):
    result = ktq("cpu", "-i", golden_input, "-o", tmp_path / "out", "--input-type", "fp16")
    assert_one_line_error(result, "--input-type fp16 does not match", "BF16")


def test_no_thread_safe_numba_layer_is_one_line(ktq, golden_input, tmp_path, monkeypatch):
    """Where neither OpenMP nor TBB loads, Numba's "threadsafe" request fails at the first parallel launch: the
    user reads what to install, not a traceback."""
    from ktq.cpu import pipeline

    def no_layer(method):
        raise ValueError("No threading layer could be loaded.\nHINT:\nIntel TBB is required, try:\n$ pip install tbb")

    monkeypatch.setattr(pipeline, "load_kernel", no_layer)
    result = ktq("cpu", "-i", golden_input, "-o", tmp_path / "out", "--threadpool-count", "1", "--quiet")
    assert_one_line_error(result, "No threading layer could be loaded", "libgomp1", "tbb")


def test_kernels_run_on_a_thread_safe_layer(ktq, golden_input, tmp_path):
    """The read thread decodes while the main thread quantises: never on Numba's workqueue layer, which aborts."""
    import numba

    assert ktq("cpu", "-i", golden_input, "-o", tmp_path / "out", "--threadpool-count", "1", "--quiet").code == 0
    assert numba.config.THREADING_LAYER == "threadsafe"
    assert numba.threading_layer() in ("omp", "tbb")
