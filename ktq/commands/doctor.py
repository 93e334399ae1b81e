"""ktq doctor: what this machine offers and which ktq commands can run here."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ktq.commands.common import opt


def doctor(
    path: Path = opt(Path("."), "--path", help="Report the free disk space where this path lives (e.g. the output "
                     "folder)."),
    as_json: bool = opt(False, "--json", help="The report as JSON on stdout."),
) -> None:
    """Check what this machine offers and which commands run here.

    CPU features, NUMA nodes, RAM, disk, GPUs and package versions against the tested ones."""
    from rich.console import Console
    from rich.table import Table

    from ktq.app import app
    from ktq.doctor import BLOCKED, READY, diagnose
    from ktq.progress import gb

    report = diagnose([command.name for command in app.registered_commands if command.name], path)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    cpu, gpus = report["cpu"], report["gpus"]
    machine = Table(title=f"ktq {report['ktq']} doctor", show_header=False, title_justify="left")
    machine.add_column(style="bold")
    machine.add_column()
    machine.add_row("CPU", f"{cpu['model']}: {cpu['logical_cpus']} logical CPUs for ktq, "
                    f"{cpu['physical_cores']} physical cores")
    machine.add_row("NUMA nodes", f"{cpu['numa_nodes']} (the default --threadpool-count)")
    machine.add_row("AVX-512", ", ".join(cpu["avx512"]) or "no")
    machine.add_row("AMX", ", ".join(cpu["amx"]) or "no")
    machine.add_row("RAM", f"{gb(report['ram']['available'])} available of {gb(report['ram']['total'])}")
    machine.add_row("disk", f"{gb(report['disk']['free'])} free on {report['disk']['path']}")
    devices = "; ".join(f"{g['name']} ({gb(g['memory'])})" for g in gpus["devices"])
    machine.add_row("GPUs", f"{devices or 'none'} [dim]({gpus['note']})[/]")
    packages = Table("package", "installed", "tested with", title="packages", title_justify="left")
    for name, versions in report["packages"].items():
        packages.add_row(name, versions["installed"] or "[dim]not installed[/]", versions["pinned"] or "")
    commands = Table("command", "status", "why", title="commands", title_justify="left")
    colour = {READY: "green", BLOCKED: "red"}
    for status in report["commands"]:
        commands.add_row(status["name"], f"[{colour.get(status['status'], 'yellow')}]{status['status']}[/]",
                         status["reason"])
    console = Console()
    for table in (machine, packages, commands):
        console.print(table)
