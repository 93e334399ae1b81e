"""The options of `ktq gpu`, checked before anything heavy is imported or read."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ktq.errors import KtqError
from ktq.output_folder import holds_output, refuse_overlap
from ktq.paths import hub_download, is_hub_id

QUANT_METHODS = ("GPTQ", "RTN")
QUANT_TYPES = ("W4A16", "W8A16")
TORCH_DTYPES = ("bfloat16", "float16", "float32")
# input columns per scale (-1: one scale per output channel): what Marlin serves. 32 is the default: it divides
# every tensor-parallel share of more models than 64 or 128 do, its finer scales cost 0.375 bits per weight over
# 128, and at W4A16 kt-kernel serves the same files as CPU experts with RAWINT4 (ktq.serving.RAWINT4_GROUP)
GROUP_SIZES = (32, 64, 128, -1)
DEFAULT_GROUP_SIZE = 32
DEFAULT_DATASET = "HuggingFaceH4/ultrachat_200k"
DEFAULT_DATASET_SPLIT = "train_sft"  # the default dataset's chat split; other datasets default to "train"

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def jsonable(value):
    """asdict(GpuOptions) as JSON takes it: paths as text, tuples as lists, nested options likewise (the report and
    the options handed to distributed workers)."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return [jsonable(v) for v in value] if isinstance(value, tuple) else value


def parse_size(text: str | None, option: str) -> int | None:
    """'40GiB', '40GB', '40g', '512MiB' or a byte count -> bytes."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise KtqError(f"{option} {text!r} is not a size; write it like 40GiB, 40GB or 512MiB")
    value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value <= 0:
        raise KtqError(f"{option} must be larger than 0")
    return value


@dataclass(frozen=True)
class CpuExpertsOptions:
    """The calibrated CPU experts a run writes (ktq cpu --calibrate; ktq gpu --cpu-output): a ktq cpu output."""

    output: Path
    method: str = "int4"  # ktq cpu's --quant-method
    numa: int = 1  # --threadpool-count
    merge: bool = True  # merged shards, or the .kt tree
    force: bool = False  # start over an output made with other settings (ktq cpu's --force)
    option: str = "--output"  # how the command names the folder, and the flag that starts it over
    force_option: str = "--force"


@dataclass(frozen=True)
class GpuOptions:
    model_id: str
    output_dir: Path | None  # the GPU checkpoint; None when only calibrated CPU experts are made (ktq cpu)
    quant_method: str = "GPTQ"
    quant_type: str = "W8A16"
    group_size: int = DEFAULT_GROUP_SIZE
    num_calibration_samples: int = 512
    max_sequence_length: int = 2048
    dampening_frac: float = 0.1
    dataset: str = DEFAULT_DATASET
    dataset_split: str | None = None
    text_column: str | None = None
    ignore_patterns: tuple[str, ...] = field(default_factory=tuple)
    torch_dtype: str = "bfloat16"
    trust_remote_code: bool = False
    random_seed: int = 42
    max_gpu_memory: int | None = None  # bytes
    max_cpu_memory: int | None = None  # bytes
    force_cpu: bool = False
    dry_run: bool = False
    as_json: bool = False  # with dry_run: the plan as JSON on stdout instead of the table
    overwrite: bool = False
    no_memory_check: bool = False
    quiet: bool = False
    expert_chunk: int | None = None  # experts on the device at once, and samples whose expert inputs it holds:
    sample_group: int | None = None  # the plan's when None
    cpu_experts: CpuExpertsOptions | None = None

    @property
    def calibrated(self) -> bool:
        """GPTQ needs calibration data; RTN does not."""
        return self.quant_method == "GPTQ"

    @property
    def source_option(self) -> str:
        """How the command names the source checkpoint: ktq gpu's --model_id, ktq cpu --calibrate's --input-path."""
        return "--model_id" if self.output_dir is not None else "--input-path"

    @property
    def split(self) -> str:
        if self.dataset_split:
            return self.dataset_split
        return DEFAULT_DATASET_SPLIT if self.dataset == DEFAULT_DATASET else "train"

    def validate(self) -> "GpuOptions":
        from ktq.gpu.layout import validate_patterns

        if self.quant_method not in QUANT_METHODS:
            raise KtqError(f"--quant_method must be one of {', '.join(QUANT_METHODS)}, not {self.quant_method!r}")
        if self.quant_type not in QUANT_TYPES:
            raise KtqError(f"--quant_type must be one of {', '.join(QUANT_TYPES)}, not {self.quant_type!r}")
        if self.group_size not in GROUP_SIZES:
            raise KtqError(f"--group_size must be one of {', '.join(map(str, GROUP_SIZES))} (-1: one scale per "
                           f"output channel), not {self.group_size}")
        if self.torch_dtype not in TORCH_DTYPES:
            raise KtqError(f"--torch_dtype must be one of {', '.join(TORCH_DTYPES)}, not {self.torch_dtype!r}")
        if self.num_calibration_samples < 1:
            raise KtqError("--num_calibration_samples must be at least 1")
        if self.max_sequence_length < 1:
            raise KtqError("--max_sequence_length must be at least 1")
        if not 0.0 < self.dampening_frac < 1.0:
            raise KtqError(f"--dampening_frac must be between 0 and 1 (exclusive), not {self.dampening_frac}")
        for option, value in (("--expert_chunk", self.expert_chunk), ("--sample_group", self.sample_group)):
            if value is not None and value < 1:
                raise KtqError(f"{option} must be at least 1, not {value}")
        if self.as_json and not self.dry_run:
            raise KtqError("--json prints the plan of --dry_run: add --dry_run")
        validate_patterns(self.ignore_patterns)
        self._check_paths()
        if self.calibrated:  # a missing dataset fails now, not after the model has loaded
            from ktq.gpu.data import dataset_kind, local_dataset

            dataset_kind(self.dataset) if self.dry_run else local_dataset(self.dataset)  # a plan reads no data
        return self

    def _check_paths(self) -> None:
        from ktq.cpu.checkpoint import load_config
        from ktq.gpu.report import MANIFEST_FILE

        model = Path(self.model_id).expanduser()
        option = self.source_option
        if os.path.lexists(model):
            if not model.is_dir():
                raise KtqError(f"{option} {self.model_id} is not a folder")
            if not os.path.lexists(model / "config.json"):
                raise KtqError(f"{model} has no config.json; {option} takes a Hugging Face checkpoint folder")
            load_config(model)  # a regular file holding a JSON object, as ktq cpu reads it
        elif is_hub_id(self.model_id):
            raise KtqError(f"{option} {self.model_id} is no folder here; as a Hugging Face hub id, download it first "
                           f"(ktq reads no network): `{hub_download(self.model_id)}`, then pass {option} DIR")
        else:
            raise KtqError(f"{option} {self.model_id}: no such folder")
        if self.cpu_experts is not None:
            self._check_cpu_experts(model)
        if self.output_dir is None:
            return
        if model.exists():
            refuse_overlap(self.output_dir, "--output_dir", model, "--model_id")
        if not self.dry_run:  # a folder ktq did not write is refused now, before anything is loaded
            holds_output(self.output_dir.expanduser(), "--output_dir", MANIFEST_FILE, "--overwrite", self.overwrite)

    def _check_cpu_experts(self, model: Path) -> None:
        from ktq.cpu.manifest import MANIFEST_NAME
        from ktq.kernels.ktformat import METHODS

        cpu = self.cpu_experts
        if cpu.method not in METHODS:
            raise KtqError(f"--cpu-method must be one of {', '.join(METHODS)}, not {cpu.method!r}")
        if cpu.numa < 1:
            raise KtqError(f"--threadpool-count must be at least 1, not {cpu.numa}")
        if not self.calibrated:
            raise KtqError("calibrated CPU experts need calibration data: --cpu-output takes --quant_method GPTQ")
        if model.exists():
            refuse_overlap(cpu.output, cpu.option, model, self.source_option)
        if self.output_dir is not None:
            refuse_overlap(cpu.output, cpu.option, self.output_dir, "--output_dir")
        if not self.dry_run:
            holds_output(cpu.output.expanduser(), cpu.option, MANIFEST_NAME, cpu.force_option, cpu.force)
