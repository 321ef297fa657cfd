"""The ``qsc`` command line: ``compile``, ``inspect``, ``eval``, ``export``, ``generate``, ``record``.

Every failure the user can cause is a ``QscError``: printed as one ``error:`` line on stderr with a
non-zero exit status (2 for bad input or configuration, 3 for a failing pass).
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Iterable

import click
from rich.console import Console
from rich.progress import Progress, TextColumn

from qsc.errors import QscError

stdout = Console()
stderr = Console(stderr=True)


def progress_bar(
    items: Iterable[Any], description: str, total: int | None = None, status: Callable[[], str] | None = None
) -> Iterable[Any]:
    """The ``Progress`` that CLI commands hand to the compiler: a transient bar on stderr, with
    the pass's ``status`` (a running loss) after it."""
    columns = [*Progress.get_default_columns(), TextColumn("{task.fields[status]}")]
    with Progress(*columns, console=stderr, transient=True) as bar:
        task = bar.add_task(description, total=total, status="")
        for item in items:
            yield item
            bar.update(task, advance=1, status=status() if status else "")


class QscGroup(click.Group):
    """Turns ``QscError`` into a one-line message and its exit code instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except QscError as e:
            stderr.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            sys.exit(e.exit_code)


@click.group(cls=QscGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qsc")
def cli() -> None:
    """qsc compresses video diffusion transformers (Wan2.1, HunyuanVideo, CogVideoX, any nn.Module).

    It traces the model with torch.export, runs compression passes over the graph (calibration,
    SmoothQuant, low-bit quantization) and writes a deployable artifact directory (NAME.qsc/).
    Start with `qsc compile` (the bundled reference model) or `qsc compile MODEL`.
    """


def _register() -> None:
    from .compile import compile_command
    from .eval import eval_command
    from .export import export_command
    from .generate import generate
    from .inspect import inspect_command
    from .record import record_command

    for command in (compile_command, inspect_command, eval_command, export_command, generate, record_command):
        cli.add_command(command)


_register()


def main() -> None:
    cli(prog_name="qsc")
