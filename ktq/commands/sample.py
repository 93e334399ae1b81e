"""ktq sample: a small synthetic checkpoint with a real model's key layout, config and tokenizer."""

from __future__ import annotations

from pathlib import Path

import typer

from ktq.commands.common import opt


def sample(
    out: Path = typer.Argument(..., metavar="OUT", help="Folder to create."),
    arch: str = opt("qwen3_moe", "--arch", help="Architecture whose layout to copy: qwen3_moe, deepseek_v3, mixtral, "
                    "minimax_m2, qwen3_vl_moe (VL, fused in x out), qwen3_5_moe (VL, fused out x in)."),
    layers: int = opt(2, "--layers", help="Decoder layers."),
    experts: int = opt(8, "--experts", help="Routed experts per MoE layer."),
    hidden: int = opt(256, "--hidden", help="hidden_size."),
    moe_intermediate: int = opt(256, "--moe-intermediate", help="moe_intermediate_size."),
    dense_layers: int = opt(0, "--dense-layers", help="Leading layers with a dense MLP instead of experts."),
    dtype: str = opt("bf16", "--dtype", help="bf16, fp16, fp8 (block-scaled, weight_scale_inv) or int4 "
                     "(compressed-tensors pack-quantized experts, as Kimi-K2-Thinking)."),
    seed: int = opt(0, "--seed", help="Random seed; same seed, same bytes."),
    shards: int = opt(2, "--shards", help="Number of safetensors shards."),
    header_only: bool = opt(False, "--header-only", help="Real headers and file sizes, no data (sparse files): a "
                            "stand-in for a huge model in `ktq cpu --dry-run`."),
) -> None:
    """Write a small random checkpoint of a real model's layout.

    For demos, tests and benchmarks: the same seed gives the same bytes; nothing is downloaded."""
    from ktq.sample import write_sample

    write_sample(out, arch=arch, layers=layers, experts=experts, hidden=hidden, moe_intermediate=moe_intermediate,
                 dense_layers=dense_layers, dtype=dtype, seed=seed, shards=shards, header_only=header_only)
    typer.echo(f"wrote {'header-only ' if header_only else ''}sample {arch} checkpoint to {out}")
