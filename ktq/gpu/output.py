"""The GPU checkpoint's folder (--output_dir) while a streaming `ktq gpu` run writes it, by the rule every output
folder follows (ktq.output_folder): one shard per decoder layer (and one for everything outside the decoder layers),
each written under `.NAME.partial`, size-checked, fsynced, renamed and recorded in `ktq_gpu.json` with its size and
digest; once every shard is in, the index, the placement file, the source's side files and, last of the checkpoint,
config.json; then the report, and `ktq_gpu.json` says complete.

An unfinished output holds no config.json, so no loader takes it for a checkpoint. A re-run with the same command
and inputs (the run's fingerprint: source, options, calibration tokens, device kind, world size) keeps every
recorded shard whose size still matches and continues with the next one; a complete one is left as it is. Shard
names are fixed by the model's depth, so resumed and uninterrupted runs write the same names and bytes.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

from ktq import __version__
from ktq.atomic import PARTIAL_SUFFIX, fsync_dir, write_json_atomic, write_text_atomic
from ktq.cpu.output import PLACEMENT_FILE
from ktq.errors import KtqError, write_error
from ktq.gpu.report import LOG_FILE, REPORT_FILE
from ktq.gpu.report import MANIFEST_FILE as MANIFEST
from ktq.gpu.source import SAFETENSORS_DTYPES, read_tensor
from ktq.hfformat import INDEX_NAME
from ktq.output_folder import (
    continuing,
    delete,
    first_manifest_partial,
    holds_output,
    partials,
    refuse_other_settings,
    starting_over,
    writing_into,
)
from ktq.safetensors_io import ShardWriter, TensorReader, read_header

FORMAT = "ktq-gpu/2"
# older versions wrote a staging folder beside --output_dir and renamed it into place once complete: an output of
# theirs at --output_dir is complete
STAGED_FORMAT = "ktq-gpu-stream/1"
CONFIG = "config.json"
# files of a source checkpoint that the quantised one replaces rather than copies
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_REPLACED = {CONFIG, INDEX_NAME, "pytorch_model.bin.index.json", "recipe.yaml"}


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


def _plain_name(name: object) -> bool:
    """A file name a manifest may name: inside the folder, nothing above or below it."""
    return isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name


def _load(folder: Path) -> dict:
    path = folder / MANIFEST
    try:
        found = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise KtqError(f"{path} is damaged ({exc}); delete {folder} and run again") from exc
    if not isinstance(found, dict) or not isinstance(found.get("units"), dict):
        raise KtqError(f"{path} is not a ktq gpu manifest; delete {folder} and run again")
    return found


def _mismatch(found: dict, fingerprint: dict) -> str | None:
    """The settings that differ, readably, or None."""
    if found.get("format") not in (FORMAT, STAGED_FORMAT):
        return f"format {found.get('format')!r} -> {FORMAT!r}"
    old = found.get("run") if isinstance(found.get("run"), dict) else {}
    diffs = [f"{key} {str(old.get(key))[:40]} -> {str(fingerprint.get(key))[:40]}"
             for key in fingerprint | old if old.get(key) != fingerprint.get(key)]
    return ", ".join(diffs) or None


def _written(folder: Path, found: dict) -> list[Path]:
    """Everything in folder that the run of manifest `found` wrote, or would have (ktq_gpu.json itself aside)."""
    records = [r for r in found["units"].values() if isinstance(r, dict)]
    side = found.get("side_files") if isinstance(found.get("side_files"), list) else []
    names = {r.get("file") for r in records} | set(side) | {INDEX_NAME, CONFIG, PLACEMENT_FILE, REPORT_FILE, LOG_FILE}
    return [folder / name for name in sorted(n for n in names if _plain_name(n)) if (folder / name).exists()] \
        + partials(folder)


class GpuOutput:
    """Planned when made, from what the folder holds (nothing written: a refusal leaves it as it was); written
    inside `with` (rank 0 of a distributed run only), which holds the folder's lock."""

    def __init__(self, folder: Path, fingerprint: dict, units: int, overwrite: bool) -> None:
        self.folder, self.fingerprint, self.units = folder, fingerprint, units
        self.created = self.restarted = self.complete = False
        self._remove: list[Path] = []
        kept: dict[str, dict] = {}
        if not holds_output(folder, "--output_dir", MANIFEST, "--overwrite", overwrite):
            self.created = not folder.exists()
            self._remove = [p for p in [folder / first_manifest_partial(MANIFEST)] if p.exists()]
        else:
            found = _load(folder)
            mismatch = _mismatch(found, fingerprint)
            if mismatch:
                if not overwrite:
                    refuse_other_settings(folder, "--output_dir", mismatch, "--overwrite")
                self._remove, self.restarted = _written(folder, found), True
            else:
                kept = {unit: record for unit, record in found["units"].items() if self._intact(unit, record)}
                self._remove = partials(folder)
                finished = found.get("complete") is True or found.get("format") == STAGED_FORMAT
                self.complete = (finished and len(kept) == units and not self._remove
                                 and all((folder / name).is_file() for name in (INDEX_NAME, CONFIG, REPORT_FILE)))
        self.manifest = {"format": FORMAT, "ktq_version": __version__, "run": fingerprint, "complete": self.complete,
                         "units": kept, "side_files": []}
        self._stack = ExitStack()

    def start_note(self) -> str | None:
        """What the run says first about this folder: started over, or continued."""
        if self.restarted:
            return starting_over(self.folder, len(self._remove), "--overwrite")
        kept = sum(unit != "rest" for unit in self.manifest["units"])
        return continuing(self.folder, kept, self.units - 1 - kept) if kept else None

    def _intact(self, unit: str, record: object) -> bool:
        """A recorded shard is kept when it is where this run would write it, with the recorded size."""
        if not (isinstance(record, dict) and (unit == "rest" or unit.isdigit()) and isinstance(record.get("bytes"), int)
                and record.get("file") == self.shard_name(unit)):
            return False
        path = self.folder / record["file"]
        return path.is_file() and not path.is_symlink() and path.stat().st_size == record["bytes"]

    def __enter__(self) -> "GpuOutput":
        self._stack.enter_context(writing_into(self.folder, self.created, lambda: not self.manifest["units"]))
        delete(self._remove)
        delete([self.folder / CONFIG])  # an unfinished output is no checkpoint to any loader
        self._save()  # until here a killed run leaves the old manifest in charge
        return self

    def __exit__(self, *exc: object) -> bool:
        return self._stack.__exit__(*exc)

    def _save(self) -> None:
        units = dict(sorted(self.manifest["units"].items(),
                            key=lambda kv: (kv[0] == "rest", int(kv[0]) if kv[0] != "rest" else 0)))
        write_json_atomic(self.folder / MANIFEST, {**self.manifest, "units": units})

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
        self._save()

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

    def write_text(self, name: str, text: str) -> None:
        write_text_atomic(self.folder / name, text)

    def copy_side_files(self, source: Path) -> None:
        """Tokenizer, chat template, processor and remote-code files, byte for byte: what the checkpoint needs
        besides the weights and config. Recorded in the manifest before they are copied, so that --overwrite
        removes them."""
        names = [path.name for path in sorted(source.iterdir())
                 if path.is_file() and not path.name.endswith(_WEIGHT_SUFFIXES) and path.name not in _REPLACED
                 and path.name not in (MANIFEST, REPORT_FILE, LOG_FILE, PLACEMENT_FILE)]
        self.manifest["side_files"] = names
        self._save()
        for name in names:
            tmp = self.folder / f".{name}{PARTIAL_SUFFIX}"
            try:
                shutil.copyfile(source / name, tmp)
                os.replace(tmp, self.folder / name)
            except OSError as exc:
                raise write_error(self.folder / name, exc) from exc

    def mark_complete(self) -> None:
        """The last write of a run: every file is in."""
        self.manifest["complete"] = self.complete = True
        self._save()
