"""The one rule for output folders, followed by every command that writes (ktq cpu and its --calibrate, ktq gpu and
its --cpu-output, ktq merge); each output kind keeps its own manifest and says which files it wrote.

- An output is never an input folder, inside one, or above one (links resolved): writing there would mix the two,
  and starting it over would delete the input. Refused before anything is read.
- A folder is a ktq output when it holds its command's manifest (ktq.json, ktq_gpu.json). ktq writes into a new
  folder, an empty one, or its own output; a folder that holds anything else is refused, --force / --overwrite
  included, and never emptied.
- An output made with the same settings is continued from its last committed layer; a complete one is left as it
  is (the run says so and exits 0 without writing a byte). One made with other settings is refused; --force /
  --overwrite starts it over by deleting the files its manifest names, and nothing else.
- One process at a time writes into a folder; Ctrl-C while it writes ends with one line saying that the same command
  continues.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ktq.atomic import PARTIAL_SUFFIX
from ktq.errors import Interrupted, KtqError, write_error
from ktq.progress import counted


def refuse_overlap(out: Path, out_option: str, source: Path, source_option: str) -> None:
    """`out` must not be `source`, lie inside it or hold it (links resolved)."""
    src, dst = Path(os.path.realpath(source.expanduser())), Path(os.path.realpath(out.expanduser()))
    if dst == src or src in dst.parents:
        raise KtqError(f"{out_option} {out} must not be {source_option} {source} or inside it: choose a folder "
                       "beside it")
    if dst in src.parents:
        raise KtqError(f"{out_option} {out} holds {source_option} {source}: ktq never writes into a folder above "
                       "its input; choose a folder beside it")


def first_manifest_partial(manifest_name: str) -> str:
    """The one file a run leaves before its first manifest exists: that manifest's temporary."""
    return f".{manifest_name}{PARTIAL_SUFFIX}"


def holds_output(out: Path, option: str, manifest_name: str, force_option: str, force: bool) -> bool:
    """Whether out is a ktq output of this kind (it holds manifest_name). Refuses a file, and a folder that holds
    anything but that manifest's temporary: ktq did not write it."""
    if out.exists() and not out.is_dir():
        raise KtqError(f"{option} {out} is a file, not a folder")
    if not out.exists() or (out / manifest_name).exists():
        return out.exists()
    foreign = sorted(p.name for p in out.iterdir() if p.name != first_manifest_partial(manifest_name))
    if foreign:
        listed = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise KtqError(f"{option} {out} already holds files ktq did not write ({listed}); choose a new or empty "
                       f"folder" + (f" ({force_option} only starts over a ktq output)" if force else ""))
    return False


def refuse_other_settings(out: Path, option: str, mismatch: str, force_option: str) -> None:
    raise KtqError(f"{option} {out} holds a ktq output made with other settings ({mismatch}); pass {force_option} "
                   f"to start it over (deletes only the files ktq wrote there) or choose another {option}")


def continuing(out: Path, kept: int, todo: int, done: str = "written") -> str:
    """What a run that continues an output says first."""
    return f"continuing {out}: {counted(kept, 'layer')} already {done}, {todo} to go"


def starting_over(out: Path, removed: int, force_option: str) -> str:
    """What a run that starts an output of other settings over says first."""
    return (f"starting {out} over ({force_option}): deleting the {removed} files and folders ktq wrote there with "
            "other settings")


def partials(out: Path) -> list[Path]:
    """Temporaries a killed run left (every file ktq writes is first written under a name ending in .partial)."""
    return sorted(p for p in out.iterdir() if p.name.endswith(PARTIAL_SUFFIX)) if out.is_dir() else []


def delete(paths: list[Path]) -> None:
    """Remove files and folders ktq wrote (named by a manifest); a folder is removed with what is in it."""
    try:
        for path in paths:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
    except OSError as exc:
        raise write_error(exc.filename, exc) from exc


def used_bytes(path: Path) -> int:
    if path.is_dir() and not path.is_symlink():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size if path.exists() else 0


@contextmanager
def writing_into(out: Path, created: bool, wrote_nothing) -> Iterator[None]:
    """Create and lock out for the caller's writes. If they fail while `wrote_nothing()` in a folder this run
    created, the folder goes (nothing of value was written). Ctrl-C ends with the line that the same command
    continues."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(out, exc) from exc
    with _exclusive(out):
        try:
            yield
        except BaseException as exc:
            if created and wrote_nothing():
                shutil.rmtree(out, ignore_errors=True)
            if isinstance(exc, KeyboardInterrupt):
                raise Interrupted("run the same command again to continue; finished layers are kept") from exc
            raise


@contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """One ktq process at a time writes into a folder: a second one would delete the first one's layer in flight
    as a leftover. The lock is on the folder itself (no lock file to clean up); the kernel drops it when the
    process ends, however it ends."""
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise KtqError(f"another ktq process is writing into {out}: wait until it ends (or stop it), then "
                           "re-run this command") from None
        yield
    finally:
        os.close(fd)
