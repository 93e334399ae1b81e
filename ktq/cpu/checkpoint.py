"""A Hugging Face checkpoint folder seen through its config.json and safetensors headers (its tensor data is read
elsewhere, one tensor at a time)."""

from __future__ import annotations

import gc
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ktq import hfformat
from ktq.errors import KtqError
from ktq.safetensors_io import TensorInfo, open_regular, read_header, read_regular

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
            fd = open_regular(path)
            try:
                size = os.fstat(fd).st_size
                digest.update(f"{path.name}:{size}\n".encode())
                for offset in (size // 2, max(0, size - FINGERPRINT_SAMPLE)):  # tensor data, not the header
                    digest.update(os.pread(fd, FINGERPRINT_SAMPLE, offset))
            except OSError as exc:
                raise KtqError(f"cannot read {path}: {exc.strerror or exc}") from exc
            finally:
                os.close(fd)
        for name in sorted(self.tensors):
            info = self.tensors[name]
            digest.update(f"{name}:{info.path.name}:{info.dtype}:{info.shape}:{info.offset}\n".encode())
        return digest.hexdigest()[:32]

    @property
    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)


def load_config(path: Path) -> dict:
    config_path = path / "config.json"
    if not os.path.lexists(config_path):
        raise KtqError(f"no config.json in {path}: point --input-path at the model folder (the one holding "
                       "config.json and the *.safetensors shards)")
    try:
        config = json.loads(read_regular(config_path))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KtqError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise KtqError(f"{config_path} does not hold a JSON object")
    return config


def _weight_map(path: Path) -> dict[str, str] | None:
    """The index's tensor -> shard map, or None when the folder has no index."""
    index = path / hfformat.INDEX_NAME
    if not os.path.lexists(index):
        return None
    try:
        weight_map = json.loads(read_regular(index))["weight_map"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise KtqError(f"{index} is not a valid safetensors index (no weight_map)") from exc
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise KtqError(f"{index}: weight_map must map tensor names to shard file names")
    return weight_map


def _listed_shard(path: Path, name: str) -> Path:
    """The file of a shard the index names. The name must stay inside the folder once resolved (`../x`, an absolute
    path or a linked folder that leads elsewhere would make ktq read files the user never pointed it at), but the
    file itself may be a symlink to anywhere: Hugging Face caches link every shard to a blob."""
    file = path / name
    root, parent = Path(os.path.realpath(path)), Path(os.path.realpath(file.parent))  # resolve() raises on a loop
    if parent != root and root not in parent.parents:
        raise KtqError(f"{path / hfformat.INDEX_NAME} lists shard {name!r}, which is outside {path}: shards must "
                       "be files of the checkpoint folder")
    if not os.path.lexists(file):  # a link that leads nowhere, or anything but a file, fails when its header is read
        raise KtqError(f"shard {name} is listed in {hfformat.INDEX_NAME} but missing from {path}")
    return file


def _tensors(path: Path, weight_map: dict[str, str] | None) -> tuple[list[Path], dict[str, TensorInfo]]:
    """Every shard and its tensors: the index, when there is one, names the shard of every tensor and each shard
    must hold exactly the tensors it is given there; without one, every *.safetensors file. A tensor in two shards
    is refused either way: which copy a loader takes is arbitrary."""
    if weight_map is None:
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise KtqError(f"no *.safetensors files in {path}")
        listed: dict[Path, set[str]] = {}
    else:
        shard_files = {name: _listed_shard(path, name) for name in set(weight_map.values())}
        listed = {file: set() for file in shard_files.values()}  # by file: two spellings of a name are one shard
        for tensor, shard in weight_map.items():
            listed[shard_files[shard]].add(tensor)
        files = sorted(listed)
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        found, _ = read_header(file)
        twice = found.keys() & tensors.keys()
        if twice:
            name = min(twice)
            raise KtqError(f"tensor {name} is in two shards, {tensors[name].path.name} and {file.name}: a checkpoint "
                           "holds each tensor once; re-download or re-export it")
        if weight_map is not None and found.keys() != listed[file]:
            unlisted = found.keys() - listed[file]
            disagreement = (f"{file.name} holds tensor {min(unlisted)}, which {hfformat.INDEX_NAME} places elsewhere "
                            "or not at all" if unlisted else f"{hfformat.INDEX_NAME} places tensor "
                            f"{min(listed[file] - found.keys())} in {file.name}, which does not hold it")
            raise KtqError(f"{disagreement}: the index and the shards disagree; re-download the checkpoint")
        tensors.update(found)
    return files, tensors


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
    files, tensors = _tensors(path, _weight_map(path))
    return Checkpoint(path, config, hfformat.checked_text_config(config), files, tensors)
