"""The ``qsc`` command line: ``compile``, ``inspect``, ``eval``, ``export``, ``generate``, ``record``.

Every failure the user can cause is a ``QscError``: printed as one ``error:`` line on stderr with a
non-zero exit status (2 for bad input or configuration, 3 for a failing pass). Python warnings print
as one ``warning:`` line each, without the file and line that raised them.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from typing import Any, Callable, Iterable, Iterator

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, TextColumn

from qsc.errors import QscError

stdout = Console()
stderr = Console(stderr=True)


def progress_bar(
    items: Iterable[Any], description: str, total: int | None = None, status: Callable[[], str] | None = None
) -> Iterable[Any]:
    """The ``Progress`` that CLI commands hand to the compiler: a transient bar on stderr, with
    the pass's ``status`` (a running loss) after it. Off when stderr is not a terminal: there a
    finished bar leaves a blank line, and a log has no use for one."""
    columns = [*Progress.get_default_columns(), TextColumn("{task.fields[status]}")]
    with Progress(*columns, console=stderr, transient=True, disable=not stderr.is_terminal) as bar:
        task = bar.add_task(description, total=total, status="")
        for item in items:
            yield item
            bar.update(task, advance=1, status=status() if status else "")


def one_line(text: object) -> str:
    """``text`` on one line: its lines joined, blank ones dropped."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` for the CLI: where in torch a warning comes from is noise to a user."""
    stderr.print(f"[yellow]warning:[/] {escape(one_line(message))}", highlight=False, soft_wrap=True)


@contextlib.contextmanager
def no_traceback(command: str) -> Iterator[None]:
    """For commands that run a user's artifact or model: an exception qsc did not foresee still
    ends in one line (and exit 2), naming the command and the exception."""
    try:
        yield
    except (QscError, click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
        raise
    except Exception as e:
        raise QscError(f"qsc {command} failed: {type(e).__name__}: {one_line(e)}") from e


class QscGroup(click.Group):
    """Turns ``QscError`` into a one-line message and its exit code instead of a traceback, and
    warnings into one line each."""

    def invoke(self, ctx: click.Context) -> Any:
        with warnings.catch_warnings():  # restores showwarning: in-process callers (tests) keep theirs
            warnings.showwarning = _show_warning
            try:
                return super().invoke(ctx)
            except QscError as e:
                # escaped: messages quote shapes, [batch, 4, 2], which rich would take for markup
                stderr.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
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
