"""ktq gpu: the reference tool's interface (kt-kernel's convert_gpu_weights.py), with MoE-aware defaults, a memory
plan before loading, local calibration data and a report. Options are shown kebab-case; the reference's snake_case
spellings work too (ktq.app.kebab)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ktq.commands import common
from ktq.commands.common import KtMethod, choices, opt
from ktq.errors import KtqError
from ktq.gpu.options import (
    DEFAULT_DATASET,
    DEFAULT_GROUP_SIZE,
    QUANT_METHODS,
    QUANT_TYPES,
    TORCH_DTYPES,
    CpuExpertsOptions,
    GpuOptions,
    parse_size,
)
from ktq.system import numa_nodes

QuantMethod = choices("QuantMethod", QUANT_METHODS)
QuantType = choices("QuantType", QUANT_TYPES)
TorchDtype = choices("TorchDtype", TORCH_DTYPES)


CPU_OUTPUT = "With --cpu-output: "
# the calibrated CPU experts are a ktq cpu output, whose messages name ktq cpu's option for its folder
CPU_OPTIONS = {"--output": "--cpu-output"}


def gpu(
    ctx: typer.Context,
    model_id: str = opt(..., "--model-id", help="Checkpoint folder of the MoE model (a hub id is refused with the "
                        "command that downloads it)."),
    output_dir: Path = opt(..., "--output-dir", help="Folder to create for the quantised checkpoint."),
    quant_method: QuantMethod = opt(QuantMethod.GPTQ, "--quant-method",
                                    help="GPTQ (calibrated) or RTN (round to nearest, no data)."),
    quant_type: QuantType = opt(QuantType.W8A16, "--quant-type", help="W4A16 or W8A16."),
    group_size: int = opt(DEFAULT_GROUP_SIZE, "--group-size", help="Input columns per scale: 32, 64, 128, or -1 "
                          "for one scale per output channel. 32 serves with the most tensor-parallel sizes, and a "
                          "W4A16 checkpoint in groups of 32 is also kt-kernel RAWINT4 CPU experts."),
    num_calibration_samples: int = common.num_calibration_samples(),
    max_sequence_length: int = common.max_sequence_length(),
    dampening_frac: float = opt(GpuOptions.dampening_frac, "--dampening-frac",
                                help="GPTQ dampening, a fraction of the Hessian's mean diagonal."),
    dataset: str = opt(DEFAULT_DATASET, "--dataset", help="Local json/jsonl/parquet/arrow/csv/txt file, saved "
                       "dataset folder, or hub id."),
    dataset_split: Optional[str] = common.dataset_split(),
    text_column: Optional[str] = common.text_column(),
    ignore_patterns: Optional[List[str]] = opt(None, "--ignore-patterns", help="More modules to keep unquantised, "
                                               "by name, class or 're:' regex; repeat the option for several."),
    torch_dtype: TorchDtype = opt(TorchDtype.bfloat16, "--torch-dtype", help="dtype to load the model in."),
    trust_remote_code: bool = opt(False, "--trust-remote-code", help="Run the checkpoint's own modeling code "
                                  "(config, tokenizer and model)."),
    random_seed: int = common.random_seed(),
    max_gpu_memory: Optional[str] = opt(None, "--max-gpu-memory", show_default="90% of the free GPU memory",
                                        help="GPU memory ktq may use, weights and GPTQ together, e.g. 40GiB."),
    max_cpu_memory: Optional[str] = opt(None, "--max-cpu-memory", show_default="85% of the available RAM",
                                        help="RAM ktq may use, e.g. 200GiB."),
    force_cpu: bool = common.force_cpu(),
    expert_chunk: Optional[int] = opt(None, "--expert-chunk", min=1, show_default="the plan's",
                                      help="Experts on the GPU at once; the output does not depend on it."),
    sample_group: Optional[int] = opt(None, "--sample-group", min=1, show_default="the plan's",
                                      help="Calibration samples whose expert inputs the GPU holds at once; the "
                                      "output does not depend on it."),
    dry_run: bool = opt(False, "--dry-run", help="Show the plan and stop; nothing is loaded or written. Exit code 2 "
                        "when it would not fit (unless --force)."),
    as_json: bool = common.as_json(),
    overwrite: bool = opt(False, "--overwrite", help="Replace an existing --output-dir once the new one is "
                          "complete."),
    no_memory_check: bool = opt(False, "--no-memory-check", "--force", help="Run even when the plan says it will "
                                "not fit (--force, as in ktq cpu)."),
    nproc: Optional[int] = opt(None, "--nproc", show_default="1, or torchrun's processes", help="Run on this many "
                               "processes through torch.distributed, one per GPU (gloo on the CPU)."),
    quiet: bool = opt(False, "--quiet", "-q", help="No plan, progress or summary output."),
    cpu_output: Optional[Path] = opt(None, "--cpu-output", help="Also write the CPU experts, calibrated on the "
                                     "same data in the same pass, as kt-kernel AMXINT4/AMXINT8 (a ktq cpu output, "
                                     "with init_expert_location.pt)."),
    cpu_method: KtMethod = opt(KtMethod.int4, "--cpu-method", help=f"{CPU_OUTPUT}int4 (AMXINT4) or int8."),
    threadpool_count: int = common.threadpool_count(CPU_OUTPUT),
) -> None:
    """Routed experts to GPTQ W4A16 / W8A16 for the GPU side.

    Streams the checkpoint one decoder layer at a time and writes a compressed-tensors checkpoint for SGLang +
    KTransformers; with --cpu-output also the calibrated CPU experts from the same pass."""
    opts = GpuOptions(
        model_id=model_id, output_dir=output_dir, quant_method=quant_method.value, quant_type=quant_type.value,
        group_size=group_size, num_calibration_samples=num_calibration_samples,
        max_sequence_length=max_sequence_length, dampening_frac=dampening_frac, dataset=dataset,
        dataset_split=dataset_split, text_column=text_column,
        ignore_patterns=tuple(ignore_patterns or ()), torch_dtype=torch_dtype.value,
        trust_remote_code=trust_remote_code, random_seed=random_seed,
        max_gpu_memory=parse_size(max_gpu_memory, "--max-gpu-memory"),
        max_cpu_memory=parse_size(max_cpu_memory, "--max-cpu-memory"), force_cpu=force_cpu, dry_run=dry_run,
        as_json=as_json, overwrite=overwrite, no_memory_check=no_memory_check, quiet=quiet,
        expert_chunk=expert_chunk, sample_group=sample_group,
        cpu_experts=CpuExpertsOptions(cpu_output, cpu_method.value,
                                      numa_nodes() if threadpool_count is None else threadpool_count, force=overwrite,
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

        with common.options_named(CPU_OPTIONS):
            run(opts, debug=debug)
