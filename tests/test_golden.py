"""ktq cpu reproduces the files kt-kernel 0.7.2 wrote itself, byte for byte, in both output forms."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import GOLDEN, tree_files
from ktq.safetensors_io import TensorReader, read_header

CASES = sorted(p.relative_to(GOLDEN).as_posix() for p in GOLDEN.glob("*/kt-*")) if GOLDEN.is_dir() else []
_CASE = re.compile(r"(?P<case>\w+)/kt-(?P<method>int[48])-numa(?P<numa>\d+)$")
_KT_FILE = re.compile(r"_layer_0/_numa_(\d+)/INT[48]_(gate|up|down)_(\d+)_(\d+)Byte_(quant|scale)_\.kt$")


def test_golden_cases_present(golden):
    assert len(CASES) >= 5, CASES


def convert(ktq, case: str, out: Path, *extra: str):
    m = _CASE.match(case)
    result = ktq("cpu", "-i", GOLDEN / m["case"] / "input", "-o", out, "--quant-method", m["method"],
                 "--threadpool-count", m["numa"], "--quiet", *extra)
    assert result.code == 0, result.stderr
    return m


@pytest.mark.parametrize("case", CASES)
def test_low_memory_tree_is_byte_identical(ktq, tmp_path, case):
    convert(ktq, case, tmp_path / "out", "--no-merge-safetensor")
    expected = tree_files(GOLDEN / case)
    produced = tree_files(tmp_path / "out")
    assert produced.pop("ktq.json")  # ktq's own manifest is the only addition
    assert sorted(produced) == sorted(expected)
    for name, data in expected.items():
        assert produced[name] == data, name


@pytest.mark.parametrize("case", CASES)
def test_merged_shards_hold_the_golden_bytes(ktq, tmp_path, case):
    m = convert(ktq, case, tmp_path / "out")
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = {}
    for shard in set(index["weight_map"].values()):
        tensors.update(read_header(out / shard)[0])
    assert set(tensors) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    expected = tree_files(GOLDEN / case)
    assert len(tensors) == len(expected)
    with TensorReader() as reader:
        for rel, data in expected.items():
            numa, proj, expert, size, kind = _KT_FILE.match(rel).groups()
            name = f"blk.0.ffn_{proj}_exps.{expert}.numa.{numa}.{'weight' if kind == 'quant' else 'scale'}"
            info = tensors[name]
            assert info.dtype == ("I8" if kind == "quant" else "F32") and info.nbytes == int(size)
            assert reader.read(info).tobytes() == data, name
    config = json.loads((out / "config.json").read_text())
    assert config == json.loads((GOLDEN / m["case"] / "input" / "config.json").read_text())
