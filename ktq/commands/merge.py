"""ktq merge: a low-memory .kt tree -> the merged safetensors form, as `ktq cpu` would have written it."""

from __future__ import annotations

from pathlib import Path

import typer

from ktq.commands import common
from ktq.commands.common import opt

# ktq merge writes its OUT as ktq cpu writes its output, in messages that name ktq cpu's option
CPU_OPTIONS = {"--output": "OUT"}


def merge(
    tree: Path = typer.Argument(..., metavar="IN", help="A low-memory output (_layer_*/_numa_*/*.kt)."),
    out: Path = typer.Argument(..., metavar="OUT", help="Folder to write (created; an unfinished merge there is "
                               "continued)."),
    original_path: Path = opt(None, "--original-path", metavar="SRC", help="The checkpoint IN was converted from: "
                              "its config and tokenizer files are copied, and it tells which layers IN must hold "
                              "when IN has no ktq.json."),
    force: bool = opt(False, "--force", help="Proceed anyway: start over an OUT made from something else (deleting "
                      "only what ktq wrote there) and start even when the disk looks too small."),
    quiet: bool = common.quiet(),
) -> None:
    """Merge a low-memory .kt tree into safetensors shards.

    Writes the shards with their index (and, with --original-path, the config and tokenizer files) as ktq cpu's
    merged form, byte for byte."""
    from ktq.merge import merge_tree
    from ktq.progress import LayerProgress, counted, gb
    from ktq.serving import UNKNOWN_MODEL, cpu_output_serve, serve_lines

    with LayerProgress(quiet=quiet) as progress, common.options_named(CPU_OPTIONS):
        result = merge_tree(tree, out, original_path, force, progress)
    if result.complete:
        if not quiet:
            typer.echo(f"{result.output} is complete already ({len(result.layers_kept)} layers): nothing to do")
        return
    if not quiet:
        typer.echo(f"wrote {result.output} (merged, {result.method.kt_method}, {counted(result.numa, 'NUMA part')}): "
                   f"{counted(len(result.layers_merged), 'layer')} merged, {len(result.layers_kept)} kept, "
                   f"{gb(result.output_bytes)} in {result.seconds:.1f} s")
        if not result.copied_aux:
            typer.echo("no --original-path: config.json and the tokenizer files were not copied")
        model = str(original_path) if original_path is not None else UNKNOWN_MODEL
        for line in serve_lines(cpu_output_serve(model, result.output, result.method.kt_method, result.numa)):
            typer.echo(line)
        if original_path is None:
            typer.echo(f"note: {UNKNOWN_MODEL} stands for the checkpoint the GPU side loads (IN's source, or its "
                       "ktq gpu checkpoint)")
