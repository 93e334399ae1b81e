"""`ktq merge`: a low-memory .kt tree -> merged safetensors shards, index, config and tokenizer files.

The result is what `ktq cpu` writes directly in the merged form, byte for byte: the same Layout gives the same
shard names and tensor order, the same MergedSink writes them, and the output folder has the same life (atomic
layers, ktq.json after each, automatic resume, --force). The whole tree is checked (every layer, expert and NUMA
part, every size) before anything is written, and each layer's files are re-hashed against the tree's ktq.json on
their way through, before the shard they went into is committed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from ktq import digest
from ktq.cpu.checkpoint import open_checkpoint
from ktq.cpu.experts import find_experts
from ktq.cpu.layout import Layout
from ktq.cpu.manifest import LayerRecord, Manifest, save_manifest
from ktq.cpu.output import check_disk, finish_output, needed_bytes, plan_output
from ktq.cpu.scan import Found, PieceReader, recognise
from ktq.cpu.sinks import MergedSink, PackedProjection, packed_slot
from ktq.errors import KtqError
from ktq.kernels import ktformat as fmt
from ktq.output_folder import continuing, refuse_overlap, starting_over
from ktq.progress import LayerProgress


@dataclass
class MergeResult:
    output: Path
    method: fmt.Method
    numa: int
    layers_merged: list[int] = field(default_factory=list)
    layers_kept: list[int] = field(default_factory=list)
    output_bytes: int = 0
    seconds: float = 0.0
    copied_aux: bool = False
    complete: bool = False  # OUT was a complete merge of IN already: nothing was written


def _source_identity(found: Found, original: Path | None) -> tuple[str, str]:
    """(input type, input fingerprint) of the checkpoint the tree was converted from."""
    manifest, layout = found.manifest, found.layout
    ckpt = open_checkpoint(original) if original is not None else None
    if manifest is not None:
        if ckpt is not None and ckpt.fingerprint() != manifest.input_fingerprint:
            raise KtqError(f"--original-path {original} is not the checkpoint {found.path} was converted from "
                           f"(its fingerprint differs from the one in {found.path}/ktq.json)")
        return manifest.input_type, manifest.input_fingerprint
    if ckpt is None:
        raise KtqError(f"{found.path} has no ktq.json, so which layers it must hold is unknown: pass "
                       "--original-path with the checkpoint it was converted from")
    model = find_experts(ckpt)
    g = model.geometry
    layers = tuple(layer.index for layer in model.layers)
    if (g.hidden, g.intermediate, g.experts) != (layout.hidden, layout.intermediate, layout.experts):
        raise KtqError(f"{found.path} holds experts of hidden {layout.hidden}, intermediate {layout.intermediate}, "
                       f"{layout.experts} per layer; --original-path {original} has {g.hidden}, {g.intermediate}, "
                       f"{g.experts}: not its source")
    if layers != layout.layers:
        missing = sorted(set(layers) - set(layout.layers))
        raise KtqError(f"{found.path} holds layers {list(layout.layers)}, the model's MoE layers are {list(layers)}"
                       + (f": layer {missing[0]} is missing, convert it first" if missing else ""))
    return model.input_type, ckpt.fingerprint()


def _check_input(found: Found, out: Path, original: Path | None) -> None:
    if not found.is_output or found.layout.form != "kt":
        what = "a checkpoint" if not found.is_output else "already merged"
        raise KtqError(f"{found.path} is {what}: ktq merge takes a low-memory output (_layer_*/_numa_*/*.kt)")
    if found.problems:
        more = f" (and {len(found.problems) - 1} more: see ktq inspect)" if len(found.problems) > 1 else ""
        raise KtqError(f"{found.path} is incomplete or damaged, nothing was written: {found.problems[0]}{more}")
    refuse_overlap(out, "OUT", found.path, "IN")
    if original is not None:
        refuse_overlap(out, "OUT", original, "--original-path")


def _merge_layer(layer: int, layout: Layout, reader: PieceReader, sink: MergedSink, slot: list[PackedProjection],
                 recorded: dict[int, LayerRecord] | None, progress: LayerProgress) -> LayerRecord:
    """One layer's files into one shard; re-hashed against the tree's ktq.json (when it has one) before the
    shard is committed. Returns the shard's manifest record."""
    sink.begin(layer)
    record = recorded[layer] if recorded is not None else None
    algorithm, expected = (record.algorithm, record.digest) if record is not None else (digest.KEY, None)
    digests = {}
    for e in range(layout.experts):
        for piece, packed in zip(layout.pieces, slot):
            reader.read(layer, e, piece, packed.body, packed.scales)
            for kind, data in (("quant", packed.body), ("scale", packed.scales)):
                path = reader.path_of(layer, e, piece, kind)
                digests[f"{path.parent.name}/{path.name}"] = digest.of(data, algorithm)
        sink.write_expert(e, slot)
        progress.advance(layout.expert_bytes())
    if record is not None and digest.of_tree(digests, algorithm) != expected:
        raise KtqError(f"layer {layer} of {reader.found.path} does not match its {algorithm} in ktq.json (damaged "
                       "since it was written): reconvert that layer, then merge again")
    return sink.commit()


def merge_tree(tree: Path, out: Path, original: Path | None, force: bool, progress: LayerProgress) -> MergeResult:
    started = time.perf_counter()
    found = recognise(tree)
    _check_input(found, out, original)
    input_type, fingerprint = _source_identity(found, original)
    layout = replace(found.layout, form="merged")
    plan = plan_output(out, Manifest(layout, input_type, fingerprint), force, option="OUT")
    manifest = plan.manifest
    todo = [layer for layer in layout.layers if layer not in manifest.layers]
    if plan.complete:
        return MergeResult(out, layout.method, layout.numa, [], list(manifest.layers), manifest.output_bytes,
                           complete=True)
    check_disk(out, needed_bytes(layout, todo, original), plan.freed_bytes(), force, progress.note)
    result = MergeResult(out, layout.method, layout.numa, todo, list(manifest.layers))
    recorded = found.manifest.layers if found.manifest is not None else None
    sink = MergedSink(out, layout)
    slot = packed_slot(layout.pieces)
    layer_input = layout.experts * layout.expert_bytes()
    with plan.writing(), PieceReader(found) as reader:
        if plan.restarted:
            progress.note(starting_over(out, len(plan.remove), "--force"))
        if result.layers_kept:
            progress.note(continuing(out, len(result.layers_kept), len(todo), "merged"))
        progress.start(todo, len(todo) * layer_input, "merging")
        for layer in todo:
            layer_started = time.perf_counter()
            try:
                manifest.layers[layer] = _merge_layer(layer, layout, reader, sink, slot, recorded, progress)
            except BaseException:
                sink.abort()
                raise
            save_manifest(out, manifest)
            progress.layer_done(layer, layout.experts, layer_input, time.perf_counter() - layer_started)
        finish_output(out, manifest, original)  # under the lock: a second run must not finish it meanwhile
    result.copied_aux = original is not None
    result.output_bytes = manifest.output_bytes
    result.seconds = time.perf_counter() - started
    return result
