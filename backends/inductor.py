"""Compressed programs prepared for ``torch.compile``: activation quantization Inductor can fuse.

Under ``torch.compile`` a custom op is opaque: Inductor fuses the glue around ``qsc::quant_linear``,
never into it. The op's per-token quantization is then a pass of its own that reads back the
activations the op before it (a norm and modulation, a GELU) has just written, and writes int8
codes. ``expose_activation_quant`` splits every activation-quantized ``quant_linear`` into its two
halves,

    codes, scales = reference.quantize_activations(x, in_scale, a_bits, a_clip)   # PyTorch ops
    y = qsc::quant_gemm(codes, scales, qweight, w_scale, bias, ...)                # the int8 GEMM

so that Inductor folds the quantization into the kernel that produces ``x``: that kernel writes the
int8 codes and their scales instead of the float activations, and the separate pass is gone.

Run eagerly on the CPU, the split program equals the program bit for bit (both halves are the
reference's). Compiled, Inductor reorders float32 arithmetic, and on a GPU its division may round a
code that sits on a rounding boundary the other way (one step of the grid), where the eager kernel
divides exactly: ``gpu_suite`` reports the compiled program's error against the eager one.
"""

from __future__ import annotations

import copy
import operator
from typing import Any

import torch
from torch import fx

from qsc.backends import reference
from qsc.graph import derive, finalize

QUANT_LINEAR = torch.ops.qsc.quant_linear.default
QUANT_GEMM = torch.ops.qsc.quant_gemm.default
_QUANT_LINEAR_ARGS = [a.name for a in QUANT_LINEAR._schema.arguments]


def expose_activation_quant(program: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``program`` (sharing its weights) with each ``quant_linear`` that quantizes its
    activations split into PyTorch quantization ops and ``qsc::quant_gemm``."""
    graph = copy.deepcopy(program.graph)
    for node in list(graph.find_nodes(op="call_function", target=QUANT_LINEAR)):
        args = {**dict(zip(_QUANT_LINEAR_ARGS, node.args)), **node.kwargs}
        if args["a_bits"] >= 16:
            continue  # weight-only: no activation quantization to move
        with graph.inserting_before(node):
            quantized = graph.call_function(
                reference.quantize_activations, (args["x"], args["in_scale"], args["a_bits"], args["a_clip"])
            )
            codes, scales = (graph.call_function(operator.getitem, (quantized, i)) for i in range(2))
            gemm = graph.call_function(QUANT_GEMM, (
                codes, scales, args["qweight"], args["w_scale"], args["bias"], args["w_bits"], args["group_size"],
                args["in_features"], node.meta["val"].dtype,
            ))
        gemm.meta = dict(node.meta)
        node.replace_all_uses_with(gemm)
        graph.erase_node(node)
    return finalize(derive(program, graph))


def torch_compile(program: fx.GraphModule, **options: Any):
    """``torch.compile(program, **options)`` with the activation quantization exposed to Inductor."""
    return torch.compile(expose_activation_quant(program), **options)
