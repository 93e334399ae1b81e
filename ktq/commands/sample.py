"""ktq sample: a small synthetic checkpoint with a real model's key layout, config and tokenizer."""

from __future__ import annotations

from pathlib import Path

import typer


def sample(
    out: Path = typer.Argument(..., help="Folder to create."),
    arch: str = typer.Option("qwen3_moe", "--arch", help="Architecture whose layout to copy: qwen3_moe, "
                             "deepseek_v3, mixtral, minimax_m2, qwen3_vl_moe (VL, fused in x out), qwen3_5_moe "
                             "(VL, fused out x in)."),
    layers: int = typer.Option(2, "--layers", help="Decoder layers."),
    experts: int = typer.Option(8, "--experts", help="Routed experts per MoE layer."),
    hidden: int = typer.Option(256, "--hidden", help="hidden_size."),
    moe_intermediate: int = typer.Option(256, "--moe-intermediate", help="moe_intermediate_size."),
    dense_layers: int = typer.Option(0, "--dense-layers", help="Leading layers with a dense MLP instead of experts."),
    dtype: str = typer.Option("bf16", "--dtype", help="bf16, fp16, fp8 (block-scaled, weight_scale_inv) or int4 "
                              "(compressed-tensors pack-quantized experts, as Kimi-K2-Thinking)."),
    seed: int = typer.Option(0, "--seed", help="Random seed; same seed, same bytes."),
    shards: int = typer.Option(2, "--shards", help="Number of safetensors shards."),
    header_only: bool = typer.Option(False, "--header-only", help="Real headers and file sizes, no data (sparse "
                                     "files): a stand-in for a huge model in `ktq cpu --dry-run`."),
) -> None:
    """Write a small random checkpoint (for demos, tests and benchmarks)."""
    from ktq.sample import write_sample

    write_sample(out, arch=arch, layers=layers, experts=experts, hidden=hidden, moe_intermediate=moe_intermediate,
                 dense_layers=dense_layers, dtype=dtype, seed=seed, shards=shards, header_only=header_only)
    typer.echo(f"wrote {'header-only ' if header_only else ''}sample {arch} checkpoint to {out}")
