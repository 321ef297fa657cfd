"""Pass ``quantize_linear``: replace every quantizable ``aten.linear`` by ``qsc::quant_linear``.

The weight is quantized by round-to-nearest on min-max scales (per output channel or per group),
optionally shrunk by a per-layer clipping ratio that an earlier pass learned (analysis
``weight_clip``), and stored packed (int4 two per byte, or int8). A SmoothQuant multiplier in
front of the linear (``mul(x, s^-1)`` tagged by ``smooth_quant``) is folded into the op's
``in_scale``. The original float weight leaves the graph.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from qsc import quant
from qsc.config import CompileConfig
from qsc.graph import at_node, finalize, quantizable_linears, register_buffer, remove_attr
from qsc.pipeline import Pass, PassContext, PassResult

from .smooth_quant import SMOOTH_META


def layer_plan(weight: torch.Tensor, cfg: CompileConfig, smoothed: bool) -> dict[str, Any]:
    """How a linear with this weight is quantized under ``cfg``, and its bytes before and after."""
    n, k = weight.shape
    group = quant.effective_group_size(k, cfg.group_size)
    return {
        "shape": [n, k],
        "w_bits": cfg.w_bits,
        "a_bits": cfg.a_bits,
        "group_size": group,
        "smoothed": smoothed,
        "bytes_fp": weight.numel() * weight.element_size(),
        "bytes_packed": quant.packed_weight_nbytes(n, k, cfg.w_bits, group),
    }


class QuantizeLinear(Pass):
    name = "quantize_linear"
    produces = ("quantized_layers",)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        cfg = ctx.config
        clips = ctx.analyses.get("weight_clip", {})
        layers = {}
        sites = quantizable_linears(gm, cfg.include, cfg.exclude)
        for site in sites:
            with at_node(site.node):
                node = site.node
                x, _, *rest = node.args
                bias = rest[0] if rest else None
                weight = gm.get_parameter(site.weight_target).detach()
                k = weight.shape[1]
                group = quant.effective_group_size(k, cfg.group_size)
                scale = quant.weight_scale(weight, cfg.w_bits, group, clips.get(site.layer, 1.0))
                codes = quant.quantize_weight(weight, scale, cfg.w_bits, group)

                in_scale = None
                if isinstance(x, fx.Node) and x.meta.get(SMOOTH_META):
                    x, in_scale = x.args

                owner = site.owner_target
                qweight_t = register_buffer(gm, owner, "qweight", quant.pack_weight(codes, cfg.w_bits))
                scale_t = register_buffer(gm, owner, "w_scale", scale)
                with gm.graph.inserting_before(node):
                    qop = gm.graph.call_function(
                        torch.ops.qsc.quant_linear.default,
                        (x, gm.graph.get_attr(qweight_t), gm.graph.get_attr(scale_t), bias, in_scale,
                         cfg.w_bits, cfg.a_bits, group, k, cfg.a_clip),
                    )
                qop.meta = dict(node.meta)
                node.replace_all_uses_with(qop)
                gm.graph.erase_node(node)
                layers[site.layer] = layer_plan(weight, cfg, smoothed=in_scale is not None)
        finalize(gm)  # drops the now-dead get_attr of each float weight and the smoothing muls
        ctx.analyses["quantized_layers"] = layers
        for site in sites:
            remove_attr(gm, site.weight_target)
        return PassResult(gm, modified=bool(layers))
