"""Progress of a `ktq gpu` run: one bar over every layer's calibration samples on a terminal, a line per layer
otherwise, nothing with --quiet (or on ranks other than 0)."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class GpuProgress:
    def __init__(self, quiet: bool = False, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.quiet = quiet
        self._progress: Progress | None = None
        self._task = None
        self._layers = 0
        self._current = -1
        self._verb = "calibrating"

    def __enter__(self) -> "GpuProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def start(self, layers: int, steps_per_layer: int, verb: str) -> None:
        """`steps_per_layer`: calibration samples (GPTQ), or 1 (RTN: one step a layer)."""
        self._layers, self._verb = layers, verb
        if self.quiet or not self.console.is_terminal:
            return
        self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console)
        self._progress.start()
        self._task = self._progress.add_task(verb, total=layers * steps_per_layer)

    def step(self, layer: int) -> None:
        """One step (a calibration sample, or a whole RTN layer) of decoder layer `layer` (0-based) is done."""
        if layer != self._current:
            self._current = layer
            text = f"{self._verb} layer {layer + 1}/{self._layers}"
            if self._progress is not None:
                self._progress.update(self._task, description=text)
            elif not self.quiet:
                print(text, file=sys.stderr, flush=True)
        if self._progress is not None:
            self._progress.advance(self._task)
