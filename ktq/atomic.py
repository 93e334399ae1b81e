"""Atomic writes, as every ktq pipeline makes them: a file is written under a temporary name, flushed to the disk
and renamed into place, and the rename is made durable by syncing its folder. A crash at any instant leaves the old
file or the new one, and at most a temporary that the next run removes."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ktq.errors import write_error

PARTIAL_SUFFIX = ".partial"  # every file or folder ktq writes is first written under its name + this suffix


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
    write_text_atomic(path, json_text(data))


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}{PARTIAL_SUFFIX}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(path, exc) from exc
