"""Passes, the compile context they share, and the manager that runs them.

A pass is a small object with a ``name``, the analyses it ``requires``, ``produces`` and
``invalidates``, and ``run(gm, ctx) -> PassResult``. Before running anything, the manager checks
that every required analysis is provided by the context or produced by an earlier pass (and not
invalidated since); it then runs the passes in order, lints the graph after each, calls its
instruments around each one, and turns any failure into a ``PassError`` that names the pass and,
where the pass was rewriting a node, that node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Protocol, Sequence

import sympy
import torch
from torch import fx

from .calibration import CalibrationSet
from .config import CompileConfig
from .errors import PassError, PipelineError, QscError


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    modified: bool
    details: dict[str, Any] = field(default_factory=dict)  # what the pass decided, for its log row


class Progress(Protocol):
    """What passes use to report long work; the CLI supplies a progress bar, tests a no-op.
    ``status``, where given, is called after each item for a short text shown beside the bar
    (a running loss)."""

    def __call__(
        self, items: Iterable[Any], description: str, total: int | None = None,
        status: Callable[[], str] | None = None,
    ) -> Iterable[Any]: ...


def no_progress(
    items: Iterable[Any], description: str, total: int | None = None, status: Callable[[], str] | None = None
) -> Iterable[Any]:
    return items


@dataclass
class PassContext:
    """Everything a pass may read besides the graph: configuration, data, teacher, analyses."""

    config: CompileConfig
    calibration: CalibrationSet
    teacher: fx.GraphModule  # the FP graph as exported, never modified
    analyses: dict[str, Any] = field(default_factory=dict)
    progress: Progress = no_progress
    # One row per pass run: the manager writes name and ``modified``; instruments add columns.
    pass_log: list[dict[str, Any]] = field(default_factory=list)
    # Where long passes keep their checkpoints (None: none kept), and whether to continue from them.
    checkpoint_dir: Path | None = None
    resume: bool = False

    def __post_init__(self) -> None:
        self.rng = torch.Generator().manual_seed(self.config.seed)  # for passes that sample
        self.analyses.setdefault("calibration", self.calibration)

    def calibration_indices(self) -> list[int]:
        """The samples passes calibrate on: those ``select_calibration`` chose, else
        ``config.calib_samples`` of the set, evenly spaced."""
        chosen = self.analyses.get("calibration_selection")
        return list(chosen) if chosen is not None else self.calibration.spread(self.config.calib_samples)

    def calibration_samples(self) -> list[dict[str, torch.Tensor]]:
        return [self.calibration.sample(i) for i in self.calibration_indices()]


class Pass:
    name: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ()
    produces: ClassVar[tuple[str, ...]] = ()
    invalidates: ClassVar[tuple[str, ...]] = ()  # analyses that no longer describe the graph after it

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def fixed_sizes(self, gm: fx.GraphModule, config: CompileConfig) -> set[sympy.Symbol]:
        """The symbols of the FP graph's open input sizes this pass needs fixed at their calibrated
        values: the compile exports the dimensions that depend on them static (``qsc.shapes``)."""
        return set()

    def __repr__(self) -> str:
        return f"<pass {self.name}>"


class PassInstrument:
    """Hooks around every pass (MLIR's PassInstrumentation); override what you need."""

    def before_pass(self, p: Pass, gm: fx.GraphModule, ctx: PassContext) -> None: ...

    def after_pass(self, p: Pass, result: PassResult, ctx: PassContext) -> None: ...

    def on_failure(self, p: Pass, gm: fx.GraphModule, ctx: PassContext, error: BaseException) -> None: ...


class PassManager:
    def __init__(self, passes: Sequence[Pass], instruments: Sequence[PassInstrument] = ()):
        self.passes = list(passes)
        self.instruments = list(instruments)

    def validate(self, provided: Iterable[str]) -> None:
        """Fail before running anything if some pass's requirement is never produced before it."""
        available = set(provided)
        for p in self.passes:
            missing = [a for a in p.requires if a not in available]
            if missing:
                raise PipelineError(
                    f"pass '{p.name}' requires {missing}, which no earlier pass produces "
                    f"(pipeline: {[q.name for q in self.passes]})"
                )
            available.update(p.produces)
            available.difference_update(p.invalidates)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        self.validate(ctx.analyses)
        for p in self.passes:
            for inst in self.instruments:
                inst.before_pass(p, gm, ctx)
            try:
                result = p.run(gm, ctx)
                result.graph_module.graph.lint()
            except Exception as e:
                for inst in self.instruments:
                    inst.on_failure(p, gm, ctx, e)
                if isinstance(e, QscError):  # already says what and where
                    raise
                raise PassError(p.name, f"{type(e).__name__}: {e}", getattr(e, "qsc_node", None)) from e
            missing = [a for a in p.produces if a not in ctx.analyses]
            if missing:
                raise PassError(p.name, f"declared it produces {missing} but did not")
            for name in p.invalidates:
                ctx.analyses.pop(name, None)
            gm = result.graph_module
            ctx.pass_log.append({"pass": p.name, "modified": result.modified, **result.details})
            for inst in self.instruments:
                inst.after_pass(p, result, ctx)
        return gm

