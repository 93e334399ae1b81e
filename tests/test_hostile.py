"""Hostile and damaged input: a corpus of broken checkpoints, outputs and options, each of which must end in one
`ktq: error:` line (exit code 2, no traceback) that names the file, tensor or key, leave the input as it was, write
nothing outside the output folder and leave nothing there that looks complete.

Each case damages a fresh copy of a tiny checkpoint (or of a tiny output) and runs every command that reads it,
in this process; a timer turns a hang (a FIFO opened for reading waits for a writer forever) into a failure.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from test_cli_errors import assert_one_line_error

SHARD = "model-00001-of-00002.safetensors"  # holds layer 0's experts
SHARD2 = "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"
TENSOR = "model.layers.0.mlp.experts.1.up_proj.weight"
TWIN = "model.layers.0.mlp.experts.0.up_proj.weight"  # same shape and dtype as TENSOR
HANG_SECONDS = 20


TINY = {"layers": 2, "experts": 2, "hidden": 128, "moe_intermediate": 128, "shards": 2}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """2 MoE layers of 2 experts, hidden and moe_intermediate 128 (the smallest INT4 allows), in 2 shards."""
    from ktq.sample import write_sample

    return write_sample(tmp_path_factory.mktemp("hostile") / "src", **TINY)


@pytest.fixture(scope="module")
def sources(tmp_path_factory, checkpoint) -> dict[str, Path]:
    """What a case starts from: the checkpoint, the same as compressed-tensors INT4, and its conversions."""
    from conftest import convert_in_process
    from ktq.sample import write_sample

    base = tmp_path_factory.mktemp("hostile")
    return {"checkpoint": checkpoint, "int4": write_sample(base / "int4", dtype="int4", **TINY),
            "merged": convert_in_process(checkpoint, base / "merged", "--threadpool-count", "1"),
            "kt": convert_in_process(checkpoint, base / "kt", "--threadpool-count", "1", "--no-merge-safetensor")}


@dataclass
class Scene:
    """The folders of one case: `src` the (damaged) input, `out` the output folder, `root` both and more."""

    root: Path

    @property
    def src(self) -> Path:
        return self.root / "in"

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def elsewhere(self) -> Path:
        """A folder beside the input: what it holds must never be read or written."""
        return self.root / "elsewhere"


RUNS: dict[str, Callable[[Scene], list[object]]] = {
    "cpu": lambda s: ["cpu", "-i", s.src, "-o", s.out, "--threadpool-count", "1", "--quiet"],
    "dry-run": lambda s: ["cpu", "-i", s.src, "-o", s.out, "--threadpool-count", "1", "--dry-run"],
    "inspect": lambda s: ["inspect", s.src],
    "verify": lambda s: ["inspect", s.src, "--verify"],
    "merge": lambda s: ["merge", s.src, s.out, "--quiet"],
    "gpu": lambda s: ["gpu", "--model_id", s.src, "--output_dir", s.out, "--quant_method", "RTN", "--force_cpu",
                      "--quiet"],
}
READERS = ("cpu", "dry-run", "inspect", "gpu")  # every command that reads a checkpoint


@dataclass(frozen=True)
class Case:
    kind: str  # the class of input
    name: str
    damage: Callable[[Scene], None]
    needles: tuple[str, ...]  # what the error line must name
    runs: tuple[str, ...] = READERS
    source: str = "checkpoint"  # a key of the sources fixture: what `in` is a copy of
    stricter: bool = False  # a header the Rust safetensors library accepts and ktq refuses (see the test)


CASES: list[Case] = []


def case(kind: str, name: str, *needles: str, runs: tuple[str, ...] = READERS, source: str = "checkpoint",
         stricter: bool = False):
    def register(damage: Callable[[Scene], None]) -> Callable[[Scene], None]:
        CASES.append(Case(kind, name, damage, needles, runs, source, stricter))
        return damage
    return register


# --- safetensors headers ----------------------------------------------------------------------------------------

def split_shard(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]), data[8 + length:]


def write_shard(path: Path, header: object, data: bytes, length: int | None = None) -> None:
    """header: an object to encode as JSON, or the header's bytes as they are."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)


def header_case(name: str, *needles: str, stricter: bool = False):
    """A case made by edit(header, data) -> (header, data) on SHARD; the error must name SHARD too."""
    def register(edit: Callable[[dict, bytes], tuple[object, bytes]]) -> None:
        def damage(scene: Scene) -> None:
            write_shard(scene.src / SHARD, *edit(*split_shard(scene.src / SHARD)))
        case("header", name, SHARD, *needles, stricter=stricter)(damage)
    return register


def _set(field: str, value: object, tensor: str = TENSOR) -> Callable[[dict, bytes], tuple[dict, bytes]]:
    def edit(header: dict, data: bytes) -> tuple[dict, bytes]:
        header[tensor][field] = value(header[tensor][field]) if callable(value) else value
        return header, data
    return edit


# (name, field of TENSOR's entry, new value or function of the old one, what the error names besides SHARD)
for _name, _field, _value, _needles in [
    ("negative-offsets-into-the-header", "data_offsets", lambda o: [-64, o[1] - o[0] - 64], (TENSOR, "data_offsets")),
    ("float-offsets", "data_offsets", lambda o: [float(o[0]), float(o[1])], (TENSOR, "data_offsets")),
    ("string-offsets", "data_offsets", lambda o: [str(o[0]), str(o[1])], (TENSOR, "data_offsets")),
    ("three-offsets", "data_offsets", lambda o: [o[0], o[1], o[1]], (TENSOR, "data_offsets")),
    ("end-before-begin", "data_offsets", lambda o: [o[1], o[0]], (TENSOR, "data_offsets")),
    ("infinite-offset", "data_offsets", lambda o: [o[0], float("inf")], ("Infinity is not JSON",)),
    ("unknown-dtype", "dtype", "BF17", (TENSOR, "BF17", "not a safetensors dtype")),
    ("dtype-not-a-string", "dtype", 16, (TENSOR, "dtype 16")),
    ("byte-count-off", "shape", lambda s: [s[0], s[1] - 1], (TENSOR, "needs")),
    ("negative-dims", "shape", lambda s: [-s[0], -s[1]], (TENSOR, "shape")),
    ("dim-beyond-usize", "shape", lambda s: [2 ** 70, 0], (TENSOR, "shape")),
    ("dims-whose-product-is-huge", "shape", lambda s: [2 ** 40, 2 ** 40], (TENSOR, "needs 2417851639229258349412352")),
    ("boolean-dim", "shape", lambda s: [True, s[0] * s[1]], (TENSOR, "shape")),
    ("nan-dim", "shape", lambda s: [float("nan")], ("NaN is not JSON",)),
    ("shape-not-a-list", "shape", 128, (TENSOR, "shape 128")),
]:
    header_case(_name, *_needles)(_set(_field, _value))


@header_case("overlapping-tensors", TENSOR, "overlap", TWIN)
def _(header, data):  # TENSOR's offsets point at TWIN's bytes, its own bytes belong to nothing
    header[TENSOR]["data_offsets"] = header[TWIN]["data_offsets"]
    return header, data


@header_case("gap-before-the-first-tensor", "bytes 0..64", "belong to no tensor")
def _(header, data):
    for name, entry in header.items():
        if name != "__metadata__":
            entry["data_offsets"] = [o + 64 for o in entry["data_offsets"]]
    return header, bytes(64) + data


@header_case("bytes-after-the-last-tensor", "the last 8 bytes belong to no tensor")
def _(header, data):
    return header, data + bytes(8)


@header_case("truncated-data", "truncated")
def _(header, data):
    return header, data[:-8]


@header_case("header-a-list", "a JSON list, not an object")
def _(header, data):
    return [header], data


@header_case("header-a-number", "a JSON int, not an object")
def _(header, data):
    return 42, data


@header_case("entry-a-list", TENSOR, "malformed header entry")
def _(header, data):
    header[TENSOR] = [header[TENSOR]["dtype"], header[TENSOR]["shape"]]
    return header, data


@header_case("entry-without-offsets", TENSOR, "malformed header entry")
def _(header, data):
    del header[TENSOR]["data_offsets"]
    return header, data


@header_case("metadata-value-not-a-string", "__metadata__")
def _(header, data):
    header["__metadata__"] = {"format": 1}
    return header, data


@header_case("metadata-a-list", "__metadata__")
def _(header, data):
    header["__metadata__"] = ["pt"]
    return header, data


@header_case("tensor-named-twice", TENSOR, "twice", stricter=True)
def _(header, data):  # same bytes, read as BF16 by a reader that keeps the first entry, as F16 by one keeping the last
    text = json.dumps(header)
    return (text[:-1] + f', "{TENSOR}": ' + json.dumps({**header[TENSOR], "dtype": "F16"}) + "}").encode(), data


@header_case("field-named-twice", "dtype", "twice")
def _(header, data):
    text = json.dumps(header)
    entry = json.dumps(header[TENSOR])
    return text.replace(entry, '{"dtype": "F32", ' + entry[1:]).encode(), data


@header_case("not-utf8", "not UTF-8")
def _(header, data):
    return json.dumps(header).replace(TENSOR, "caf\udce9", 1).encode("utf-8", "surrogateescape"), data


@header_case("not-json", "not JSON")
def _(header, data):
    return b"{'single': 'quotes'}", data


@header_case("nul-padding", "not JSON")
def _(header, data):
    return json.dumps(header).encode() + bytes(8), data


def raw_case(name: str, content: Callable[[int], bytes], *needles: str) -> None:
    """SHARD replaced by content(its size)."""
    def damage(scene: Scene) -> None:
        path = scene.src / SHARD
        path.write_bytes(content(path.stat().st_size))
    case("header", name, SHARD, *needles)(damage)


raw_case("empty-file", lambda size: b"", "shorter than its 8-byte header length")
raw_case("header-length-0", lambda size: bytes(8), "not JSON")
raw_case("five-byte-file", lambda size: b"\x10\0\0\0\0", "shorter than its 8-byte header length")
raw_case("header-length-2**63", lambda size: struct.pack("<Q", 2 ** 63) + b"{}", "header length 9223372036854775808")
raw_case("header-length-past-the-end", lambda size: struct.pack("<Q", size) + b"{}", "truncated (header length")
raw_case("header-length-over-100-MB", lambda size: struct.pack("<Q", 100_000_001) + b"{", "100000001",
         "the format allows")  # refused for its length first, as the Rust library does, whatever the file's size


# --- the index as the authority ---------------------------------------------------------------------------------

def edit_index(scene: Scene, edit: Callable[[dict], object]) -> None:
    """edit(weight_map) changes it in place (and returns None) or returns its replacement."""
    path = scene.src / INDEX
    index = json.loads(path.read_text())
    edited = edit(index["weight_map"])
    index["weight_map"] = index["weight_map"] if edited is None else edited
    path.write_text(json.dumps(index))


def index_case(name: str, *needles: str):
    """A case made by edit_index(edit)."""
    def register(edit: Callable[[dict], object]) -> None:
        case("index", name, *needles)(lambda scene: edit_index(scene, edit))
    return register


def add_copy(shard: Path, tensor_from: Path, name: str) -> None:
    """Append tensor `name` of file tensor_from to shard, header and bytes."""
    header, data = split_shard(shard)
    source_header, source_data = split_shard(tensor_from)
    begin, end = source_header[name]["data_offsets"]
    header[name] = {**source_header[name], "data_offsets": [len(data), len(data) + end - begin]}
    write_shard(shard, header, data + source_data[begin:end])


@case("index", "tensor-in-two-shards", TENSOR, "in two shards", SHARD, SHARD2)
def _(scene):
    add_copy(scene.src / SHARD2, scene.src / SHARD, TENSOR)  # the index still lists it in SHARD only


@case("index", "tensor-in-two-shards-without-index", TENSOR, "in two shards", SHARD, SHARD2)
def _(scene):
    add_copy(scene.src / SHARD2, scene.src / SHARD, TENSOR)
    (scene.src / INDEX).unlink()


@index_case("index-names-the-wrong-shard", TENSOR, SHARD, "disagree")
def _(weight_map):
    weight_map[TENSOR] = SHARD2


@index_case("index-lacks-a-tensor", TENSOR, "not at all")
def _(weight_map):
    del weight_map[TENSOR]


@index_case("index-lists-a-tensor-no-shard-holds", "ghost.weight", "which does not hold it")
def _(weight_map):
    weight_map["ghost.weight"] = SHARD


def outside_case(name: str, shard_name: Callable[[Scene], str], prepare: Callable[[Scene], None] = lambda s: None):
    """SHARD's tensors listed under another name, for a copy of SHARD outside the folder."""
    def damage(scene: Scene) -> None:
        shutil.copy(scene.src / SHARD, scene.elsewhere / SHARD)
        prepare(scene)
        listed = shard_name(scene)
        edit_index(scene, lambda weight_map: {t: listed if s == SHARD else s for t, s in weight_map.items()})
    case("index", name, "outside", INDEX)(damage)


outside_case("shard-in-a-parent-folder", lambda scene: f"../elsewhere/{SHARD}")
outside_case("shard-at-an-absolute-path", lambda scene: str(scene.elsewhere / SHARD))
outside_case("shard-in-a-linked-folder", lambda scene: f"sub/{SHARD}",
             lambda scene: (scene.src / "sub").symlink_to(scene.elsewhere, target_is_directory=True))


@case("index", "shard-in-a-folder-that-links-to-itself", f"loop/{SHARD}", "missing")
def _(scene):
    (scene.src / "loop").symlink_to("loop")
    edit_index(scene, lambda weight_map: {t: f"loop/{s}" if s == SHARD else s for t, s in weight_map.items()})


@index_case("weight-map-a-list", "weight_map must map")
def _(weight_map):
    return list(weight_map.items())


@index_case("shard-name-a-number", "weight_map must map")
def _(weight_map):
    weight_map[TENSOR] = 1


@case("index", "index-not-json", INDEX, "not a valid safetensors index")
def _(scene):
    (scene.src / INDEX).write_text("{")


@case("index", "index-without-weight-map", INDEX, "no weight_map")
def _(scene):
    (scene.src / INDEX).write_text('{"metadata": {}}')


@case("index", "listed-shard-missing", SHARD2, "missing")
def _(scene):
    (scene.src / SHARD2).unlink()


# --- files that are not regular files ---------------------------------------------------------------------------

def replaced_case(name: str, file: str, make: Callable[[Path], None], *needles: str) -> None:
    """`file` of the checkpoint replaced by what make(path) creates."""
    def damage(scene: Scene) -> None:
        path = scene.src / file
        path.unlink()
        make(path)
    case("not a regular file", name, file, *needles)(damage)


replaced_case("shard-a-fifo", SHARD2, os.mkfifo, "is a FIFO")
replaced_case("shard-a-link-to-dev-zero", SHARD, lambda p: p.symlink_to("/dev/zero"), "character device")
replaced_case("shard-a-link-to-dev-null", SHARD, lambda p: p.symlink_to("/dev/null"), "character device")
replaced_case("shard-a-folder", SHARD, os.mkdir, "is a folder")
replaced_case("shard-a-symlink-loop", SHARD, lambda p: p.symlink_to(p.name), "Too many levels of symbolic links")
replaced_case("shard-a-dangling-link", SHARD2, lambda p: p.symlink_to("gone.safetensors"), "No such file")
replaced_case("config-a-fifo", "config.json", os.mkfifo, "is a FIFO")
replaced_case("config-a-link-to-dev-zero", "config.json", lambda p: p.symlink_to("/dev/zero"), "character device")
replaced_case("index-a-fifo", INDEX, os.mkfifo, "is a FIFO")


def input_case(name: str, make: Callable[[Path], None], *needles: str) -> None:
    """The input folder itself replaced by what make(path) creates."""
    def damage(scene: Scene) -> None:
        shutil.rmtree(scene.src)
        make(scene.src)
    case("not a regular file", name, *needles)(damage)


input_case("input-a-symlink-loop", lambda p: p.symlink_to(p.name), "is not a folder")
input_case("input-a-fifo", os.mkfifo, "is not a folder")
input_case("input-a-link-to-dev-null", lambda p: p.symlink_to("/dev/null"), "is not a folder")


@case("not a regular file", "unlisted-fifo-without-index", "extra.safetensors", "is a FIFO")
def _(scene):
    (scene.src / INDEX).unlink()
    os.mkfifo(scene.src / "extra.safetensors")


# --- config.json values -----------------------------------------------------------------------------------------

def config_case(name: str, key: str, value: object, *needles: str) -> None:
    """config.json with key set to value (written as JSON: NaN as NaN)."""
    def damage(scene: Scene) -> None:
        path = scene.src / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))
    case("config", name, *needles)(damage)


config_case("num-hidden-layers-10**12", "num_hidden_layers", 10 ** 12, "num_hidden_layers is 1000000000000",
            "2 decoder layers")
config_case("num-hidden-layers-0", "num_hidden_layers", 0, "num_hidden_layers is 0")
config_case("num-hidden-layers-a-float", "num_hidden_layers", 2.0, "num_hidden_layers is 2.0")
config_case("negative-moe-intermediate-size", "moe_intermediate_size", -128, "moe_intermediate_size is -128")
config_case("hidden-size-a-string", "hidden_size", "128", 'hidden_size is "128"')
config_case("hidden-size-nan", "hidden_size", float("nan"), "hidden_size is NaN")
config_case("hidden-size-10**12", "hidden_size", 10 ** 12, "hidden_size 1000000000000")
config_case("num-experts-true", "num_experts", True, "num_experts is true")
config_case("num-experts-10**12", "num_experts", 10 ** 12, "1000000000000 experts")
config_case("mlp-only-layers-a-number", "mlp_only_layers", 5, "mlp_only_layers is 5")
config_case("mlp-only-layers-negative", "mlp_only_layers", [-1], "mlp_only_layers is [-1]")
config_case("first-k-dense-replace-negative", "first_k_dense_replace", -1, "first_k_dense_replace is -1")
config_case("decoder-sparse-step-0", "decoder_sparse_step", 0, "decoder_sparse_step is 0")
config_case("moe-layer-freq-0", "moe_layer_freq", 0, "moe_layer_freq is 0")
config_case("mlp-layer-types-a-string", "mlp_layer_types", "sparse", 'mlp_layer_types is "sparse"')
config_case("text-config-a-number", "text_config", 5, "text_config is 5")


def quantization_case(name: str, edit: Callable[[dict], None], *needles: str) -> None:
    """The INT4 checkpoint's quantization_config changed in place by edit."""
    def damage(scene: Scene) -> None:
        path = scene.src / "config.json"
        config = json.loads(path.read_text())
        edit(config["quantization_config"])
        path.write_text(json.dumps(config))
    case("config", name, *needles, source="int4")(damage)


quantization_case("config-groups-a-list", lambda q: q.update(config_groups=[1]), "config_groups is [1]")
quantization_case("group-size-negative", lambda q: q["config_groups"]["group_0"]["weights"].update(group_size=-32),
                  "group_size (-32)")


def weight_shape_case(name: str, dtype: str, shape: list[int]) -> None:
    """A weight_shape tensor (the rows and columns a packed INT4 projection stands for) of another dtype or shape,
    the same bytes."""
    tensor = "model.layers.0.mlp.experts.1.up_proj.weight_shape"

    def damage(scene: Scene) -> None:
        shard = next(p for p in scene.src.glob("*.safetensors") if tensor in split_shard(p)[0])
        header, data = split_shard(shard)
        header[tensor].update(dtype=dtype, shape=shape)
        write_shard(shard, header, data)
    case("config", name, tensor, f"{dtype} {shape}", "needs I32 or I64 [2]", source="int4")(damage)


weight_shape_case("weight-shape-a-table", "I64", [1, 2])
weight_shape_case("weight-shape-of-floats", "F32", [4])


@case("config", "config-a-list", "config.json", "does not hold a JSON object")
def _(scene):
    (scene.src / "config.json").write_text("[]")


@case("config", "config-not-utf8", "config.json", "not valid JSON")
def _(scene):
    (scene.src / "config.json").write_bytes(b'{"model_type": "\xff"}')


# --- options ----------------------------------------------------------------------------------------------------

def option_case(name: str, argv: Callable[[Scene], list[object]], *needles: str,
                prepare: Callable[[Scene], None] = lambda scene: None) -> None:
    """A command line of its own, run on the intact checkpoint (after prepare)."""
    RUNS[name] = argv
    case("options", name, *needles, runs=(name,))(prepare)


def cpu_with(*options: object) -> Callable[[Scene], list[object]]:
    return lambda s: ["cpu", "-i", s.src, "-o", s.out, "--quiet", *options]


option_case("threadpool-count-0", cpu_with("--threadpool-count", 0), "--threadpool-count", "greater than or equal to 1")
option_case("threadpool-count-negative", cpu_with("--threadpool-count", -2), "--threadpool-count")
option_case("threadpool-count-not-a-number", cpu_with("--threadpool-count", "two"), "--threadpool-count",
            "valid integer")
option_case("cpuinfer-threads-0", cpu_with("--threadpool-count", 1, "--cpuinfer-threads", 0), "--cpuinfer-threads",
            "greater than or equal to 1")
option_case("resume-layer-negative", cpu_with("--threadpool-count", 1, "--resume-layer", -1), "--resume-layer")
option_case("dry-run-threadpool-count-0", cpu_with("--threadpool-count", 0, "--dry-run"), "--threadpool-count")
option_case("unknown-option", cpu_with("--threadpool-count", 1, "--merge"), "No such option: --merge",
            "see ktq cpu --help")
option_case("unknown-choice", cpu_with("--threadpool-count", 1, "--quant-method", "int3"), "--quant-method", "int3")
option_case("missing-output", lambda s: ["cpu", "-i", s.src], "Missing option '--output'")
option_case("unknown-command", lambda s: ["convert", s.src], "No such command 'convert'", "see ktq --help")
option_case("output-inside-the-input", lambda s: ["cpu", "-i", s.src, "-o", s.src / "out", "--threadpool-count", 1],
            "must not be --input-path", "or inside it")
option_case("output-is-the-input", lambda s: ["cpu", "-i", s.src, "-o", s.src, "--threadpool-count", 1,
                                              "--dry-run"], "must not be --input-path")
option_case("output-a-link-into-the-input",
            lambda s: ["cpu", "-i", s.src, "-o", s.root / "link" / "out", "--threadpool-count", 1],
            "must not be --input-path", prepare=lambda s: (s.root / "link").symlink_to(s.src))
option_case("inspect-two-paths", lambda s: ["inspect", s.src, s.src], "unexpected extra argument")


def gpu_with(*options: object) -> Callable[[Scene], list[object]]:
    return lambda s: ["gpu", "--model_id", s.src, "--quant_method", "RTN", "--force_cpu", "--quiet", *options]


option_case("gpu-output-inside-the-input", lambda s: gpu_with("--output_dir", s.src / "out")(s),
            "--output_dir", "must not be --model_id")
option_case("gpu-output-above-the-input", lambda s: gpu_with("--output_dir", s.root, "--overwrite")(s),
            "--output_dir", "holds --model_id")
option_case("gpu-cpu-output-inside-the-input",
            lambda s: gpu_with("--output_dir", s.out, "--quant_method", "GPTQ", "--cpu-output", s.src / "cpu")(s),
            "--cpu-output", "must not be --model_id")
option_case("gpu-unknown-choice", lambda s: gpu_with("--output_dir", s.out, "--quant_type", "W3A16")(s),
            "--quant_type", "W3A16")
option_case("gpu-unknown-option", lambda s: gpu_with("--output_dir", s.out, "--merge")(s), "No such option: --merge",
            "see ktq gpu --help")
option_case("gpu-missing-output", lambda s: ["gpu", "--model_id", s.src], "Missing option '--output-dir'")


# --- outputs: what ktq inspect and ktq merge read ---------------------------------------------------------------

OUTPUT_SHARD = "model-00001-of-00002.safetensors"  # layer 0 of the merged conversion
OUTPUT_TENSOR = "blk.0.ffn_up_exps.1.numa.0.weight"


def output_case(name: str, source: str, damage: Callable[[Scene], None], *needles: str,
                runs: tuple[str, ...] = ("inspect", "verify")) -> None:
    case("output", name, *needles, runs=runs, source=source)(damage)


def _edit_output_shard(edit: Callable[[dict, bytes], tuple[object, bytes]]) -> Callable[[Scene], None]:
    def damage(scene: Scene) -> None:
        write_shard(scene.src / OUTPUT_SHARD, *edit(*split_shard(scene.src / OUTPUT_SHARD)))
    return damage


def _overlap(header: dict, data: bytes) -> tuple[dict, bytes]:
    header[OUTPUT_TENSOR]["data_offsets"] = header["blk.0.ffn_up_exps.0.numa.0.weight"]["data_offsets"]
    return header, data


output_case("shard-with-overlapping-tensors", "merged", _edit_output_shard(_overlap), OUTPUT_SHARD, "overlap")
output_case("shard-with-trailing-bytes", "merged", _edit_output_shard(lambda h, d: (h, d + bytes(8))), OUTPUT_SHARD,
            "belong to no tensor")
output_case("shard-a-fifo", "merged", lambda s: ((s.src / OUTPUT_SHARD).unlink(), os.mkfifo(s.src / OUTPUT_SHARD)),
            OUTPUT_SHARD, "is a FIFO")
output_case("kt-file-a-fifo", "kt", lambda s: _replace_kt_file(s, os.mkfifo), "layer 0", "missing")
output_case("complete-but-a-shard-still-pending", "merged",
            lambda s: (s.src / OUTPUT_SHARD).rename(s.src / f"{OUTPUT_SHARD}.pending"), f"{OUTPUT_SHARD}.pending",
            "never renamed")
output_case("manifest-numa-0", "merged", lambda s: _edit_manifest(s, numa=0), "ktq.json", "NUMA count 0")
output_case("manifest-experts-a-string", "kt", lambda s: _edit_manifest(s, experts="2"), "ktq.json",
            "expert count '2'")
output_case("manifest-10**12-experts", "merged", lambda s: _edit_manifest(s, experts=10 ** 12), "ktq.json",
            "1000000000000 experts")
output_case("manifest-hidden-not-aligned", "kt", lambda s: _edit_manifest(s, hidden=100), "ktq.json",
            "hidden_size 100")
output_case("manifest-layers-out-of-order", "kt", lambda s: _edit_manifest(s, moe_layers=[1, 0]), "ktq.json",
            "not ascending")
output_case("merge-out-inside-in", "kt", lambda s: None, "must not be IN", runs=("merge-inside",))
RUNS["merge-inside"] = lambda s: ["merge", s.src, s.src / "merged"]


def _edit_manifest(scene: Scene, **fields: object) -> None:
    path = scene.src / "ktq.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def _replace_kt_file(scene: Scene, make: Callable[[Path], None]) -> None:
    victim = next((scene.src / "_layer_0" / "_numa_0").glob("INT4_up_1_*quant_.kt"))
    victim.unlink()
    make(victim)


def kt_tree_case(name: str, files: dict[str, int], *needles: str) -> None:
    """A folder of nothing but `_layer_0/_numa_P/` files of well-formed names and the given sizes."""
    def damage(scene: Scene) -> None:
        shutil.rmtree(scene.src)
        for relpath, size in files.items():
            path = scene.src / "_layer_0" / relpath
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(bytes(size))
    output_case(name, "kt", damage, *needles, runs=("inspect", "verify", "merge"))


def _kt_names(size: Callable[[str, str], int], numa: str = "_numa_0", expert: int = 0) -> dict[str, int]:
    return {f"{numa}/INT4_{proj}_{expert}_{size(proj, kind)}Byte_{kind}_.kt": size(proj, kind)
            for proj in ("gate", "up", "down") for kind in ("quant", "scale")}


kt_tree_case("tree-of-empty-files", {name: 0 for name in _kt_names(lambda proj, kind: 0)}, "hidden size 0")
kt_tree_case("tree-of-misaligned-sizes", _kt_names(lambda proj, kind: 400 if kind == "scale" else 5000),
             "hidden_size 100")
kt_tree_case("tree-with-a-billion-experts", _kt_names(lambda p, k: 512 if k == "scale" else 8192, expert=10 ** 9),
             "1000000001 experts")
kt_tree_case("tree-with-a-million-numa-parts", _kt_names(lambda p, k: 512 if k == "scale" else 8192,
                                                         numa="_numa_999999"), "1000000 NUMA parts")


# --- the test ---------------------------------------------------------------------------------------------------

def snapshot(root: Path, skip: Path | None = None) -> dict[str, object]:
    """Every entry below root (skip aside) without following links or opening anything but regular files."""
    found: dict[str, object] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            if skip is not None and (path == skip or skip in path.parents):
                continue
            rel = str(path.relative_to(root))
            if path.is_symlink():
                found[rel] = ("link", os.readlink(path))
            elif path.is_file():
                found[rel] = path.read_bytes()
            else:
                found[rel] = ("not a file", path.lstat().st_mode)
        dirs[:] = [d for d in dirs if not (Path(folder) / d).is_symlink()]
    return found


def assert_nothing_servable(out: Path) -> None:
    """Nothing in out that kt-kernel or a Hugging Face loader would load, or ktq would call complete."""
    if not out.exists():
        return
    assert not list(out.glob("*.safetensors")), sorted(out.iterdir())
    assert not (out / "config.json").exists()  # what a Hugging Face loader opens first
    manifest = out / "ktq.json"
    assert not manifest.is_file() or not json.loads(manifest.read_text())["complete"]


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """A hang becomes an exception (ktq reports it as an internal error, and the test fails)."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _prepare(case: Case, sources: dict[str, Path], tmp_path: Path) -> Scene:
    scene = Scene(tmp_path)
    shutil.copytree(sources[case.source], scene.src, symlinks=True)
    scene.elsewhere.mkdir()
    case.damage(scene)
    return scene


@pytest.mark.parametrize("case,run", [pytest.param(c, r, id=f"{c.kind}-{c.name}" + (f"-{r}" if r != c.name else ""))
                                      for c in CASES for r in c.runs])
def test_refused_in_one_line_touching_nothing(ktq, sources, tmp_path, case, run):
    scene = _prepare(case, sources, tmp_path)
    before = snapshot(tmp_path, skip=scene.out)
    if run.startswith("gpu"):
        importlib.import_module("ktq.gpu.run")  # torch and transformers imported: their first import is no hang
    with deadline(HANG_SECONDS):
        result = ktq(*RUNS[run](scene))
    assert_one_line_error(result, *case.needles)
    assert snapshot(tmp_path, skip=scene.out) == before  # the input and everything beside it as they were
    assert_nothing_servable(scene.out)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in CASES if c.kind == "header"])
def test_the_safetensors_library_refuses_the_same_headers(sources, tmp_path, case):
    """ktq's header rules are the format's: what ktq refuses, the Rust library refuses too, except a name given
    twice, which that library resolves silently (the last one wins) and ktq refuses as ambiguous."""
    from safetensors import SafetensorError, safe_open

    scene = _prepare(case, sources, tmp_path)
    try:
        with safe_open(scene.src / SHARD, "numpy"):
            refused = False
    except SafetensorError:
        refused = True
    assert refused != case.stricter


def test_a_hugging_face_cache_layout_is_read(ktq, checkpoint, tmp_path):
    """Shards that are symlinks to blobs outside the folder (how Hugging Face caches store them) are the
    checkpoint's own: converted as the plain folder is."""
    from conftest import tree_files

    snapshot_dir, blobs = tmp_path / "snapshots" / "abc123", tmp_path / "blobs"
    snapshot_dir.mkdir(parents=True)
    blobs.mkdir()
    for file in checkpoint.iterdir():
        blob = blobs / f"blob-{file.name}"
        shutil.copy(file, blob)
        (snapshot_dir / file.name).symlink_to(os.path.relpath(blob, snapshot_dir))
    outputs = []
    for name, source in (("plain", checkpoint), ("cache", snapshot_dir)):
        result = ktq("cpu", "-i", source, "-o", tmp_path / name, "--threadpool-count", "1", "--quiet")
        assert result.code == 0, result.stderr
        outputs.append(tree_files(tmp_path / name))
    assert outputs[0] == outputs[1]


# --- an unfinished output is never servable; the lock lasts until the output is complete ------------------------

def _poke_nan(src: Path, tensor: str) -> bytes:
    """One bf16 NaN in tensor (row 3); returns the shard's bytes before."""
    from ktq.safetensors_io import read_header

    shard = src / json.loads((src / INDEX).read_text())["weight_map"][tensor]
    before = shard.read_bytes()
    info = read_header(shard)[0][tensor]
    with open(shard, "r+b") as f:
        f.seek(info.offset + 2 * 3 * info.shape[1])
        f.write(b"\xc0\x7f")
    return before


@pytest.mark.usefixtures("two_numa_nodes")
def test_a_failed_merged_run_leaves_nothing_kt_kernel_would_serve_and_resumes(ktq, moe_sample, converted, tmp_path):
    """Layers 1 and 2 are committed when layer 3's last expert fails (the pipeline is at most 4 experts ahead of
    the writer): their shards wait under pending names, not at the top level where kt-kernel loads every
    *.safetensors; ktq inspect refuses the folder and gives no flags to serve it; the same command, once the input
    is repaired, keeps them and ends byte-identical to an uninterrupted run."""
    from conftest import tree_files

    src, out = tmp_path / "src", tmp_path / "out"
    shutil.copytree(moe_sample, src)
    tensor = "model.layers.3.mlp.experts.3.down_proj.weight"
    intact = _poke_nan(src, tensor)
    args = ["cpu", "-i", src, "-o", out, "--threadpool-count", "2", "--quiet"]
    assert_one_line_error(ktq(*args), tensor, "Inf or NaN")
    assert sorted(p.name for p in out.iterdir()) == [
        "ktq.json", "model-00001-of-00003.safetensors.pending", "model-00002-of-00003.safetensors.pending"]
    inodes = {p.name.removesuffix(".pending"): p.stat().st_ino for p in out.glob("*.pending")}
    inspected = ktq("inspect", out)
    assert_one_line_error(inspected, "unfinished conversion: 2 of 3 layers done", "re-run")
    assert "--kt-weight-path" not in inspected.stdout and "serve with: nothing yet" in inspected.stdout
    assert json.loads(ktq("inspect", out, "--json").stdout)["serve"] is None
    assert_one_line_error(ktq("inspect", out, "--verify"), "unfinished conversion")  # the pending shards verify
    (src / json.loads((src / INDEX).read_text())["weight_map"][tensor]).write_bytes(intact)
    assert ktq(*args).code == 0
    assert tree_files(out) == tree_files(converted["merged"])
    assert {name: (out / name).stat().st_ino for name in inodes} == inodes  # kept, renamed, not rewritten


@pytest.mark.parametrize("command", ["cpu", "merge"])
def test_the_lock_is_held_until_the_output_is_complete(ktq, checkpoint, sources, tmp_path, monkeypatch, command):
    """The config and tokenizer files are copied, the index written and the shards given their names under the
    folder's lock: the same command started again meanwhile is refused in one line instead of finishing the output
    itself (and making the first one fail), and the first one completes it."""
    from ktq.cpu import output

    out = tmp_path / "out"
    args = {"cpu": ["cpu", "-i", checkpoint, "-o", out, "--threadpool-count", "1", "--quiet"],
            "merge": ["merge", sources["kt"], out, "--original-path", checkpoint, "--quiet"]}[command]
    copy_aux_files, second = output.copy_aux_files, []

    def copy_while_a_second_run_starts(source: Path, destination: Path) -> None:
        if not second:  # once: a second run that got through would come here too
            before = snapshot(out)
            second.append((ktq(*args), snapshot(out) == before))
        copy_aux_files(source, destination)

    monkeypatch.setattr(output, "copy_aux_files", copy_while_a_second_run_starts)
    first = ktq(*args)
    assert first.code == 0, first.stderr
    [(refused, untouched)] = second
    assert_one_line_error(refused, "another ktq process is writing into", str(out))
    assert untouched
    manifest = json.loads((out / "ktq.json").read_text())
    assert manifest["complete"] and (out / "config.json").is_file() and list(out.glob("*.safetensors"))


@pytest.mark.parametrize("name", ["model-00001-of-00002.safetensors", "model-00001-of-00002.safetensors.pending"])
def test_a_fifo_where_a_committed_shard_was_is_converted_again(ktq, checkpoint, sources, tmp_path, name):
    """Resuming checks each committed shard's header: a FIFO in its place (under its name or its pending one) is
    not opened (that would wait for a writer forever) but taken as a layer to convert again."""
    from conftest import tree_files

    out = tmp_path / "out"
    shutil.copytree(sources["merged"], out)
    manifest = json.loads((out / "ktq.json").read_text())
    (out / "ktq.json").write_text(json.dumps({**manifest, "complete": False}))
    (out / "model-00001-of-00002.safetensors").unlink()
    os.mkfifo(out / name)
    with deadline(HANG_SECONDS):
        result = ktq("cpu", "-i", checkpoint, "-o", out, "--threadpool-count", "1", "--quiet")
    assert result.code == 0, result.stderr
    assert tree_files(out) == tree_files(sources["merged"])
