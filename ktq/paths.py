"""What the user's path arguments are: a local path, or a Hugging Face hub id."""

from __future__ import annotations


def looks_like_path(text: str) -> bool:
    """A local path rather than a hub id ('org/name'): absolute, relative with ./ ../ ~, or deeper than org/name."""
    return text.startswith(("/", "./", "../", "~")) or text.count("/") > 1 or text in (".", "..")
