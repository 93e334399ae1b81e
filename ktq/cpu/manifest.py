"""ktq.json: what an output folder holds, rewritten atomically after every committed layer.

It records what kt-kernel cannot tell from the files (the NUMA count the output must be served with, the method,
the source it came from) and each committed layer's file or folder with its size and digest (ktq.digest), so an
interrupted run resumes after its last committed layer and `ktq inspect --verify` can re-hash everything. Its name
must not end in .safetensors: that would switch kt-kernel's loader mode.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ktq import __version__
from ktq.errors import KtqError, write_error
from ktq.cpu.layout import Layout

MANIFEST_NAME = "ktq.json"
FORMAT = "ktq-cpu/1"
PARTIAL_SUFFIX = ".partial"  # every file or folder ktq writes is first written under its name + this suffix

# Fields that must agree for a run to continue an existing output: anything that changes a single output byte.
IDENTITY_FIELDS = ("format", "form", "method", "numa", "hidden", "intermediate", "experts", "moe_layers",
                   "input_type", "input_fingerprint")


def identity(layout: Layout, input_type: str, input_fingerprint: str) -> dict:
    return {"format": FORMAT, "form": layout.form, "method": layout.method.name,
            "kt_method": layout.method.kt_method, "numa": layout.numa, "hidden": layout.hidden,
            "intermediate": layout.intermediate, "experts": layout.experts, "input_type": input_type,
            "input_fingerprint": input_fingerprint, "moe_layers": list(layout.layers)}


def new_manifest(ident: dict, layers: dict[str, dict] | None = None) -> dict:
    return {**ident, "ktq_version": __version__, "complete": False, "layers": dict(layers or {})}


def fsync_dir(path: Path) -> None:
    """Make a rename inside path durable (a crash after it can no longer bring the old name back)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def json_text(data: object) -> str:
    """How ktq writes every JSON file (so its size can be known before writing)."""
    return json.dumps(data, indent=2) + "\n"


def write_json_atomic(path: Path, data: object) -> None:
    tmp = path.with_name(f".{path.name}{PARTIAL_SUFFIX}")
    try:
        with open(tmp, "w") as f:
            f.write(json_text(data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(path, exc) from exc


def load_manifest(out: Path) -> dict | None:
    path = out / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KtqError(f"{path} is damaged ({exc}); delete the output folder and convert again") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("layers"), dict):
        raise KtqError(f"{path} is not a ktq manifest of format {FORMAT}")
    return data


def save_manifest(out: Path, manifest: dict) -> None:
    """Layers are stored in layer order, whatever order they were committed in, so that resumed and
    uninterrupted runs write the same bytes."""
    layers = dict(sorted(manifest["layers"].items(), key=lambda item: int(item[0])))
    write_json_atomic(out / MANIFEST_NAME, {**manifest, "layers": layers})


def identity_mismatch(existing: dict, wanted: dict) -> str | None:
    """A readable list of the identity fields that differ, or None."""
    def show(value: object) -> str:
        text = repr(value)
        return text if len(text) <= 40 else text[:37] + "..."

    diffs = [f"{key} {show(existing.get(key))} -> {show(wanted.get(key))}"
             for key in IDENTITY_FIELDS if existing.get(key) != wanted.get(key)]
    return ", ".join(diffs) or None
