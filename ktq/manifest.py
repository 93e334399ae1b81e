"""ktq.json: what an output folder holds, rewritten atomically after every committed layer.

It records what kt-kernel cannot tell from the files (the NUMA count the output must be served with, the method,
the source it came from) and each committed layer's files with sizes and sha256, so an interrupted run resumes
after its last verified layer. Its name must not end in .safetensors: that would switch kt-kernel's loader mode.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ktq.errors import KtqError

MANIFEST_NAME = "ktq.json"
FORMAT = "ktq-cpu/1"

# Fields that must agree for a run to continue an existing output.
IDENTITY_FIELDS = ("format", "form", "method", "numa", "hidden", "intermediate", "experts", "input_fingerprint")


def json_text(data: object) -> str:
    """How ktq writes every JSON file (so its size can be known before writing)."""
    return json.dumps(data, indent=2) + "\n"


def write_json_atomic(path: Path, data: object) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "w") as f:
        f.write(json_text(data))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_manifest(out: Path) -> dict | None:
    path = out / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KtqError(f"{path} is damaged ({exc}); delete the output folder and convert again") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise KtqError(f"{path} is not a ktq manifest of format {FORMAT}")
    return data


def save_manifest(out: Path, manifest: dict) -> None:
    write_json_atomic(out / MANIFEST_NAME, manifest)


def identity_mismatch(existing: dict, wanted: dict) -> str | None:
    """A readable list of the identity fields that differ, or None."""
    diffs = [f"{key} {existing.get(key)!r} -> {wanted.get(key)!r}"
             for key in IDENTITY_FIELDS if existing.get(key) != wanted.get(key)]
    return ", ".join(diffs) or None


def tree_digest(file_digests: dict[str, str]) -> str:
    """The sha256 recorded for a low-memory layer folder: over 'relative/path sha256' lines in path order."""
    lines = "".join(f"{path} {digest}\n" for path, digest in sorted(file_digests.items()))
    return hashlib.sha256(lines.encode()).hexdigest()
