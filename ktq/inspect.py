"""`ktq inspect`: what a folder holds, whether every byte of it is right, and how close it is to its source.

    report   ktq.cpu.scan.recognise + a summary (method, NUMA count, layers, experts, shapes, sizes, dtypes,
             manifest, the kt-kernel flags to serve it with)
    verify   every layer re-hashed against ktq.json; without ktq.json every scale read and checked
    compare  every expert dequantised and measured against the source checkpoint, per layer and projection

Problems are collected, never raised one by one, so that one run lists them all.
"""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ktq import digest, hfformat
from ktq.cpu.checkpoint import open_checkpoint
from ktq.cpu.experts import find_experts
from ktq.cpu.layout import Layout
from ktq.cpu.output import committed_path, index_data
from ktq.cpu.scan import Found, PieceReader, recognise
from ktq.cpu.sinks import packed_slot
from ktq.errors import KtqError
from ktq.inspect_gpu import gpu_checkpoint_report, is_gpu_checkpoint, verify_shards
from ktq.kernels import ktformat as fmt
from ktq.kernels.amx import unpack_dequantize
from ktq.progress import LayerProgress, counted
from ktq.safetensors_io import TensorReader
from ktq.serving import PLACEMENT_FILE, UNKNOWN_MODEL, cpu_output_serve, serve_lines
from ktq.system import cpu_cores, numa_nodes

# |source - dequantised| of a correct conversion never exceeds this many row-amax (§2 of kt-format.md): INT8 rounds
# to half a step of amax/127; INT4 rounds to a code (half a step of amax/112) and then to a multiple of 16 (8 more).
ERROR_BOUND = {4: 8.5 / 112, 8: 0.5 / 127}
BOUND_SLACK = 1e-4  # fp32 rounding of the scale and of the products


@dataclass
class Inspection:
    found: Found | None  # None for a ktq gpu checkpoint
    report: dict
    problems: list[str] = field(default_factory=list)
    comparison: list[dict] = field(default_factory=list)


# --- report -----------------------------------------------------------------------------------------------------

def _output_report(found: Found) -> dict:
    layout = found.layout
    per_part = layout.intermediate // layout.numa
    projections = {}
    for piece in layout.pieces:
        if piece.part == 0:
            projections[piece.proj] = {"shape": [piece.n, piece.k], "weight_bytes": piece.body_bytes,
                                       "scale_bytes": piece.scale_bytes}
    if layout.form == "merged":
        dtypes = {"weight": "I8", "scale": "F32"}
    else:
        dtypes = {"weight": "raw bytes", "scale": "raw float32"}
    manifest = None
    if found.manifest is not None:
        m = found.manifest
        manifest = {"ktq_version": m.ktq_version, "complete": m.complete, "layers_done": len(m.layers),
                    "input_type": m.input_type, "input_fingerprint": m.input_fingerprint,
                    "calibration": m.calibration, "hot_experts": _hot_experts(m)}
    return {
        "path": str(found.path.resolve()), "kind": found.kind, "form": layout.form,
        "method": layout.method.name, "kt_method": layout.method.kt_method, "numa": layout.numa,
        "layers": list(layout.layers), "experts": layout.experts, "hidden": layout.hidden,
        "intermediate": layout.intermediate, "intermediate_per_part": per_part,
        "projections": projections, "dtypes": dtypes,
        "bytes": sum(layout.layer_bytes(layer) for layer in layout.layers),
        "manifest": manifest,
        "serve": {"kt_method": layout.method.kt_method, "kt_weight_path": str(found.path.resolve()),
                  "kt_threadpool_count": layout.numa,
                  **({"init_expert_location": str((found.path / PLACEMENT_FILE).resolve())}
                     if (found.path / PLACEMENT_FILE).is_file() else {})},
        "serve_lines": serve_lines(cpu_output_serve(UNKNOWN_MODEL, found.path.resolve(), layout.method.kt_method,
                                                    layout.numa))
        + [f"note: {UNKNOWN_MODEL} stands for the checkpoint the GPU side loads (the source, or its ktq gpu "
           "checkpoint)"],
        "machine_numa_nodes": numa_nodes(),
    }


HOT_EXPERTS_SHOWN = 8


def _hot_experts(manifest) -> dict[str, dict] | None:
    """Per layer of a calibrated output: the experts the router sent most calibration tokens to (most first) and
    the share of all routed tokens they took."""
    hot = {}
    for layer, record in sorted(manifest.layers.items()):
        if record.routed is None:
            continue
        total = sum(record.routed) or 1
        order = sorted(range(len(record.routed)), key=lambda e: (-record.routed[e], e))[:HOT_EXPERTS_SHOWN]
        hot[str(layer)] = {"experts": order, "share": round(sum(record.routed[e] for e in order) / total, 4)}
    return hot or None


def _numa_warning(numa: int, machine_numa: int) -> str | None:
    """None when the output's NUMA parts match this machine's nodes."""
    if numa == machine_numa:
        return None
    return (f"this output is split into {counted(numa, 'NUMA part')} and this machine has "
            f"{counted(machine_numa, 'NUMA node')}: serve it here with --kt-threadpool-count "
            f"{numa} all the same (any other count reads it wrongly), or convert again with --threadpool-count "
            f"{machine_numa}")


def _checkpoint_report(found: Found) -> dict:
    ckpt = found.checkpoint
    model = find_experts(ckpt)
    g = model.geometry
    layers = tuple(layer.index for layer in model.layers)
    conversions = []
    for method in fmt.METHODS.values():
        counts = fmt.working_numa_counts(method, g.intermediate) if g.hidden % method.align == 0 else []
        size = Layout("kt", method, counts[0], g.hidden, g.intermediate, g.experts, layers) if counts else None
        conversions.append({"method": method.name, "kt_method": method.kt_method, "threadpool_counts": counts,
                            "output_bytes": sum(size.layer_bytes(layer) for layer in layers) if size else None})
    return {
        "path": str(found.path.resolve()), "kind": "checkpoint",
        "model_type": ckpt.config.get("model_type"), "architectures": ckpt.config.get("architectures"),
        "layers": list(layers), "experts": g.experts, "hidden": g.hidden, "intermediate": g.intermediate,
        "input_type": model.input_type,
        "expert_shapes": {proj: list(src.shape) for proj, src in model.layers[0].experts[0].items()},
        "shards": len(ckpt.files), "bytes": ckpt.total_bytes,
        "expert_bytes": sum(layer.input_bytes for layer in model.layers),
        "conversions": conversions,
    }


# --- verify -----------------------------------------------------------------------------------------------------

def _layer_digest(found: Found, layer: int, algorithm: str) -> str:
    layout = found.layout
    path = committed_path(found.path, layout, layer)
    if layout.form == "merged":
        return digest.of_file(path, algorithm)
    return digest.of_tree({relpath: digest.of_file(path / relpath, algorithm) for relpath, _ in layout.kt_files(layer)},
                          algorithm)


def _verify_hashes(found: Found, progress: LayerProgress) -> list[str]:
    """Every recorded layer whose files are all there, re-hashed on a few threads (file reads release the GIL)."""
    layout = found.layout
    records = {layer: record for layer, record in found.manifest.layers.items()
               if layer in layout.layers and layer not in found.broken}  # broken ones are reported
    order = sorted(records)

    def check(layer: int) -> tuple[str | None, float]:
        started = time.perf_counter()
        algorithm, expected = records[layer].algorithm, records[layer].digest
        try:
            actual = _layer_digest(found, layer, algorithm)
        except OSError as exc:
            return f"layer {layer}: cannot read {exc.filename}: {exc.strerror}", time.perf_counter() - started
        if actual != expected:
            return (f"layer {layer}: {layout.layer_path(layer)} does not match its {algorithm} in ktq.json (damaged "
                    "or changed since it was written); reconvert it with --resume-layer or from scratch",
                    time.perf_counter() - started)
        return None, time.perf_counter() - started

    problems = []
    progress.start(order, sum(map(layout.layer_bytes, order)), "verifying")
    with ThreadPoolExecutor(min(4, cpu_cores())) as pool:
        for layer, (problem, seconds) in zip(order, pool.map(check, order)):
            progress.advance(layout.layer_bytes(layer))
            progress.layer_done(layer, layout.experts, layout.layer_bytes(layer), seconds)
            problems += [problem] if problem else []
    return problems


def _verify_index(found: Found) -> list[str]:
    path = found.path / hfformat.INDEX_NAME
    if not path.is_file():
        return [f"{hfformat.INDEX_NAME} is missing"] if found.manifest.complete else []
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return [f"{hfformat.INDEX_NAME} is not valid JSON ({exc})"]
    expected = index_data(found.layout)
    problems = []
    if not isinstance(index, dict) or index.get("weight_map") != expected["weight_map"]:
        problems.append(f"{hfformat.INDEX_NAME}'s weight_map does not list exactly the output's tensors and shards")
    meta = index.get("metadata") if isinstance(index, dict) else None
    for key in ("total_size", "kt_method", "numa"):
        if not isinstance(meta, dict) or meta.get(key) != expected["metadata"][key]:
            problems.append(f"{hfformat.INDEX_NAME}'s metadata {key} is not {expected['metadata'][key]!r}")
    return problems


def _intact_layers(found: Found, progress: LayerProgress, verb: str):
    """The output's layers whose files are all there (the others are reported already), in order; each is counted
    done, with its time, when the caller asks for the next one."""
    layout = found.layout
    layers = [layer for layer in layout.layers if layer not in found.broken]
    progress.start(layers, len(layers) * layout.experts * layout.expert_bytes(), verb)
    for layer in layers:
        started = time.perf_counter()
        yield layer
        progress.layer_done(layer, layout.experts, layout.experts * layout.expert_bytes(),
                            time.perf_counter() - started)


def _verify_scales(found: Found, progress: LayerProgress) -> list[str]:
    """Without a manifest there is nothing to hash against: read every piece, check every scale is a finite,
    non-negative float (a scale is a row's amax over 112 or 127)."""
    layout = found.layout
    slot = packed_slot(layout.pieces)
    bad: list[str] = []
    with PieceReader(found) as reader:
        for layer in _intact_layers(found, progress, "verifying"):
            for e in range(layout.experts):
                for piece, p in zip(layout.pieces, slot):
                    reader.read(layer, e, piece, p.body, p.scales)
                    if not (np.isfinite(p.scales).all() and (p.scales >= 0).all()):
                        bad.append(f"layer {layer} expert {e} {p.proj} part {p.part}")
                progress.advance(layout.expert_bytes())
    return [f"{len(bad)} pieces hold negative, Inf or NaN scales: {', '.join(bad[:3])}"] if bad else []


def verify(found: Found, progress: LayerProgress) -> list[str]:
    if not found.is_output:
        return []  # recognising a checkpoint already read every header and found every expert
    if found.manifest is None:
        return _verify_scales(found, progress)
    problems = _verify_hashes(found, progress)
    if found.layout.form == "merged":
        problems += _verify_index(found)
    return problems


# --- compare ----------------------------------------------------------------------------------------------------

def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def compare(found: Found, source: Path, progress: LayerProgress) -> tuple[list[dict], list[str]]:
    """Per layer and projection, over all experts and NUMA parts: relative RMS error, max abs error, SNR in dB;
    problems where any element is further from the source than the format's rounding allows."""
    if not found.is_output:
        raise KtqError("--compare needs a converted output as PATH and its source checkpoint as SRC")
    layout = found.layout
    ckpt = open_checkpoint(source)
    model = find_experts(ckpt)
    g = model.geometry
    if (g.hidden, g.intermediate, g.experts) != (layout.hidden, layout.intermediate, layout.experts):
        raise KtqError(f"{source} has hidden {g.hidden}, moe_intermediate {g.intermediate}, {g.experts} experts; "
                       f"{found.path} was made from hidden {layout.hidden}, intermediate {layout.intermediate}, "
                       f"{layout.experts} experts: not its source")
    sources = {layer.index: layer for layer in model.layers}
    absent = [layer for layer in layout.layers if layer not in sources]
    if absent:
        raise KtqError(f"{source} has no MoE layer {absent[0]}, which {found.path} holds: not its source")
    problems = []
    if found.manifest is not None and found.manifest.input_fingerprint != ckpt.fingerprint():
        problems.append(f"{source} is not the checkpoint this output was converted from (its fingerprint differs)")
    bound = ERROR_BOUND[layout.method.bits] * (1 + BOUND_SLACK)
    per_part = layout.intermediate // layout.numa
    slot = packed_slot(layout.pieces)
    src = {proj: np.empty(fmt.projection_shape(proj, g.hidden, g.intermediate), np.uint16) for proj in fmt.PROJECTIONS}
    scratch = np.empty(model.scratch_bytes, np.uint8)
    rows = []
    with TensorReader() as tensors, PieceReader(found) as pieces:
        for layer in _intact_layers(found, progress, "comparing"):
            sums = {proj: [0.0, 0.0, 0.0, 0] for proj in fmt.PROJECTIONS}  # sum w^2, sum err^2, max |err|, beyond
            for e in range(layout.experts):
                for proj, projection in sources[layer].experts[e].items():
                    projection.read(tensors, src[proj], scratch)
                for piece, p in zip(layout.pieces, slot):
                    pieces.read(layer, e, piece, p.body, p.scales)
                    full = _bf16_to_f32(src[p.proj])
                    cut = slice(p.part * per_part, (p.part + 1) * per_part)
                    w = full[:, cut] if p.proj == "down" else full[cut]
                    err = unpack_dequantize(p.body, p.scales, p.n, p.k, layout.method.bits) - w
                    w64, err64 = w.astype(np.float64).ravel(), err.astype(np.float64).ravel()  # BLAS dots
                    s = sums[p.proj]
                    s[0] += float(np.dot(w64, w64))
                    s[1] += float(np.dot(err64, err64))
                    s[2] = max(s[2], float(np.abs(err).max()))
                    limit = np.abs(w).max(axis=1, keepdims=True) * np.float32(bound)
                    s[3] += int(np.count_nonzero(~(np.abs(err) <= limit)))  # NaN counts as beyond
                progress.advance(layout.expert_bytes())
            for proj, (w2, e2, max_abs, beyond) in sums.items():
                rows.append({"layer": layer, "projection": proj, "relative_rms": math.sqrt(e2 / w2) if w2 else 0.0,
                             "max_abs": max_abs, "snr_db": 10 * math.log10(w2 / e2) if e2 else None})
                if beyond:
                    problems.append(f"layer {layer} {proj}: {beyond} values differ from the source by more than "
                                    "the format's rounding allows: the output does not encode this source")
    return rows, problems


# --- the command ------------------------------------------------------------------------------------------------

def _inspect_gpu_checkpoint(path: Path, do_verify: bool, source: Path | None) -> Inspection:
    if source is not None:
        raise KtqError("--compare measures CPU outputs (AMXINT4 / AMXINT8) against their source; this folder is a "
                       "ktq gpu checkpoint")
    report = gpu_checkpoint_report(path)
    if do_verify:
        report["problems"] += verify_shards(path)
        report["verified"] = not report["problems"]
    if report["problems"]:
        report["serve_lines"] = []
    report["notes"], report["warnings"] = [], []
    return Inspection(None, report, report["problems"])


def inspect(path: Path, do_verify: bool = False, source: Path | None = None,
            progress: LayerProgress | None = None) -> Inspection:
    """progress: of --verify and --compare, by layer (none when not given)."""
    if is_gpu_checkpoint(path):
        return _inspect_gpu_checkpoint(path, do_verify, source)
    progress = progress or LayerProgress(quiet=True)
    found = recognise(path)
    report = _output_report(found) if found.is_output else _checkpoint_report(found)
    result = Inspection(found, report, list(found.problems))
    if do_verify:
        result.problems += verify(found, progress)
    if source is not None:
        result.comparison, problems = compare(found, source, progress)
        result.problems += problems
    report["problems"] = result.problems
    if result.problems and found.is_output:
        report["serve"] = None  # an unfinished or damaged output must not be served: no flags to serve it with
        report["serve_lines"] = []
    report["notes"] = found.notes
    warning = _numa_warning(report["numa"], report["machine_numa_nodes"]) if found.is_output else None
    report["warnings"] = [warning] if warning else []
    if source is not None:
        report["compare"] = {"source": str(source.resolve()), "rows": result.comparison}
    if do_verify:
        report["verified"] = not result.problems
    return result

