"""Pass ``smooth_quant``: migrate activation outliers into the weights (SmoothQuant).

For a linear ``y = x W^T`` with input channel maxima ``a_j = max|X_j|`` (from calibration) and
weight column maxima ``w_j = max|W_:,j|``, pick ``s_j = a_j^alpha / w_j^(1-alpha)`` and rewrite

    y = (x * s^-1) (W * s)^T

which is the same function with flatter activations. The pass keeps the graph numerically
equivalent: it scales the weight and inserts an explicit ``mul(x, s^-1)`` node (tagged
``qsc_smooth``) in front of the linear; ``quantize_linear`` later folds that multiplier into the
quantized op's fused activation quantization, where it costs nothing.

The migration strength is ``smooth_alpha`` for every layer, or, with ``smooth_alpha = "auto"``,
searched per layer (SmoothQuant's and ModelOpt's auto-alpha): each alpha of ``ALPHA_GRID``, and no
migration at all (``s = 1``), is lowered exactly as ``quantize_linear`` will lower the layer, run on
the calibration rows the observer sampled, and the one with the lowest output MSE against the
float layer wins. Since no migration is a candidate, a layer never ends up worse than
round-to-nearest on that sample; such a layer keeps ``s = 1`` (exact, and the artifact's layout,
hence its planned size, does not depend on what the search picked). Layers whose activations stay
float are not smoothed: migration only helps an activation quantizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from qsc import quant
from qsc.backends import reference
from qsc.config import AUTO_ALPHA, CompileConfig
from qsc.errors import CalibrationError
from qsc.graph import SMOOTH_META, LinearSite, at_node, finalize, register_buffer
from qsc.pipeline import Pass, PassContext, PassResult
from qsc.schemes import FLOAT_ACTIVATIONS, LinearScheme, SchemePlan

_S_RANGE = (1e-5, 1e5)  # channels that were all zero must not produce inf/0 factors
ALPHA_GRID = tuple(i / 20 for i in range(21))  # 0, 0.05, ..., 1: the step of ModelOpt's search


@dataclass(frozen=True)
class Smoothing:
    """What the pass did to one layer (analysis ``smoothing``)."""

    alpha: float | None  # None: the search found no migration better than none (s = 1)
    factors: torch.Tensor  # s, [K]


def smoothing_factors(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    s = act_absmax.float().clamp_min(1e-5).pow(alpha) / w_absmax.float().clamp_min(1e-5).pow(1 - alpha)
    return s.clamp(*_S_RANGE)


def smooths(scheme: LinearScheme) -> bool:
    return scheme.a_bits != FLOAT_ACTIVATIONS


def searches_alpha(cfg: CompileConfig, scheme: LinearScheme) -> bool:
    """Whether this pass will search the alpha of a layer (its observer then samples rows)."""
    return cfg.smooth_quant and cfg.smooth_alpha == AUTO_ALPHA and smooths(scheme)


def lowered_output(
    x: torch.Tensor, weight: torch.Tensor, s: torch.Tensor, scheme: LinearScheme, clip: float
) -> torch.Tensor:
    """The quantized layer's output on ``x`` (bias left out) once smoothed by ``s`` and lowered:
    the same weight and multiplier dtypes, codes and reference op that ``quantize_linear`` uses."""
    smoothed = weight * s.to(weight.dtype)
    scale = quant.weight_scale(smoothed, scheme.w_bits, scheme.group_size, clip)
    codes = quant.quantize_weight(smoothed, scale, scheme.w_bits, scheme.group_size)
    # The codes go in unpacked, as 8-bit ones: packing is exact, and skipping the round trip takes a
    # third off the search (it lowers every layer once per candidate).
    return reference.quant_linear(
        x, codes, scale, None, (1.0 / s).to(weight.dtype),
        8, scheme.a_bits, scheme.group_size, weight.shape[1], scheme.a_clip,
    )


def search_alpha(
    x: torch.Tensor, weight: torch.Tensor, act_absmax: torch.Tensor, w_absmax: torch.Tensor,
    scheme: LinearScheme, clip: float = 1.0,
) -> Smoothing:
    """The candidate (no migration, or an alpha of ``ALPHA_GRID``) with the lowest output MSE on
    ``x`` against the float layer; ties go to the earlier candidate, no migration first."""
    target = torch.nn.functional.linear(x.float(), weight.float())
    candidates = [Smoothing(None, torch.ones_like(w_absmax, dtype=torch.float32))]
    candidates += [Smoothing(a, smoothing_factors(act_absmax, w_absmax, a)) for a in ALPHA_GRID]

    def error(c: Smoothing) -> float:
        return float((lowered_output(x, weight, c.factors, scheme, clip).float() - target).square().mean())

    return min(candidates, key=error)


class SmoothQuant(Pass):
    name = "smooth_quant"
    requires = ("activation_stats", "weight_stats")
    produces = ("smoothing",)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        cfg = ctx.config
        applied = {}
        sites = SchemePlan(cfg).linears(gm, quantized_input=True)
        # The alpha search lowers each layer once per candidate: minutes on a CPU for a 1.3B model.
        description = "searching smoothing strengths" if cfg.smooth_alpha == AUTO_ALPHA else "smoothing"
        for site, scheme in ctx.progress(sites, description, total=len(sites)):
            with at_node(site.node):
                if len(site.node.args[1].users) > 1:
                    continue  # a weight shared by several linears cannot take one layer's factors
                weight = gm.get_parameter(site.weight_target).detach()
                applied[site.layer] = smoothing = self._choose(site, weight, scheme, ctx)
                _apply(gm, site, weight, smoothing.factors)
        ctx.analyses["smoothing"] = applied
        return PassResult(finalize(gm), modified=bool(applied))

    @staticmethod
    def _choose(site: LinearSite, weight: torch.Tensor, scheme: LinearScheme, ctx: PassContext) -> Smoothing:
        cfg = ctx.config
        stats = ctx.analyses["activation_stats"][site.layer]
        w_absmax = ctx.analyses["weight_stats"][site.layer].in_channel_absmax
        if cfg.smooth_alpha != AUTO_ALPHA:
            return Smoothing(cfg.smooth_alpha, smoothing_factors(stats.channel_absmax, w_absmax, cfg.smooth_alpha))
        if stats.sample is None:
            raise CalibrationError(
                f"layer '{site.layer}' has no calibration rows to search smooth_alpha on "
                "(smooth_quant = false, yet the pass runs: set smooth_quant = true or a fixed smooth_alpha)"
            )
        clip = ctx.analyses.get("weight_clip", {}).get(site.layer, 1.0)
        return search_alpha(stats.sample, weight, stats.channel_absmax, w_absmax, scheme, clip)


def _apply(gm: fx.GraphModule, site: LinearSite, weight: torch.Tensor, s: torch.Tensor) -> None:
    """Scale the weight by ``s`` and put ``mul(x, s^-1)`` in front of the linear."""
    # A new parameter, not an in-place update: the graph's weights may alias the user's model
    # (and the FP teacher).
    owner = gm.get_submodule(site.owner_target)
    setattr(owner, site.weight_target.rpartition(".")[2],
            torch.nn.Parameter(weight * s.to(weight.dtype), requires_grad=False))
    inv_target = register_buffer(gm, site.owner_target, "smooth_inv", (1.0 / s).to(weight.dtype))
    x = site.node.args[0]
    with gm.graph.inserting_before(site.node):
        inv = gm.graph.get_attr(inv_target)
        smoothed = gm.graph.call_function(torch.ops.aten.mul.Tensor, (x, inv))
    # The multiplier belongs to the layer (its module provenance too: the block partition of
    # learn_scales reads it), whatever produced x (cross-attention: the text embedder).
    smoothed.meta = {**x.meta, "nn_module_stack": site.node.meta.get("nn_module_stack", {}), SMOOTH_META: True}
    site.node.replace_input_with(x, smoothed)
