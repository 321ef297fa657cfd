"""Pass instruments: timing and memory, IR dumps (with a crash reproducer), numerical checks."""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import torch
from torch import fx

from .graph import state_inputs
from .metrics import relative_l2
from .pipeline import Pass, PassContext, PassInstrument, PassResult


def _peak_memory_bytes() -> int:
    """Peak CUDA allocation if a GPU is in use, else the process's peak resident set size."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


class Timing(PassInstrument):
    """Wall time of each pass and the peak memory seen by its end."""

    def before_pass(self, p: Pass, gm: fx.GraphModule, ctx: PassContext) -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()
        self._start = time.perf_counter()

    def after_pass(self, p: Pass, result: PassResult, ctx: PassContext) -> None:
        ctx.pass_log[-1]["seconds"] = time.perf_counter() - self._start
        ctx.pass_log[-1]["peak_memory_bytes"] = _peak_memory_bytes()


class DumpIR(PassInstrument):
    """Writes the graph after every pass to ``DIR/NN-<pass>.txt``.

    When a pass fails, the graph it was given goes to ``DIR/NN-<pass>.crash.txt``: the input that
    reproduces the failure, like MLIR's crash reproducer.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._index = 0

    def _write(self, name: str, gm: fx.GraphModule) -> None:
        path = self.directory / f"{self._index:02d}-{name}"
        path.write_text(gm.print_readable(print_output=False, include_stride=False, include_device=False))

    def before_pass(self, p: Pass, gm: fx.GraphModule, ctx: PassContext) -> None:
        if self._index == 0:
            self._write("input.txt", gm)
        self._index += 1

    def after_pass(self, p: Pass, result: PassResult, ctx: PassContext) -> None:
        self._write(f"{p.name}.txt", result.graph_module)

    def on_failure(self, p: Pass, gm: fx.GraphModule, ctx: PassContext, error: BaseException) -> None:
        self._write(f"{p.name}.crash.txt", gm)


class NumericCheck(PassInstrument):
    """Relative L2 error of each pass's graph against the FP graph on the first calibration sample.

    A pass that should preserve numerics (observer insertion, SmoothQuant's migration) shows ~0;
    a quantizing pass shows its error. The first pass whose error jumps is the one to look at.
    """

    def __init__(self, sample: dict[str, torch.Tensor], reference: torch.Tensor):
        self.sample = sample
        # A reference computed with grad enabled (an eager call outside no_grad) would keep its
        # autograd graph, and with it every activation of the FP forward, alive for the compile.
        self.reference = reference.detach()

    def after_pass(self, p: Pass, result: PassResult, ctx: PassContext) -> None:
        gm = result.graph_module
        with torch.no_grad():
            out = gm(**self.sample, **state_inputs(gm, self.sample))
        ctx.pass_log[-1]["rel_l2_vs_fp"] = relative_l2(out, self.reference)
