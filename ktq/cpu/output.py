"""The life of a ktq cpu output folder: start it, continue it, leave it when complete, start it over (--force),
check the disk, finish it; by the rule every output folder follows (ktq.output_folder).

A folder is a ktq cpu output when it holds ktq.json. A run continues one made with the same settings, keeping every
committed layer whose files are intact; one that is complete is left as it is. `plan_output` decides without
writing, so that a refusal (other settings, too little disk) leaves the folder as it was; `OutputPlan.writing` then
acts, under the folder's lock until the output is complete.

An unfinished merged output holds no *.safetensors at its top level, where kt-kernel would load (and serve) them:
committed shards wait under their pending names (`model-…safetensors.pending`) and `finish_output` gives them their
names once the last layer is in, just before ktq.json says complete. A run that continues an output first moves any
shard under its name back to its pending one.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from ktq import __version__, hfformat
from ktq.atomic import PARTIAL_SUFFIX, fsync_dir, json_text, write_json_atomic
from ktq.cpu.layout import Layout
from ktq.cpu.manifest import MANIFEST_NAME, LayerRecord, Manifest, identity_mismatch, load_manifest, save_manifest
from ktq.cpu.sinks import merged_pending_path
from ktq.errors import KtqError, write_error
from ktq.output_folder import (
    delete,
    first_manifest_partial,
    holds_output,
    partials,
    refuse_other_settings,
    used_bytes,
    writing_into,
)
from ktq.progress import gb
from ktq.safetensors_io import open_regular
from ktq.serving import PLACEMENT_FILE

# Files of the source folder that serving needs beside the weights (merged form only, as the reference tool).
AUX_PATTERNS = ("config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
                "added_tokens.json", "vocab.*", "merges.txt", "*.tiktoken", "chat_template*")
METADATA_RESERVE = 1 << 20  # room for ktq.json (a few hundred bytes per layer)


@dataclass
class OutputPlan:
    out: Path
    manifest: Manifest  # what the run starts from: the identity and the layers kept
    remove: list[Path] = field(default_factory=list)  # ktq's own files to delete first
    created: bool = False  # the folder does not exist yet
    restarted: bool = False  # --force starts over an output made with other settings
    complete: bool = False  # a complete output of these settings: nothing to write

    def freed_bytes(self) -> int:
        return sum(used_bytes(path) for path in self.remove)

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Create and lock the folder, delete what is to be deleted, write the starting manifest; then the caller
        writes. If it fails before a layer is committed into a folder this run created, the folder goes: nothing of
        value was written, leave no trace."""
        with writing_into(self.out, self.created, lambda: not self.manifest.layers):
            delete(self.remove)
            save_manifest(self.out, self.manifest)  # until here a killed run leaves the old one in charge
            _unpublish(self.out, self.manifest)
            yield


def committed_path(out: Path, layout: Layout, layer: int) -> Path:
    """The file or folder of a committed layer: a merged shard under its name once published (or while
    finish_output publishes the shards, one rename each), else under its pending name."""
    final = out / layout.layer_path(layer)
    if layout.form == "merged" and not os.path.lexists(final):
        return merged_pending_path(out, layout, layer)
    return final


def _renamed(moves: list[tuple[Path, Path]], out: Path) -> None:
    """Each (path, new path) renamed, then made durable."""
    try:
        for path, new in moves:
            os.replace(path, new)
        if moves:
            fsync_dir(out)
    except OSError as exc:
        raise write_error(exc.filename, exc) from exc


def _unpublish(out: Path, manifest: Manifest) -> None:
    """A merged output being written holds no shard under its name: each goes back to its pending name (where the
    shard of a layer converted again is replaced when that layer is committed)."""
    layout = manifest.layout
    if layout.form == "merged":
        _renamed([(out / layout.layer_path(layer), merged_pending_path(out, layout, layer))
                  for layer in layout.layers if os.path.lexists(out / layout.layer_path(layer))], out)


def _publish(out: Path, manifest: Manifest) -> None:
    """Every committed shard of a merged output under its name: the output is complete."""
    layout = manifest.layout
    _renamed([(merged_pending_path(out, layout, layer), out / layout.layer_path(layer))
              for layer in layout.layers if os.path.lexists(merged_pending_path(out, layout, layer))], out)


def ktq_files(out: Path, manifest: Manifest) -> list[Path]:
    """Everything in out that ktq wrote for this manifest, or would have: layers, index, copied files,
    temporaries. ktq.json itself is not listed."""
    layout = manifest.layout  # its layer paths are those of every record too
    names = {layout.layer_path(layer) for layer in layout.layers} | {hfformat.INDEX_NAME, PLACEMENT_FILE}
    if layout.form == "merged":
        names |= {merged_pending_path(out, layout, layer).name for layer in layout.layers}
    found = [out / name for name in sorted(names) if (out / name).exists()]
    found += sorted(p for pattern in AUX_PATTERNS for p in out.glob(pattern) if p.is_file())
    found += partials(out)
    return list(dict.fromkeys(found))


def layer_intact(out: Path, layout: Layout, layer: int, record: LayerRecord) -> bool:
    """A committed layer is kept when its file or folder is where the layout puts it with exactly the layout's
    sizes (and, merged, the layout's header). Content is re-hashed by `ktq inspect --verify`, not here: files are
    flushed to the disk before they are renamed, so a crash cannot leave a renamed file with the wrong bytes."""
    if record.path != layout.layer_path(layer) or record.bytes != layout.layer_bytes(layer):
        return False
    path = committed_path(out, layout, layer)
    if layout.form == "merged":
        header = layout.shard_header(layer)
        try:
            fd = open_regular(path)
        except KtqError:  # missing, or not a file: converted again
            return False
        try:
            return os.pread(fd, len(header), 0) == header and os.fstat(fd).st_size == record.bytes
        except OSError:
            return False
        finally:
            os.close(fd)
    for relpath, size in layout.kt_files(layer):
        file = path / relpath
        if not file.is_file() or file.stat().st_size != size:
            return False
    files = [f for f in path.rglob("*") if f.is_file()]
    return len(files) == layout.experts * len(layout.pieces) * 2


def plan_output(out: Path, wanted: Manifest, force: bool, option: str = "--output",
                force_option: str = "--force") -> OutputPlan:
    """What to do with the output folder for a run of wanted's identity; raises KtqError to refuse. Writes
    nothing. option, force_option: how the command names the folder and its start-over flag."""
    if not holds_output(out, option, MANIFEST_NAME, force_option, force):
        first_manifest = out / first_manifest_partial(MANIFEST_NAME)
        return OutputPlan(out, wanted.fresh(), remove=[first_manifest] if first_manifest.exists() else [],
                          created=not out.exists())
    existing = load_manifest(out)
    mismatch = identity_mismatch(existing, wanted)
    if mismatch:
        if not force:
            refuse_other_settings(out, option, mismatch, force_option)
        return OutputPlan(out, wanted.fresh(), remove=ktq_files(out, existing), restarted=True)
    layout = wanted.layout
    kept = {layer: record for layer, record in existing.layers.items()
            if layer in layout.layers and layer_intact(out, layout, layer, record)}
    leftovers = partials(out)
    complete = existing.complete and len(kept) == len(layout.layers) and not leftovers and all(
        (out / name).is_file() for name in finished_files(existing))
    return OutputPlan(out, wanted.fresh(kept), remove=leftovers, complete=complete)


def finished_files(manifest: Manifest) -> list[str]:
    """What a complete output holds besides its layers and ktq.json: the merged form's index, a calibrated
    output's placement file."""
    return ([hfformat.INDEX_NAME] if manifest.layout.form == "merged" else []) + \
        ([PLACEMENT_FILE] if manifest.calibration is not None else [])


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def aux_files(source: Path | None) -> list[Path]:
    if source is None:
        return []
    found = {p for pattern in AUX_PATTERNS for p in source.glob(pattern)
             if p.is_file() and not p.name.endswith(".safetensors")}
    return sorted(found)


def check_disk(out: Path, needed: int, freed: int, force: bool, note) -> None:
    """Refuse to start when the output will not fit (--force proceeds anyway, after a warning)."""
    free = shutil.disk_usage(_existing_parent(out)).free + freed
    if needed <= free:
        return
    message = (f"the output needs {gb(needed)} more on the disk of {out}, which has {gb(free)} free")
    if not force:
        raise KtqError(f"{message}; free some space, choose another --output, or pass --force to start anyway")
    note(f"warning: {message}; starting anyway (--force)")


def extra_files_bytes(layout: Layout, source: Path | None) -> int:
    """Exact bytes of the merged form's index and of the files copied from source (ktq.json aside)."""
    if layout.form != "merged":
        return 0
    return _index_bytes(layout) + sum(path.stat().st_size for path in aux_files(source))


@lru_cache(maxsize=4)
def _index_bytes(layout: Layout) -> int:
    """len(json_text(index_data(layout))) without building the text (89k entries for DeepSeek-V3: 0.2 s).

    json's indent=2 writes the weight map as "{", one line `\n    "name": "shard"` per tensor with a "," between
    lines, then "\n  }", where an empty map is "{}". A layer's lines differ from another layer's only in the layer
    index (every shard name has the same length), so one layer per index width is measured."""
    frame = len(json_text({"metadata": _index_metadata(layout), "weight_map": {}}))
    if not layout.layers:
        return frame
    lines = sum(_index_lines_bytes(layout, len(str(layer))) for layer in layout.layers)
    tensors = len(layout.layers) * len(layout.tensor_entries(layout.layers[0]))
    return frame - len("{}") + len("{") + lines + (tensors - 1) * len(",") + len("\n  }")


@lru_cache(maxsize=16)
def _index_lines_bytes(layout: Layout, digits: int) -> int:
    """The weight map's lines of one layer whose index has `digits` digits."""
    shard = layout.shard_name(layout.layers[0])
    return sum(len(f'\n    "{name}": "{shard}"') for name, *_ in layout.tensor_entries(10 ** (digits - 1)))


def needed_bytes(layout: Layout, layers: list[int], source: Path | None) -> int:
    """Disk space a run still takes: the layers to convert (whole blocks), the index and the copied files when
    merged, and room for ktq.json."""
    return layout.disk_bytes(layers) + extra_files_bytes(layout, source) + METADATA_RESERVE


def index_data(layout: Layout) -> dict:
    """The index (hfformat.INDEX_NAME) of a merged output."""
    weight_map: dict[str, str] = {}
    for layer in layout.layers:
        shard = layout.shard_name(layer)
        for name, *_ in layout.tensor_entries(layer):
            weight_map[name] = shard
    return {"metadata": _index_metadata(layout), "weight_map": weight_map}


def _index_metadata(layout: Layout) -> dict:
    total = len(layout.layers) * layout.experts * layout.expert_bytes()  # the bytes of every tensor
    return {"total_size": total, "ktq_version": __version__, "kt_method": layout.method.kt_method,
            "numa": layout.numa}


def copy_aux_files(source: Path, out: Path) -> None:
    for path in aux_files(source):
        tmp = out / f".{path.name}{PARTIAL_SUFFIX}"
        try:
            shutil.copyfile(path, tmp)
            tmp.replace(out / path.name)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise write_error(out / path.name, exc) from exc


def finish_output(out: Path, manifest: Manifest, source: Path | None) -> None:
    """After the last layer, still under the folder's lock (OutputPlan.writing): the merged form's copied files,
    index and shards under their names, then ktq.json marked complete."""
    if manifest.layout.form == "merged":
        if source is not None:
            copy_aux_files(source, out)
        write_json_atomic(out / hfformat.INDEX_NAME, index_data(manifest.layout))
        _publish(out, manifest)
    manifest.complete = True
    save_manifest(out, manifest)

