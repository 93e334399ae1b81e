"""Progress of long work: a rich bar on a terminal, one plain line per layer otherwise, nothing with --quiet; and the
few words every command prints numbers with."""

from __future__ import annotations

import sys
import time
from collections import deque
from datetime import timedelta

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text


def gb(nbytes: float) -> str:
    """A byte count for people: GB with two decimals, MB below 1 GB."""
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def counted(count: int, noun: str) -> str:
    """'1 layer', '2 layers'."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def clock(seconds: float) -> str:
    """Seconds as h:mm:ss, as rich's time columns show them."""
    return str(timedelta(seconds=max(0, round(seconds))))


class Countdown:
    """The time left of work measured in units (layers, fractions of layers): the rate of the last WINDOW seconds,
    which forgets a slow start (dense layers, replayed ones) once real layers pass. Between two updates the estimate
    counts down, so a bar's ETA moves while a long step (a GPTQ solve, a write) runs."""

    WINDOW = 300.0

    def __init__(self, total: float) -> None:
        self.total = total
        self.done = 0.0
        self._history: deque[tuple[float, float]] = deque([(time.monotonic(), 0.0)])  # (time, units worked)
        self._worked = 0.0
        self._ends_at: float | None = None

    def advance(self, units: float, worked: bool = True) -> None:
        """`units` more are done; `worked`: they took time (not a committed layer skipped on resume)."""
        self.done += units
        now = time.monotonic()
        if worked:
            self._worked += units
            self._history.append((now, self._worked))
            while len(self._history) > 2 and self._history[1][0] < now - self.WINDOW:
                self._history.popleft()
        first_time, first_worked = self._history[0]
        if self._worked > first_worked and now > first_time:
            rate = (self._worked - first_worked) / (now - first_time)
            self._ends_at = now + (self.total - self.done) / rate

    def seconds_left(self) -> float | None:
        return None if self._ends_at is None else max(0.0, self._ends_at - time.monotonic())


class CountdownColumn(ProgressColumn):
    """The ETA of the task's `countdown` field, re-rendered at every refresh."""

    def render(self, task) -> Text:
        left = task.fields["countdown"].seconds_left()
        return Text("-:--:--" if left is None else clock(left), style="progress.remaining")


class LayerProgress:
    """Layers of experts worked through in order (a conversion, a merge, inspect's checks), counted in bytes;
    `layer_done` is called once per finished layer (from any thread).

    transient: on a terminal only, and gone when done (ktq inspect: the report that follows is the output)."""

    def __init__(self, quiet: bool = False, console: Console | None = None, transient: bool = False) -> None:
        self.console = console or Console(stderr=True)
        self.quiet = quiet
        self.transient = transient
        self.rich = not quiet and self.console.is_terminal
        self._progress: Progress | None = None
        self._task = None
        self._layers: list[int] = []
        self._layers_done = 0
        self._verb = ""

    def __enter__(self) -> "LayerProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()

    def _stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def start(self, layers: list[int], nbytes: int, verb: str = "converting") -> None:
        """`layers`: the layer numbers in the order they will be done; `nbytes`: what they read, in all."""
        self._stop()
        self._layers, self._layers_done, self._verb = list(layers), 0, verb
        if self.rich:
            # the bar counts bytes, so TransferSpeedColumn shows GB/s and the ETA follows bytes; 80 columns hold it
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(),
                TextColumn("{task.fields[layers]}/{task.fields[layers_total]} layers"), TransferSpeedColumn(),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console,
                transient=self.transient)
            self._task = self._progress.add_task(self._description(), total=nbytes, layers=0,
                                                 layers_total=len(self._layers))
            self._progress.start()  # drawn at once, with its task

    def _description(self) -> str:
        """The layer in the works, by its number (the output's and the checkpoint's)."""
        if self._layers_done < len(self._layers):
            return f"{self._verb} layer {self._layers[self._layers_done]}"
        return f"{self._verb}: done"

    def advance(self, nbytes: int) -> None:
        """`nbytes` more of the work are done (an expert's, a layer's)."""
        if self._progress is not None:
            self._progress.update(self._task, advance=nbytes)

    def layer_done(self, layer: int, experts: int, nbytes: int, seconds: float) -> None:
        self._layers_done += 1
        if self._progress is not None:
            self._progress.update(self._task, description=self._description(), layers=self._layers_done)
        elif not (self.quiet or self.transient):
            rate = nbytes / seconds / 1e9 if seconds > 0 else float("inf")
            print(f"layer {layer} done ({self._layers_done}/{counted(len(self._layers), 'layer')}): "
                  f"{counted(experts, 'expert')}, {gb(nbytes)} in {seconds:.2f} s ({rate:.2f} GB/s)",
                  file=sys.stderr, flush=True)

    def note(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, highlight=False, soft_wrap=True)  # one line per note, also when piped
