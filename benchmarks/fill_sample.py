"""A large sample checkpoint at GPU speed (DeepSeek-V3 geometry, FP8 or BF16), for benchmarks/gpu_bench.py --fill.

`ktq sample` draws and encodes every value on the CPU (minutes per GB for FP8); this takes the key layout, shapes
and config of a `ktq sample --header-only` folder and writes the same tensors with data drawn by torch on the GPU:
block-scaled FP8 weights that decode to N(0, 0.02) (codes of N(0, 64), scale_inv 0.02 / 64), norms of ones, biases
of zeros, everything else N(0, 0.02) in its stored dtype. The MTP layers (index >= num_hidden_layers) are left
out, and the config says so: decoded to BF16 in the output they would not fit the device's disk beside the rest.

    python benchmarks/fill_sample.py HEADER_ONLY_FOLDER OUT
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from ktq.safetensors_io import read_header

DTYPES = {"BF16": torch.bfloat16, "F32": torch.float32, "F8_E4M3": torch.float8_e4m3fn}
FP8_SPREAD = 64.0


def tensor(name: str, dtype: str, shape: tuple[int, ...], device: str) -> torch.Tensor:
    if name.endswith("weight_scale_inv"):
        return torch.full(shape, 0.02 / FP8_SPREAD, dtype=DTYPES[dtype], device=device)
    if "norm" in name:
        return torch.ones(shape, dtype=DTYPES[dtype], device=device)
    if "bias" in name:
        return torch.zeros(shape, dtype=DTYPES[dtype], device=device)
    if dtype == "F8_E4M3":
        return (torch.randn(shape, device=device) * FP8_SPREAD).clamp(-448, 448).to(torch.float8_e4m3fn)
    return (torch.randn(shape, device=device) * 0.02).to(DTYPES[dtype])


def main() -> None:
    source, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True)
    config = json.loads((source / "config.json").read_text())
    layers = config["num_hidden_layers"]
    config["num_nextn_predict_layers"] = 0
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for path in source.iterdir():
        if not path.name.endswith(".safetensors") and path.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(path, out / path.name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator_seed = 0
    weight_map = {}
    for shard in sorted(source.glob("*.safetensors")):
        infos, _ = read_header(shard)
        kept = {name: info for name, info in infos.items()
                if not (m := re.search(r"layers\.(\d+)\.", name)) or int(m.group(1)) < layers}
        if not kept:
            continue
        torch.manual_seed(generator_seed)
        generator_seed += 1
        data = {name: tensor(name, info.dtype, info.shape, device).cpu() for name, info in kept.items()}
        save_file(data, out / shard.name, metadata={"format": "pt"})
        weight_map |= {name: shard.name for name in kept}
        print(f"{shard.name}: {len(kept)} tensors", flush=True)
    total = sum((out / f).stat().st_size for f in set(weight_map.values()))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}, indent=2))


if __name__ == "__main__":
    main()
