"""Pass ``insert_observers``: put an activation observer in front of every quantizable linear.

Like PT2E's ``prepare``: the observers are ordinary graph nodes (``call_module``) that pass their
input through unchanged; they record only while enabled, which the ``calibrate`` pass does while it
runs the calibration data. Weight statistics need no observer: the pass records them directly
(analysis ``weight_stats``: per-output-channel and per-input-channel absolute maxima).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from qsc.graph import at_node, finalize, quantizable_linears
from qsc.pipeline import Pass, PassContext, PassResult

OBSERVER_ROOT = "qsc_observers"


class ActivationObserver(torch.nn.Module):
    """Per-input-channel and per-token absolute maxima of a linear's input."""

    def __init__(self, layer: str):
        super().__init__()
        self.layer = layer
        self.enabled = False
        self.channel_absmax: torch.Tensor | None = None  # [K], max over all tokens seen
        self.token_absmax_max = 0.0
        self.token_absmax_sum = 0.0
        self.tokens = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            with torch.no_grad():
                a = x.detach().abs().float().reshape(-1, x.shape[-1])
                cmax = a.amax(dim=0)
                self.channel_absmax = cmax if self.channel_absmax is None else torch.maximum(self.channel_absmax, cmax)
                tmax = a.amax(dim=1)
                self.token_absmax_max = max(self.token_absmax_max, float(tmax.max()))
                self.token_absmax_sum += float(tmax.sum())
                self.tokens += tmax.numel()
        return x


@dataclass(frozen=True)
class WeightStats:
    out_channel_absmax: torch.Tensor  # [N]: the range each output channel's scale must cover
    in_channel_absmax: torch.Tensor  # [K]: what SmoothQuant balances against the activations

    @classmethod
    def of(cls, weight: torch.Tensor) -> "WeightStats":
        a = weight.detach().abs().float()
        return cls(a.amax(dim=1), a.amax(dim=0))


def observer_name(layer: str) -> str:
    return layer.replace(".", "_")


class InsertObservers(Pass):
    name = "insert_observers"
    produces = ("observers", "weight_stats")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        cfg = ctx.config
        root = torch.nn.Module()
        gm.add_submodule(OBSERVER_ROOT, root)
        observers, weight_stats = {}, {}
        for site in quantizable_linears(gm, cfg.include, cfg.exclude):
            with at_node(site.node):
                obs = ActivationObserver(site.layer)
                root.add_module(observer_name(site.layer), obs)
                x = site.node.args[0]
                with gm.graph.inserting_before(site.node):
                    observed = gm.graph.call_module(f"{OBSERVER_ROOT}.{observer_name(site.layer)}", (x,))
                    observed.meta = dict(x.meta)
                site.node.replace_input_with(x, observed)
                observers[site.layer] = obs
                weight_stats[site.layer] = WeightStats.of(gm.get_parameter(site.weight_target))
        ctx.analyses["observers"] = observers
        ctx.analyses["weight_stats"] = weight_stats
        return PassResult(finalize(gm), modified=bool(observers))
