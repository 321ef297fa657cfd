"""Pass ``calibrate``: run the calibration samples through the observed graph, then remove observers.

Produces ``activation_stats``: for every observed layer, the per-input-channel absolute maximum and
per-token maxima of its input over the calibration samples, and the observer's sample of input rows
where it kept one (PT2E's calibration + the observer removal of ``convert``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from qsc.errors import CalibrationError
from qsc.graph import finalize
from qsc.pipeline import Pass, PassContext, PassResult

from .insert_observers import OBSERVER_ROOT, ActivationObserver


@dataclass(frozen=True)
class ActivationStats:
    channel_absmax: torch.Tensor  # [K]
    token_absmax_max: float
    token_absmax_mean: float
    sample: torch.Tensor | None = None  # [<= SAMPLE_ROWS, K] input rows, where smooth_quant searches


class Calibrate(Pass):
    name = "calibrate"
    requires = ("observers",)
    produces = ("activation_stats",)
    invalidates = ("observers",)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        observers: dict[str, ActivationObserver] = ctx.analyses["observers"]
        samples = ctx.calibration_samples()
        for obs in observers.values():
            obs.enabled = True
        with torch.no_grad():
            for sample in ctx.progress(samples, "calibrating", total=len(samples)):
                gm(**sample)
        stats = {}
        for layer, obs in observers.items():
            if obs.channel_absmax is None:
                raise CalibrationError(f"layer '{layer}' was never executed by the calibration samples")
            stats[layer] = ActivationStats(
                obs.channel_absmax, obs.token_absmax_max, obs.token_absmax_sum / obs.tokens, obs.sample
            )
        ctx.analyses["activation_stats"] = stats
        return PassResult(finalize(_strip_observers(gm)), modified=True)


def _strip_observers(gm: fx.GraphModule) -> fx.GraphModule:
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target.startswith(OBSERVER_ROOT + "."):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    delattr(gm, OBSERVER_ROOT)
    return gm
