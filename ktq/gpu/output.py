"""The staging folder of a streaming `ktq gpu` run: one shard per decoder layer (and one for everything outside the
decoder layers), each committed atomically and recorded in `ktq_gpu.json` with its size and digest.

A shard is written under `.NAME.partial`, size-checked, fsynced and renamed; the manifest is rewritten atomically
after it. A re-run with the same command and inputs (the run's fingerprint: source, options, calibration tokens,
device kind, world size) keeps every recorded shard whose size still matches and continues with the next one; any
other staging folder is cleared first. Shard names are fixed by the model's depth, so resumed and uninterrupted runs
write the same names and bytes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from ktq.atomic import PARTIAL_SUFFIX, fsync_dir, write_json_atomic
from ktq.errors import KtqError, write_error
from ktq.gpu.source import SAFETENSORS_DTYPES, read_tensor
from ktq.hfformat import INDEX_NAME
from ktq.safetensors_io import ShardWriter, TensorReader, read_header

MANIFEST = "ktq_gpu.json"
FORMAT = "ktq-gpu-stream/1"
# files of a source checkpoint that the quantised one replaces rather than copies
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_REPLACED = {"config.json", INDEX_NAME, "pytorch_model.bin.index.json", "recipe.yaml"}


def tensor_entry(name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> tuple[str, str, tuple[int, ...], int]:
    numel = 1
    for d in shape:
        numel *= d
    return name, SAFETENSORS_DTYPES[dtype], tuple(shape), numel * torch.empty((), dtype=dtype).element_size()


def _as_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().contiguous().cpu()
    if tensor.dtype in (torch.bfloat16, torch.float16):
        return tensor.view(torch.int16).numpy()
    if tensor.dtype.is_floating_point and tensor.element_size() == 1:
        return tensor.view(torch.uint8).numpy()
    return tensor.numpy()


class StreamOutput:
    def __init__(self, folder: Path, fingerprint: dict, units: int, writable: bool = True) -> None:
        """writable: this process writes (rank 0); other ranks only read what rank 0 kept."""
        self.folder, self.fingerprint, self.units, self.writable = folder, fingerprint, units, writable
        self.manifest = self._resume()

    def _resume(self) -> dict:
        path = self.folder / MANIFEST
        if path.is_file():
            try:
                found = json.loads(path.read_text())
            except (OSError, ValueError):
                found = None
            if isinstance(found, dict) and found.get("format") == FORMAT and found.get("run") == self.fingerprint:
                kept = {unit: record for unit, record in found.get("units", {}).items()
                        if (self.folder / record["file"]).is_file()
                        and (self.folder / record["file"]).stat().st_size == record["bytes"]}
                for stale in self.folder.iterdir() if self.writable else ():
                    if stale.name.endswith(PARTIAL_SUFFIX):
                        stale.unlink()
                return {"format": FORMAT, "run": self.fingerprint, "units": kept}
        if not self.writable:
            return {"format": FORMAT, "run": self.fingerprint, "units": {}}
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)
        return {"format": FORMAT, "run": self.fingerprint, "units": {}}

    def shard_name(self, unit: int | str) -> str:
        number = self.units if unit == "rest" else int(unit) + 1
        return f"model-{number:05d}-of-{self.units:05d}.safetensors"

    def done(self, unit: int | str) -> dict | None:
        return self.manifest["units"].get(str(unit))

    def write_unit(self, unit: int | str, entries: list, tensors: list, extra: dict) -> None:
        """Write one shard: `tensors` are (name, callable returning the tensor) in the order of `entries`."""
        name = self.shard_name(unit)
        final = self.folder / name
        partial = self.folder / f".{name}{PARTIAL_SUFFIX}"
        writer = ShardWriter(partial, entries, {"format": "pt"})
        try:
            for tensor_name, make in tensors:
                writer.write(tensor_name, _as_numpy(make()))
            digest = writer.finish()
            os.replace(partial, final)
            fsync_dir(self.folder)
        except OSError as exc:
            writer.abort()
            raise write_error(partial, exc) from exc
        except BaseException:
            writer.abort()
            raise
        self.manifest["units"][str(unit)] = {"file": name, "bytes": final.stat().st_size, "xxh3_128": digest,
                                             **extra}
        units = dict(sorted(self.manifest["units"].items(), key=lambda kv: (kv[0] == "rest", int(kv[0])
                                                                           if kv[0] != "rest" else 0)))
        write_json_atomic(self.folder / MANIFEST, {**self.manifest, "units": units})

    def read_unit(self, unit: int | str) -> dict[str, torch.Tensor]:
        """Every tensor of a committed shard, on the CPU."""
        path = self.folder / self.shard_name(unit)
        infos, _ = read_header(path)
        with TensorReader() as reader:
            return {name: read_tensor(reader, info) for name, info in infos.items()}

    def weight_map(self) -> dict[str, str]:
        mapping = {}
        for record in self.manifest["units"].values():
            for tensor in read_header(self.folder / record["file"])[0]:
                mapping[tensor] = record["file"]
        return dict(sorted(mapping.items()))

    def total_size(self) -> int:
        total = 0
        for record in self.manifest["units"].values():
            total += sum(info.nbytes for info in read_header(self.folder / record["file"])[0].values())
        return total

    def check_complete(self) -> None:
        missing = [u for u in [*map(str, range(self.units - 1)), "rest"] if u not in self.manifest["units"]]
        if missing:
            raise KtqError(f"{self.folder}: shards of units {', '.join(missing[:5])} were never written")


def staging_path(output_dir: Path) -> Path:
    """Where a run writes until its output is complete: a hidden folder beside --output_dir."""
    output_dir = output_dir.expanduser()
    return output_dir.parent / f".{output_dir.name}.ktq-partial"


def commit(staging: Path, output_dir: Path) -> None:
    """Put the finished folder in place; an older output (with --overwrite) is removed only after that."""
    output_dir = output_dir.expanduser()
    old = None
    if output_dir.exists():
        old = output_dir.parent / f".{output_dir.name}.ktq-old"
        if old.exists():
            shutil.rmtree(old)
        output_dir.rename(old)
    staging.rename(output_dir)
    if old is not None:
        shutil.rmtree(old)


def copy_side_files(source: Path, staging: Path) -> None:
    """Tokenizer, chat template, processor and remote-code files, byte for byte: what the checkpoint needs
    besides the weights and config that save_pretrained wrote."""
    for path in sorted(source.iterdir()):
        if (path.is_file() and not path.name.endswith(_WEIGHT_SUFFIXES) and path.name not in _REPLACED
                and not (staging / path.name).exists()):
            shutil.copy2(path, staging / path.name)
