"""Pass ``smooth_quant``: migrate activation outliers into the weights (SmoothQuant).

For a linear ``y = x W^T`` with input channel maxima ``a_j = max|X_j|`` (from calibration) and
weight column maxima ``w_j = max|W_:,j|``, pick ``s_j = a_j^alpha / w_j^(1-alpha)`` and rewrite

    y = (x * s^-1) (W * s)^T

which is the same function with flatter activations. The pass keeps the graph numerically
equivalent: it scales the weight and inserts an explicit ``mul(x, s^-1)`` node (tagged
``qsc_smooth``) in front of the linear; ``quantize_linear`` later folds that multiplier into the
quantized op's fused activation quantization, where it costs nothing.
"""

from __future__ import annotations

import torch
from torch import fx

from qsc.graph import at_node, finalize, quantizable_linears, register_buffer
from qsc.pipeline import Pass, PassContext, PassResult

SMOOTH_META = "qsc_smooth"
_S_RANGE = (1e-5, 1e5)  # channels that were all zero must not produce inf/0 factors


def smoothing_factors(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    s = act_absmax.float().clamp_min(1e-5).pow(alpha) / w_absmax.float().clamp_min(1e-5).pow(1 - alpha)
    return s.clamp(*_S_RANGE)


class SmoothQuant(Pass):
    name = "smooth_quant"
    requires = ("activation_stats", "weight_stats")
    produces = ("smoothing",)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        cfg = ctx.config
        stats, weight_stats = ctx.analyses["activation_stats"], ctx.analyses["weight_stats"]
        applied = {}
        for site in quantizable_linears(gm, cfg.include, cfg.exclude):
            with at_node(site.node):
                weight = gm.get_parameter(site.weight_target)
                if len(site.node.args[1].users) > 1:
                    continue  # a weight shared by several linears cannot take one layer's factors
                s = smoothing_factors(
                    stats[site.layer].channel_absmax, weight_stats[site.layer].in_channel_absmax, cfg.smooth_alpha
                )
                # A new parameter, not an in-place update: the graph's weights may alias the
                # user's model (and the FP teacher).
                owner = gm.get_submodule(site.owner_target)
                setattr(owner, site.weight_target.rpartition(".")[2],
                        torch.nn.Parameter(weight.detach() * s.to(weight.dtype), requires_grad=False))
                inv_target = register_buffer(gm, site.owner_target, "smooth_inv", (1.0 / s).to(weight.dtype))
                x = site.node.args[0]
                with gm.graph.inserting_before(site.node):
                    inv = gm.graph.get_attr(inv_target)
                    smoothed = gm.graph.call_function(torch.ops.aten.mul.Tensor, (x, inv))
                smoothed.meta = {**x.meta, SMOOTH_META: True}
                site.node.replace_input_with(x, smoothed)
                applied[site.layer] = s
        ctx.analyses["smoothing"] = applied
        return PassResult(finalize(gm), modified=bool(applied))
