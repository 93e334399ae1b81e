"""Progress of a `ktq gpu` run: one bar over the decoder layers on a terminal, a line per layer otherwise, nothing
with --quiet (or on ranks other than 0).

The bar counts layers, as the checkpoint numbers them (`layer 16` is `model.layers.16`, and 16 layers are done while
it runs). Within a layer it moves with the calibration samples: each of the layer's two passes over them (the
calibration pass, and the propagation pass that gives the next layer its inputs) is half a layer; the rest of the
layer (the solve, the write, a layer without one of the passes) is counted when the layer is done. The ETA is the
rate of the last few minutes, counting down in between (ktq.progress.Countdown)."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from ktq.progress import Countdown, CountdownColumn, clock, counted


class GpuProgress:
    def __init__(self, quiet: bool = False, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.quiet = quiet
        self._progress: Progress | None = None
        self._task = None
        self._layers = 0
        self._layers_done = 0
        self._samples = 0
        self._verb = ""
        self._countdown = Countdown(0)
        self._layer_done_units = 0.0  # units of the current layer already counted, by its samples
        self._layer_started = time.perf_counter()

    def __enter__(self) -> "GpuProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def start(self, layers: int, samples: int, verb: str) -> None:
        """`layers`: decoder layers; `samples`: calibration samples each pass runs (0 without calibration, RTN)."""
        self._layers, self._samples, self._verb = layers, samples, verb
        self._countdown = Countdown(layers)
        self._layer_started = time.perf_counter()
        if self.quiet or not self.console.is_terminal:
            return
        self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                  TextColumn("{task.fields[layers]}/{task.total:.0f} layers"), TimeElapsedColumn(),
                                  TextColumn("ETA"), CountdownColumn(), console=self.console)
        self._task = self._progress.add_task(f"{verb} layer 0", total=layers, layers=0, countdown=self._countdown)
        self._progress.start()  # drawn at once, with its task

    def step(self, layer: int, stage: str) -> None:
        """One calibration sample went through decoder layer `layer` (0-based) in `stage` ("calibrating" or
        "propagating")."""
        units = 0.5 / self._samples
        self._layer_done_units += units
        self._countdown.advance(units)
        self._show(f"{stage} layer {layer}")

    def layer_done(self, layer: int) -> None:
        """Decoder layer `layer` is done: calibrated, solved, written and propagated where it had to be."""
        seconds = self._finish_layer(layer, worked=True)
        if self._progress is None and not self.quiet:
            left = self._countdown.seconds_left()
            eta = "" if left is None or layer == self._layers - 1 else f", ETA {clock(left)}"
            print(f"layer {layer} done ({self._layers_done}/{counted(self._layers, 'layer')}) in {seconds:.1f} s{eta}",
                  file=sys.stderr, flush=True)

    def skip(self, layer: int) -> None:
        """Decoder layer `layer` had nothing left to do (committed before a resume, no pass to replay)."""
        self._finish_layer(layer, worked=False)

    def _finish_layer(self, layer: int, worked: bool) -> float:
        """The layer's seconds since the last one finished (or the run started)."""
        now = time.perf_counter()
        seconds, self._layer_started = now - self._layer_started, now
        self._countdown.advance(1 - self._layer_done_units, worked)
        self._layer_done_units = 0.0
        self._layers_done += 1
        self._show(f"{self._verb} layer {layer + 1}" if layer + 1 < self._layers else f"{self._verb}: done")
        return seconds

    def _show(self, description: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=description, completed=self._countdown.done,
                                  layers=self._layers_done)
