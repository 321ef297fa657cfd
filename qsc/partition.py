"""The exported graph cut into its transformer blocks, and the blocks run one at a time.

Every node that ``torch.export`` traced inside a module records the module path in
``nn_module_stack``; the outermost path that the ``include`` patterns take for a block
(``blocks.3``, ``transformer_blocks.0``) names the node's partition, and the nodes outside every
block form the partitions between them (``glue:0``: the embedders, ``glue:4``: the output head
after four blocks). The
partitions and the values that flow between them are a ``networkx`` graph; it must be acyclic,
and its topological order (ties broken by graph position) is the order in which the blocks are
learned and the calibration activations advanced.

``Stream`` holds, for every calibration sample, the values that cross from the partitions run so
far to the ones still to come (the block's inputs, and nothing older than they need): the pass
holds one block and these activations at a time, whatever the depth of the model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import networkx as nx
import torch
from torch import fx

from .errors import PassError
from .graph import ADAPTER_PREFIX, LayerFilter


@dataclass
class Partition:
    name: str  # the block's module path, or ``glue:N`` for what lies outside blocks after N of them
    is_block: bool
    nodes: list[fx.Node]  # compute nodes in graph order (get_attr and placeholders excluded)
    inputs: list[fx.Node]  # values from outside it reads, in first-use order (get_attr excluded)
    outputs: list[fx.Node]  # values it makes that later partitions or the graph output read

    def module(self, gm: fx.GraphModule, extra_outputs: Sequence[fx.Node] = ()) -> fx.GraphModule:
        """A program of this partition alone: ``inputs`` as positional arguments, a tuple of
        ``outputs`` (and then ``extra_outputs``, inner values) as result; weights shared with ``gm``."""
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for node in self.inputs:
            env[node] = graph.placeholder(_safe(node.name))
            env[node].meta = dict(node.meta)

        def arg(node: fx.Node) -> fx.Node:
            if node not in env:  # a weight: read it from the shared module
                env[node] = graph.node_copy(node)
            return env[node]

        for node in self.nodes:
            env[node] = graph.node_copy(node, arg)
        graph.output(tuple(env[n] for n in (*self.outputs, *extra_outputs)))
        sub = fx.GraphModule(gm, graph)
        sub.graph.lint()
        return sub


def _safe(name: str) -> str:
    return re.sub(r"\W", "_", name)


def block_of(node: fx.Node, is_block: LayerFilter) -> str | None:
    """The outermost module of ``node`` that ``is_block`` takes for a transformer block."""
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        path = path.removeprefix(ADAPTER_PREFIX)
        if path and is_block(path):
            return path
    return None


def partition_blocks(gm: fx.GraphModule, include: Sequence[str]) -> list[Partition]:
    """The graph's partitions in execution order (see the module docstring)."""
    is_block = LayerFilter(include, ())
    compute = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    labels: dict[fx.Node, str] = {}
    blocks: list[str] = []
    for node in compute:
        block = block_of(node, is_block)
        if block is not None and block not in blocks:
            blocks.append(block)
        labels[node] = block or f"glue:{len(blocks)}"  # outside the blocks, after that many

    position = {node: i for i, node in enumerate(gm.graph.nodes)}
    dependencies = nx.DiGraph()
    members: dict[str, list[fx.Node]] = {}
    for node in compute:
        members.setdefault(labels[node], []).append(node)
        dependencies.add_node(labels[node], first=position[node])
        for source in node.all_input_nodes:
            if source in labels and labels[source] != labels[node]:
                dependencies.add_edge(labels[source], labels[node])
    if not nx.is_directed_acyclic_graph(dependencies):
        cycle = " -> ".join(a for a, _ in nx.find_cycle(dependencies))
        raise PassError("learn_scales", f"the blocks' nodes interleave, so no block runs before the other: {cycle}")
    order = nx.lexicographical_topological_sort(dependencies, key=lambda name: dependencies.nodes[name]["first"])

    partitions = []
    for name in order:
        nodes = members[name]
        inside = set(nodes)
        inputs = list(dict.fromkeys(
            source for n in nodes for source in n.all_input_nodes
            if source not in inside and source.op != "get_attr"
        ))
        outputs = [n for n in nodes if any(user not in inside for user in n.users)]
        partitions.append(Partition(name, not name.startswith("glue:"), nodes, inputs, outputs))
    return partitions


class Stream:
    """The live values of one calibration sample between partitions (node -> tensor)."""

    def __init__(self, gm: fx.GraphModule, sample: dict[str, torch.Tensor]):
        self.values: dict[fx.Node, Any] = {
            n: sample[n.target] for n in gm.graph.find_nodes(op="placeholder") if n.target in sample
        }

    def inputs(self, partition: Partition) -> list[Any]:
        return [self.values[n] for n in partition.inputs]

    def advance(self, partition: Partition, outputs: Sequence[Any], still_needed: set[fx.Node]) -> None:
        """Take the partition's outputs and forget what no later partition reads."""
        self.values.update(zip(partition.outputs, outputs))
        self.values = {n: v for n, v in self.values.items() if n in still_needed}


def needed_after(gm: fx.GraphModule, partitions: Sequence[Partition]) -> list[set[fx.Node]]:
    """For each partition, the values some later partition (or the graph output) still reads."""
    needed: list[set[fx.Node]] = []
    later: set[fx.Node] = set(gm.graph.output_node().all_input_nodes)
    for partition in reversed(partitions):
        needed.append(set(later))
        later |= set(partition.inputs)
    return list(reversed(needed))
