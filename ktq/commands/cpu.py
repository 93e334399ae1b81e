"""ktq cpu: the reference tool's interface (kt-kernel's convert_cpu_weights.py), plus resume and checks."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from ktq.errors import KtqError
from ktq.system import cpu_cores, numa_nodes


class InputType(str, Enum):
    bf16 = "bf16"
    fp16 = "fp16"
    fp8 = "fp8"
    int4 = "int4"


class QuantMethod(str, Enum):
    int4 = "int4"
    int8 = "int8"


def cpu(
    input_path: Path = typer.Option(..., "--input-path", "-i", help="Folder of the source checkpoint."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder to write (created; an unfinished ktq output "
                                "there is continued)."),
    input_type: InputType = typer.Option(None, "--input-type", help="How the expert weights are stored (int4: "
                                         "compressed-tensors pack-quantized); detected when omitted."),
    quant_method: QuantMethod = typer.Option(QuantMethod.int4, "--quant-method", help="AMXINT4 or AMXINT8."),
    cpuinfer_threads: int = typer.Option(None, "--cpuinfer-threads", help="Threads for quantisation "
                                         "[default: all cores]."),
    threadpool_count: int = typer.Option(None, "--threadpool-count", help="NUMA parts; serve with the same "
                                         "--kt-threadpool-count [default: this machine's NUMA nodes]."),
    merge: bool = typer.Option(True, "--merge-safetensor/--no-merge-safetensor",
                               help="Merged safetensors shards, or the low-memory .kt tree."),
    resume_layer: int = typer.Option(None, "--resume-layer", help="Reconvert from this layer on; earlier layers "
                                     "must already be in --output."),
    force: bool = typer.Option(False, "--force", help="Proceed anyway: start over an output made with other "
                               "settings (deleting only what ktq wrote there) and start even when the disk looks "
                               "too small."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Convert routed experts to kt-kernel's AMXINT4 / AMXINT8 CPU format."""
    import numba

    from ktq.convert import CpuJob, convert_cpu
    from ktq.kernels.ktformat import METHODS
    from ktq.progress import LayerProgress, gb

    threads = cpuinfer_threads or cpu_cores()
    if threads < 1:
        raise KtqError("--cpuinfer-threads must be at least 1")
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    job = CpuJob(input_path=input_path, output=output, method=METHODS[quant_method.value],
                 numa=threadpool_count or numa_nodes(), merge=merge,
                 input_type=input_type.value if input_type else None, resume_layer=resume_layer, force=force)
    with LayerProgress(quiet=quiet) as progress:
        result = convert_cpu(job, progress)
    if not quiet:
        rate = result.input_bytes / result.seconds / 1e9 if result.seconds else 0.0
        typer.echo(f"wrote {result.output} ({result.form}, {result.method.kt_method}, {result.numa} NUMA parts): "
                   f"{len(result.layers_converted)} layers converted, {len(result.layers_kept)} kept, "
                   f"{gb(result.output_bytes)} in {result.seconds:.1f} s ({rate:.2f} GB/s of input)")
        typer.echo(f"serve with: --kt-method {result.method.kt_method} --kt-weight-path {result.output} "
                   f"--kt-threadpool-count {result.numa}")
