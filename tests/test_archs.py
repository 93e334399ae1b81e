"""ktq cpu on the checkpoints people have: every sample architecture and storage kind, each checked against a
reference computed independently here (torch, compressed-tensors, transformers), and broken inputs."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import rewrite_checkpoint, tree_files
from ktq.cpu.checkpoint import open_checkpoint
from ktq.cpu.experts import find_experts
from ktq.safetensors_io import TensorReader, read_header
from test_cli_errors import assert_one_line_error

SMALL = {"layers": 2, "experts": 2, "hidden": 256, "moe_intermediate": 256}
NUMA = 2
PER_EXPERT_ARCHS = ("qwen3_moe", "deepseek_v3", "mixtral", "minimax_m2")
FUSED_ARCHS = ("qwen3_vl_moe", "qwen3_5_moe")
COMBOS = [(arch, dtype) for arch in PER_EXPERT_ARCHS for dtype in ("bf16", "fp8", "int4")] + \
         [(arch, dtype) for arch in FUSED_ARCHS for dtype in ("bf16", "fp16")]
_KT_FILE = re.compile(r"_layer_(\d+)/_numa_(\d+)/INT[48]_(gate|up|down)_(\d+)_\d+Byte_(quant|scale)_\.kt$")


@pytest.fixture(autouse=True)
def _machine_of_numa_nodes(monkeypatch):
    """These tests split into NUMA parts whatever this machine has: it looks like a machine of that many nodes, so
    that ktq cpu's warning about a count that differs from the machine's stays out of the streams they check."""
    import ktq.commands.cpu

    monkeypatch.setattr(ktq.commands.cpu, "numa_nodes", lambda: NUMA)


def _main(*args: object) -> None:
    """ktq in this process, for session fixtures (no capsys there); fails the test on a non-zero exit."""
    from ktq.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    assert exit_info.value.code == 0, args


@pytest.fixture(scope="session")
def samples(tmp_path_factory):
    """(arch, dtype, dense layers, shape overrides) -> a small sample, written once per session."""
    from ktq.sample import write_sample

    root = tmp_path_factory.mktemp("archs")
    made: dict[tuple, Path] = {}

    def get(arch: str, dtype: str = "bf16", dense: int = 0, **shape) -> Path:
        key = (arch, dtype, dense, tuple(sorted(shape.items())))
        if key not in made:
            made[key] = write_sample(root / f"{arch}-{dtype}-{len(made)}", arch=arch, dtype=dtype,
                                     dense_layers=dense, **{**SMALL, **shape})
        return made[key]

    return get


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """(input folder, form, options) -> its conversion, done once per session."""
    root = tmp_path_factory.mktemp("converted")
    done: dict[tuple, Path] = {}

    def get(src: Path, merge: bool = False, *options: str, numa: int = NUMA) -> Path:
        key = (src, merge, options, numa)
        if key not in done:
            out = root / f"out-{len(done)}"
            _main("cpu", "-i", src, "-o", out, "--threadpool-count", numa, "--quiet",
                  *([] if merge else ["--no-merge-safetensor"]), *options)
            done[key] = out
        return done[key]

    return get


def kt_files(out: Path) -> dict[str, bytes]:
    files = tree_files(out)
    assert json.loads(files.pop("ktq.json"))["complete"]
    return files


def same_weights_new_folder(src: Path, dst: Path, state: dict[str, torch.Tensor], config_changes: dict) -> Path:
    """A one-shard checkpoint of state (written by safetensors' torch API) beside src's config and tokenizer."""
    dst.mkdir(parents=True)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    for aux in src.iterdir():
        if aux.is_file() and not aux.name.startswith("model"):
            shutil.copy(aux, dst / aux.name)
    config = json.loads((src / "config.json").read_text())
    for key, value in config_changes.items():
        config.pop(key) if value is None else config.__setitem__(key, value)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def torch_state(src: Path) -> dict[str, torch.Tensor]:
    state = {}
    for shard in sorted(src.glob("*.safetensors")):
        state.update(load_file(shard))
    return state


# ---- decode kernels against torch and compressed-tensors -------------------------------------------------------

def test_e4m3_table_and_sample_encoder_match_torch():
    from ktq.kernels.decode import E4M3_VALUES
    from ktq.sample import encode_e4m3

    codes = torch.arange(256, dtype=torch.uint8)
    assert np.array_equal(E4M3_VALUES, codes.view(torch.float8_e4m3fn).float().numpy(), equal_nan=True)
    values = torch.cat([torch.randn(20000) * 50, torch.tensor([0.0, -0.0, 448.0, -448.0, 2.0 ** -9, 2.0 ** -10,
                                                                 3 * 2.0 ** -10, 0.0625 + 2.0 ** -8, 240.0 + 8])])
    values = values.clamp(-448, 448)  # torch turns values beyond the range into NaN, the sample saturates
    expected = values.to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    assert np.array_equal(encode_e4m3(values.numpy()), expected)


@pytest.mark.parametrize("shape,block", [((300, 333), (128, 128)), ((64, 200), (128, 128)), ((257, 129), (32, 64))],
                         ids=str)
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16], ids=["F32", "BF16"])
def test_fp8_kernel_matches_torch(shape, block, scale_dtype):
    from ktq.kernels.decode import fp8_blocks_to_bf16

    (n, k), (bn, bk) = shape, block
    generator = torch.Generator().manual_seed(n + k)
    w = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    w[(w & 0x7F) == 0x7F] = 0  # NaN codes are checked by the conversion tests
    scale = (torch.rand((-(-n // bn), -(-k // bk)), generator=generator) * 1e-2).to(scale_dtype)
    out = np.empty(shape, np.uint16)
    scale_bits = scale.numpy() if scale_dtype == torch.float32 else scale.view(torch.uint16).numpy()
    fp8_blocks_to_bf16(w.numpy(), scale_bits, bn, bk, out)
    full = scale.float().repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n, :k]
    expected = (w.view(torch.float8_e4m3fn).to(torch.float32) * full).to(torch.bfloat16)
    assert np.array_equal(out, expected.view(torch.uint16).numpy())


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 128), (4, 256), (8, 64)])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32], ids=["BF16", "F32"])
def test_packed_int_kernel_matches_compressed_tensors(bits, group, scale_dtype):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    from ktq.kernels.decode import packed_int_to_bf16

    n, k = 96, 256
    generator = torch.Generator().manual_seed(bits * group)
    q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (n, k), dtype=torch.int8, generator=generator)
    scale = (torch.rand((n, k // group), generator=generator) * 1e-2).to(scale_dtype)
    packed = pack_to_int32(q, bits)
    strategy = "channel" if group == k else "group"
    args = QuantizationArgs(num_bits=bits, strategy=strategy, group_size=None if group == k else group)
    expected = dequantize(unpack_from_int32(packed, bits, torch.Size((n, k))), scale, None, args).to(torch.bfloat16)
    out = np.empty((n, k), np.uint16)
    scale_bits = scale.numpy() if scale_dtype == torch.float32 else scale.view(torch.uint16).numpy()
    packed_int_to_bf16(packed.numpy().view(np.uint32), scale_bits, group, bits, out)
    assert np.array_equal(out, expected.view(torch.uint16).numpy())


def test_transpose_of_a_column_window():
    from ktq.kernels.decode import transpose_u16

    src = np.random.default_rng(1).integers(0, 1 << 16, (150, 300), dtype=np.uint16)
    out = np.empty((130, 150), np.uint16)
    transpose_u16(src[:, 70:200], out)
    assert np.array_equal(out, src[:, 70:200].T)


# ---- every architecture, both output forms ------------------------------------------------------------------

@pytest.mark.parametrize("arch,dtype", COMBOS, ids=lambda v: str(v))
def test_every_sample_converts_in_both_forms(samples, converted, arch, dtype):
    dense = 1 if arch in ("qwen3_moe", "deepseek_v3", "qwen3_vl_moe") else 0
    src = samples(arch, dtype, dense, layers=3 if dense else 2)
    tree = kt_files(converted(src))
    merged = converted(src, True)
    manifest = json.loads((merged / "ktq.json").read_text())
    assert manifest["input_type"] == dtype and manifest["complete"]
    expected_layers = [1, 2] if dense else [0, 1]  # dense layers and DeepSeek's MTP layer (index 3) are skipped
    assert manifest["moe_layers"] == expected_layers
    assert {m[1] for m in (_KT_FILE.match(name) for name in tree)} == {str(layer) for layer in expected_layers}
    assert len(tree) == len(expected_layers) * SMALL["experts"] * NUMA * 3 * 2
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    assert len(index["weight_map"]) == len(tree)
    with TensorReader() as reader:
        for rel, data in tree.items():
            layer, numa, proj, expert, kind = _KT_FILE.match(rel).groups()
            name = f"blk.{layer}.ffn_{proj}_exps.{expert}.numa.{numa}.{'weight' if kind == 'quant' else 'scale'}"
            info = read_header(merged / index["weight_map"][name])[0][name]
            assert reader.read(info).tobytes() == data, name


# ---- each storage kind against its own reference ------------------------------------------------------------

def fp8_decoded_by_torch(src: Path, dst: Path) -> Path:
    """kt-format.md §5 written in torch: bf16(fp32(w) * scale_inv repeated over its block, cropped)."""
    bn, bk = json.loads((src / "config.json").read_text())["quantization_config"]["weight_block_size"]
    state = torch_state(src)
    decoded = {}
    for name, tensor in state.items():
        if tensor.dtype == torch.float8_e4m3fn:
            n, k = tensor.shape
            scale = state[f"{name}_scale_inv"].repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n, :k]
            decoded[name] = (tensor.to(torch.float32) * scale).to(torch.bfloat16)
        elif not name.endswith("weight_scale_inv"):
            decoded[name] = tensor
    return same_weights_new_folder(src, dst, decoded, {"quantization_config": None})


@pytest.mark.parametrize("arch,shape,method,numa", [
    ("deepseek_v3", {}, "int4", NUMA),
    # H and I not multiples of the 128 x 128 scale blocks: the last block row and column are partly filled
    ("deepseek_v3", {"hidden": 320, "moe_intermediate": 192}, "int8", 3),
    ("minimax_m2", {}, "int4", NUMA),
], ids=["deepseek_v3-int4", "deepseek_v3-edge-blocks-int8", "minimax_m2-int4"])
def test_fp8_equals_converting_torch_decoded_bf16(samples, converted, tmp_path, arch, shape, method, numa):
    src = samples(arch, "fp8", 1 if arch == "deepseek_v3" else 0, **shape)
    reference = fp8_decoded_by_torch(src, tmp_path / "bf16")
    options = ("--quant-method", method)
    assert kt_files(converted(src, False, *options, "--input-type", "fp8", numa=numa)) == \
        kt_files(converted(reference, False, *options, numa=numa))


def int4_decompressed_by_compressed_tensors(src: Path, dst: Path) -> Path:
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    config = QuantizationConfig.model_validate(json.loads((src / "config.json").read_text())["quantization_config"])
    scheme = config.config_groups["group_0"]
    state = torch_state(src)
    decoded = {}
    for name, tensor in state.items():
        base, _, param = name.rpartition(".")
        if param == "weight_packed":
            module = {key: state[f"{base}.{key}"] for key in ("weight_packed", "weight_scale", "weight_shape")}
            decoded[f"{base}.weight"] = PackedQuantizationCompressor.decompress(module, scheme)["weight"]
        elif param not in ("weight_scale", "weight_shape"):
            decoded[name] = tensor
    assert all(t.dtype == torch.bfloat16 for n, t in decoded.items() if ".experts." in n)
    return same_weights_new_folder(src, dst, decoded, {"quantization_config": None})


@pytest.mark.parametrize("arch", ["deepseek_v3", "mixtral"])
def test_int4_equals_converting_compressed_tensors_decompression(samples, converted, tmp_path, arch):
    src = samples(arch, "int4", 1 if arch == "deepseek_v3" else 0)
    reference = int4_decompressed_by_compressed_tensors(src, tmp_path / "bf16")
    assert kt_files(converted(src)) == kt_files(converted(reference))


def fused_copy(src: Path, dst: Path, in_by_out: bool) -> Path:
    """src's per-expert experts stacked into gate_up_proj / down_proj (Qwen3.5 or, in_by_out, Qwen3-VL order)."""
    state = torch_state(src)
    key = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
    experts: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
    fused = {}
    for name, tensor in state.items():
        match = key.match(name)
        if match:
            experts.setdefault(match[1], {})[(int(match[2]), match[3])] = tensor
        else:
            fused[name] = tensor
    for prefix, parts in experts.items():
        count = 1 + max(e for e, _ in parts)
        gate_up = torch.stack([torch.cat([parts[(e, "gate")], parts[(e, "up")]]) for e in range(count)])
        down = torch.stack([parts[(e, "down")] for e in range(count)])
        if in_by_out:
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        fused[f"{prefix}.gate_up_proj"], fused[f"{prefix}.down_proj"] = gate_up.contiguous(), down.contiguous()
    return same_weights_new_folder(src, dst, fused, {})


@pytest.mark.parametrize("in_by_out", [False, True], ids=["E,2I,H", "E,H,2I"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_fused_orientations_equal_per_expert_layout(samples, converted, tmp_path, in_by_out, dtype):
    src = samples("qwen3_moe", dtype, moe_intermediate=512)  # I != H: a transposition cannot go unnoticed
    fused = fused_copy(src, tmp_path / "fused", in_by_out)
    assert kt_files(converted(src)) == kt_files(converted(fused))


def test_mixtral_names_are_gate_up_down(samples, converted, tmp_path):
    src = samples("mixtral")
    renames = {"block_sparse_moe.": "mlp.", ".w1.": ".gate_proj.", ".w3.": ".up_proj.", ".w2.": ".down_proj."}

    def rename(name, bits, dtype):
        for old, new in renames.items():
            name = name.replace(old, new) if ".experts." in name else name
        return [(name, bits, dtype)]

    per_expert = rewrite_checkpoint(src, tmp_path / "renamed", rename)
    assert kt_files(converted(src)) == kt_files(converted(per_expert))


@pytest.mark.parametrize("arch", PER_EXPERT_ARCHS + FUSED_ARCHS)
def test_transformers_loads_the_sample_and_ktq_reads_its_experts(samples, arch):
    """transformers' own loader (renames, fusing, the Qwen3-VL transpose) is the reference for key names,
    shapes and which tensor is gate, up and down. I != H: transformers does not transpose a square down_proj."""
    import transformers

    src = samples(arch, moe_intermediate=384)
    loader = transformers.AutoModelForImageTextToText if arch in FUSED_ARCHS else transformers.AutoModelForCausalLM
    model, info = loader.from_pretrained(src, dtype=torch.bfloat16, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    mtp_layer = f"model.layers.{SMALL['layers']}."  # DeepSeek's MTP layer: transformers does not load it
    assert all(key.startswith(mtp_layer) for key in info["unexpected_keys"]), info["unexpected_keys"]
    assert bool(info["unexpected_keys"]) == (arch == "deepseek_v3")
    params = dict(model.named_parameters())
    ckpt = open_checkpoint(src)
    moe = find_experts(ckpt)
    scratch = np.empty(moe.scratch_bytes, np.uint8)
    checked = 0
    with TensorReader() as reader:
        for layer in moe.layers:
            prefix = next(n for n in params if n.endswith(f"layers.{layer.index}.mlp.experts.gate_up_proj"))
            gate_up = params[prefix].detach().view(torch.uint16).numpy()
            down = params[prefix.replace("gate_up_proj", "down_proj")].detach().view(torch.uint16).numpy()
            for e, expert in enumerate(layer.experts):
                bits = {proj: source.read(reader, np.empty(source.shape, np.uint16), scratch).copy()
                        for proj, source in expert.items()}
                assert np.array_equal(np.concatenate([bits["gate"], bits["up"]]), gate_up[e])
                assert np.array_equal(bits["down"], down[e])
                checked += 1
    assert checked == len(moe.layers) * SMALL["experts"]


# ---- detection, warnings ------------------------------------------------------------------------------------

def test_fp8_warns_once_and_converts(ktq, samples, tmp_path):
    result = ktq("cpu", "-i", samples("deepseek_v3", "fp8"), "-o", tmp_path / "out", "--threadpool-count", NUMA)
    assert result.code == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("ktq: warning:")]
    assert len(warnings) == 1 and "FP8" in warnings[0] and "BF16" in warnings[0]
    plain = ktq("cpu", "-i", samples("deepseek_v3"), "-o", tmp_path / "plain", "--threadpool-count", NUMA)
    assert plain.code == 0 and "warning" not in plain.stderr


@pytest.mark.parametrize("dtype,given,found", [("fp8", "bf16", "F8_E4M3"), ("int4", "fp8", "pack-quantized"),
                                               ("bf16", "int4", "BF16")])
def test_input_type_contradicted_by_the_tensors(ktq, samples, tmp_path, dtype, given, found):
    src = samples("deepseek_v3", dtype)
    result = ktq("cpu", "-i", src, "-o", tmp_path / "out", "--input-type", given)
    assert_one_line_error(result, f"--input-type {given} does not match", found, f"--input-type {dtype}")
    assert not (tmp_path / "out").exists()


# How ktq sample stores each family's fused experts, as their releases do: in x out ([E, H, 2I]) or out x in
SAMPLE_IN_BY_OUT = {"qwen3_vl_moe": True, "qwen3_5_moe": False}
TIED = {"hidden": 512, "moe_intermediate": 256}  # H = 2I: [E, 2I, H] and [E, H, 2I] are the same shape


def unfused_copy(src: Path, dst: Path, in_by_out: bool) -> Path:
    """src's fused experts split per expert in torch (the inverse of fused_copy), read in the orientation given."""
    state, unfused = torch_state(src), {}
    for name, tensor in state.items():
        if name.endswith(".experts.gate_up_proj"):
            prefix = name.removesuffix(".gate_up_proj")
            down = state[f"{prefix}.down_proj"]
            gate_up, down = (tensor.transpose(1, 2), down.transpose(1, 2)) if in_by_out else (tensor, down)
            for e in range(gate_up.shape[0]):
                gate, up = gate_up[e].chunk(2)
                for proj, matrix in (("gate", gate), ("up", up), ("down", down[e])):
                    unfused[f"{prefix}.{e}.{proj}_proj.weight"] = matrix.contiguous()
        elif not name.endswith(".experts.down_proj"):
            unfused[name] = tensor
    return same_weights_new_folder(src, dst, unfused, {})


@pytest.mark.parametrize("arch", FUSED_ARCHS)
def test_fused_orientation_when_gate_up_shapes_tie(samples, converted, tmp_path, arch):
    """H = 2I: gate_up_proj's two orientations have one shape, down_proj's shape tells them apart (this was refused
    before)."""
    src = samples(arch, **TIED)
    gate_up = next(i for n, i in open_checkpoint(src).tensors.items() if n.endswith("experts.gate_up_proj"))
    assert gate_up.shape == (SMALL["experts"], 512, 512)  # the shape alone cannot tell
    reference = unfused_copy(src, tmp_path / "per-expert", SAMPLE_IN_BY_OUT[arch])
    assert kt_files(converted(src)) == kt_files(converted(reference))


@pytest.mark.parametrize("arch", FUSED_ARCHS)
def test_gpu_reads_the_orientation_when_gate_up_shapes_tie(samples, tmp_path, arch):
    """ktq gpu (RTN) packs the same expert matrices from the fused source as from its per-expert split."""
    from gpu_models import run_ktq, tensors

    src = samples(arch, **TIED)
    outputs = {}
    for name, source in (("fused", src), ("per-expert", unfused_copy(src, tmp_path / "split", SAMPLE_IN_BY_OUT[arch]))):
        outputs[name] = tmp_path / f"{name}-w8"
        assert run_ktq("gpu", "--model-id", source, "--output-dir", outputs[name], "--quant-method", "RTN",
                       "--force-cpu", "--quiet") == 0
    fused, split = tensors(outputs["fused"]), tensors(outputs["per-expert"])
    packed = sorted(n for n in fused if n.endswith("weight_packed"))
    assert len(packed) == SMALL["layers"] * SMALL["experts"] * 3 and sorted(split) == sorted(fused)
    with TensorReader() as a, TensorReader() as b:
        for name in fused:
            assert a.read(fused[name]).tobytes() == b.read(split[name]).tobytes(), name


# ---- broken inputs: one line naming the tensor or file, exit code 2, no output --------------------------------

def broken(samples, tmp_path, arch="qwen3_moe", dtype="bf16") -> Path:
    src = tmp_path / "input"
    shutil.copytree(samples(arch, dtype), src)
    return src


def poke(src: Path, tensor: str, byte_offset: int, data: bytes) -> None:
    index = json.loads((src / "model.safetensors.index.json").read_text())
    path = src / index["weight_map"][tensor]
    info = read_header(path)[0][tensor]
    with open(path, "r+b") as f:
        f.seek(info.offset + byte_offset)
        f.write(data)


def fails(ktq, src: Path, tmp_path: Path, *needles: str, finished_layers: bool = False) -> Path:
    """One error line with needles; no output folder unless some layers were finished before the failure."""
    out = tmp_path / "out"
    assert_one_line_error(ktq("cpu", "-i", src, "-o", out, "--threadpool-count", NUMA, "--quiet"), *needles)
    assert out.exists() == finished_layers
    return out


def test_fp8_nan_names_tensor_and_row(ktq, samples, tmp_path):
    src = broken(samples, tmp_path, "deepseek_v3", "fp8")
    name = "model.layers.1.mlp.experts.1.up_proj.weight"
    poke(src, name, 37 * SMALL["hidden"] + 5, bytes([0x7F]))  # e4m3 NaN in row 37
    out = fails(ktq, src, tmp_path, name, "row 37", "Inf or NaN", finished_layers=True)
    # layer 0 was finished and stays for a re-run to continue from; nothing claims the conversion is complete, and
    # its shard waits under its pending name, where kt-kernel (which loads every top-level *.safetensors) ignores it
    manifest = json.loads((out / "ktq.json").read_text())
    assert list(manifest["layers"]) == ["0"] and not manifest["complete"]
    assert sorted(p.name for p in out.iterdir()) == ["ktq.json", "model-00001-of-00002.safetensors.pending"]


def test_int4_nan_scale_names_tensor_and_row(ktq, samples, tmp_path):
    src = broken(samples, tmp_path, "mixtral", "int4")
    poke(src, "model.layers.0.block_sparse_moe.experts.1.w2.weight_scale", 2 * (9 * 8 + 3), b"\xc0\x7f")  # bf16 NaN
    fails(ktq, src, tmp_path, "model.layers.0.block_sparse_moe.experts.1.w2.weight_packed", "row 9", "Inf or NaN")


@pytest.mark.parametrize("arch,dtype,dropped", [
    ("qwen3_moe", "bf16", "model.layers.1.mlp.experts.1.down_proj.weight"),
    ("mixtral", "bf16", "model.layers.0.block_sparse_moe.experts.1.w3.weight"),
    ("deepseek_v3", "fp8", "model.layers.1.mlp.experts.0.gate_proj.weight"),
])
def test_missing_expert_names_the_tensor(ktq, samples, tmp_path, arch, dtype, dropped):
    src = samples(arch, dtype)
    base = dropped.removesuffix("weight")
    incomplete = rewrite_checkpoint(src, tmp_path / "input",
                                    lambda name, bits, dt: [] if name.startswith(base) else [(name, bits, dt)])
    fails(ktq, incomplete, tmp_path, dropped, "is missing", "2 experts")


def test_fused_missing_expert_names_the_tensor(ktq, samples, tmp_path):
    def drop_last_expert(name, bits, dtype):
        return [(name, np.ascontiguousarray(bits[:-1]) if name.endswith("experts.down_proj") else bits, dtype)]

    src = rewrite_checkpoint(samples("qwen3_vl_moe"), tmp_path / "input", drop_last_expert)
    fails(ktq, src, tmp_path, "model.language_model.layers.0.mlp.experts.down_proj", "has shape [1, 256, 256]",
          "implies [2, 256, 256]")


def test_fp8_without_scale_inv_names_the_weight(ktq, samples, tmp_path):
    name = "model.layers.0.block_sparse_moe.experts.1.w1.weight"
    src = rewrite_checkpoint(samples("minimax_m2", "fp8"), tmp_path / "input",
                             lambda n, bits, dt: [] if n == f"{name}_scale_inv" else [(n, bits, dt)])
    fails(ktq, src, tmp_path, name, "without a weight_scale_inv")


def test_fp8_without_block_size_in_config(ktq, samples, tmp_path):
    src = broken(samples, tmp_path, "deepseek_v3", "fp8")
    config = json.loads((src / "config.json").read_text())
    del config["quantization_config"]["weight_block_size"]
    (src / "config.json").write_text(json.dumps(config))
    fails(ktq, src, tmp_path, "config.json", "weight_block_size")


def test_asymmetric_int4_refused(ktq, samples, tmp_path):
    src = broken(samples, tmp_path, "deepseek_v3", "int4")
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"] = False
    (src / "config.json").write_text(json.dumps(config))
    fails(ktq, src, tmp_path, "quantization_config", "asymmetric")


def test_shard_listed_in_index_but_absent(ktq, samples, tmp_path):
    src = broken(samples, tmp_path)
    (src / "model-00002-of-00002.safetensors").unlink()
    fails(ktq, src, tmp_path, "model-00002-of-00002.safetensors", "listed in model.safetensors.index.json", "missing")


def test_truncated_shard(ktq, samples, tmp_path):
    src = broken(samples, tmp_path)
    shard = src / "model-00002-of-00002.safetensors"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 1000)
    fails(ktq, src, tmp_path, str(shard), "is truncated")


def test_unknown_architecture(ktq, samples, tmp_path):
    """Experts under a block name ktq does not know (`moe.`, as a remote-code model might keep them): it says so
    and names a tensor."""
    def custom(name, bits, dtype):
        return [(name.replace(".mlp.", ".moe."), bits, dtype)]

    as_custom = {"model_type": "custom_moe", "architectures": ["CustomMoeForCausalLM"]}
    src = rewrite_checkpoint(samples("qwen3_vl_moe"), tmp_path / "input", custom, lambda c: {**c, **as_custom})
    fails(ktq, src, tmp_path, "model_type 'custom_moe'", "model.language_model.layers.0.moe.experts.down_proj",
          "layout ktq does not know")


def test_int4_weight_shape_contradicting_the_packed_tensor(ktq, samples, tmp_path):
    src = broken(samples, tmp_path, "deepseek_v3", "int4")
    name = "model.layers.0.mlp.experts.1.gate_proj.weight_shape"
    poke(src, name, 8, np.array([128], np.int64).tobytes())  # records [256, 128] for a [256, 256] weight
    fails(ktq, src, tmp_path, name, "records shape [256, 128]", "packs [256, 256]")
