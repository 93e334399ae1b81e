"""Every name a Layout generates parses back, through ktformat's parsers, to what it was generated from."""

from __future__ import annotations

import pytest

from ktq.cpu.layout import Layout
from ktq.kernels import ktformat as fmt


@pytest.mark.parametrize("method", fmt.METHODS.values(), ids=lambda m: m.name)
@pytest.mark.parametrize("numa", [1, 2])
def test_every_generated_name_parses_back(method, numa):
    layers = (1, 3, 10)
    merged = Layout("merged", method, numa, 256, 512, 3, layers)
    kt = Layout("kt", method, numa, 256, 512, 3, layers)
    for layer in layers:
        entries = merged.tensor_entries(layer)
        parsed = [fmt.parse_merged_tensor_name(name) for name, *_ in entries]
        assert parsed == [fmt.MergedTensorName(layer, p.proj, e, p.part, kind)
                          for e in range(3) for p in merged.pieces for kind in ("weight", "scale")]

        assert fmt.parse_layer_dir_name(kt.layer_path(layer)) == layer
        files = kt.kt_files(layer)
        expected = [(p.part, fmt.KtFileName(method, p.proj, e, nbytes, kind))
                    for e in range(3) for p in kt.pieces
                    for kind, nbytes in (("quant", p.body_bytes), ("scale", p.scale_bytes))]
        parsed = [(fmt.parse_numa_dir_name(folder), fmt.parse_kt_file_name(name))
                  for folder, name in (relpath.split("/") for relpath, _ in files)]
        assert parsed == expected
        assert [name.nbytes for _, name in parsed] == [size for _, size in files]  # the name records the size


@pytest.mark.parametrize("name", ["blk.1.ffn_gate_exps.0.numa.0.bias", "model.layers.1.mlp.gate.weight",
                                  "blk.x.ffn_up_exps.0.numa.0.weight", "blk.1.ffn_gate_exps.0.numa.0.weight.1"])
def test_other_tensor_names_do_not_parse(name):
    assert fmt.parse_merged_tensor_name(name) is None


@pytest.mark.parametrize("name", ["INT2_gate_0_64Byte_quant_.kt", "INT4_gate_0_64Byte_quant_.kt.partial",
                                  "INT4_proj_0_64Byte_scale_.kt", "INT8_down_1_64Byte_body_.kt"])
def test_other_file_names_do_not_parse(name):
    assert fmt.parse_kt_file_name(name) is None


def test_other_folder_names_do_not_parse():
    for name in ("_layer_", "_layer_1.partial", "_layer_x", "layer_1", "_numa_0"):
        assert fmt.parse_layer_dir_name(name) is None
    for name in ("_numa_", "_numa_-1", "_layer_0", "_numa_1.partial"):
        assert fmt.parse_numa_dir_name(name) is None
