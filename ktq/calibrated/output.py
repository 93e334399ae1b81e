"""Calibrated CPU experts written by the streaming engine into a `ktq cpu` output: the same folder, forms, names,
sizes, manifest, locking and resume as a round-to-nearest conversion (ktq.cpu.output, ktq.cpu.sinks), only the codes
and scales come from ktgrid instead of the Numba quantiser. ktq.json records the calibration in the output's
identity (a run with other data starts over, or is refused without --force) and the routed-token counts per layer;
when the output is complete, `init_expert_location.pt` holds those counts as sglang-kt's `--init-expert-location`
reads them.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ktq.calibrated.ktgrid import GridCodes
from ktq.cpu.checkpoint import Checkpoint
from ktq.cpu.experts import MoeModel
from ktq.cpu.layout import Layout
from ktq.cpu.manifest import Manifest, save_manifest
from ktq.cpu.output import committed_path, finish_output, plan_output
from ktq.cpu.scan import Found, PieceReader
from ktq.cpu.sinks import KtTreeSink, MergedSink, packed_slot
from ktq.kernels.amx import pack_codes, unpack_dequantize
from ktq.output_folder import continuing, starting_over
from ktq.placement import write_placement
from ktq.safetensors_io import read_header
from ktq.serving import PLACEMENT_FILE


class CalibratedCpuOutput:
    """Planned when made (the layers kept from an earlier run known, nothing written; `complete` when there is
    nothing to write); written inside `with`, which holds the folder's lock (ktq.cpu.output.OutputPlan.writing) and
    removes a folder the run created if it fails before its first layer."""

    def __init__(self, out: Path, layout: Layout, ckpt: Checkpoint, model: MoeModel, calibration: dict,
                 num_hidden_layers: int, force: bool, option: str, force_option: str) -> None:
        """option, force_option: how the command names the folder and its start-over flag."""
        self.folder, self.layout, self.num_hidden_layers = out, layout, num_hidden_layers
        plan = plan_output(out, Manifest(layout, model.input_type, ckpt.fingerprint(), calibration=calibration),
                           force, option, force_option)
        self.manifest, self._plan, self.complete = plan.manifest, plan, plan.complete
        self._force_option = force_option
        self._stack = ExitStack()
        self.sink = MergedSink(out, layout) if layout.form == "merged" else KtTreeSink(out, layout)
        self._slot = packed_slot(layout.pieces)

    def start_note(self) -> str | None:
        """What the run says first about this folder: started over, or continued."""
        if self._plan.restarted:
            return starting_over(self.folder, len(self._plan.remove), self._force_option)
        kept = len(self.manifest.layers)
        return continuing(self.folder, kept, len(self.layout.layers) - kept) if kept else None

    def __enter__(self) -> "CalibratedCpuOutput":
        self._stack.enter_context(self._plan.writing())
        return self

    def __exit__(self, *exc: object) -> bool:
        return self._stack.__exit__(*exc)

    def done(self, layer: int) -> bool:
        return layer in self.manifest.layers

    def routed(self, layer: int) -> list[int] | None:
        record = self.manifest.layers.get(layer)
        return list(record.routed) if record is not None and record.routed is not None else None

    def write_layer(self, layer: int, gate: GridCodes, up: GridCodes, down: GridCodes, routed: list[int]) -> None:
        """One MoE layer's experts (codes [E, I, H], [E, I, H], [E, H, I] on any device), committed atomically."""
        bits, part_rows = self.layout.method.bits, self.layout.intermediate // self.layout.numa
        gate_codes, up_codes, down_codes = (g.codes.cpu().numpy() for g in (gate, up, down))
        gate_scales, up_scales, down_scales = (g.scales.cpu().numpy() for g in (gate, up, down))
        try:
            self.sink.begin(layer)
            for e in range(self.layout.experts):
                for piece in self._slot:
                    rows = slice(piece.part * part_rows, (piece.part + 1) * part_rows)
                    if piece.proj == "down":
                        pack_codes(down_codes[e], piece.part * part_rows, part_rows, bits, piece.body)
                        piece.scales[:] = down_scales[e, :, piece.part]
                    else:
                        codes, scales = (gate_codes, gate_scales) if piece.proj == "gate" else (up_codes, up_scales)
                        pack_codes(np.ascontiguousarray(codes[e, rows]), 0, self.layout.hidden, bits, piece.body)
                        piece.scales[:] = scales[e, rows, 0]
                self.sink.write_expert(e, self._slot)
            record = self.sink.commit()
        except BaseException:
            self.sink.abort()
            raise
        self.manifest.layers[layer] = replace(record, routed=tuple(routed))
        save_manifest(self.folder, self.manifest)

    def finish(self, source: Path | None) -> None:
        counts = {layer: list(record.routed or ()) for layer, record in self.manifest.layers.items()}
        write_placement(self.folder / PLACEMENT_FILE, counts, self.num_hidden_layers, self.layout.experts)
        finish_output(self.folder, self.manifest, source if self.layout.form == "merged" else None)


def dequantized_experts(out: Path, layout: Layout, layer: int, experts: range | None = None):
    """A committed layer's experts (all, or `experts`) as kt-kernel computes with them, one expert at a time: (e,
    gate [I, H], up [I, H], down [H, I]) in fp32 (NUMA parts joined: gate and up parts are row ranges, down parts
    column ranges); the host never holds a whole layer in fp32. Read through ktq.cpu.scan's PieceReader, from the
    layer's pending or published shard or its .kt folder."""
    bits, part_rows = layout.method.bits, layout.intermediate // layout.numa
    tensors = read_header(committed_path(out, layout, layer))[0] if layout.form == "merged" else {}
    with PieceReader(Found(out, "ktq-output", layout, tensors=tensors)) as reader:
        for e in experts or range(layout.experts):
            gate = np.empty((layout.intermediate, layout.hidden), np.float32)
            up = np.empty_like(gate)
            down = np.empty((layout.hidden, layout.intermediate), np.float32)
            for piece in layout.pieces:
                body, scales = np.empty(piece.body_bytes, np.uint8), np.empty(piece.n, np.float32)
                reader.read(layer, e, piece, body, scales)
                values = unpack_dequantize(body, scales, piece.n, piece.k, bits)
                part = slice(piece.part * part_rows, (piece.part + 1) * part_rows)
                if piece.proj == "down":
                    down[:, part] = values
                else:
                    (gate if piece.proj == "gate" else up)[part] = values
            yield e, torch.from_numpy(gate), torch.from_numpy(up), torch.from_numpy(down)


def dequantized_layer(out: Path, layout: Layout, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All of dequantized_experts at once: fp32 gate, up [E, I, H] and down [E, H, I]."""
    experts = list(dequantized_experts(out, layout, layer))
    return tuple(torch.stack([expert[p] for expert in experts]) for p in (1, 2, 3))
