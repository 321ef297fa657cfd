"""Symbolic dimensions: which inputs' sizes a program leaves open, and their sizes in a given call.

qsc exports with a symbolic batch: every input whose leading dimension is the batch of the
calibration samples (1) gets the dimension ``batch``, shared by all of them, so one artifact serves
guidance's stacked calls and several videos per prompt. The other dimensions stay as calibrated:
frames, height and width fix the token count, which the sparse attention layouts are measured for
(``passes/sparsify_attention.py``), and diffusers' Wan and CogVideoX build their position tables
from Python integers of those sizes.

``torch.export`` specializes any dimension of size 1 to the constant 1, so a symbolic batch is
exported from an example of batch ``EXPORT_BATCH`` (the calibration sample repeated); the program
still accepts batch 1.
"""

from __future__ import annotations

from typing import Mapping

import sympy
import torch
from torch import fx
from torch.export import Dim

BATCH = "batch"
EXPORT_BATCH = 2

DynamicDims = Mapping[str, Mapping[int, str]]  # input -> {dimension: name}


def batch_dims(sample: Mapping[str, torch.Tensor]) -> dict[str, dict[int, str]]:
    """The batch dimension of every input of a batch-1 sample (a leading 1)."""
    return {n: {0: BATCH} for n, t in sample.items() if t.dim() and t.shape[0] == 1}


def batched_example(sample: Mapping[str, torch.Tensor], dynamic: DynamicDims) -> dict[str, torch.Tensor]:
    """``sample`` with every input of ``dynamic`` repeated to ``EXPORT_BATCH`` along dimension 0."""
    return {n: t.repeat_interleave(EXPORT_BATCH, dim=0) if 0 in dynamic.get(n, {}) else t for n, t in sample.items()}


def export_dynamic_shapes(dynamic: DynamicDims, names: list[str]) -> dict[str, dict[int, Dim] | None]:
    """``torch.export``'s ``dynamic_shapes`` for inputs ``names``: one ``Dim`` per name, shared."""
    dims = {d: Dim(d, min=1) for spec in dynamic.values() for d in spec.values()}
    return {n: {i: dims[d] for i, d in dynamic[n].items()} if n in dynamic else None for n in names}


def graph_dynamic_dims(gm: fx.GraphModule) -> dict[str, dict[int, str]]:
    """The symbolic dimensions of ``gm``'s inputs, by the symbol's name (``s0``, shared across
    inputs of the same size), from the placeholders' fake values."""
    dims = {}
    for node in gm.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            symbolic = {i: str(d.node.expr) for i, d in enumerate(val.shape) if isinstance(d, torch.SymInt)}
            if symbolic:
                dims[node.target] = symbolic
    return dims


def symbol_sizes(gm: fx.GraphModule, inputs: Mapping[str, torch.Tensor]) -> dict[sympy.Symbol, int]:
    """What each symbol of ``gm``'s input shapes stands for in a call with ``inputs``."""
    sizes = {}
    for node in gm.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if node.target in inputs and isinstance(val, torch.Tensor):
            for d, size in zip(val.shape, inputs[node.target].shape):
                if isinstance(d, torch.SymInt) and isinstance(d.node.expr, sympy.Symbol):
                    sizes[d.node.expr] = int(size)
    return sizes


def concrete_shape(shape: torch.Size, sizes: Mapping[sympy.Symbol, int]) -> tuple[int, ...]:
    """``shape`` with its symbolic sizes evaluated at ``sizes``."""
    return tuple(int(d.node.expr.subs(sizes)) if isinstance(d, torch.SymInt) else int(d) for d in shape)


def named_dims(dynamic: DynamicDims, names: list[str]) -> dict[str, dict[int, str]]:
    """``dynamic`` (by symbol) for the inputs ``names``, the symbol of the batch renamed ``batch``:
    how the manifest and ``qsc inspect`` show the dimensions a program leaves open."""
    batch_symbol = next((spec[0] for spec in dynamic.values() if 0 in spec), None)
    return {
        n: {i: BATCH if d == batch_symbol else d for i, d in dynamic[n].items()}
        for n in names if n in dynamic
    }
