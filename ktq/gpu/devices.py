"""The process environment `ktq gpu` needs before torch is imported, and the accelerator it then runs on.

CUDA reads CUDA_VISIBLE_DEVICES once, when the driver is first initialised, and torch caches the device count
from then on. Setting the variable therefore works whenever it happens before the first CUDA query, whether torch
is already imported or not; after that query nothing can hide the GPUs, and ktq says so instead of silently
running on them.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from ktq.errors import KtqError

_VISIBILITY_VARIABLES = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES")  # NVIDIA, and ROCm builds of torch


def prepare_environment(force_cpu: bool, debug: bool) -> None:
    """Everything that must be set before torch, tqdm and llm-compressor are first imported."""
    if force_cpu:
        hide_gpus()
    if not debug:
        os.environ.setdefault("TQDM_DISABLE", "1")  # ktq draws its own progress; tqdm reads this on import
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # else llm-compressor sets it and warns
    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")  # it logs to stdout from its import on


def hide_gpus() -> None:
    """Make every GPU invisible to this process; call before anything queries CUDA."""
    for variable in _VISIBILITY_VARIABLES:
        os.environ[variable] = ""
    if "torch" in sys.modules:
        import torch

        # with the variables set, this is False unless CUDA was initialised (or counted) earlier in the process
        if torch.cuda.is_available():
            raise KtqError("--force_cpu cannot hide the GPUs: CUDA was already initialised in this process; "
                           "run ktq in a fresh process, or set CUDA_VISIBLE_DEVICES= before starting it")


@dataclass(frozen=True)
class Device:
    """Where calibration and GPTQ run: 'cuda:0' with its memory, or 'cpu'."""

    kind: str  # "cuda" or "cpu"
    name: str
    total_bytes: int  # GPU memory (0 for cpu)
    free_bytes: int

    @property
    def is_gpu(self) -> bool:
        return self.kind == "cuda"

    @property
    def torch_device(self) -> str:
        return "cuda:0" if self.is_gpu else "cpu"


def detect_device() -> Device:
    """The first visible GPU (llm-compressor calibrates on one device per process), else the CPU."""
    import torch

    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(0)
        return Device("cuda", torch.cuda.get_device_name(0), total, free)
    return Device("cpu", "cpu", 0, 0)


def available_cpu_memory() -> int:
    import psutil

    return psutil.virtual_memory().available
