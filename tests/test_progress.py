"""Progress as a user sees it: bars on a terminal (the real CLI on a pseudo-terminal), a line per layer otherwise,
layer counts and numbers that agree, units, an ETA that moves, words in the singular when there is one."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys

import pytest

from conftest import ktq_subprocess
from gpu_models import write_jsonl
from ktq.progress import Countdown

# MoE layers 1-3 after a dense layer 0: a count of layers done must not read as a layer number
LAYERS = dict(arch="qwen3_moe", layers=4, dense_layers=1, experts=4, hidden=256, moe_intermediate=256)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    from ktq.sample import write_sample

    return write_sample(tmp_path_factory.mktemp("progress") / "src", **LAYERS)


def in_a_terminal(*args: object) -> tuple[int, list[str]]:
    """`ktq ARGS` with its streams on a pseudo-terminal 80 columns wide: the exit code and every frame and line it
    drew (escape codes removed)."""
    master, slave = pty.openpty()
    env = {**os.environ, "TERM": "xterm", "COLUMNS": "80", "LINES": "40"}
    proc = subprocess.Popen([sys.executable, "-m", "ktq", *map(str, args)], stdin=slave, stdout=slave, stderr=slave,
                            env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 1 << 16)
        except OSError:  # EIO: the process closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode(errors="replace"))
    return proc.wait(), [frame.strip() for frame in re.split(r"[\r\n]+", text) if frame.strip()]


def bar_frames(frames: list[str], verb: str) -> list[str]:
    return [frame for frame in frames if frame.startswith(verb)]


def test_cpu_bar_names_the_layer_in_the_works_and_counts_layers(src, tmp_path):
    code, frames = in_a_terminal("cpu", "-i", src, "-o", tmp_path / "out", "--threadpool-count", 1)
    assert code == 0, frames
    bars = bar_frames(frames, "converting")
    assert re.match(r"converting layer 1 .* 0/3 layers ", bars[0]), bars  # MoE layer 1 first, none done yet
    assert re.match(r"converting: done .* 3/3 layers ", bars[-1]), bars
    assert all(len(frame) <= 80 for frame in bars)
    assert not any("layer 0" in frame for frame in bars)  # layer 0 is dense: not converted
    assert any(frame.startswith("wrote ") and "(merged, AMXINT4, 1 NUMA part):" in frame for frame in frames)


def test_cpu_lines_without_a_terminal(src, tmp_path):
    result = ktq_subprocess("cpu", "-i", src, "-o", tmp_path / "out", "--threadpool-count", 1)
    assert result.code == 0, result.stderr
    lines = result.stderr.splitlines()
    assert [line.split(":")[0] for line in lines] == [f"layer {n} done ({n}/3 layers)" for n in (1, 2, 3)]
    assert "3 layers converted" in result.stdout and "1 NUMA part)" in result.stdout


@pytest.mark.parametrize("check,verb", [(("--verify",), "verifying"), (("--compare", "SRC"), "comparing")])
def test_inspect_shows_progress_on_a_terminal_only(src, tmp_path, check, verb):
    out = tmp_path / "out"
    assert ktq_subprocess("cpu", "-i", src, "-o", out, "--threadpool-count", 1, "-q").code == 0
    args = ("inspect", out, *(src if word == "SRC" else word for word in check))
    code, frames = in_a_terminal(*args)
    assert code == 0, frames
    assert re.match(rf"{verb} layer 1 .* 0/3 layers ", bar_frames(frames, verb)[0]), frames
    assert ktq_subprocess(*args).stderr == ""  # without a terminal: the report alone
    code, frames = in_a_terminal(*args, "--quiet")
    assert code == 0 and not bar_frames(frames, verb)


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "calib.jsonl", [{"text": "a few words to calibrate on"}] * 2)


def test_gpu_bar_counts_every_decoder_layer_to_the_end(src, tmp_path, calibration):
    """GPTQ with a dense layer first: the bar runs over all 4 decoder layers, in layers, and ends at 4/4."""
    code, frames = in_a_terminal("gpu", "--model-id", src, "--output-dir", tmp_path / "out", "--dataset", calibration,
                                 "--num-calibration-samples", 2, "--force-cpu")
    assert code == 0, frames
    bars = [frame for frame in frames if re.match(r"(calibrating|propagating)", frame)]
    assert re.match(r"calibrating layer 0 .* 0/4 layers .* ETA", bars[0]), bars
    assert re.match(r"calibrating: done .* 4/4 layers .* ETA 0:00:00", bars[-1]), bars
    assert all(len(frame) <= 80 for frame in bars)


def test_gpu_lines_without_a_terminal(src, tmp_path, ktq):
    result = ktq("gpu", "--model-id", src, "--output-dir", tmp_path / "out", "--quant-method", "RTN", "--force-cpu")
    assert result.code == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("layer ")]
    assert [line.split(" in ")[0] for line in lines] == [f"layer {i} done ({i + 1}/4 layers)" for i in range(4)]
    assert all("ETA" in line for line in lines[:-1])


class FakeClock:
    def __init__(self, monkeypatch):
        self.now = 1000.0
        monkeypatch.setattr("ktq.progress.time.monotonic", lambda: self.now)


def test_the_eta_counts_down_between_updates(monkeypatch):
    clock = FakeClock(monkeypatch)
    countdown = Countdown(4)
    assert countdown.seconds_left() is None  # nothing measured yet
    clock.now += 10
    countdown.advance(1)
    assert countdown.seconds_left() == pytest.approx(30)  # 3 layers at 10 s each
    clock.now += 12  # a long solve, no update: the estimate keeps moving
    assert countdown.seconds_left() == pytest.approx(18)
    clock.now += 30
    assert countdown.seconds_left() == 0


def test_the_eta_forgets_a_fast_start_and_skipped_layers(monkeypatch):
    clock = FakeClock(monkeypatch)
    countdown = Countdown(10)
    countdown.advance(3, worked=False)  # committed layers of a resumed run: no time spent
    for _ in range(3):  # dense layers: 1 s each
        clock.now += 1
        countdown.advance(1)
    assert countdown.seconds_left() == pytest.approx(4)
    for _ in range(3):  # MoE layers: 200 s each; the window holds the last 300 s and more
        clock.now += 200
        countdown.advance(1)
    assert countdown.done == 9
    assert countdown.seconds_left() == pytest.approx(200, rel=0.01)
