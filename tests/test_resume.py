"""Crash safety of `ktq cpu`: killed anywhere or out of disk, the same command continues and ends byte-identical
to an uninterrupted run; other settings are refused, --force starts over, --resume-layer reconverts from a layer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import tree_files
from faults import ForkServer, IoFaults
from test_cli_errors import assert_one_line_error

pytestmark = pytest.mark.usefixtures("two_numa_nodes")

FORMS = {"merged": (), "kt": ("--no-merge-safetensor",)}
KILL_POINTS = 12  # per form, spread over every file-system event of a clean run


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    forks = ForkServer(tmp_path_factory.mktemp("fork-logs"))
    yield forks
    forks.close()


def cpu_args(source: Path, out: Path, form: str, *extra: object) -> list[object]:
    # one quantisation thread: the output does not depend on it, and idle OpenMP threads would spin on busy CI
    return ["cpu", "-i", source, "-o", out, "--threadpool-count", "2", "--cpuinfer-threads", "1", "--quiet",
            *FORMS[form], *extra]


def committed_inodes(out: Path) -> dict[str, int]:
    """The inode of every layer ktq.json records: a layer that is kept, not rewritten, keeps its inode. A merged
    shard is under its pending name until the output is complete (and, killed while they are renamed, some are
    under their names already)."""
    manifest = out / "ktq.json"
    if not manifest.is_file():
        return {}
    layers = json.loads(manifest.read_text())["layers"]
    where = {record["path"]: out / record["path"] for record in layers.values()}
    return {path: (file if file.exists() else file.with_name(f"{file.name}.pending")).stat().st_ino
            for path, file in where.items()}


def spread(total: int, count: int) -> list[int]:
    """count distinct event numbers from 1 to total: both ends and evenly in between."""
    return sorted({1 + round(i * (total - 1) / (count - 1)) for i in range(count)})


@pytest.mark.parametrize("form", FORMS)
def test_killed_at_any_point_the_rerun_ends_byte_identical(server, moe_sample, converted, tmp_path, form):
    expected = tree_files(converted[form])
    reference = server.run(cpu_args(moe_sample, tmp_path / "reference", form), tmp_path / "reference")
    assert reference.code == 0, reference.log
    assert tree_files(tmp_path / "reference") == expected  # the fork server runs the same conversion
    # each stage of a shard written (merged) or each file created and written (kt) is at least one event
    assert reference.events > (100 if form == "merged" else 200), reference.events
    points = spread(reference.events, KILL_POINTS)
    assert len(points) >= 10
    resumed_with_layers = 0
    for i, at in enumerate(points):
        out = tmp_path / f"killed-at-{at}"
        first = server.run(cpu_args(moe_sample, out, form), out, kill_at=at)
        assert first.killed, f"event {at} of {reference.events}: {first.log}"
        if i % 3 == 1:  # killed again early in the rerun
            second = server.run(cpu_args(moe_sample, out, form), out, kill_at=6)
            assert second.killed or second.code == 0, second.log
        kept = committed_inodes(out)
        resumed_with_layers += bool(kept)
        rerun = server.run(cpu_args(moe_sample, out, form), out)
        assert rerun.code == 0, f"after a kill at event {at}: {rerun.log}"
        assert tree_files(out) == expected, f"after a kill at event {at}"
        assert {path: ino for path, ino in committed_inodes(out).items() if path in kept} == kept
    assert resumed_with_layers >= KILL_POINTS // 2  # most reruns really continued, not started over


def test_torn_first_manifest_is_not_a_foreign_file(server, moe_sample, converted, tmp_path):
    """Killed while writing the very first ktq.json: the folder holds only that temporary, and a rerun goes on."""
    out = tmp_path / "out"
    first = server.run(cpu_args(moe_sample, out, "merged"), out, kill_at=3)  # mkdir, open, write (torn)
    assert first.killed and [p.name for p in out.iterdir()] == [".ktq.json.partial"]
    assert server.run(cpu_args(moe_sample, out, "merged"), out).code == 0
    assert tree_files(out) == tree_files(converted["merged"])


@pytest.mark.parametrize("form", FORMS)
def test_disk_full_fails_in_one_line_and_the_output_resumes(ktq, moe_sample, converted, tmp_path, form):
    """ENOSPC injected at points spread over a run: one-line error, no temporary left, same command finishes."""
    probe = tmp_path / "probe"
    with IoFaults(probe, at=None) as counter:
        assert ktq(*cpu_args(moe_sample, probe, form)).code == 0
    for at in spread(counter.events, 6):
        out = tmp_path / f"full-at-{at}"
        with IoFaults(out, at=at, action="enospc"):
            result = ktq(*cpu_args(moe_sample, out, form))
        assert_one_line_error(result, "disk is full", "re-run the same command")
        if out.exists():
            assert not [p for p in out.rglob("*") if p.name.endswith(".partial")], at
            assert json.loads((out / "ktq.json").read_text())["complete"] is False
        assert ktq(*cpu_args(moe_sample, out, form)).code == 0
        assert tree_files(out) == tree_files(converted[form])


def _mount_tmpfs(path: Path, size: int) -> bool:
    path.mkdir(exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A real 700 KiB file system (tmpfs: needs root); the test is skipped where it cannot be mounted."""
    disk = tmp_path / "disk"
    if os.geteuid() != 0 or shutil.which("mount") is None or not _mount_tmpfs(disk, 700 * 1024):
        pytest.skip("mounting a tmpfs needs root")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_real_full_disk(ktq, moe_sample, converted, small_disk):
    out = small_disk / "out"
    refused = ktq(*cpu_args(moe_sample, out, "kt"))
    assert_one_line_error(refused, "needs", "free", "--force")
    assert not out.exists()  # refused before writing anything
    full = ktq(*cpu_args(moe_sample, out, "kt", "--force"))  # started anyway: the disk fills up during the run
    warning, error = full.stderr.splitlines()
    assert warning.startswith("ktq: warning: this conversion does not fit") and warning.endswith("(--force)")
    assert full.code == 2 and error.startswith("ktq: error: cannot write") and "disk is full" in error
    assert not [p for p in out.rglob("*") if p.name.endswith(".partial")]
    kept = json.loads((out / "ktq.json").read_text())["layers"]
    assert len(kept) == 1  # one layer (480 KiB on the disk) fits, the second does not
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)
    assert ktq(*cpu_args(moe_sample, out, "kt")).code == 0
    assert tree_files(out) == tree_files(converted["kt"])


@pytest.mark.parametrize("change,mismatch", [(("--threadpool-count", "1"), "numa 2 -> 1"),
                                             (("--quant-method", "int8"), "method 'int4' -> 'int8'"),
                                             (("--no-merge-safetensor",), "form 'merged' -> 'kt'")])
def test_other_settings_are_refused_and_force_starts_over(ktq, moe_sample, converted, tmp_path, change, mismatch,
                                                          monkeypatch):
    from ktq.commands import cpu as cpu_command

    numa = change[1] if change[0] == "--threadpool-count" else "2"
    monkeypatch.setattr(cpu_command, "numa_nodes", lambda: int(numa))  # no warning about the count
    out = tmp_path / "out"
    shutil.copytree(converted["merged"], out)
    (out / "notes.txt").write_text("mine")
    args = ["cpu", "-i", moe_sample, "-o", out, "--quiet", "--threadpool-count", numa, *change]
    before = tree_files(out)
    assert_one_line_error(ktq(*args), "other settings", mismatch, "--force")
    assert tree_files(out) == before
    assert ktq(*args, "--force").code == 0
    direct = tmp_path / "direct"
    assert ktq("cpu", "-i", moe_sample, "-o", direct, "--quiet", "--threadpool-count", numa, *change).code == 0
    assert tree_files(out) == {**tree_files(direct), "notes.txt": b"mine"}  # only ktq's files were replaced


def test_other_input_is_refused(ktq, moe_sample, converted, tmp_path):
    from ktq.sample import write_sample

    other = write_sample(tmp_path / "other", layers=4, experts=4, hidden=256, moe_intermediate=256, dense_layers=1,
                         seed=1)
    out = tmp_path / "out"
    shutil.copytree(converted["kt"], out)
    result = ktq(*cpu_args(other, out, "kt"))
    assert_one_line_error(result, "other settings", "input_fingerprint")


def test_force_never_deletes_a_folder_ktq_did_not_write(ktq, moe_sample, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model-00001-of-00003.safetensors").write_bytes(b"someone else's")
    result = ktq(*cpu_args(moe_sample, out, "merged", "--force"))
    assert_one_line_error(result, "did not write", "--force only starts over a ktq output")
    assert tree_files(out) == {"model-00001-of-00003.safetensors": b"someone else's"}


def test_a_damaged_layer_is_reconverted(ktq, moe_sample, converted, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(converted["kt"], out)
    victim = next((out / "_layer_2" / "_numa_1").glob("INT4_down_3_*quant_.kt"))
    victim.write_bytes(victim.read_bytes()[:-1])  # truncated
    untouched = (out / "_layer_1").stat().st_ino
    assert ktq(*cpu_args(moe_sample, out, "kt")).code == 0
    assert tree_files(out) == tree_files(converted["kt"])
    assert (out / "_layer_1").stat().st_ino == untouched


def test_resume_layer_reconverts_from_that_layer(ktq, moe_sample, converted, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(converted["merged"], out)
    kept = (out / "model-00001-of-00003.safetensors").stat().st_ino
    later = (out / "model-00002-of-00003.safetensors").stat().st_ino
    result = ktq("cpu", "-i", moe_sample, "-o", out, "--threadpool-count", "2", "--resume-layer", "2")
    assert result.code == 0, result.stderr
    assert "2 layers converted, 1 kept" in result.stdout
    assert tree_files(out) == tree_files(converted["merged"])  # same shard numbering, same index, same manifest
    assert (out / "model-00001-of-00003.safetensors").stat().st_ino == kept
    assert (out / "model-00002-of-00003.safetensors").stat().st_ino != later


def test_resume_layer_needs_the_earlier_layers(ktq, moe_sample, tmp_path):
    assert_one_line_error(ktq(*cpu_args(moe_sample, tmp_path / "new", "merged", "--resume-layer", "2")),
                          "--resume-layer 2", "layers [1] are not in")
    assert not (tmp_path / "new").exists()
    assert_one_line_error(ktq(*cpu_args(moe_sample, tmp_path / "new", "merged", "--resume-layer", "0")),
                          "not a MoE layer")


def test_disk_check_counts_what_the_run_writes(moe_sample, converted):
    """The estimate behind the free-space check is never below what a run really writes."""
    from ktq.cpu.manifest import load_manifest
    from ktq.cpu.output import needed_bytes

    for name, out in converted.items():
        layout = load_manifest(out).layout
        written = sum(len(data) for data in tree_files(out).values())
        estimate = needed_bytes(layout, list(layout.layers), moe_sample if layout.form == "merged" else None)
        assert written <= estimate <= written + (2 << 20), (name, written, estimate)


def test_a_second_process_cannot_write_into_the_same_output(ktq, moe_sample, converted, tmp_path):
    """While one ktq writes into a folder (it holds the lock), another one touches nothing there."""
    import fcntl

    out = tmp_path / "out"
    shutil.copytree(converted["kt"], out)
    shutil.copytree(out / "_layer_3", out / "_layer_3.partial")  # the first process's layer in flight
    before = tree_files(out)
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert_one_line_error(ktq(*cpu_args(moe_sample, out, "kt")), "another ktq process is writing into")
        assert tree_files(out) == before
    finally:
        os.close(fd)
    assert ktq(*cpu_args(moe_sample, out, "kt")).code == 0
    assert tree_files(out) == tree_files(converted["kt"])
