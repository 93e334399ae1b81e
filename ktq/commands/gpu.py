"""ktq gpu: the reference tool's interface (kt-kernel's convert_gpu_weights.py), with MoE-aware defaults, a memory
plan before loading, local calibration data and a report. Options are snake_case as in the reference; the
kebab-case spelling works too."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ktq.commands.common import KtMethod, choices, opt
from ktq.errors import KtqError
from ktq.gpu.options import (
    DEFAULT_DATASET,
    QUANT_METHODS,
    QUANT_TYPES,
    TORCH_DTYPES,
    CpuExpertsOptions,
    GpuOptions,
    parse_size,
)

QuantMethod = choices("QuantMethod", QUANT_METHODS)
QuantType = choices("QuantType", QUANT_TYPES)
TorchDtype = choices("TorchDtype", TORCH_DTYPES)


def gpu(
    ctx: typer.Context,
    model_id: str = opt(..., "--model_id", help="Checkpoint folder (or hub id) of the BF16/FP16 MoE model."),
    output_dir: Path = opt(..., "--output_dir", help="Folder to create for the quantised checkpoint."),
    quant_method: QuantMethod = opt(QuantMethod.GPTQ, "--quant_method",
                                     help="GPTQ (calibrated) or RTN (round to nearest, no data)."),
    quant_type: QuantType = opt(QuantType.W8A16, "--quant_type", help="W4A16 or W8A16, groups of 128."),
    num_calibration_samples: int = opt(512, "--num_calibration_samples", help="Calibration samples."),
    max_sequence_length: int = opt(2048, "--max_sequence_length", help="Tokens per sample at most."),
    dampening_frac: float = opt(0.1, "--dampening_frac", help="GPTQ dampening, a fraction of the Hessian's "
                                 "mean diagonal."),
    dataset: str = opt(DEFAULT_DATASET, "--dataset", help="Local json/jsonl/parquet/arrow/csv/txt file, saved "
                        "dataset folder, or hub id."),
    dataset_split: Optional[str] = opt(None, "--dataset_split", help="Split of a hub or saved dataset "
                                        "(default: train_sft for the default dataset, else train)."),
    text_column: Optional[str] = opt(None, "--text_column", help="Column to calibrate on (default: messages, "
                                      "else text); chat messages go through the tokenizer's chat template."),
    ignore_patterns: Optional[List[str]] = opt(None, "--ignore_patterns", help="More modules to keep unquantised, "
                                                "by name, class or 're:' regex; repeat the option for several."),
    torch_dtype: TorchDtype = opt(TorchDtype.bfloat16, "--torch_dtype", help="dtype to load the model in."),
    trust_remote_code: bool = opt(False, "--trust_remote_code", help="Run the checkpoint's own modeling code "
                                   "(config, tokenizer and model)."),
    random_seed: int = opt(42, "--random_seed", help="Seed for picking calibration samples."),
    max_gpu_memory: Optional[str] = opt(None, "--max_gpu_memory", help="GPU memory ktq may use, weights and "
                                         "GPTQ together, e.g. 40GiB (default: 90% of the free memory)."),
    max_cpu_memory: Optional[str] = opt(None, "--max_cpu_memory", help="RAM ktq may use, e.g. 200GiB "
                                         "(default: 85% of the available RAM)."),
    force_cpu: bool = opt(False, "--force_cpu", help="Hide all GPUs and calibrate on the CPU."),
    dry_run: bool = opt(False, "--dry_run", help="Show the plan and stop; nothing is loaded or written. Exit code 2 "
                         "when it would not fit (unless --force)."),
    as_json: bool = typer.Option(False, "--json", help="With --dry_run: the plan as JSON on stdout."),
    overwrite: bool = opt(False, "--overwrite", help="Replace an existing --output_dir once the new one is "
                           "complete."),
    no_memory_check: bool = opt(False, "--no_memory_check", "--force", help="Run even when the plan says it will "
                                 "not fit (--force, as in ktq cpu)."),
    nproc: Optional[int] = opt(None, "--nproc", help="Run on this many processes through torch.distributed, "
                                "one per GPU (gloo on the CPU); inside torchrun ktq joins its job instead."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No plan, progress or summary output."),
    cpu_output: Optional[Path] = opt(None, "--cpu_output", help="Also write the CPU experts, calibrated on the "
                                      "same data in the same pass, as kt-kernel AMXINT4/AMXINT8 (a ktq cpu "
                                      "output, with init_expert_location.pt)."),
    cpu_method: KtMethod = opt(KtMethod.int4, "--cpu_method", help="With --cpu-output: int4 (AMXINT4) or int8."),
    threadpool_count: int = opt(1, "--threadpool_count", help="With --cpu-output: NUMA parts; serve with the same "
                                 "--kt-threadpool-count."),
) -> None:
    """Quantise a MoE checkpoint's routed experts to GPTQ W4A16/W8A16 (compressed-tensors) for the GPU side."""
    opts = GpuOptions(
        model_id=model_id, output_dir=output_dir, quant_method=quant_method.value, quant_type=quant_type.value,
        num_calibration_samples=num_calibration_samples, max_sequence_length=max_sequence_length,
        dampening_frac=dampening_frac, dataset=dataset, dataset_split=dataset_split, text_column=text_column,
        ignore_patterns=tuple(ignore_patterns or ()), torch_dtype=torch_dtype.value,
        trust_remote_code=trust_remote_code, random_seed=random_seed,
        max_gpu_memory=parse_size(max_gpu_memory, "--max_gpu_memory"),
        max_cpu_memory=parse_size(max_cpu_memory, "--max_cpu_memory"), force_cpu=force_cpu, dry_run=dry_run,
        as_json=as_json, overwrite=overwrite, no_memory_check=no_memory_check, quiet=quiet,
        cpu_experts=CpuExpertsOptions(cpu_output, cpu_method.value, threadpool_count, force=overwrite,
                                      option="--cpu-output", force_option="--overwrite")
        if cpu_output is not None else None,
    ).validate()
    from ktq.gpu import launch
    from ktq.gpu.devices import prepare_environment

    if cpu_output is not None and (nproc is not None or launch.in_torchrun()):
        raise KtqError("--cpu-output: calibrated CPU experts are made by one process; drop --nproc (or torchrun)")

    debug = bool(ctx.find_root().params.get("debug"))
    prepare_environment(force_cpu, debug)  # before the import below: it is the first to load torch
    if launch.in_torchrun():
        launch.run_as_rank(opts, debug)
    elif nproc is not None:
        launch.launch(opts, nproc, debug)
    else:
        from ktq.gpu.run import run

        run(opts, debug=debug)
