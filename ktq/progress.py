"""Progress of long work: a rich bar on a terminal, one plain line per layer otherwise, nothing with --quiet."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn, TransferSpeedColumn


def gb(nbytes: float) -> str:
    """A byte count for people: GB with two decimals, MB below 1 GB."""
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


class LayerProgress:
    """Counts experts and input bytes; `layer_done` is called once per committed layer (from any thread)."""

    def __init__(self, quiet: bool = False, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.quiet = quiet
        self.rich = not quiet and self.console.is_terminal
        self._progress: Progress | None = None
        self._task = None
        self._layers_total = 0
        self._layers_done = 0

    def __enter__(self) -> "LayerProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def start(self, layers: int, experts: int, input_bytes: int) -> None:
        self._layers_total = layers
        if self.rich:
            # the bar counts input bytes, so TransferSpeedColumn shows GB/s and the ETA follows bytes, not experts
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(),
                TextColumn("{task.fields[experts]}/{task.fields[experts_total]} experts"),
                TransferSpeedColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=self.console)
            self._progress.start()
            self._task = self._progress.add_task(self._description(), total=input_bytes, experts=0,
                                                 experts_total=experts)

    def _description(self) -> str:
        return f"layer {self._layers_done}/{self._layers_total}"

    def expert_done(self, input_bytes: int) -> None:
        if self._progress is not None:
            done = self._progress.tasks[0].fields["experts"] + 1
            self._progress.update(self._task, advance=input_bytes, experts=done)

    def layer_done(self, layer: int, experts: int, input_bytes: int, seconds: float) -> None:
        self._layers_done += 1
        if self._progress is not None:
            self._progress.update(self._task, description=self._description())
        elif not self.quiet:
            rate = input_bytes / seconds / 1e9 if seconds > 0 else float("inf")
            print(f"layer {layer} done ({self._layers_done}/{self._layers_total}): {experts} experts, "
                  f"{gb(input_bytes)} in {seconds:.2f} s ({rate:.2f} GB/s)", file=sys.stderr, flush=True)

    def note(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, highlight=False, soft_wrap=True)  # one line per note, also when piped
