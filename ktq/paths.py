"""What the user's path arguments are: a local path, or a Hugging Face hub id, which ktq never fetches (it reads no
network): a hub id is refused with the command that downloads it, or read from the local cache where that works."""

from __future__ import annotations

from pathlib import Path

# the files ktq reads (checkpoints, datasets, its own outputs): a name ending in one is a path, never a hub id
FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".kt", ".json", ".jsonl", ".parquet", ".arrow",
                 ".csv", ".txt")


def looks_like_path(text: str) -> bool:
    """A local path, whether or not it exists: absolute, starting with . or ~, deeper than org/name, with a
    backslash, or ending in a file suffix. Anything else that does not exist is a hub id (org/name, or a bare name)."""
    return (not text or text.startswith(("/", ".", "~")) or text.count("/") > 1 or "\\" in text
            or text.lower().endswith(FILE_SUFFIXES))


def is_hub_id(text: str) -> bool:
    """A Hugging Face hub id: no local path by looks_like_path, and nothing of that name here."""
    return not looks_like_path(text) and not Path(text).expanduser().exists()


def hub_download(repo: str, kind: str = "model") -> str:
    """The command that downloads hub id `repo` into a folder ktq reads."""
    return f"hf download {repo}{' --repo-type dataset' if kind == 'dataset' else ''} --local-dir DIR"
