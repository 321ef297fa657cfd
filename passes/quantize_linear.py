"""Pass ``quantize_linear``: replace ``aten.linear`` by ``qsc::quant_linear`` per the scheme plan.

Each linear gets the scheme ``qsc.schemes.SchemePlan`` assigns to its layer (weights and
activations, weight-only, or none). The weight is quantized by round-to-nearest on min-max scales
(per output channel or per group), optionally shrunk by clipping ratios that an earlier pass
learned (analysis ``weight_clip``: per layer, a number or one ratio per output channel and group),
or under the scales an earlier pass fixed (analysis ``weight_scale``: ``compensate_weights``
put the weights on that grid), and stored packed (int4 two per byte, or int8). A
SmoothQuant multiplier in front of the linear (``mul(x, s^-1)`` tagged by ``smooth_quant``) is
folded into the op's ``in_scale``, and its alpha recorded as the layer's ``smooth_alpha``; a learned
activation clipping ratio (analysis ``activation_clip``) becomes the op's ``a_clip``. The original
float weight leaves the graph.
"""

from __future__ import annotations

import torch
from torch import fx

from qsc import quant
from qsc.graph import SMOOTH_META, at_node, finalize, linear_sites, register_buffer, remove_attr
from qsc.pipeline import Pass, PassContext, PassResult
from qsc.schemes import SchemePlan, layer_record


class QuantizeLinear(Pass):
    name = "quantize_linear"
    produces = ("quantized_layers",)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        plan = SchemePlan(ctx.config)
        clips = ctx.analyses.get("weight_clip", {})
        fixed_scales = ctx.analyses.get("weight_scale", {})
        a_clips = ctx.analyses.get("activation_clip", {})
        smoothing = ctx.analyses.get("smoothing", {})
        rotations = ctx.analyses.get("rotations", {})
        layers, replaced = {}, []
        sites = linear_sites(gm)
        for site in ctx.progress(sites, "quantizing weights", total=len(sites)):
            weight = gm.get_parameter(site.weight_target).detach()
            scheme = plan.scheme(site.layer, weight.shape[1])
            if scheme is None:
                continue
            with at_node(site.node):
                node = site.node
                x, _, *rest = node.args
                bias = rest[0] if rest else None
                scale = fixed_scales.get(site.layer)
                if scale is None:
                    scale = quant.weight_scale(weight, scheme.w_bits, scheme.group_size, clips.get(site.layer, 1.0))
                codes = quant.quantize_weight(weight, scale, scheme.w_bits, scheme.group_size)
                packed = quant.pack_weight(codes, scheme.w_bits)

                in_scale = None
                if isinstance(x, fx.Node) and x.meta.get(SMOOTH_META):
                    x, in_scale = x.args

                owner = site.owner_target
                qweight_t = register_buffer(gm, owner, "qweight", packed)
                scale_t = register_buffer(gm, owner, "w_scale", scale)
                with gm.graph.inserting_before(node):
                    qop = gm.graph.call_function(
                        torch.ops.qsc.quant_linear.default,
                        (x, gm.graph.get_attr(qweight_t), gm.graph.get_attr(scale_t), bias, in_scale,
                         scheme.w_bits, scheme.a_bits, scheme.group_size, weight.shape[1],
                         a_clips.get(site.layer, scheme.a_clip)),
                    )
                qop.meta = dict(node.meta)
                node.replace_all_uses_with(qop)
                gm.graph.erase_node(node)
                layers[site.layer] = layer_record(weight, scheme, smoothed=in_scale is not None)
                if site.layer in smoothing:  # the migration strength used (None: searched, none won)
                    layers[site.layer]["smooth_alpha"] = smoothing[site.layer].alpha
                if site.layer in rotations:  # the block size of the Hadamard rotation its input takes
                    layers[site.layer]["rotation_block"] = rotations[site.layer]
                replaced.append(site.weight_target)
        finalize(gm)  # drops the now-dead get_attr of each float weight and the smoothing muls
        for target in replaced:
            remove_attr(gm, target)
        ctx.analyses["quantized_layers"] = layers
        return PassResult(gm, modified=bool(layers))
