"""The I/O paths of the conversion: tensors mapped from the page cache, and files written through O_DIRECT."""

from __future__ import annotations

import errno
import fcntl
import os
import re
from pathlib import Path

import numpy as np
import pytest
import xxhash

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


def _write_shard(path: Path, sizes: tuple[int, ...], stage_blocks: int) -> tuple[bytes, str, int]:
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, size, np.uint8) for size in sizes]
    entries = [(f"t{i}", "U8", a.shape, a.nbytes) for i, a in enumerate(arrays)]
    writer = ShardWriter(path, entries, stages=[st.aligned_buffer(stage_blocks * st.ALIGN) for _ in range(2)])
    for (name, *_), a in zip(entries, arrays):
        writer.write(name, a)
    digest = writer.finish()
    return st.encode_header(entries, None) + b"".join(a.tobytes() for a in arrays), digest, writer.size


@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "no_o_direct"])
def test_shard_bytes_and_digest_across_stage_flushes(tmp_path, monkeypatch, direct):
    """Many flushes of a 2-block stage, most of them inside a tensor, and a last block cut to size; also where the
    file system refuses O_DIRECT (open fails with EINVAL)."""
    if not direct:
        real_open = os.open

        def no_direct(path, flags, *args):
            if flags & os.O_DIRECT:
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            return real_open(path, flags, *args)

        monkeypatch.setattr(os, "open", no_direct)
    expected, digest, size = _write_shard(tmp_path / "s.safetensors", (7, 25_000, 9_999, 1, 40_000), 2)
    data = (tmp_path / "s.safetensors").read_bytes()
    assert data == expected
    assert digest == xxhash.xxh3_128_hexdigest(data) and len(data) == size


def test_direct_writes_refused_after_open_go_on_buffered(tmp_path, monkeypatch):
    """A file system may accept O_DIRECT at open and refuse the writes (blocks larger than 4 KB): the file is
    written without it, byte for byte the same."""
    real_write = os.write

    def refuse_direct(fd, data):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", refuse_direct)
    expected, digest, size = _write_shard(tmp_path / "s.safetensors", (7, 25_000, 9_999, 1, 40_000), 2)
    data = (tmp_path / "s.safetensors").read_bytes()
    assert data == expected and len(data) == size and digest == xxhash.xxh3_128_hexdigest(data)


def test_a_short_direct_write_is_a_full_disk(tmp_path, monkeypatch):
    """O_DIRECT cannot go on from a write cut short inside a block: that is reported as ENOSPC (what cut it),
    not as the EINVAL of the next write."""
    monkeypatch.setattr(os, "write", lambda fd, data: len(data) // 2 + 1)  # took part of a block, then stopped
    with pytest.raises(OSError) as caught:
        _write_shard(tmp_path / "s.safetensors", (20_000,), 4)
    assert caught.value.errno == errno.ENOSPC


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


