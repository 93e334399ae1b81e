"""ktq cpu: the reference tool's interface (kt-kernel's convert_cpu_weights.py), plus resume and checks."""

from __future__ import annotations

import atexit
import gc
import json
import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from ktq.commands import common
from ktq.commands.common import KtMethod, choices, opt
from ktq.errors import KtqError
from ktq.hfformat import INPUT_TYPES
from ktq.serving import cpu_output_serve, serve_lines
from ktq.system import cpu_cores, numa_nodes

InputType = choices("InputType", INPUT_TYPES)


def _run_calibrated(opts, threads: int | None, debug: bool) -> None:
    """ktq cpu --calibrate: the streaming engine of ktq gpu, writing only the calibrated CPU experts."""
    from ktq.gpu.devices import prepare_environment

    prepare_environment(opts.force_cpu, debug)
    import torch  # after prepare_environment, which hides the GPUs from it with --force_cpu

    from ktq.gpu.run import run

    if threads is not None:
        torch.set_num_threads(threads)
    run(opts, debug=debug)


CALIBRATE = "With --calibrate: "
# ktq cpu --calibrate runs ktq gpu's engine, whose messages name ktq gpu's options: ktq cpu's names for them
GPU_OPTIONS = {"--model-id": "--input-path", "--dataset": "--calibrate", "--cpu-output": "--output",
               "--cpu-method": "--quant-method"}


def cpu(
    ctx: typer.Context,
    input_path: Path = opt(..., "--input-path", "-i", help="Folder of the source checkpoint."),
    output: Path = opt(..., "--output", "-o", help="Folder to write (created; an unfinished ktq output there is "
                       "continued)."),
    input_type: InputType = opt(None, "--input-type", show_default="detected from the tensors",
                                help="How the expert weights are stored (int4: compressed-tensors pack-quantized)."),
    quant_method: KtMethod = opt(KtMethod.int4, "--quant-method", help="AMXINT4 or AMXINT8."),
    cpuinfer_threads: int = opt(None, "--cpuinfer-threads", min=1, show_default="all cores",
                                help="Threads for quantisation."),
    threadpool_count: int = common.threadpool_count(),
    merge: bool = opt(True, "--merge-safetensor/--no-merge-safetensor",
                      help="Merged safetensors shards, or the low-memory .kt tree."),
    resume_layer: int = opt(None, "--resume-layer", min=0, show_default="after the last finished layer",
                            help="Reconvert from this layer on; earlier layers must already be in --output."),
    quiet: bool = common.quiet(),
    dry_run: bool = opt(False, "--dry-run", help="Only show the plan: layers, output size, peak RAM, disk, time; "
                        "reads headers only. Exit code 2 when it would not fit."),
    as_json: bool = common.as_json(),
    force: bool = opt(False, "--force", help="Proceed anyway: run when the plan says it does not fit in RAM or on the "
                      "disk, and start over an output made with other settings (deleting only what ktq wrote there)."),
    calibrate: Optional[str] = opt(None, "--calibrate", metavar="DATASET", help="Choose codes and scales by GPTQ on "
                                   "this dataset's activations (a local file or saved dataset, as ktq gpu "
                                   "--dataset), not by round to nearest: same format, better experts."),
    num_calibration_samples: int = common.num_calibration_samples(CALIBRATE),
    max_sequence_length: int = common.max_sequence_length(CALIBRATE),
    dataset_split: Optional[str] = common.dataset_split(CALIBRATE),
    text_column: Optional[str] = common.text_column(CALIBRATE),
    random_seed: int = common.random_seed(CALIBRATE),
    force_cpu: bool = common.force_cpu(CALIBRATE),
) -> None:
    """Routed experts to kt-kernel's AMXINT4 / AMXINT8 CPU format.

    Reads the checkpoint's routed experts (BF16, FP16, FP8 or INT4) and writes what kt-kernel serves on the CPU;
    an interrupted conversion continues where it stopped."""
    # OpenMP threads that spin while waiting for the next kernel launch steal the cores the read and write
    # threads need between experts (measured: 2.5x the CPU time of a conversion); they must sleep instead.
    # Set before Numba starts its threading layer, which reads it once. Nothing here calls BLAS: numpy's
    # OpenBLAS need not start (and spin) threads of its own.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    import numba

    from ktq.cpu.pipeline import CpuJob, convert_cpu
    from ktq.cpu.plan import numa_warning, plan_cpu, plan_table
    from ktq.kernels.ktformat import METHODS
    from ktq.output_folder import refuse_overlap
    from ktq.progress import LayerProgress, counted, gb

    if as_json and not dry_run:
        raise KtqError("--json prints the plan of --dry-run: add --dry-run")
    refuse_overlap(output, "--output", input_path, "--input-path")
    if calibrate is not None:
        if resume_layer is not None:
            raise KtqError("--resume-layer: a calibrated conversion resumes by itself after its last finished "
                           "layer (each layer's inputs come from the layers before it); drop --resume-layer")
        from ktq.gpu.options import CpuExpertsOptions, GpuOptions

        opts = GpuOptions(
            model_id=str(input_path), output_dir=None, quant_method="GPTQ", dataset=calibrate,
            num_calibration_samples=num_calibration_samples, max_sequence_length=max_sequence_length,
            dataset_split=dataset_split, text_column=text_column, random_seed=random_seed, force_cpu=force_cpu,
            dry_run=dry_run, as_json=as_json, no_memory_check=force, quiet=quiet,
            cpu_experts=CpuExpertsOptions(output, quant_method.value,
                                          numa_nodes() if threadpool_count is None else threadpool_count, merge,
                                          force),
        )
        with common.options_named(GPU_OPTIONS):
            _run_calibrated(opts.validate(), cpuinfer_threads, bool(ctx.find_root().params.get("debug")))
        return
    # At exit, the interpreter's last garbage collection walks every object of Numba's compiler and of the
    # checkpoint's description: 0.2 s of a dry run (measured). atexit handlers run before it; frozen objects are
    # skipped.
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)
    threads = cpu_cores() if cpuinfer_threads is None else cpuinfer_threads  # 0 is refused by Typer (min=1)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    job = CpuJob(input_path=input_path, output=output, method=METHODS[quant_method.value],
                 numa=numa_nodes() if threadpool_count is None else threadpool_count, merge=merge,
                 input_type=input_type.value if input_type else None, resume_layer=resume_layer, force=force)
    if dry_run:
        plan = plan_cpu(job, threads, measure_time=True)
        if as_json:
            typer.echo(json.dumps(plan.to_json(), indent=2))
        else:
            Console().print(plan_table(plan))
        if plan.problems:
            raise KtqError(f"this conversion would not fit: {'; '.join(plan.problems)}")
        return
    problems = plan_cpu(job, threads, measure_time=False).problems  # the plan's objects are dropped here,
    if problems and not force:  # before the run allocates its own
        raise KtqError(f"this conversion does not fit: {'; '.join(problems)}; free memory or disk, choose "
                       "another --output, or pass --force to run anyway")
    if problems:
        typer.echo(f"ktq: warning: this conversion does not fit: {'; '.join(problems)}; running anyway (--force)",
                   err=True)
    warning = numa_warning(job.numa, numa_nodes())
    if warning:
        typer.echo(f"ktq: warning: {warning}", err=True)
    with LayerProgress(quiet=quiet) as progress:
        result = convert_cpu(job, progress)
    if result.complete:
        if not quiet:
            typer.echo(f"{result.output} is complete already ({len(result.layers_kept)} layers): nothing to do")
        return
    if not quiet:
        rate = result.input_bytes / result.seconds / 1e9 if result.seconds else 0.0
        typer.echo(f"wrote {result.output} ({result.form}, {result.method.kt_method}, "
                   f"{counted(result.numa, 'NUMA part')}): {counted(len(result.layers_converted), 'layer')} "
                   f"converted, {len(result.layers_kept)} kept, "
                   f"{gb(result.output_bytes)} in {result.seconds:.1f} s ({rate:.2f} GB/s of input)")
        for line in serve_lines(cpu_output_serve(str(input_path), result.output, result.method.kt_method,
                                                 result.numa)):
            typer.echo(line)
