"""Pass ``insert_observers``: put an activation observer in front of every quantizable linear.

Like PT2E's ``prepare``: the observers are ordinary graph nodes (``call_module``) that pass their
input through unchanged; they record only while enabled, which the ``calibrate`` pass does while it
runs the calibration data. Weight statistics need no observer: the pass records them directly
(analysis ``weight_stats``: per-output-channel and per-input-channel absolute maxima).

Where ``smooth_quant`` will search its migration strength per layer, the observer also keeps a
sample of its layer's input rows (tokens) to measure output error on: a uniform random subset of
all calibration tokens, at most ``SAMPLE_ROWS`` of them. Memory is bounded by
``SAMPLE_ROWS x in_features`` values in the activation dtype (plus ``SAMPLE_ROWS`` float32 keys)
per observed layer, whatever the amount of calibration data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from qsc.graph import at_node, finalize
from qsc.pipeline import Pass, PassContext, PassResult
from qsc.schemes import SchemePlan

from .smooth_quant import searches_alpha

OBSERVER_ROOT = "qsc_observers"


SAMPLE_ROWS = 512  # input rows kept per layer for smooth_quant's search (when it searches)


class ActivationObserver(torch.nn.Module):
    """Per-input-channel and per-token absolute maxima of a linear's input, and optionally a
    random sample of its rows (``seed`` given: up to ``SAMPLE_ROWS``, the same ones for a seed)."""

    def __init__(self, layer: str, seed: int | None = None):
        super().__init__()
        self.layer = layer
        self.enabled = False
        self.channel_absmax: torch.Tensor | None = None  # [K], max over all tokens seen
        self.token_absmax_max = 0.0
        self.token_absmax_sum = 0.0
        self.tokens = 0
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)
        self.sample: torch.Tensor | None = None  # [<= SAMPLE_ROWS, K], in the input's dtype
        self.sample_keys: torch.Tensor | None = None  # the random key of each sampled row

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
                if self.generator is not None:
                    self._sample(x.detach().reshape(-1, x.shape[-1]))
        return x

    def _sample(self, rows: torch.Tensor) -> None:
        """Bottom-k sampling: each row draws a uniform key and the rows with the ``SAMPLE_ROWS``
        smallest keys seen so far stay, which is a uniform sample of all rows without replacement
        in bounded memory, fixed by the seed and the data."""
        keys, rows = _smallest(torch.rand(rows.shape[0], generator=self.generator), rows)
        if self.sample is not None:
            keys, rows = _smallest(torch.cat([self.sample_keys, keys]), torch.cat([self.sample, rows]))
        self.sample_keys, self.sample = keys, rows


def _smallest(keys: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    keep = keys.topk(min(SAMPLE_ROWS, keys.numel()), largest=False).indices
    return keys[keep], rows[keep]


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
        for site, scheme in SchemePlan(cfg).linears(gm):
            with at_node(site.node):
                weight = gm.get_parameter(site.weight_target)
                samples = searches_alpha(cfg, scheme)
                # A seed of its own per observer: the rows a layer samples do not depend on
                # how many rows the layers before it drew.
                seed = int(torch.randint(2**62, (), generator=ctx.rng)) if samples else None
                obs = ActivationObserver(site.layer, seed)
                root.add_module(observer_name(site.layer), obs)
                x = site.node.args[0]
                with gm.graph.inserting_before(site.node):
                    observed = gm.graph.call_module(f"{OBSERVER_ROOT}.{observer_name(site.layer)}", (x,))
                    observed.meta = dict(x.meta)
                site.node.replace_input_with(x, observed)
                observers[site.layer] = obs
                weight_stats[site.layer] = WeightStats.of(weight)
        ctx.analyses["observers"] = observers
        ctx.analyses["weight_stats"] = weight_stats
        return PassResult(finalize(gm), modified=bool(observers))
