"""ktq merge: a low-memory .kt tree -> the merged safetensors form, as `ktq cpu` would have written it."""

from __future__ import annotations

from pathlib import Path

import typer


def merge(
    tree: Path = typer.Argument(..., metavar="IN", help="A low-memory output (_layer_*/_numa_*/*.kt)."),
    out: Path = typer.Argument(..., metavar="OUT", help="Folder to write (created; an unfinished merge there is "
                               "continued)."),
    original_path: Path = typer.Option(None, "--original-path", metavar="SRC", help="The checkpoint IN was "
                                       "converted from: its config and tokenizer files are copied, and it tells "
                                       "which layers IN must hold when IN has no ktq.json."),
    force: bool = typer.Option(False, "--force", help="Proceed anyway: start over an OUT made from something else "
                               "(deleting only what ktq wrote there) and start even when the disk looks too small."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Merge a low-memory .kt tree into safetensors shards with index, config and tokenizer files."""
    from ktq.merge import merge_tree
    from ktq.progress import LayerProgress, gb

    with LayerProgress(quiet=quiet) as progress:
        result = merge_tree(tree, out, original_path, force, progress)
    if result.complete:
        if not quiet:
            typer.echo(f"{result.output} is complete already ({len(result.layers_kept)} layers): nothing to do")
        return
    if not quiet:
        typer.echo(f"wrote {result.output} (merged, {result.method.kt_method}, {result.numa} NUMA parts): "
                   f"{len(result.layers_merged)} layers merged, {len(result.layers_kept)} kept, "
                   f"{gb(result.output_bytes)} in {result.seconds:.1f} s")
        if not result.copied_aux:
            typer.echo("no --original-path: config.json and the tokenizer files were not copied")
        typer.echo(f"serve with: --kt-method {result.method.kt_method} --kt-weight-path {result.output} "
                   f"--kt-threadpool-count {result.numa}")
