"""What ktq watches while llm-compressor calibrates: routed tokens per expert, GPTQ losses, progress over layers.

Hooks are registered through llm-compressor's HooksMixin, so they fire in the calibration pass of each layer and
stay silent in the propagation pass that follows it (HooksMixin.disable_hooks), which would otherwise count every
token twice. GPTQ's per-module loss is only handed to `CompressionLogger.set_results`, which logs it rounded to two
decimals; ktq wraps that method for the duration of the run to keep the exact value with the module's name.
"""

from __future__ import annotations

import contextlib
import sys

import torch
from compressed_tensors.utils import patch_attr
from llmcompressor.modeling.moe.linear_experts import LinearExperts2D
from llmcompressor.modifiers.utils.hooks import HooksMixin
from llmcompressor.utils.metric_logging import CompressionLogger
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class GpuProgress:
    """Two bars on a terminal (calibration samples over all layers, GPTQ modules), one line per layer otherwise,
    nothing with --quiet."""

    def __init__(self, quiet: bool = False, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.quiet = quiet
        self._progress: Progress | None = None
        self._calib = self._gptq = None
        self._layers = 0
        self._current = -1

    def __enter__(self) -> "GpuProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def start(self, layers: int, samples: int, modules: int) -> None:
        self._layers = layers
        if self.quiet or not self.console.is_terminal:
            return
        self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console)
        self._progress.start()
        self._calib = self._progress.add_task("calibrating", total=layers * samples)
        self._gptq = self._progress.add_task("GPTQ modules", total=modules) if modules else None

    def sample(self, layer: int) -> None:
        """One calibration sample went through decoder layer `layer` (0-based)."""
        if layer != self._current:
            self._current = layer
            if self._progress is not None:
                self._progress.update(self._calib, description=f"calibrating layer {layer + 1}/{self._layers}")
            elif not self.quiet:
                print(f"calibrating layer {layer + 1}/{self._layers}", file=sys.stderr, flush=True)
        if self._progress is not None:
            self._progress.advance(self._calib)

    def module_done(self) -> None:
        if self._gptq is not None:
            self._progress.advance(self._gptq)

    def note(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, highlight=False)


class _KtqHooks(HooksMixin):
    """A hook owner that llm-compressor's disable_hooks() silences like its own modifiers' hooks."""


class CalibrationObserver:
    """Counts tokens routed to each expert and records GPTQ losses while `watching()` is active."""

    def __init__(self, model, progress: GpuProgress) -> None:
        self.model = model
        self.progress = progress
        self.routed: dict[str, list[int]] = {}  # experts module name -> tokens routed to each expert
        self.losses: dict[str, float] = {}  # Linear name -> GPTQ loss
        self._counts: dict[str, object] = {}
        self._names = {module: name for name, module in model.named_modules()}

    @contextlib.contextmanager
    def watching(self, decoder_layers: list):
        hooks = _KtqHooks()
        for name, module in self.model.named_modules():
            if isinstance(module, LinearExperts2D):
                hooks.register_hook(module, self._routing_hook(name, module.num_experts), "forward_pre",
                                    with_kwargs=True)
        for index, layer in enumerate(decoder_layers):
            hooks.register_hook(layer, self._layer_hook(index), "forward_pre")
        record = self._loss_recorder(CompressionLogger.set_results)
        try:
            with patch_attr(CompressionLogger, "set_results", record):
                yield self
        finally:
            hooks.remove_hooks()
            self.routed = {name: [int(c) for c in counts.tolist()] for name, counts in self._counts.items()}

    def _routing_hook(self, name: str, num_experts: int):
        def hook(_module, args, kwargs):
            top_k = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
            if top_k is None:
                return
            counts = torch.bincount(top_k.reshape(-1).long(), minlength=num_experts)[:num_experts]
            previous = self._counts.get(name)
            self._counts[name] = counts if previous is None else previous + counts

        return hook

    def _layer_hook(self, index: int):
        def hook(_module, _args):
            self.progress.sample(index)

        return hook

    def _loss_recorder(self, original):
        observer = self

        def set_results(logger_self, name=None, loss=None):
            original(logger_self, name=name, loss=loss)
            if loss is not None:
                observer.losses[observer._names.get(logger_self.module, "?")] = float(loss)
            observer.progress.module_done()

        return set_results

    def unrouted(self) -> dict[str, list[int]]:
        """Experts that no calibration token was routed to, per experts module."""
        return {name: [e for e, n in enumerate(counts) if n == 0]
                for name, counts in self.routed.items() if 0 in counts}
