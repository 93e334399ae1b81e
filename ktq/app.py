"""The Typer application and the one place where failures become exit codes.

Every command raises KtqError for problems the user can fix; `main` turns that into one line on stderr and exit
code 2. Anything else is a bug in ktq: one line and exit code 1, the traceback only with --debug.
"""

from __future__ import annotations

import re
import sys

import typer

from ktq import __version__
from ktq.errors import Interrupted, KtqError


def kebab(name: str) -> str:
    """An option name as ktq declares and shows it: `dry_run` -> `dry-run`. The reference scripts spell their options
    snake_case, Typer and `hf` kebab-case; the parser reads every option name the user types through this, so both
    spellings are one option (choice values go through it too, on both sides of the comparison: harmless)."""
    return name.replace("_", "-")


# an option named in a message: `--` at the start of a word, not inside a path or another word
_OPTION_IN_TEXT = re.compile(r"(?<![\w./-])--[A-Za-z0-9][\w-]*")


def rename_options(message: str, names: dict[str, str]) -> str:
    """The options a message names, each as `names` gives it (keyed by the kebab-case name), else kebab-case."""
    return _OPTION_IN_TEXT.sub(lambda match: names.get(kebab(match[0]), kebab(match[0])), message)


def _as_typed(args: list[str]) -> dict[str, str]:
    """Each option of the command line by its kebab-case name, as the user spelled it (`--dry-run` -> `--dry_run`)."""
    names = (arg.split("=", 1)[0] for arg in args if arg.startswith("--"))
    return {kebab(name): name for name in names}


app = typer.Typer(
    name="ktq",
    help="Convert Mixture-of-Experts checkpoints for KTransformers: CPU experts to kt-kernel AMXINT4/AMXINT8, "
    "GPU experts to GPTQ.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # click's plain help: at 80 columns Typer's rich tables cut option names (--cpuinfer-thr…) and squeeze the help
    # into a column a dozen characters wide
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"], "token_normalize_func": kebab},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ktq {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback when something fails."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """ktq: one command for both halves of a KTransformers MoE deployment."""


_INTERRUPTED = 130  # the exit code of a process ended by Ctrl-C (128 + SIGINT)
# Numba's error when ktq.kernels asked for its thread-safe layers and neither OpenMP nor TBB loads
_NO_THREADING_LAYER = "No threading layer could be loaded"


def _one_line(message: object) -> str:
    return " ".join(str(message).split())


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    typed = _as_typed(args)  # errors name each option as the user typed it
    try:
        result = app(args=args, prog_name="ktq", standalone_mode=False)
    except (KeyboardInterrupt, typer.Abort):
        result = _INTERRUPTED
    except typer.TyperException as exc:  # bad usage (Typer's vendored click)
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `ktq`: the help is the message (Typer tells it so too)
            exc.show()
            sys.exit(exc.exit_code)
        context = getattr(exc, "ctx", None)
        hint = f" (see {context.command_path} --help)" if context is not None else ""
        message = rename_options(_one_line(exc.format_message()).rstrip("."), typed)
        print(f"ktq: error: {message}{hint}", file=sys.stderr)
        sys.exit(2)
    except KtqError as exc:
        if debug:
            raise
        kind = "interrupted" if isinstance(exc, Interrupted) else "error"
        print(f"ktq: {kind}: {rename_options(_one_line(exc), typed)}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except Exception as exc:  # a bug in ktq, not in the user's input
        if debug:
            raise
        if str(exc).startswith(_NO_THREADING_LAYER):
            print(f"ktq: error: {_NO_THREADING_LAYER}: ktq runs Numba kernels from two threads at once, which "
                  "needs OpenMP (install libgomp1) or TBB (pip install tbb)", file=sys.stderr)
            sys.exit(2)
        print(f"ktq: internal error: {type(exc).__name__}: {_one_line(exc)} (rerun with --debug for the traceback)",
              file=sys.stderr)
        sys.exit(1)
    if result == _INTERRUPTED:  # Typer turns Ctrl-C into this exit code without a word
        print("ktq: interrupted", file=sys.stderr)
    sys.exit(result if isinstance(result, int) else 0)
