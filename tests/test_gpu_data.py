"""Calibration data: local formats, chat templates, deterministic picking, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpu_models import chat_rows, write_jsonl
from ktq.errors import KtqError
from ktq.gpu.data import calibration_dataset, dataset_kind, load_rows, render
from ktq.sample import write_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tok")
    write_tokenizer(folder)
    return AutoTokenizer.from_pretrained(folder)


ROWS = chat_rows(6)
TEXTS = [{"text": f"sample number {i} routes tokens to experts"} for i in range(6)]


def _write(kind: str, folder: Path, rows: list[dict]) -> Path:
    import datasets

    table = datasets.Dataset.from_list(rows)
    if kind == "jsonl":
        return write_jsonl(folder / "d.jsonl", rows)
    if kind == "json":
        path = folder / "d.json"
        path.write_text(json.dumps(rows))
        return path
    if kind == "parquet":
        table.to_parquet(str(folder / "d.parquet"))
        return folder / "d.parquet"
    if kind == "arrow":
        import pyarrow as pa

        with pa.OSFile(str(folder / "d.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.data.schema) as w:
            w.write_table(table.data.table)
        return folder / "d.arrow"
    if kind == "saved":
        datasets.DatasetDict({"train_sft": table, "test": table.select([0])}).save_to_disk(str(folder / "saved"))
        return folder / "saved"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "arrow", "saved"])
def test_local_formats_give_the_same_rows(kind, tmp_path):
    rows = load_rows(str(_write(kind, tmp_path, ROWS)), "train_sft")
    assert [r["messages"] for r in rows] == [r["messages"] for r in ROWS]


def test_saved_dataset_dict_needs_an_existing_split(tmp_path):
    folder = _write("saved", tmp_path, ROWS)
    assert len(load_rows(str(folder), "test")) == 1
    with pytest.raises(KtqError, match="splits train_sft, test; choose one with --dataset_split"):
        load_rows(str(folder), "validation")


def test_chat_messages_go_through_the_chat_template(tokenizer):
    text = render(ROWS[0]["messages"], tokenizer, "messages")
    user, assistant = ROWS[0]["messages"]
    assert text == (f"<|im_start|>user\n{user['content']}<|im_end|>\n"
                    f"<|im_start|>assistant\n{assistant['content']}<|im_end|>\n")
    sharegpt = [{"from": "human", "value": user["content"]}, {"from": "gpt", "value": assistant["content"]}]
    assert render(sharegpt, tokenizer, "conversations") == text


def test_calibration_set_is_deterministic_and_truncated(tmp_path, tokenizer):
    path = str(_write("jsonl", tmp_path, chat_rows(20)))
    first = calibration_dataset(path, "train", None, tokenizer, samples=8, max_length=16, seed=7)
    again = calibration_dataset(path, "train", None, tokenizer, samples=8, max_length=16, seed=7)
    other = calibration_dataset(path, "train", None, tokenizer, samples=8, max_length=16, seed=8)
    assert len(first) == 8 and first["input_ids"] == again["input_ids"] != other["input_ids"]
    assert all(len(ids) == 16 for ids in first["input_ids"])  # every chat row is longer than 16 tokens
    assert first["attention_mask"] == [[1] * 16] * 8
    # the chat template's special tokens are in the text; the tokenizer adds none of its own
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert all(ids[0] == start for ids in first["input_ids"])


def test_text_column_and_fewer_rows_than_asked(tmp_path, tokenizer):
    path = str(_write("parquet", tmp_path, TEXTS))
    data = calibration_dataset(path, "train", None, tokenizer, samples=100, max_length=64, seed=0)
    assert len(data) == len(TEXTS)
    decoded = sorted(tokenizer.decode(ids) for ids in data["input_ids"])
    assert decoded == sorted(row["text"] for row in TEXTS)


def test_explicit_text_column_must_exist(tmp_path, tokenizer):
    path = str(_write("jsonl", tmp_path, TEXTS))
    with pytest.raises(KtqError, match=r"--text_column .prompt. is not a column .* \(columns: text\)"):
        calibration_dataset(path, "train", "prompt", tokenizer, samples=2, max_length=8, seed=0)


def test_dataset_without_a_text_column(tmp_path, tokenizer):
    path = str(_write("jsonl", tmp_path, [{"id": 1, "score": 0.5}]))
    with pytest.raises(KtqError, match="no text or messages column .* name one with --text_column"):
        calibration_dataset(path, "train", None, tokenizer, samples=2, max_length=8, seed=0)


@pytest.mark.parametrize("name", ["missing.jsonl", "./nowhere", "/no/such/folder", "data/calib.parquet"])
def test_missing_local_paths_are_errors_not_hub_ids(name):
    with pytest.raises(KtqError, match="no such file or folder"):
        dataset_kind(name)


def test_hub_ids_are_hub_ids():
    assert dataset_kind("HuggingFaceH4/ultrachat_200k") == "hub"
    assert dataset_kind("wikitext") == "hub"


def test_a_hub_id_is_read_from_the_local_cache(tmp_path, monkeypatch):
    """As `hf download ORG/NAME --repo-type dataset` leaves it: the snapshot that refs/main names."""
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "datasets--org--chat"
    for folder in ("snapshots/c0ffee", "refs"):
        (repo / folder).mkdir(parents=True)
    write_jsonl(repo / "snapshots" / "c0ffee" / "train.jsonl", ROWS)
    (repo / "refs" / "main").write_text("c0ffee")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert [r["messages"] for r in load_rows("org/chat", "train")] == [r["messages"] for r in ROWS]
    with pytest.raises(KtqError, match="not in the local cache .* `hf download org/other --repo-type dataset "
                                       "--local-dir DIR` and pass --dataset DIR"):
        load_rows("org/other", "train")


def test_unknown_file_type(tmp_path):
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(KtqError, match="unknown file type '.xlsx'"):
        dataset_kind(str(tmp_path / "d.xlsx"))
