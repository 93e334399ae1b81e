"""What every command's options share: the spellings an option answers to, and the choices built from the formats."""

from __future__ import annotations

from enum import Enum

import typer

from ktq.kernels.ktformat import METHODS


def choices(name: str, values) -> type[Enum]:
    """An option's choices as Typer takes them: a str Enum whose members are the values themselves."""
    return Enum(name, {value: value for value in values}, type=str)


# kt-kernel's CPU methods by the name ktq's options give them (int4 -> AMXINT4, int8 -> AMXINT8)
KtMethod = choices("KtMethod", METHODS)


def opt(default, *names: str, help: str):
    """Each option under its snake_case name and its kebab-case twin."""
    spellings = []
    for name in names:
        spellings.append(name)
        if "_" in name:
            spellings.append(name.replace("_", "-"))
    return typer.Option(default, *spellings, help=help)
