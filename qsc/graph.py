"""Reading and editing the FX graphs that ``torch.export`` produces.

The frontend exports the model wrapped in an adapter whose attribute is ``model``, so every
parameter of the user's model appears as ``get_attr`` target ``model.<path>``; a *layer path* is
the user's own module path (``blocks.0.attn1.to_q``), which is how layers are named in configs,
reports and errors.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import fx

ADAPTER_PREFIX = "model."
aten = torch.ops.aten


def layer_path(target: str) -> str:
    """``model.blocks.0.attn1.to_q.weight`` -> ``blocks.0.attn1.to_q``."""
    return target.removeprefix(ADAPTER_PREFIX).rpartition(".")[0]


@dataclass(frozen=True)
class LinearSite:
    """One ``aten.linear`` call whose weight is a module parameter."""

    node: fx.Node
    layer: str  # user-facing module path
    weight_target: str  # get_attr target of the weight

    @property
    def owner_target(self) -> str:
        """get_attr prefix of the module that owns the weight (where new buffers go)."""
        return self.weight_target.rpartition(".")[0]


def linear_sites(gm: fx.GraphModule) -> list[LinearSite]:
    """Every ``aten.linear`` whose weight is a ``get_attr`` of a parameter, in graph order."""
    sites = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == aten.linear.default:
            weight = node.args[1]
            if isinstance(weight, fx.Node) and weight.op == "get_attr":
                sites.append(LinearSite(node, layer_path(weight.target), weight.target))
    return sites


class LayerFilter:
    """Selects layers by path: matched by an ``include`` regex and by no ``exclude`` regex."""

    def __init__(self, include: Sequence[str], exclude: Sequence[str]):
        self.include = [re.compile(p) for p in include]
        self.exclude = [re.compile(p) for p in exclude]

    def __call__(self, layer: str) -> bool:
        probe = layer + "."  # lets patterns anchor on a whole path component
        return any(p.search(probe) for p in self.include) and not any(
            p.search(probe) for p in self.exclude
        )


def quantizable_linears(gm: fx.GraphModule, include: Sequence[str], exclude: Sequence[str]) -> list[LinearSite]:
    keep = LayerFilter(include, exclude)
    return [s for s in linear_sites(gm) if keep(s.layer)]


def register_buffer(gm: fx.GraphModule, owner_target: str, name: str, value: torch.Tensor) -> str:
    """Attach ``value`` as buffer ``name`` of submodule ``owner_target``; returns its get_attr target."""
    owner = gm.get_submodule(owner_target)
    owner.register_buffer(name, value)
    return f"{owner_target}.{name}"


def remove_attr(gm: fx.GraphModule, target: str) -> None:
    """Delete parameter/buffer ``target`` once no node reads it any more."""
    if any(n.op == "get_attr" and n.target == target for n in gm.graph.nodes):
        return
    owner_target, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_target)
    if name in owner._parameters:
        del owner._parameters[name]
    elif name in owner._buffers:
        del owner._buffers[name]


def finalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Drop dead nodes, check the graph and regenerate its code after a rewrite."""
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm


@contextlib.contextmanager
def at_node(node: fx.Node) -> Iterator[None]:
    """Tag any exception raised while rewriting ``node`` so the pass manager can name it."""
    try:
        yield
    except Exception as e:
        if not hasattr(e, "qsc_node"):
            e.qsc_node = node.name  # type: ignore[attr-defined]
        raise
