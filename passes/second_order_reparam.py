"""Pass ``second_order_reparam`` (SSAR): sparse attention gets a cached residual, threaded as state.

Every ``qsc::sparse_attention`` of a sparsified layer takes three more program inputs, its
residual cache: ``ssar_<layer>`` (``[B, H, L, D]``, the op's ``residual``) and the factors of its
low-rank second-order term, ``ssar_<layer>_u`` (``[B, H, L, rank]``) and ``ssar_<layer>_v``
(``[B, H, rank, D]``), all added in the kernel's epilogue. The program so rewritten is the *step*
program, run at sparse steps.

``refresh_graph`` derives the *refresh* program from it, run every ``tau``-th step: each such
attention becomes ``qsc::refresh_attention``, dense attention and the first-order residual
``D = O_dense - O_sparse`` in one pass; the program continues with the dense output and returns
``D`` as an extra output. ``qsc.runtime.SSARRuntime`` owns the caches and the step counter, and
turns the residuals into caches (second order, see ``qsc.runtime``). The caches never hide in
the program: they are its inputs and outputs, in the exported program as in anything lowered
from it.
"""

from __future__ import annotations

import operator

import torch
from torch import fx
from torch.utils import _pytree as pytree

from qsc.graph import add_input, deepcopy, derive, finalize, set_signature
from qsc.lowrank import factor_shapes
from qsc.pipeline import Pass, PassContext, PassResult

from .sparsify_attention import LAYER_META, sparse_attention_nodes

CACHE_PREFIX = "ssar_"
REFRESH_ATTENTION = torch.ops.qsc.refresh_attention.default


# The op's keyword arguments that carry the cache, and the suffixes of their inputs' names.
CACHE_ARGS = {"residual": "", "residual_u": "_u", "residual_v": "_v"}


def cache_name(layer: str) -> str:
    """The input of ``layer``'s residual; the refresh program returns it under this name too."""
    return CACHE_PREFIX + layer.replace(".", "_")


def factor_names(cache: str) -> tuple[str, str]:
    """The inputs of the low-rank term that goes with residual input ``cache``."""
    return cache + CACHE_ARGS["residual_u"], cache + CACHE_ARGS["residual_v"]


class SecondOrderReparam(Pass):
    name = "second_order_reparam"
    requires = ("attention_layouts",)
    produces = ("ssar_caches",)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        caches = {}
        for node in sparse_attention_nodes(gm.graph):
            layer = node.meta[LAYER_META]
            name = cache_name(layer)
            out = node.meta["val"]
            u_shape, v_shape = factor_shapes(out.shape, ctx.config.ssar_rank)
            shapes = {"residual": out.shape, "residual_u": u_shape, "residual_v": v_shape}
            inputs = {arg: add_input(gm, name + suffix, shapes[arg], out.dtype) for arg, suffix in CACHE_ARGS.items()}
            node.kwargs = {**node.kwargs, **inputs}
            caches[name] = layer
        ctx.analyses["ssar_caches"] = caches
        return PassResult(finalize(gm), modified=bool(caches))


def refresh_graph(step: fx.GraphModule) -> fx.GraphModule:
    """The refresh program of a step program: same inputs minus the caches; outputs
    ``(output, {cache name: D})``. Shares every weight with ``step``."""
    graph = deepcopy(step.graph)
    residuals = {}
    for node in sparse_attention_nodes(graph):
        cache_inputs = [node.kwargs[arg] for arg in CACHE_ARGS]
        with graph.inserting_before(node):
            kwargs = {k: v for k, v in node.kwargs.items() if k not in CACHE_ARGS}
            refresh = graph.call_function(REFRESH_ATTENTION, node.args, kwargs)
            dense, residual = (graph.call_function(operator.getitem, (refresh, i)) for i in range(2))
        refresh.meta = {**node.meta, "val": (node.meta["val"], node.meta["val"])}
        for new in (dense, residual):
            new.meta = {k: v for k, v in node.meta.items() if k != LAYER_META}
        node.replace_all_uses_with(dense)
        graph.erase_node(node)
        for cache in cache_inputs:
            graph.erase_node(cache)
        residuals[cache_inputs[0].target] = residual
    output = graph.output_node()
    (out,) = output.args[0]
    output.args = ((out, *residuals.values()),)
    refresh = derive(step, graph)
    set_signature(refresh, pytree.tree_structure((0, dict.fromkeys(residuals, 0))))
    return finalize(refresh)
