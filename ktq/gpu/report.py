"""The report of a `ktq gpu` run: ktq_gpu_report.json beside the checkpoint, and its printed summary."""

from __future__ import annotations

import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ktq import __version__
from ktq.atomic import write_json_atomic
from ktq.progress import counted, gb

# ktq's own files in a GPU checkpoint it writes: the manifest (ktq.gpu.output), the report and the log
MANIFEST_FILE = "ktq_gpu.json"
REPORT_FILE = "ktq_gpu_report.json"
LOG_FILE = "ktq_gpu.log"


@dataclass
class Report:
    model_id: str
    output_dir: str
    quant_method: str
    quant_type: str
    options: dict
    plan: dict
    ignore_patterns: list[str]
    ktq_version: str = __version__
    stages: dict[str, float] = field(default_factory=dict)  # seconds, in order (rank 0's in a distributed run)
    world_size: int = 1  # processes of a distributed run (torch.distributed), 1 for a plain run
    rank_stages: list[dict[str, float]] = field(default_factory=list)  # each rank's stages up to quantize
    calibration_samples: int = 0
    calibration_tokens: int = 0
    quantized_modules: int = 0
    ignored_modules: dict[str, int] = field(default_factory=dict)  # reason -> count
    gptq_loss: dict[str, float] = field(default_factory=dict)  # module -> loss
    routed_tokens: dict[str, list[int]] = field(default_factory=dict)  # experts module -> tokens per expert
    unrouted_experts: dict[str, list[int]] = field(default_factory=dict)
    layer_seconds: dict[str, dict[str, float]] = field(default_factory=dict)  # decoder layer -> stage -> seconds
    peak_gpu_bytes: int | None = None  # torch.cuda.max_memory_allocated over the run
    warnings: list[str] = field(default_factory=list)  # llm-compressor's warnings, e.g. RTN fallbacks

    @contextmanager
    def stage(self, name: str):
        """Time one stage; a stage that fails is still recorded up to the failure."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = round(time.perf_counter() - start, 3)

    def count_modules(self, reasons: list[str | None]) -> None:
        """reasons: one entry per Linear, None for those that were quantised."""
        self.quantized_modules = sum(1 for r in reasons if r is None)
        self.ignored_modules = dict(sorted(Counter(r for r in reasons if r is not None).items()))

    def write(self, folder: Path) -> Path:
        path = folder / REPORT_FILE
        write_json_atomic(path, asdict(self))
        return path

    def summary_lines(self) -> list[str]:
        total = sum(self.stages.values())
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in self.stages.items())
        lines = [f"stages: {stages} (total {total:.1f} s)"]
        if self.rank_stages:
            lines.append(f"ranks: {self.world_size}; quantize per rank " + ", ".join(
                f"{stages.get('quantize', 0):.1f} s" for stages in self.rank_stages))
        if self.quantized_modules:
            kept = ", ".join(f"{n} {reason}" for reason, n in self.ignored_modules.items()) or "none"
            lines.append(f"modules: {self.quantized_modules} quantised ({self.quant_method} {self.quant_type}); "
                         f"kept: {kept}")
        if self.calibration_samples:
            lines.append(f"calibration: {counted(self.calibration_samples, 'sample')}, "
                         f"{counted(self.calibration_tokens, 'token')}")
        if self.gptq_loss:
            worst = sorted(self.gptq_loss.items(), key=lambda kv: kv[1], reverse=True)[:3]
            mean = sum(self.gptq_loss.values()) / len(self.gptq_loss)
            lines.append(f"GPTQ loss: mean {mean:.4g} over {len(self.gptq_loss)} modules; highest "
                         + ", ".join(f"{name} {loss:.4g}" for name, loss in worst))
        if self.routed_tokens:
            experts = sum(len(c) for c in self.routed_tokens.values())
            unrouted = sum(len(e) for e in self.unrouted_experts.values())
            detail = "; ".join(f"{layer}: {ids}" for layer, ids in list(self.unrouted_experts.items())[:4])
            lines.append(f"routing: {unrouted} of {experts} experts got no routed calibration token"
                         + (f" ({detail}{' ...' if len(self.unrouted_experts) > 4 else ''}); all experts were "
                            "still calibrated on every token" if unrouted else ""))
        if self.peak_gpu_bytes is not None:
            lines.append(f"GPU memory: peak {gb(self.peak_gpu_bytes)} allocated, planned "
                         f"{gb(self.plan.get('gpu_peak_bytes', 0))}")
        lines += [f"warning: {w}" for w in self.warnings[:5]]
        return lines
