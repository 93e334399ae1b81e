"""A Hugging Face checkpoint folder seen through its config.json and safetensors headers (its tensor data is read
elsewhere, one tensor at a time)."""

from __future__ import annotations

import gc
import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ktq import hfformat
from ktq.errors import KtqError
from ktq.safetensors_io import TensorInfo, read_header

FINGERPRINT_SAMPLE = 4096  # bytes read in the middle and at the end of every shard for the fingerprint


@dataclass
class Checkpoint:
    path: Path
    config: dict  # the full config.json
    text_config: dict  # the language model's config (hfformat.text_config: VL models nest it)
    files: list[Path]
    tensors: dict[str, TensorInfo]

    def fingerprint(self) -> str:
        """Identifies the input by its shard names, sizes, headers and a sample of bytes: cheap (two small reads
        per shard), and changes with any re-export or other weights of the same shapes."""
        digest = hashlib.sha256()
        for path in self.files:
            size = path.stat().st_size
            digest.update(f"{path.name}:{size}\n".encode())
            try:
                with open(path, "rb") as f:
                    for offset in (size // 2, max(0, size - FINGERPRINT_SAMPLE)):  # tensor data, not the header
                        f.seek(offset)
                        digest.update(f.read(FINGERPRINT_SAMPLE))
            except OSError as exc:
                raise KtqError(f"cannot read {path}: {exc.strerror or exc}") from exc
        for name in sorted(self.tensors):
            info = self.tensors[name]
            digest.update(f"{name}:{info.path.name}:{info.dtype}:{info.shape}:{info.offset}\n".encode())
        return digest.hexdigest()[:32]

    @property
    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)


def load_config(path: Path) -> dict:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise KtqError(f"no config.json in {path}: point --input-path at the model folder (the one holding "
                       "config.json and the *.safetensors shards)")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KtqError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise KtqError(f"{config_path} does not hold a JSON object")
    return config


def shard_files(path: Path) -> list[Path]:
    """The shards the index lists (each must exist), else every *.safetensors file of the folder."""
    index = path / hfformat.INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise KtqError(f"{index} is not a valid safetensors index (no weight_map)") from exc
        files = [path / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise KtqError(f"shard {file.name} is listed in {hfformat.INDEX_NAME} but missing from {path}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise KtqError(f"no *.safetensors files in {path}")
    return files


@contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused while a checkpoint's description is built and used (a decorator
    too).

    At DeepSeek-V3 scale that description is hundreds of thousands of small objects (92k tensors, 44k expert
    projections), none of them garbage, and the collector would walk all of them again and again as they pile up
    and while they live: half the time of building them, and 0.5 s of a dry run after that (measured)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@collector_paused()
def open_checkpoint(path: Path) -> Checkpoint:
    if not path.is_dir():
        raise KtqError(f"input path {path} is not a folder")
    config = load_config(path)
    files = shard_files(path)
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        found, _ = read_header(file)
        tensors.update(found)
    return Checkpoint(path, config, hfformat.text_config(config), files, tensors)
