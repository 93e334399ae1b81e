"""The I/O paths of the conversion: tensors mapped from the page cache, and shards written with early writeback."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest

import ktq.safetensors_io as st
from conftest import rewrite_checkpoint, tree_files
from ktq.safetensors_io import ShardWriter, TensorReader, read_header


def rss_file_bytes() -> int:
    """This process's resident pages that belong to mapped files."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"RssFile:\s+(\d+) kB", status)[1]) * 1024


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> Path:
    """Tensors of awkward sizes, so that most start and end inside a page."""
    rng = np.random.default_rng(0)
    arrays = {f"t{i}": rng.integers(0, 256, size, np.uint8) for i, size in enumerate([3, 8 << 20, 4097, 1, 12345])}
    path = tmp_path_factory.mktemp("io") / "a.safetensors"
    writer = ShardWriter(path, [(name, "U8", a.shape, a.nbytes) for name, a in arrays.items()])
    for name, a in arrays.items():
        writer.write(name, a)
    writer.finish()
    return path


def test_mapped_tensors_equal_read_tensors(shard):
    tensors, _ = read_header(shard)
    with TensorReader() as reader:
        for info in tensors.values():
            assert reader.map(info).tobytes() == reader.read(info).tobytes(), info.name
            reader.drop(info)
            assert reader.map(info).tobytes() == reader.read(info).tobytes(), info.name  # still readable


def test_drop_hands_the_pages_back(shard):
    big = read_header(shard)[0]["t1"]  # 8 MB
    with TensorReader() as reader:
        before = rss_file_bytes()
        view = reader.map(big)  # paged in at once
        mapped = rss_file_bytes()
        del view
        reader.drop(big)
        dropped = rss_file_bytes()
    assert mapped - before >= big.nbytes - (1 << 20)
    assert mapped - dropped >= big.nbytes - (1 << 20)


def test_close_with_a_view_alive_does_not_fail(shard):
    info = read_header(shard)[0]["t2"]
    reader = TensorReader()
    view = reader.map(info)
    reader.close()  # an error path may still hold a view: the map stays until the view goes
    assert view.tobytes() == shard.read_bytes()[info.offset:info.offset + info.nbytes]


def test_shard_bytes_and_digest_across_writeback_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(st, "WRITEBACK_BYTES", 10_000)  # many steps, most of them inside a tensor
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, size, np.uint8) for size in (7, 25_000, 9_999, 1, 40_000)]
    entries = [(f"t{i}", "U8", a.shape, a.nbytes) for i, a in enumerate(arrays)]
    writer = ShardWriter(tmp_path / "s.safetensors", entries)
    for (name, *_), a in zip(entries, arrays):
        writer.write(name, a)
    digest = writer.finish()
    data = (tmp_path / "s.safetensors").read_bytes()
    assert data == st.encode_header(entries, None) + b"".join(a.tobytes() for a in arrays)
    assert digest == hashlib.sha256(data).hexdigest() and len(data) == writer.size


def test_unaligned_tensors_are_read_not_mapped(ktq, tmp_path):
    """A tensor at an odd offset cannot be viewed as bf16 in place: it is copied, with the same result."""
    from ktq.sample import write_sample

    src = write_sample(tmp_path / "src", layers=1, experts=2, hidden=256, moe_intermediate=256, shards=1)

    def shift(name, bits, dtype):  # a 1-byte tensor first puts every tensor after it at an odd offset
        return [("a.odd", np.zeros(1, np.uint8), "U8"), (name, bits, dtype)] if name.endswith("embed_tokens.weight") \
            else [(name, bits, dtype)]

    odd = rewrite_checkpoint(src, tmp_path / "odd", shift)
    offsets = [i.offset for n, i in read_header(odd / "model.safetensors")[0].items() if ".experts." in n]
    assert all(o % 2 for o in offsets)
    outputs = []
    for name, checkpoint in (("even", src), ("odd", odd)):
        result = ktq("cpu", "-i", checkpoint, "-o", tmp_path / f"out-{name}", "--threadpool-count", "1", "--quiet",
                     "--no-merge-safetensor")
        assert result.code == 0, result.stderr
        outputs.append({k: v for k, v in tree_files(tmp_path / f"out-{name}").items() if k != "ktq.json"})
    assert outputs[0] == outputs[1]


def test_write_behind_closes_every_file_it_was_handed(tmp_path, monkeypatch):
    monkeypatch.setattr(st, "WRITEBACK_BYTES", 1000)
    before = len(list(Path("/proc/self/fd").iterdir()))
    behind = st.WriteBehind()
    for i in range(50):
        f = open(tmp_path / f"{i}.bin", "wb")
        f.write(bytes(300))
        f.flush()
        behind.wrote(f, 0, 300, close=True)
    held = len(list(Path("/proc/self/fd").iterdir())) - before
    assert 0 < held <= 5  # the last ~1000 bytes' files only
    behind.drop_all()
    assert len(list(Path("/proc/self/fd").iterdir())) == before
    assert all((tmp_path / f"{i}.bin").stat().st_size == 300 for i in range(50))
