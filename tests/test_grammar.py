"""One grammar for every command: each option answers to its --kebab-case and its --snake_case spelling, --help
shows the kebab one with its default, whole at 80 columns, an option two commands share has one default, and errors
name options and arguments as the user typed them."""

from __future__ import annotations

import json
import os
import re
from enum import Enum

import pytest
import typer

from conftest import ktq_subprocess
from gpu_models import sample_moe, write_jsonl
from ktq.cli import app
from test_cli_errors import assert_one_line_error

GROUP = typer.main.get_command(app)
COMMANDS = sorted(GROUP.commands)
# what each command needs besides the option under test: its arguments and required options
REQUIRED = {"cpu": ["-i", "src", "-o", "out"], "gpu": ["--model-id", "src", "--output-dir", "out"],
            "merge": ["tree", "out"], "inspect": ["path"], "sample": ["out"], "doctor": []}
# options whose absence means "not asked for", with no default to show
NO_DEFAULT = {"--calibrate", "--cpu-output", "--ignore-patterns", "--compare", "--original-path"}
# the reference scripts give --quant-method two meanings: kt-kernel's int4 / int8 (ktq cpu), GPTQ / RTN (ktq gpu)
TWO_MEANINGS = {"--quant-method"}


def snake(name: str) -> str:
    return "--" + name[2:].replace("-", "_")


def options(command: str) -> list:
    return [p for p in GROUP.commands[command].params if isinstance(p, typer.core.TyperOption) and p.name != "help"]


def parse(command: str, args: list[str]) -> dict:
    """The values the app's parser gives the command's parameters (the app's own context settings apply)."""
    root = GROUP.make_context("ktq", [command])
    return GROUP.commands[command].make_context(command, REQUIRED[command] + args, parent=root).params


def a_value(param) -> list[str]:
    """A value for the option that is not its default, as command-line words."""
    kind = param.type_descriptor.annotation
    if param.is_flag:
        return []
    if isinstance(kind, type) and issubclass(kind, Enum):
        return [next(member.value for member in kind if member != param.default)]
    return {int: ["7"], float: ["0.5"]}.get(kind, ["x_y"])


def help_rows(text: str) -> list[str]:
    """--help's option rows, each with its wrapped help joined on one line."""
    rows = re.split(r"\n(?=  -)", text.split("Options:\n", 1)[1])
    return [" ".join(row.split()) for row in rows]


CASES = [(command, param.name, name) for command in COMMANDS for param in options(command)
         for name in param.opts + param.secondary_opts if name.startswith("--") and "-" in name[2:]]


@pytest.mark.parametrize("command,param,name", CASES, ids=[f"{c} {n}" for c, _, n in CASES])
def test_both_spellings_parse_to_the_same_value(command, param, name):
    option = next(p for p in options(command) if p.name == param)
    value = a_value(option)
    kebab, snake_case = parse(command, [name, *value]), parse(command, [snake(name), *value])
    assert kebab == snake_case
    # the option was read, not left at its default
    if option.default is True and name in option.opts:  # --merge-safetensor, on unless --no-merge-safetensor
        assert parse(command, [option.secondary_opts[0], snake(name)])[param] is True
    else:
        assert kebab[param] != parse(command, [])[param]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_at_80_columns_shows_every_option_whole_with_its_default(command):
    result = ktq_subprocess(command, "--help", env={**os.environ, "COLUMNS": "80"})
    assert result.code == 0, result.stderr
    assert max(map(len, result.stdout.splitlines())) <= 80
    rows = help_rows(result.stdout)
    for param in options(command):
        names = param.opts + param.secondary_opts
        assert not any("_" in name for name in names)  # kebab-case, the one spelling shown
        row, = (row for row in rows if re.match(rf"({'|'.join(names)})(?![\w-])", row))
        for name in names:  # each whole: a cut name would be another word
            assert re.search(rf"(?<![\w-]){name}(?![\w-])", row.split("  ", 1)[0]), (name, row)
        if not (param.is_flag or param.required or names[0] in NO_DEFAULT):
            assert "[default:" in row, row


def test_an_option_two_commands_share_has_one_default():
    defaults: dict[str, dict[str, tuple]] = {}
    for command in COMMANDS:
        for param in options(command):
            for name in param.opts:
                defaults.setdefault(name, {})[command] = (param.default, param.show_default)
    shared = {name: seen for name, seen in defaults.items() if len(seen) > 1 and name not in TWO_MEANINGS}
    assert "--threadpool-count" in shared and "--num-calibration-samples" in shared
    for name, seen in shared.items():
        assert len(set(seen.values())) == 1, (name, seen)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return sample_moe(tmp_path_factory.mktemp("grammar") / "src", layers=2, dense_layers=0)


# what a plan measures on this machine at that moment (free memory and disk, rates, times): the rest is the run
_MEASURED = re.compile(r"free|budget|process|peak|available|baseline|second|rate|bottleneck|classes")


def _plan(result) -> dict:
    assert result.code == 0, result.stderr
    return {key: value for key, value in json.loads(result.stdout).items() if not _MEASURED.search(key)}


def test_cpu_dry_run_is_the_same_in_both_spellings(src, tmp_path):
    common = ["--threadpool-count", "1", "--quant-method", "int8", "--no-merge-safetensor", "--json"]
    kebab = ktq_subprocess("cpu", "--input-path", src, "--output", tmp_path / "out", "--dry-run", *common)
    snake_case = ktq_subprocess("cpu", "--input_path", src, "--output", tmp_path / "out", "--dry_run",
                                *map(lambda word: snake(word) if word.startswith("--") else word, common))
    plan = _plan(kebab)
    assert (plan["method"], plan["numa"], plan["form"]) == ("int8", 1, "kt")
    assert _plan(snake_case) == plan


def test_gpu_dry_run_is_the_same_in_both_spellings(src, tmp_path):
    data = write_jsonl(tmp_path / "calib.jsonl", [{"text": "the quick brown fox jumps over the lazy dog"}] * 4)
    options = ["--model-id", src, "--output-dir", tmp_path / "out", "--dataset", data, "--quant-type", "W4A16",
               "--num-calibration-samples", 4, "--max-sequence-length", 64, "--force-cpu", "--json"]
    kebab = ktq_subprocess("gpu", "--dry-run", *options)
    snake_case = ktq_subprocess("gpu", "--dry_run",
                                *(snake(w) if isinstance(w, str) and w.startswith("--") else w for w in options))
    plan = _plan(kebab)
    assert (plan["quant_type"], plan["device"]) == ("W4A16", "cpu")
    assert _plan(snake_case) == plan


@pytest.mark.parametrize("spelling", ["--threadpool-count", "--threadpool_count"])
def test_a_usage_error_names_the_option_as_typed(src, tmp_path, spelling):
    result = ktq_subprocess("cpu", "-i", src, "-o", tmp_path / "out", spelling, 0)
    assert_one_line_error(result, f"'{spelling}'")


def test_calibrate_errors_name_calibrate(src, tmp_path):
    """ktq cpu --calibrate runs ktq gpu's engine: its errors name ktq cpu's options, not ktq gpu's --dataset."""
    result = ktq_subprocess("cpu", "-i", src, "-o", tmp_path / "out", "--calibrate", tmp_path / "missing.jsonl")
    assert_one_line_error(result, "--calibrate", "missing.jsonl: no such file or folder")
    assert "--dataset" not in result.stderr


def test_merge_errors_name_the_out_argument(src, tmp_path):
    tree = tmp_path / "tree"
    assert ktq_subprocess("cpu", "-i", src, "-o", tree, "--threadpool-count", 1, "--no-merge-safetensor",
                          "-q").code == 0
    (tmp_path / "a-file").write_text("mine")
    result = ktq_subprocess("merge", tree, tmp_path / "a-file")
    assert_one_line_error(result, "OUT", "a-file is a file")
    assert "--output" not in result.stderr and (tmp_path / "a-file").read_text() == "mine"


def test_cpu_output_errors_name_cpu_output(src, tmp_path):
    data = write_jsonl(tmp_path / "calib.jsonl", [{"text": "the quick brown fox jumps over the lazy dog"}] * 2)
    (tmp_path / "a-file").write_text("mine")
    result = ktq_subprocess("gpu", "--model-id", src, "--output-dir", tmp_path / "out", "--dataset", data,
                            "--force-cpu", "--num-calibration-samples", 2, "--cpu-output", tmp_path / "a-file",
                            "--threadpool-count", 1, "-q")
    assert_one_line_error(result, "--cpu-output", "a-file is a file")
    assert "--output " not in result.stderr


def test_gpu_cpu_output_defaults_to_the_machines_numa_nodes(monkeypatch, src, tmp_path, ktq):
    """ktq gpu --cpu-output splits into this machine's NUMA nodes unless told otherwise, as ktq cpu does."""
    from ktq.commands import gpu as gpu_command

    seen = {}
    monkeypatch.setattr(gpu_command, "numa_nodes", lambda: 3)
    monkeypatch.setattr("ktq.gpu.run.run", lambda opts, debug: seen.setdefault("numa", opts.cpu_experts.numa))
    data = write_jsonl(tmp_path / "calib.jsonl", [{"text": "a b c"}])
    result = ktq("gpu", "--model-id", src, "--output-dir", tmp_path / "out", "--dataset", data, "--force-cpu",
                 "--cpu-output", tmp_path / "cpu")
    assert result.code == 0, result.stderr
    assert seen == {"numa": 3}
