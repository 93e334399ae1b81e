"""What a folder holds: a ktq output, a kt-kernel output without ktq.json (either form), or a source checkpoint.

`recognise` reads only names, sizes and safetensors headers. For an output it returns the Layout (from ktq.json,
or inferred from the names and sizes the format fixes) and every structural problem: a missing layer, expert or
NUMA part, a file or tensor of the wrong size, a file kt-kernel would trip over. `PieceReader` reads the quantised
pieces back, whichever the form. `ktq inspect` and `ktq merge` are built on both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ktq.atomic import PARTIAL_SUFFIX
from ktq.cpu.checkpoint import Checkpoint, open_checkpoint
from ktq.cpu.layout import Layout, Piece, geometry_problem
from ktq.cpu.manifest import PENDING_SUFFIX, Manifest, load_manifest
from ktq.cpu.output import committed_path
from ktq.errors import KtqError
from ktq.kernels import ktformat as fmt
from ktq.safetensors_io import TensorInfo, TensorReader, open_regular, read_header

SHOWN = 3  # examples named in one problem line


@dataclass
class Found:
    path: Path
    kind: str  # "ktq-output", "kt-output" (no ktq.json) or "checkpoint"
    layout: Layout | None = None
    manifest: Manifest | None = None
    tensors: dict[str, TensorInfo] = field(default_factory=dict)  # merged outputs: every tensor of every shard
    checkpoint: Checkpoint | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    broken: set[int] = field(default_factory=set)  # layers with a structural problem (missing or wrong sizes)

    def layer_problem(self, layer: int, problem: str) -> None:
        self.broken.add(layer)
        self.problems.append(problem)

    @property
    def is_output(self) -> bool:
        return self.kind != "checkpoint"

    @property
    def checked_layers(self) -> list[int]:
        """The layers whose files must all be there: every layer of the layout, or, in a ktq output, those ktq.json
        records as committed (the rest are the unfinished part of the conversion, one problem of its own)."""
        layers = self.layout.layers
        return [layer for layer in layers if self.manifest is None or layer in self.manifest.layers]


def _examples(items: list[str]) -> str:
    return ", ".join(items[:SHOWN]) + (", ..." if len(items) > SHOWN else "")


def _method_by_bits(body: int, n: int, k: int) -> fmt.Method | None:
    return next((m for m in fmt.METHODS.values() if m.body_bytes(n, k) == body), None)


# --- the low-memory tree ----------------------------------------------------------------------------------------

def _kt_layer_dirs(path: Path) -> dict[int, Path]:
    return {layer: p for p in path.iterdir()
            if p.is_dir() and (layer := fmt.parse_layer_dir_name(p.name)) is not None}


def _infer_kt_layout(path: Path) -> Layout:
    """method, NUMA count, experts, H and I from the names and sizes kt-kernel's files carry."""
    dirs = _kt_layer_dirs(path)
    methods, parts, experts, scale_n = set(), set(), set(), {}
    for layer_dir in dirs.values():
        for file in layer_dir.glob("*/*.kt"):
            name, part = fmt.parse_kt_file_name(file.name), fmt.parse_numa_dir_name(file.parent.name)
            if name is None or part is None:
                continue
            methods.add(name.method)
            parts.add(part)
            experts.add(name.expert)
            if name.kind == "scale":
                scale_n[name.proj] = name.nbytes // fmt.scale_bytes(1)
    if len(methods) != 1 or {"gate", "down"} - set(scale_n):
        tags = sorted(method.file_tag for method in methods)
        raise KtqError(f"{path} has _layer_* folders but no complete set of kt-kernel .kt files "
                       f"(methods found: {tags or 'none'}): not a kt-kernel output")
    numa = max(parts) + 1
    return _possible(path, Layout("kt", methods.pop(), numa, scale_n["down"], scale_n["gate"] * numa,
                                  max(experts) + 1, tuple(sorted(dirs))))


def _possible(path: Path, layout: Layout) -> Layout:
    """An inferred layout, refused when no kt-kernel output can have it (files of zero bytes with well-formed
    names, say, make a 0 x 0 geometry that every size check would pass)."""
    problem = geometry_problem(layout)
    if problem:
        raise KtqError(f"{path}: its file names and sizes describe an output kt-kernel cannot have ({problem}): "
                       "not a kt-kernel output")
    return layout


def _check_kt_tree(found: Found) -> None:
    layout, path = found.layout, found.path
    dirs = _kt_layer_dirs(path)
    for layer in sorted(set(dirs) - set(layout.layers)):
        found.problems.append(f"{fmt.layer_dir_name(layer)} is not a MoE layer of this output (MoE layers: "
                              f"{_span(layout.layers)}): kt-kernel would read it")
    for layer in found.checked_layers:
        folder = path / fmt.layer_dir_name(layer)
        if not folder.is_dir():
            found.layer_problem(layer, f"layer {layer} is missing ({folder.name}/ does not exist)")
            continue
        expected = dict(layout.kt_files(layer))
        actual = {f.relative_to(folder).as_posix(): f.stat().st_size for f in folder.rglob("*") if f.is_file()}
        missing = sorted(set(expected) - set(actual))
        extra = sorted(set(actual) - set(expected))
        wrong = sorted(f"{name} ({actual[name]} bytes, not {expected[name]})"
                       for name in set(expected) & set(actual) if actual[name] != expected[name])
        for what, items in (("missing", missing), ("of the wrong size", wrong), ("unexpected", extra)):
            if items:
                found.layer_problem(layer, f"layer {layer}: {len(items)} files {what}: {_examples(items)}")
    top = sorted(p.name for p in path.glob("*.safetensors"))
    if top:
        found.problems.append(f"{_examples(top)} at the top level switch kt-kernel to the merged form, which "
                              "ignores the _layer_* folders: remove them")


# --- merged shards ----------------------------------------------------------------------------------------------

def _read_tensors(path: Path, pending: tuple[Path, ...] = ()) -> tuple[dict[str, TensorInfo], list[str]]:
    """Every tensor of every *.safetensors below path (kt-kernel indexes them recursively) and of the pending
    shards of an unfinished ktq output, and the files that could not be read (truncated, not safetensors)."""
    tensors: dict[str, TensorInfo] = {}
    unreadable = []
    for file in (*sorted(path.rglob("*.safetensors")), *pending):
        try:
            tensors.update(read_header(file)[0])
        except KtqError as exc:
            unreadable.append(str(exc))
    return tensors, unreadable


def _infer_merged_layout(found: Found) -> Layout:
    layers, experts, parts, scale_n, gate_body = set(), set(), set(), {}, None
    for tensor, info in found.tensors.items():
        name = fmt.parse_merged_tensor_name(tensor)
        if name is None:
            continue
        layers.add(name.layer)
        experts.add(name.expert)
        parts.add(name.part)
        if name.kind == "scale" and info.shape:
            scale_n[name.proj] = info.shape[0]
        elif name.proj == "gate":
            gate_body = info.nbytes
    if {"gate", "down"} - set(scale_n) or gate_body is None:
        raise KtqError(f"{found.path} holds safetensors but no kt-kernel expert tensors (blk.L.ffn_*_exps.E.numa.P.*) "
                       "and no config.json: neither a kt-kernel output nor a checkpoint")
    hidden, per_part = scale_n["down"], scale_n["gate"]
    method = _method_by_bits(gate_body, per_part, hidden)
    if method is None:
        raise KtqError(f"{found.path}: gate bodies of {gate_body} bytes for [{per_part}, {hidden}] match neither "
                       "AMXINT4 nor AMXINT8")
    numa = max(parts) + 1
    return _possible(found.path, Layout("merged", method, numa, hidden, per_part * numa, max(experts) + 1,
                                        tuple(sorted(layers))))


def _check_merged(found: Found) -> None:
    layout, path = found.layout, found.path
    expected_names: set[str] = set()
    checked = set(found.checked_layers)
    for layer in layout.layers:
        if layer not in checked:
            expected_names.update(name for name, *_ in layout.tensor_entries(layer))
            continue
        missing, wrong = [], []
        for name, dtype, shape, nbytes in layout.tensor_entries(layer):
            expected_names.add(name)
            info = found.tensors.get(name)
            if info is None:
                missing.append(name)
            elif (info.dtype, tuple(info.shape), info.nbytes) != (dtype, shape, nbytes):
                wrong.append(f"{name} ({info.dtype} {list(info.shape)}, not {dtype} {list(shape)})")
        if len(missing) == len(layout.tensor_entries(layer)):
            found.layer_problem(layer, f"layer {layer} is missing (no blk.{layer}.* expert tensors)")
        elif missing:
            found.layer_problem(layer, f"layer {layer}: {len(missing)} tensors missing: {_examples(missing)}")
        if wrong:
            found.layer_problem(layer, f"layer {layer}: {len(wrong)} tensors of the wrong type or size: "
                                f"{_examples(wrong)}")
    extra = sorted(name for name in found.tensors
                   if fmt.parse_merged_tensor_name(name) is not None and name not in expected_names)
    if extra:
        found.problems.append(f"{len(extra)} expert tensors beyond the layout (a stray shard?): {_examples(extra)}")
    if found.manifest is None:
        return
    # a ktq output: its own shard names, exact sizes and headers, and nothing else kt-kernel would index
    shards = {layout.shard_name(layer): layer for layer in layout.layers}
    for layer in found.checked_layers:
        file = committed_path(path, layout, layer)
        if not file.is_file():
            if layer not in found.broken:
                found.layer_problem(layer, f"layer {layer}: {file.name} is missing")
        elif file.stat().st_size != layout.layer_bytes(layer):
            found.layer_problem(layer, f"layer {layer}: {file.name} has {file.stat().st_size} bytes, it needs "
                                f"{layout.layer_bytes(layer)} (truncated or damaged)")
        elif found.manifest.complete and file.suffix == PENDING_SUFFIX:  # kt-kernel would not find it there
            found.layer_problem(layer, f"layer {layer}: {file.name} of a complete output was never renamed to "
                                f"{layout.shard_name(layer)}")
    stray = sorted(p.relative_to(path).as_posix() for p in path.rglob("*.safetensors") if p.name not in shards)
    if stray:
        found.problems.append(f"safetensors files ktq did not write, which kt-kernel would also load: "
                              f"{_examples(stray)}")


def _span(layers: tuple[int, ...]) -> str:
    return f"{layers[0]}..{layers[-1]}" if layers else "none"


# --- recognise --------------------------------------------------------------------------------------------------

def _check_manifest(found: Found) -> None:
    manifest, layout = found.manifest, found.layout
    records = manifest.layers
    unrecorded = [layer for layer in layout.layers if layer not in records]
    if not manifest.complete or unrecorded:
        found.problems.append(f"unfinished conversion: {len(layout.layers) - len(unrecorded)} of "
                              f"{len(layout.layers)} layers done; re-run the same ktq cpu command to finish it")
    for layer, record in records.items():
        expected = (layout.layer_path(layer), layout.layer_bytes(layer)) if layer in layout.layers else None
        if expected is not None and (record.path, record.bytes) != expected:
            found.problems.append(f"ktq.json's record of layer {layer} does not match its layout")


def recognise(path: Path) -> Found:
    if not path.is_dir():
        raise KtqError(f"{path} is not a folder")
    manifest = load_manifest(path)
    top_safetensors = sorted(path.glob("*.safetensors"))
    if manifest is not None:
        found = Found(path, "ktq-output", manifest.layout, manifest)
    elif top_safetensors:
        tensors, unreadable = _read_tensors(path)
        experts = any(fmt.parse_merged_tensor_name(name) is not None for name in tensors)
        if not experts and os.path.lexists(path / "config.json"):
            return Found(path, "checkpoint", checkpoint=open_checkpoint(path))
        found = Found(path, "kt-output", tensors=tensors, problems=unreadable)
        found.layout = _infer_merged_layout(found)
    elif _kt_layer_dirs(path):
        found = Found(path, "kt-output", layout=_infer_kt_layout(path))
    else:
        hint = " (config.json but no *.safetensors)" if (path / "config.json").is_file() else ""
        raise KtqError(f"{path} is neither a ktq / kt-kernel output nor a safetensors checkpoint{hint}")
    if manifest is not None:
        _check_manifest(found)  # first: an unfinished conversion is the problem to read first
    if found.layout.form == "merged":
        if manifest is not None:
            committed = (committed_path(path, found.layout, layer) for layer in found.checked_layers)
            pending = tuple(file for file in committed if file.suffix == PENDING_SUFFIX and file.exists())
            found.tensors, problems = _read_tensors(path, pending)
            found.problems += problems
        _check_merged(found)
    else:
        _check_kt_tree(found)
    leftovers = sorted(p.name for p in path.iterdir() if p.name.endswith(PARTIAL_SUFFIX))
    if leftovers:
        found.notes.append(f"temporaries of an interrupted run (removed by the next run): {_examples(leftovers)}")
    return found


# --- reading pieces back ----------------------------------------------------------------------------------------

class PieceReader:
    """Reads one expert's packed body and scales for one NUMA part from either form into caller buffers."""

    def __init__(self, found: Found) -> None:
        self.found = found
        self._tensors = TensorReader()

    def path_of(self, layer: int, expert: int, piece: Piece, kind: str) -> Path:
        body, scale = fmt.kt_file_names(self.found.layout.method, piece.proj, expert, piece.n, piece.k)
        return (self.found.path / fmt.layer_dir_name(layer) / fmt.numa_dir_name(piece.part)
                / (body if kind == "quant" else scale))

    def _read_file(self, path: Path, out: np.ndarray) -> None:
        view = memoryview(out.reshape(-1).view(np.uint8))
        try:
            with os.fdopen(open_regular(path), "rb") as f:
                got = f.readinto(view)
                extra = f.read(1)
        except OSError as exc:
            raise KtqError(f"cannot read {path}: {exc.strerror or exc}") from exc
        if got != view.nbytes or extra:
            raise KtqError(f"{path} does not hold the {view.nbytes} bytes its name promises")

    def read(self, layer: int, expert: int, piece: Piece, body: np.ndarray, scales: np.ndarray) -> None:
        if self.found.layout.form == "kt":
            self._read_file(self.path_of(layer, expert, piece, "quant"), body)
            self._read_file(self.path_of(layer, expert, piece, "scale"), scales)
            return
        for kind, out in (("weight", body), ("scale", scales)):
            name = fmt.merged_tensor_name(layer, piece.proj, expert, piece.part, kind)
            self._tensors.read_into(self.found.tensors[name], out)

    def close(self) -> None:
        self._tensors.close()

    def __enter__(self) -> "PieceReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

