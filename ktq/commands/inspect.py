"""ktq inspect: a ktq / kt-kernel output or a source checkpoint, as a table or as JSON; non-zero exit on problems."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from ktq.commands import common
from ktq.commands.common import opt
from ktq.errors import KtqError


def inspect(
    path: Path = typer.Argument(..., metavar="PATH", help="An output folder (either form, with or without ktq.json) or "
                                "a checkpoint."),
    as_json: bool = opt(False, "--json", help="Print one JSON object instead of tables."),
    verify: bool = opt(False, "--verify", help="Re-hash every layer against ktq.json (without one: read every file "
                       "and check its scales); sizes are always checked."),
    compare: Path = opt(None, "--compare", metavar="SRC", help="Dequantise every expert and report the error "
                        "against the source checkpoint SRC per layer and projection."),
    quiet: bool = common.quiet(),
) -> None:
    """Show what a folder holds and how to serve it.

    Checks an output byte by byte (--verify) or against its source (--compare); exit code 2 on any problem."""
    # --compare alternates small parallel kernels with numpy work on this thread: idle OpenMP workers must sleep,
    # not spin (spinning made it 10-30x slower on a 2-core machine); set before Numba starts its threads
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from ktq.inspect import inspect as run_inspect
    from ktq.progress import LayerProgress

    with LayerProgress(quiet=quiet, transient=True) as progress:  # a bar on a terminal: the report is the output
        result = run_inspect(path, verify, compare, progress)
    if as_json:
        typer.echo(json.dumps(result.report, indent=2))
    else:
        _render(result.report)
    if result.problems:
        more = f" (and {len(result.problems) - 1} more, listed above)" if len(result.problems) > 1 else ""
        raise KtqError(f"{path}: {result.problems[0]}{more}")


def _render_gpu_checkpoint(console, table, report: dict) -> None:
    group = f"groups of {report['group_size']}" if report["group_size"] > 0 else "one scale per channel"
    table.add_row("kind", f"ktq gpu checkpoint ({report['model_type']}, from {report['source']})")
    table.add_row("experts", f"{report['quant_method']} W{report['bits']}A16 in {group}, symmetric "
                             f"{report['symmetric']}, actorder {report['actorder']}; {report['experts']} per layer, "
                             f"hidden {report['hidden']} / moe_intermediate {report['intermediate']}")
    if report["fp8_linears"]:
        table.add_row("FP8 Linears", f"{report['fp8_linears']} names kept FP8 (block scales), "
                                     + ("sglang-kt reads them through linear_fp8_config" if report["sglang_kt_fp8"]
                                        else "no linear_fp8_config for sglang-kt"))
    table.add_row("tensor parallel", report["tp"])
    console.print(table)


def _render(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from ktq.progress import counted, gb

    console = Console(highlight=False)
    table = Table(title=f"ktq inspect {report['path']}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    layers = report.get("layers", [])
    span = f"{len(layers)} ({layers[0]}..{layers[-1]})" if layers else "none"
    if report["kind"] == "gpu-checkpoint":
        _render_gpu_checkpoint(console, table, report)
    elif report["kind"] == "checkpoint":
        table.add_row("kind", f"source checkpoint ({report['model_type']}, {counted(report['shards'], 'shard')})")
        table.add_row("MoE layers", span)
        table.add_row("experts", f"{report['experts']} per layer")
        table.add_row("hidden / moe_intermediate", f"{report['hidden']} / {report['intermediate']}")
        table.add_row("expert dtype", report["input_type"])
        table.add_row("expert shapes", ", ".join(f"{p} {s}" for p, s in report["expert_shapes"].items()))
        table.add_row("size", f"{gb(report['bytes'])} ({gb(report['expert_bytes'])} routed experts)")
        for conv in report["conversions"]:
            if conv["threadpool_counts"]:
                table.add_row(f"ktq cpu --quant-method {conv['method']}",
                              f"--threadpool-count {', '.join(map(str, conv['threadpool_counts']))}; writes "
                              f"{gb(conv['output_bytes'])}")
            else:
                table.add_row(f"ktq cpu --quant-method {conv['method']}", "not possible (alignment)")
        console.print(table)
    else:
        kind = {"ktq-output": "ktq output", "kt-output": "kt-kernel output without ktq.json"}[report["kind"]]
        form = "merged safetensors" if report["form"] == "merged" else "low-memory .kt tree"
        table.add_row("kind", f"{kind}, {form}")
        table.add_row("method", f"{report['method']} ({report['kt_method']})")
        table.add_row("NUMA parts", f"{report['numa']} (this machine: "
                                    f"{counted(report['machine_numa_nodes'], 'NUMA node')})")
        table.add_row("MoE layers", span)
        table.add_row("experts", f"{report['experts']} per layer")
        table.add_row("hidden / intermediate", f"{report['hidden']} / {report['intermediate']} "
                                               f"({report['intermediate_per_part']} per NUMA part)")
        table.add_row("size", gb(report["bytes"]))
        manifest = report["manifest"]
        if manifest:
            table.add_row("manifest", f"ktq.json by ktq {manifest['ktq_version']}: "
                                      f"{'complete' if manifest['complete'] else 'unfinished'}, "
                                      f"{manifest['layers_done']}/{len(layers)} layers, {manifest['input_type']} "
                                      f"input {manifest['input_fingerprint']}")
        else:
            table.add_row("manifest", "none (layout inferred from the files)")
        calibration = manifest.get("calibration") if manifest else None
        if calibration:
            table.add_row("calibrated", f"GPTQ on {calibration['dataset']}: "
                                        f"{counted(calibration['samples'], 'sample')}, "
                                        f"{counted(calibration['tokens'], 'token')} (fingerprint "
                                        f"{calibration['tokens_fingerprint']}), on the {calibration['device']}")
        elif manifest:
            table.add_row("calibrated", "no (round to nearest)")
        console.print(table)
        hot = manifest.get("hot_experts") if manifest else None
        if hot:
            hottest = Table(title="hottest experts per layer (calibration tokens routed)", title_justify="left")
            for column in ("layer", "experts, most tokens first", "share of the layer's tokens"):
                hottest.add_column(column)
            for layer, row in hot.items():
                hottest.add_row(layer, " ".join(map(str, row["experts"])), f"{100 * row['share']:.1f}%")
            console.print(hottest)
        pieces = Table(title="per expert and NUMA part", title_justify="left")
        for column in ("projection", "shape [n, k]", f"weight ({report['dtypes']['weight']})",
                       f"scale ({report['dtypes']['scale']})"):
            pieces.add_column(column)
        for proj, p in report["projections"].items():
            pieces.add_row(proj, str(p["shape"]), f"{p['weight_bytes']:,} B", f"{p['scale_bytes']:,} B")
        console.print(pieces)
        serve = report["serve"]
        if serve is None:
            console.print("serve with: nothing yet, the output is unfinished or damaged (problems below)")
        else:
            for line in report["serve_lines"]:
                console.print(line, soft_wrap=True, markup=False)
    if report["kind"] == "gpu-checkpoint":
        for line in report["serve_lines"] or ["serve with: nothing, the checkpoint has problems (below)"]:
            console.print(line, soft_wrap=True, markup=False)
    if "compare" in report:
        errors = Table(title=f"error against {report['compare']['source']}", title_justify="left")
        for column in ("layer", "projection", "relative RMS", "max abs", "SNR dB"):
            errors.add_column(column, justify="right")
        for row in report["compare"]["rows"]:
            snr = "inf" if row["snr_db"] is None else f"{row['snr_db']:.2f}"
            errors.add_row(str(row["layer"]), row["projection"], f"{row['relative_rms']:.5f}",
                           f"{row['max_abs']:.3g}", snr)
        console.print(errors)
    for warning in report["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {warning}", soft_wrap=True)
    for note in report["notes"]:
        console.print(f"note: {note}", soft_wrap=True)
    for problem in report["problems"]:
        console.print(f"[red]problem:[/red] {problem}", soft_wrap=True)
    if report.get("verified"):
        if report["kind"] == "gpu-checkpoint":
            checked = "every shard against its digest in ktq_gpu.json"
        elif report["kind"] == "checkpoint":
            checked = "every header, expert tensor and shape"
        else:
            checked = "every size and " + ("every digest in ktq.json" if report["manifest"] else "every scale")
        console.print(f"verified: {checked} checked, no problem")
