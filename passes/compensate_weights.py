"""Pass ``compensate_weights``: GPTQ's error compensation of the quantized weights (``qsc.gptq``).

Round-to-nearest rounds every weight on its own; at 4 bits per channel the rounding errors of a
row add up in the layer's output. This pass chooses each layer's integer codes column by column
so that the output on the calibration inputs moves least, under the scales the layer would have
anyway (min-max with ``learn_scales``' clipping ratios where it ran): the packed format, the
kernels and the op do not change, only which codes they hold.

The blocks are taken in order (``qsc.partition``). For each block, the inputs of its quantized
linears are gathered from ``compensation_samples`` calibration samples (default: all of the set,
whatever ``calib_selection`` chose for learning) as the *quantized* model computes them (the
blocks before it already compensated and run with quantized weights and activations), their
``X^T X`` accumulated, and the block's weights replaced by their compensated codes dequantized
(on the grid, so ``quantize_linear`` rounds them back to the same codes under the scales this
pass records in the analysis ``weight_scale``). The samples then advance through the block as it
will run. One block's activations are held at a time.
"""

from __future__ import annotations

import statistics

import torch
from torch import fx

from qsc import quant
from qsc.fake_quant import QuantizedLinear
from qsc.gptq import Gram, gptq_codes
from qsc.graph import finalize, substitute_linears
from qsc.partition import Stream, needed_after, partition_blocks
from qsc.pipeline import Pass, PassContext, PassResult
from qsc.schemes import SchemePlan


def output_error(w: torch.Tensor, w_q: torch.Tensor, gram: torch.Tensor) -> float:
    """``||X (W_q - W)^T||^2 / ||X W^T||^2`` from the Gram matrix of the inputs ``X``."""
    w, d = w.double(), (w_q.double() - w.double())
    return float(((d @ gram) * d).sum() / ((w @ gram) * w).sum().clamp_min(1e-30))


class CompensateWeights(Pass):
    name = "compensate_weights"
    produces = ("weight_scale",)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        cfg = ctx.config
        clips = ctx.analyses.get("weight_clip", {})
        a_clips = ctx.analyses.get("activation_clip", {})
        sites = {site.layer: (site, scheme) for site, scheme in SchemePlan(cfg).linears(gm)}
        partitions = partition_blocks(gm, cfg.include)
        calib = ctx.calibration
        count = cfg.compensation_samples or len(calib)
        streams = [Stream(gm, calib.sample(i)) for i in calib.spread(count)]
        scales, errors = {}, {"round_to_nearest": [], "compensated": []}
        blocks = list(zip(partitions, needed_after(gm, partitions)))
        for partition, still_needed in ctx.progress(blocks, "compensating weights", total=len(blocks)):
            members = set(partition.nodes)
            block = {layer: entry for layer, entry in sites.items() if entry[0].node in members}
            with torch.no_grad():
                if block:
                    grams = _input_grams(gm, partition, [site for site, _ in block.values()], streams)
                    for layer, (site, scheme) in block.items():
                        weight = gm.get_parameter(site.weight_target)
                        scale = quant.weight_scale(weight, scheme.w_bits, scheme.group_size, clips.get(layer, 1.0))
                        gram = grams[site.node.args[0]]
                        codes = gptq_codes(weight, gram, scale, scheme.w_bits, scheme.group_size, cfg.compensation_damping)
                        for kind, c in (("round_to_nearest", quant.quantize_weight(weight, scale, scheme.w_bits, scheme.group_size)),
                                        ("compensated", codes)):
                            errors[kind].append(output_error(weight, quant.dequantize_weight(c, scale, scheme.group_size), gram))
                        # On the grid: quantize_linear rounds it back to ``codes`` under ``scale``.
                        _set_weight(gm, site.weight_target,
                                    quant.dequantize_weight(codes, scale, scheme.group_size).to(weight.dtype))
                        scales[layer] = scale
                program = partition.module(gm)
                substitute_linears(
                    program,
                    lambda layer, w, b, s: QuantizedLinear(w, b, s, block[layer][1].a_bits,
                                                           a_clips.get(layer, block[layer][1].a_clip))
                    if layer in block else None,
                )
                for stream in streams:
                    stream.advance(partition, program(*stream.inputs(partition)), still_needed)
        ctx.analyses["weight_scale"] = scales
        details = {f"output_error_{k}": round(statistics.mean(v), 6) for k, v in errors.items() if v}
        return PassResult(finalize(gm), modified=bool(scales), details=details)


def _set_weight(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    """A new parameter, not an in-place write: the teacher's weights stay as they were."""
    owner, _, name = target.rpartition(".")
    setattr(gm.get_submodule(owner), name, torch.nn.Parameter(value, requires_grad=False))


def _input_grams(gm: fx.GraphModule, partition, sites, streams: list[Stream]) -> dict[fx.Node, torch.Tensor]:
    """``X^T X`` of the input of every linear of ``sites`` over the streams' samples."""
    inputs = list(dict.fromkeys(site.node.args[0] for site in sites))
    capture = partition.module(gm, inputs)
    grams = {node: Gram(node.meta["val"].shape[-1]) for node in inputs}
    for stream in streams:
        values = capture(*stream.inputs(partition))[len(partition.outputs):]
        for node, x in zip(inputs, values):
            grams[node].add(x)
    return {node: g.matrix for node, g in grams.items()}
