"""The one rule for output folders, through the real CLI of every command that writes (ktq cpu and --calibrate,
ktq gpu and --cpu-output, ktq merge): no output at, inside or above an input; a folder ktq did not write is refused
and never emptied, --force / --overwrite included; a complete output re-run writes nothing and says so; Ctrl-C ends
with one line saying that the same command continues, and it does."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from conftest import convert_in_process, interrupt_when, ktq_subprocess, layers_recorded, mtimes, tree_files
from gpu_models import chat_rows, write_jsonl
from test_cli_errors import assert_one_line_error


@pytest.fixture(scope="module")
def parent(tmp_path_factory, moe_sample, converted) -> Path:
    """parent/model (a checkpoint), parent/tree (a .kt output of it), parent/keep.txt (the user's), chat.jsonl."""
    folder = tmp_path_factory.mktemp("outputs") / "parent"
    folder.mkdir()
    shutil.copytree(moe_sample, folder / "model")
    shutil.copytree(converted["kt"], folder / "tree")
    (folder / "keep.txt").write_text("the user's")
    write_jsonl(folder.parent / "chat.jsonl", chat_rows(8))
    return folder


GPU = ("gpu", "--model_id", "{p}/model", "--dataset", "{chat}", "--force_cpu")
WRITERS = {  # every command that writes, with its output in {out} and its start-over flag
    "cpu": ("cpu", "-i", "{p}/model", "-o", "{out}", "--force"),
    "cpu --calibrate": ("cpu", "-i", "{p}/model", "-o", "{out}", "--calibrate", "{chat}", "--force"),
    "gpu": (*GPU, "--output_dir", "{out}", "--overwrite"),
    "gpu --cpu-output": (*GPU, "--output_dir", "{p}/../gpu-beside", "--cpu-output", "{out}", "--overwrite"),
    "merge": ("merge", "{p}/tree", "{out}", "--force"),
    "merge --original-path": ("merge", "{p}/../tree-copy", "{out}", "--original-path", "{p}/model", "--force"),
}


def args(command: str, parent: Path, out: Path) -> list[str]:
    return [a.format(p=parent, out=out, chat=parent.parent / "chat.jsonl") for a in WRITERS[command]]


@pytest.mark.parametrize("command", WRITERS)
def test_an_output_that_holds_the_input_is_refused_and_the_input_kept(parent, command):
    """The slip of an output folder one level too high: `parent/model` in, `parent` out, with --overwrite."""
    if command == "merge --original-path" and not (parent.parent / "tree-copy").exists():
        shutil.copytree(parent / "tree", parent.parent / "tree-copy")
    before = tree_files(parent)
    result = ktq_subprocess(*args(command, parent, parent))
    assert_one_line_error(result, "holds", "ktq never writes into a folder above its input")
    assert tree_files(parent) == before
    assert not (parent.parent / "gpu-beside").exists()


@pytest.mark.parametrize("command", ["cpu", "cpu --calibrate", "gpu", "gpu --cpu-output", "merge"])
def test_a_folder_ktq_did_not_write_survives_force(parent, tmp_path, command):
    users = tmp_path / "users"
    users.mkdir()
    (users / "notes.txt").write_text("the user's")
    result = ktq_subprocess(*args(command, parent, users))
    assert_one_line_error(result, f"{users} already holds files ktq did not write (notes.txt)", "only starts over")
    assert tree_files(users) == {"notes.txt": b"the user's"}


@pytest.mark.parametrize("form", ["merged", "kt"])
def test_a_complete_conversion_re_run_writes_nothing(ktq, moe_sample, converted, tmp_path, form):
    out = tmp_path / form
    shutil.copytree(converted[form], out)  # mtimes kept
    before = mtimes(out)
    extra = ["--no-merge-safetensor"] if form == "kt" else []
    result = ktq("cpu", "-i", moe_sample, "-o", out, "--threadpool-count", 2, *extra)
    assert result.code == 0, result.stderr
    assert f"{out} is complete already (3 layers): nothing to do" in result.stdout
    assert mtimes(out) == before


def test_a_damaged_layer_of_a_complete_output_is_converted_again(ktq, moe_sample, converted, tmp_path):
    out = tmp_path / "merged"
    shutil.copytree(converted["merged"], out)
    shard = sorted(out.glob("model-*.safetensors"))[1]
    os.truncate(shard, shard.stat().st_size - 1)
    result = ktq("cpu", "-i", moe_sample, "-o", out, "--threadpool-count", 2)
    assert result.code == 0 and "continuing" in result.stderr + result.stdout, result.stderr
    assert tree_files(out) == tree_files(converted["merged"])


def test_a_complete_merge_re_run_writes_nothing(ktq, moe_sample, converted, tmp_path):
    out = tmp_path / "merged"
    assert ktq("merge", converted["kt"], out, "--original-path", moe_sample).code == 0
    before = mtimes(out)
    result = ktq("merge", converted["kt"], out, "--original-path", moe_sample)
    assert result.code == 0 and "is complete already" in result.stdout, result.stderr
    assert mtimes(out) == before


def test_ctrl_c_says_the_same_command_continues_and_it_does(tmp_path):
    from ktq.sample import write_sample

    source = write_sample(tmp_path / "src", layers=24, experts=4, hidden=512, moe_intermediate=512, shards=1)
    out = tmp_path / "out"
    argv = ["cpu", "-i", source, "-o", out, "--threadpool-count", 2, "--cpuinfer-threads", 1]
    stopped = interrupt_when(argv, lambda: layers_recorded(out / "ktq.json", "layers") > 0)
    assert stopped.code == 130, stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1] == \
        "ktq: interrupted: run the same command again to continue; finished layers are kept"
    assert 0 < layers_recorded(out / "ktq.json", "layers") < 24
    rerun = ktq_subprocess(*argv)
    assert rerun.code == 0 and f"continuing {out}: " in rerun.stderr, rerun.stderr
    assert tree_files(out) == tree_files(convert_in_process(source, tmp_path / "clean"))
