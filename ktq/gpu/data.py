"""Calibration samples for GPTQ: read, picked, rendered and tokenised before llm-compressor sees them.

--dataset is a local file (json, jsonl, parquet, arrow, csv, txt), a folder written by `Dataset.save_to_disk`,
a folder of data files, or a Hugging Face hub id, read from the local Hugging Face cache (ktq reads no network: one
that is not there is refused with the `hf download` command that fetches it). Rows are rendered by
column type: a list of {role, content} messages goes through the tokenizer's chat template, a string is used as
it is. ktq picks the samples itself (a seeded shuffle, then the first N non-empty ones), so the same options give
the same calibration set on every run and on every rank of a distributed run.
"""

from __future__ import annotations

from pathlib import Path

from ktq.errors import KtqError
from ktq.paths import hub_download, is_hub_id

FILE_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv",
                ".txt": "text"}
CHAT_COLUMNS = ("messages", "conversation", "conversations")
TEXT_COLUMNS = ("text", "content", "prompt")


def dataset_kind(dataset: str) -> str:
    """'file', 'saved' (save_to_disk folder), 'folder' (of data files) or 'hub'; checked before the model loads."""
    path = Path(dataset).expanduser()
    if path.is_file():
        if path.suffix.lower() not in FILE_FORMATS:
            raise KtqError(f"--dataset {path}: unknown file type {path.suffix!r}; use one of "
                           f"{', '.join(sorted(FILE_FORMATS))}, or a saved dataset folder")
        return "file"
    if path.is_dir():
        saved = (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
        return "saved" if saved else "folder"
    if not is_hub_id(dataset):
        raise KtqError(f"--dataset {dataset}: no such file or folder")
    return "hub"


def local_dataset(dataset: str) -> tuple[str, Path]:
    """What --dataset is (dataset_kind) and the local file or folder it is read from: a hub id's folder in the
    local Hugging Face cache. Never touches the network."""
    kind = dataset_kind(dataset)
    if kind != "hub":
        return kind, Path(dataset).expanduser()
    # where `snapshot_download(dataset, repo_type="dataset", local_files_only=True)` looks, without the second
    # that importing it takes: the cache's folder of the repo, the snapshot its main ref names
    from huggingface_hub import constants

    repo = Path(constants.HF_HUB_CACHE) / ("datasets--" + dataset.replace("/", "--"))
    try:
        snapshot = repo / "snapshots" / (repo / "refs" / "main").read_text().strip()
    except OSError:
        snapshot = None
    if snapshot is None or not snapshot.is_dir():
        raise KtqError(f"--dataset {dataset} is no file or folder here, and as a Hugging Face hub id it is not in "
                       f"the local cache (ktq reads no network): fetch it with `{hub_download(dataset, 'dataset')}` "
                       "and pass --dataset DIR")
    return "folder", snapshot


def load_rows(dataset: str, split: str):
    """The rows of --dataset as one `datasets.Dataset` (not yet tokenised)."""
    import datasets

    datasets.disable_progress_bars()  # its bars ("Generating train split") would come between ktq's own lines
    kind, path = local_dataset(dataset)
    if kind == "file":
        fmt = FILE_FORMATS[path.suffix.lower()]
        return _guard(lambda: datasets.load_dataset(fmt, data_files=str(path), split="train"), dataset)
    if kind == "saved":
        return _pick_split(_guard(lambda: datasets.load_from_disk(str(path)), dataset), split, dataset)
    return _pick_split(_guard(lambda: datasets.load_dataset(str(path)), dataset), split, dataset)


def _guard(load, dataset: str):
    try:
        return load()
    except KtqError:
        raise
    except Exception as exc:  # datasets raises many types; the user needs the first line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KtqError(f"cannot load --dataset {dataset} as a dataset: {first}") from exc


def _pick_split(loaded, split: str, dataset: str):
    """A Dataset from a DatasetDict: the requested split, else the only one there is."""
    if not hasattr(loaded, "keys"):
        return loaded
    if split in loaded:
        return loaded[split]
    if len(loaded) == 1:
        return next(iter(loaded.values()))
    raise KtqError(f"--dataset {dataset} has splits {', '.join(loaded.keys())}; choose one with --dataset_split")


def pick_column(columns: list[str], requested: str | None, dataset: str) -> str:
    if requested is not None:
        if requested not in columns:
            raise KtqError(f"--text_column {requested!r} is not a column of {dataset} (columns: {', '.join(columns)})")
        return requested
    for name in CHAT_COLUMNS + TEXT_COLUMNS:
        if name in columns:
            return name
    raise KtqError(f"{dataset} has no text or messages column (columns: {', '.join(columns)}); "
                   "name one with --text_column")


def render(value, tokenizer, column: str) -> str:
    """A row's value as the text the model reads: chat messages through the tokenizer's template."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        if not getattr(tokenizer, "chat_template", None):
            raise KtqError(f"column {column!r} holds chat messages but the tokenizer has no chat template; "
                           "use a dataset with a plain text column (--text_column)")
        messages = [_normalise_message(m) for m in value]
        return tokenizer.apply_chat_template(messages, tokenize=False)
    raise KtqError(f"column {column!r} holds {type(value).__name__} values; it needs text or chat messages")


def _normalise_message(message: dict) -> dict:
    """ShareGPT-style {from, value} turns become {role, content}."""
    if "role" in message:
        return message
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    return {"role": roles.get(message.get("from"), message.get("from")), "content": message.get("value", "")}


def calibration_dataset(dataset: str, split: str, text_column: str | None, tokenizer, samples: int,
                        max_length: int, seed: int):
    """The tokenised calibration set: `samples` rows (fewer if the data has fewer), at most max_length tokens.

    Chat-rendered text already holds its special tokens, so only plain text gets the tokenizer's BOS/EOS.
    """
    import datasets

    rows = load_rows(dataset, split)
    if len(rows) == 0:
        raise KtqError(f"--dataset {dataset} has no rows")
    column = pick_column(list(rows.column_names), text_column, dataset)
    order = rows.shuffle(seed=seed)
    input_ids: list[list[int]] = []
    for row in order:
        value = row[column]
        text = render(value, tokenizer, column)
        ids = tokenizer(text, add_special_tokens=isinstance(value, str), truncation=True,
                        max_length=max_length)["input_ids"]
        if ids:
            input_ids.append(ids)
            if len(input_ids) == samples:
                break
    if not input_ids:
        raise KtqError(f"every row of --dataset {dataset} column {column!r} is empty")
    return datasets.Dataset.from_dict({"input_ids": input_ids,
                                       "attention_mask": [[1] * len(ids) for ids in input_ids]})
