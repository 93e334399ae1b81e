"""The calibrated CPU experts as an artifact of the streaming engine (ktq cpu --calibrate, ktq gpu --cpu-output):
what they take from the calibration pass (routed.RoutedInputs), a layer solved on kt-kernel's grid (solve) and
written into a ktq cpu output (output), and a committed layer read back for the propagation pass of a resumed
run."""

from __future__ import annotations

from pathlib import Path

import torch
from loguru import logger

from ktq.calibrated.ktgrid import warm_up
from ktq.calibrated.output import CalibratedCpuOutput, dequantized_experts
from ktq.calibrated.routed import RoutedInputs
from ktq.calibrated.solve import (
    DAMPENING,
    GENERIC_TOKENS,
    GENERIC_WEIGHT,
    LayerCodes,
    StageClock,
    calibrate_layer,
)
from ktq.cpu.layout import Layout
from ktq.cpu.output import check_disk, needed_bytes
from ktq.errors import KtqError
from ktq.held_buffers import HeldBuffers
from ktq.kernels.ktformat import METHODS, alignment_problem


def refuse_misaligned(method: str, numa: int, geometry) -> None:
    """Calibrated CPU experts need kt-kernel's alignment as ktq cpu does: refused before anything is loaded."""
    problem = alignment_problem(METHODS[method], geometry.hidden, geometry.intermediate, numa)
    if problem:
        raise KtqError(problem)


class CalibratedExperts:
    """The engine's artifact for calibrated CPU experts (see ktq.gpu.engine.Artifact)."""

    stages = ("cpu experts", "cpu write")

    def __init__(self, output: CalibratedCpuOutput, chunk: int, device) -> None:
        """chunk: experts solved at a time (the plan's)."""
        self.output, self.chunk = output, chunk
        self.bits, self.numa = output.layout.method.bits, output.layout.numa
        self.device = torch.device(device)
        # the codes of one layer on the host, the same (pinned) buffers for every layer
        self.codes = LayerCodes(pin=self.device.type == "cuda")
        # the routed inputs when the calibration pass holds them in several groups, and the solve's staging buffers
        self.inputs = HeldBuffers(pin=self.device.type == "cuda")
        self._act_fn = None
        self._solved: tuple | None = None  # (layer, gate, up, down codes, routed) of the layer solved last

    @classmethod
    def open(cls, options, source, calibration: dict, num_hidden_layers: int, source_path: Path,
             no_disk_check: bool, chunk: int, device) -> "CalibratedExperts":
        """The output (a ktq cpu folder; options: ktq.gpu.options.CpuExpertsOptions) planned, its disk need
        checked; its identity records the calibration (what the run's `calibration` says of the data, and the
        solver's settings), so a run with other data or settings does not continue it. Lock it with
        `with artifact.output`."""
        out, merge = options.output.expanduser(), options.merge
        g = source.experts.geometry
        layout = Layout("merged" if merge else "kt", METHODS[options.method], options.numa, g.hidden, g.intermediate,
                        g.experts, tuple(layer.index for layer in source.experts.layers))
        calibration = {**calibration, "dampening": DAMPENING, "generic_tokens": GENERIC_TOKENS,
                       "generic_weight": GENERIC_WEIGHT}
        output = CalibratedCpuOutput(out, layout, source.ckpt, source.experts, calibration, num_hidden_layers,
                                     options.force, options.option, options.force_option)
        todo = [layer for layer in layout.layers if layer not in output.manifest.layers]
        check_disk(out, needed_bytes(layout, todo, source_path if merge else None), 0, no_disk_check,
                   logger.warning)
        return cls(output, chunk, device)

    # ---- the engine's calls -----------------------------------------------------------------------------------

    def prepare(self) -> None:
        """On a GPU the solve's Triton kernels compile now, while the samples are captured."""
        warm_up(self.bits, self.numa, self.device)

    def pending(self, index: int) -> bool:
        return index in self.output.layout.layers and not self.output.done(index)

    def routed(self, index: int) -> list[int] | None:
        return self.output.routed(index)

    def collector(self, index: int, act_fn) -> RoutedInputs:
        self._act_fn = act_fn
        return RoutedInputs(self.inputs)

    def solve(self, index: int, experts, inputs: RoutedInputs, routed: list[int]) -> None:
        stages = StageClock(self.device)
        gate, up, down, _ = calibrate_layer(experts, inputs, self._act_fn, self.bits, self.numa, self.chunk,
                                            self.codes, stages)
        logger.info(f"layer {index} CPU experts, {self.chunk} at a time: "
                    + ", ".join(f"{k} {v:.2f} s" for k, v in stages.seconds.items()))
        self._solved = (index, gate, up, down, routed)

    def write(self, index: int) -> None:
        self.output.write_layer(index, *self._solved[1:])

    def written(self, index: int, chunk) -> None:
        """The experts of `chunk` as served: the codes just solved, or a committed layer read back."""
        if self._solved is not None and self._solved[0] == index:
            for weight, codes in zip(chunk.projections(), self._solved[1:4]):
                codes.dequantize_into(weight, self.bits, chunk.block)
        else:
            for e, *values in dequantized_experts(self.output.folder, self.output.layout, index, chunk.block):
                for weight, value in zip(chunk.projections(), values):
                    weight[e - chunk.block.start].copy_(value)

    def finish(self, source: Path) -> None:
        self.output.finish(source)
