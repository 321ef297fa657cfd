"""The errors qsc raises on purpose.

Every failure a user can cause (a bad file, an unsupported setting, a model that does not export)
ends in a ``QscError`` whose message names what is wrong and where; the CLI prints that message and
exits non-zero. Anything else escaping qsc is a bug in qsc.
"""

from __future__ import annotations


class QscError(Exception):
    """Base class: a failure caused by the input, explained in its message."""

    exit_code = 2


class InputError(QscError):
    """A file or argument the user gave cannot be used (missing, wrong format, corrupt, unsafe)."""


class ConfigError(QscError):
    """A configuration value is unsupported or inconsistent."""


class CalibrationError(QscError):
    """Calibration data is malformed: NaN/Inf values, wrong shapes, missing inputs."""


class ExportError(QscError):
    """``torch.export`` could not trace the model; the message names the construct and a fix."""


class PassError(QscError):
    """A compiler pass failed; names the pass and, where known, the graph node."""

    exit_code = 3

    def __init__(self, pass_name: str, message: str, node: str | None = None):
        self.pass_name = pass_name
        self.node = node
        where = f"pass '{pass_name}'" + (f" at node '{node}'" if node else "")
        super().__init__(f"{where}: {message}")


class PipelineError(QscError):
    """A pipeline is malformed: unknown pass, or a pass whose required analyses nobody produces."""
