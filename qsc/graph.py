"""Reading and editing the FX graphs that ``torch.export`` produces.

The frontend exports the model wrapped in an adapter whose attribute is ``model``, so every
parameter of the user's model appears as ``get_attr`` target ``model.<path>``; a *layer path* is
the user's own module path (``blocks.0.attn1.to_q``), which is how layers are named in configs,
reports and errors.
"""

from __future__ import annotations

import contextlib
import copy
import re
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, TypeVar

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
from torch.utils import _pytree as pytree

from .shapes import concrete_shape, symbol_sizes

ADAPTER_PREFIX = "model."
aten = torch.ops.aten
T = TypeVar("T")


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


# ``smooth_quant``'s tag on the ``mul(x, s^-1)`` it puts in front of a linear: the multiplier that
# later passes fold into the quantized op's ``in_scale``.
SMOOTH_META = "qsc_smooth"


def linear_sites(gm: fx.GraphModule) -> list[LinearSite]:
    """Every ``aten.linear`` whose weight is a ``get_attr`` of a parameter, in graph order."""
    sites = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == aten.linear.default:
            weight = node.args[1]
            if isinstance(weight, fx.Node) and weight.op == "get_attr":
                sites.append(LinearSite(node, layer_path(weight.target), weight.target))
    return sites


def substitute_linears(
    gm: fx.GraphModule,
    make: Callable[[str, torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.nn.Module | None],
) -> dict[str, torch.nn.Module]:
    """Replace every ``aten.linear`` for which ``make(layer, weight, bias, in_scale)`` returns a
    module by a call of that module; a SmoothQuant multiplier in front of the linear is taken into
    the call (its inverse scale is the ``in_scale`` given to ``make``). Returns the modules by layer."""
    modules = {}
    for site in linear_sites(gm):
        node = site.node
        x, bias = node.args[0], node.args[2] if len(node.args) > 2 else None
        in_scale = None
        if isinstance(x, fx.Node) and x.meta.get(SMOOTH_META):
            x, inv = x.args
            in_scale = gm.get_buffer(inv.target)
        module = make(site.layer, gm.get_parameter(site.weight_target),
                      None if bias is None else gm.get_parameter(bias.target), in_scale)
        if module is None:
            continue
        name = f"substituted_{len(modules)}"
        gm.add_submodule(name, module)
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(name, (x,))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        modules[site.layer] = module
    finalize(gm)
    return modules


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


@dataclass(frozen=True)
class AttentionSite:
    """One self-attention ``aten.scaled_dot_product_attention``: no mask, no dropout, not causal,
    queries and keys of the same length (cross-attention to text stays as it is)."""

    node: fx.Node
    layer: str  # user-facing module path, e.g. ``blocks.0.attn1``

    @property
    def scale(self) -> float | None:
        return self.node.kwargs.get("scale")


def attention_sites(gm: fx.GraphModule) -> list[AttentionSite]:
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target != aten.scaled_dot_product_attention.default:
            continue
        q, k = node.args[:2]
        options = {**dict(zip(("attn_mask", "dropout_p", "is_causal"), node.args[3:])), **node.kwargs}
        if any(options.get(o) for o in ("dropout_p", "is_causal", "enable_gqa")) or options.get("attn_mask") is not None:
            continue
        q_shape, k_shape = q.meta["val"].shape, k.meta["val"].shape
        if q_shape[:-1] != k_shape[:-1]:
            continue
        stack = node.meta.get("nn_module_stack") or {}
        owner = next(reversed(stack.values()))[0] if stack else node.name
        sites.append(AttentionSite(node, owner.removeprefix(ADAPTER_PREFIX)))
    return sites


def add_input(gm: fx.GraphModule, name: str, shape: Sequence[int], dtype: torch.dtype) -> fx.Node:
    """A new keyword input ``name`` of the program, of ``shape`` and ``dtype``, after the existing ones."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    with gm.graph.inserting_after(placeholders[-1]):
        node = gm.graph.placeholder(name)
    # A shape with symbolic sizes (the batch) can only live in the fake mode of the graph's values.
    fake = next((p.meta["val"] for p in placeholders if isinstance(p.meta.get("val"), FakeTensor)), None)
    node.meta["val"] = (
        fake.new_empty(shape, dtype=dtype) if fake is not None else torch.empty(shape, dtype=dtype, device="meta")
    )
    set_signature(gm)
    return node


def set_signature(gm: fx.GraphModule, out_spec: pytree.TreeSpec | None = None) -> None:
    """Make the program's calling convention match its graph again after inputs or outputs changed:
    one keyword argument per placeholder, and ``out_spec`` (kept when None) for the outputs."""
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    in_spec = pytree.tree_structure(((), dict.fromkeys(names, 0)))
    out_spec = out_spec or gm.graph._codegen.pytree_info.out_spec
    gm.graph._codegen = _PyTreeCodeGen(_PyTreeInfo(names, in_spec, out_spec))
    gm._in_spec, gm._out_spec = in_spec, out_spec
    gm.recompile()


def state_inputs(gm: fx.GraphModule, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The graph's inputs beyond the model's own (state a runtime threads through, such as SSAR's
    residual caches), as zeros: the value that means "no state yet", sized for ``inputs``' batch."""
    device = next(iter(inputs.values())).device
    sizes = symbol_sizes(gm, inputs)
    return {
        n.target: torch.zeros(concrete_shape(n.meta["val"].shape, sizes), dtype=n.meta["val"].dtype, device=device)
        for n in gm.graph.nodes
        if n.op == "placeholder" and n.target not in inputs
    }


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


def deepcopy(obj: T) -> T:
    """``copy.deepcopy`` of a graph or graph module, without the FutureWarning torch's own treespec
    pickling raises about its own deprecated ``LeafSpec`` check."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        return copy.deepcopy(obj)


def derive(gm: fx.GraphModule, graph: fx.Graph) -> fx.GraphModule:
    """A program of ``graph`` (a rewritten copy of ``gm``'s) over ``gm``'s weights, shared, not copied."""
    derived = fx.GraphModule(gm, graph)
    # GraphModule re-registers every buffer it copies as persistent; the constants of ``gm``
    # (non-persistent buffers, such as RoPE tables) must stay constants for the two to share weights.
    for path, module in gm.named_modules():
        for name in module._non_persistent_buffers_set:
            derived.get_submodule(path)._non_persistent_buffers_set.add(name)
    return derived


def finalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Drop dead nodes, check the graph and regenerate its code after a rewrite."""
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm


def fake_call(graph: fx.Graph, op: Callable, *args, **kwargs) -> fx.Node:
    """A node applying ``op`` to ``args`` and ``kwargs`` at the graph's insertion point, with the
    (fake) value it will have as its ``val``, as ``torch.export`` gives every node."""
    node = graph.call_function(op, args, kwargs)
    value = pytree.tree_map_only(fx.Node, lambda a: a.meta["val"], (args, kwargs))
    node.meta["val"] = op(*value[0], **value[1])
    return node


@contextlib.contextmanager
def at_node(node: fx.Node) -> Iterator[None]:
    """Tag any exception raised while rewriting ``node`` so the pass manager can name it."""
    try:
        yield
    except Exception as e:
        if not hasattr(e, "qsc_node"):
            e.qsc_node = node.name  # type: ignore[attr-defined]
        raise
