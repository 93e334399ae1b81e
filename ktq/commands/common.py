"""What every command's options share: one way to declare them, the options ktq cpu and ktq gpu both take (one
default each), the choices built from the formats, and the names other code's messages give this command's options.

Options are declared kebab-case and shown so in --help; the app matches `--snake_case` to them too (the reference
scripts' spellings: app.kebab), and error messages name an option as the user typed it (app.rename_options)."""

from __future__ import annotations

from contextlib import contextmanager
from enum import Enum

import typer

from ktq.app import kebab, rename_options
from ktq.errors import KtqError
from ktq.gpu.options import DEFAULT_DATASET, DEFAULT_DATASET_SPLIT, GpuOptions
from ktq.kernels.ktformat import METHODS


def choices(name: str, values) -> type[Enum]:
    """An option's choices as Typer takes them: a str Enum whose members are the values themselves."""
    return Enum(name, {value: value for value in values}, type=str)


# kt-kernel's CPU methods by the name ktq's options give them (int4 -> AMXINT4, int8 -> AMXINT8)
KtMethod = choices("KtMethod", METHODS)


def opt(default, *names: str, help: str, **settings):
    """An option under its kebab-case names (a name declared snake_case is shown kebab-case all the same); settings
    as typer.Option takes them (min, metavar, show_default: a text for a default computed at run time)."""
    return typer.Option(default, *map(kebab, names), help=help, **settings)


def _help(when: str, text: str) -> str:
    """`when` starts the help of an option that only matters with another one ("With --calibrate: ")."""
    return f"{when}{text}" if when else text[0].upper() + text[1:]


# The options ktq cpu and ktq gpu both take, one definition each: one default, one help.
def threadpool_count(when: str = ""):
    return opt(None, "--threadpool-count", min=1, show_default="this machine's NUMA nodes",
               help=_help(when, "NUMA parts; serve with the same --kt-threadpool-count."))


def num_calibration_samples(when: str = ""):
    return opt(GpuOptions.num_calibration_samples, "--num-calibration-samples",
               help=_help(when, "calibration samples."))


def max_sequence_length(when: str = ""):
    return opt(GpuOptions.max_sequence_length, "--max-sequence-length", help=_help(when, "tokens per sample at most."))


def dataset_split(when: str = ""):
    return opt(None, "--dataset-split", show_default=f"train; {DEFAULT_DATASET_SPLIT} for {DEFAULT_DATASET}",
               help=_help(when, "split of a hub or saved dataset."))


def text_column(when: str = ""):
    return opt(None, "--text-column", show_default="messages, else text",
               help=_help(when, "column to calibrate on; chat messages go through the tokenizer's chat template."))


def random_seed(when: str = ""):
    return opt(GpuOptions.random_seed, "--random-seed", help=_help(when, "seed for picking calibration samples."))


def force_cpu(when: str = ""):
    return opt(False, "--force-cpu", help=_help(when, "hide every GPU and calibrate on the CPU."))


def as_json():
    return opt(False, "--json", help="With --dry-run: the plan as JSON on stdout.")


def quiet():
    return opt(False, "--quiet", "-q", help="No progress output.")


@contextmanager
def options_named(names: dict[str, str]):
    """Errors of code that names another command's options (ktq cpu --calibrate runs ktq gpu's engine), with those
    options named as this command calls them (`names`: the other command's kebab-case name -> this command's)."""
    try:
        yield
    except KtqError as exc:
        exc.args = (rename_options(str(exc), names),)
        raise
