"""The placement file sglang-kt reads with `--kt-expert-placement-strategy frequency --init-expert-location FILE`:
the routed calibration tokens of every expert, written beside both artifacts of a calibrated run."""

from __future__ import annotations

from pathlib import Path

import torch

from ktq.atomic import PARTIAL_SUFFIX


def placement(counts: dict[int, list[int]], num_hidden_layers: int, experts: int) -> dict[str, torch.Tensor]:
    """sglang-kt's --init-expert-location contents: logical_count [1, num_hidden_layers, experts], the routed
    calibration tokens of every expert, every decoder layer on the layer axis (dense ones zero)."""
    table = torch.zeros((1, num_hidden_layers, experts), dtype=torch.int64)
    for layer, routed in counts.items():
        table[0, layer] = torch.tensor(routed, dtype=torch.int64)
    return {"logical_count": table}


def write_placement(path: Path, counts: dict[int, list[int]], num_hidden_layers: int, experts: int) -> None:
    tmp = path.with_name(f".{path.name}{PARTIAL_SUFFIX}")
    torch.save(placement(counts, num_hidden_layers, experts), tmp)
    tmp.replace(path)
