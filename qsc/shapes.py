"""Symbolic dimensions: which inputs' sizes a program leaves open, their names, their ranges, and
their sizes in a given call.

qsc exports with every size open that the model leaves open: the batch, shared by all inputs whose
leading dimension is the batch of the calibration samples (1), so one artifact serves guidance's
stacked calls and several videos per prompt; and every other dimension of size 2 or more as
``torch.export``'s ``Dim.AUTO``, which stays symbolic unless the model's code specializes it
(CogVideoX's sin-cos position table compares the latent's size with the configured one; the
channels meet the weights). Only the ranges are checked before a call: a condition the code puts
on an open size besides (a reshape it must divide) fails inside the program. Wan and
HunyuanVideo leave frames, height, width and text length open, within the ranges their rotary
tables allow, so one artifact serves other resolutions and lengths. Sparse attention closes the
dimensions its token count depends on again (``passes/sparsify_attention.py``: a layout is
measured for one tile grid).

``torch.export`` specializes any dimension of size 1 to the constant 1, so a symbolic batch is
exported from an example of batch ``EXPORT_BATCH`` (the calibration sample repeated); the program
still accepts batch 1.

The manifest names the open dimensions: ``batch``; ``frames``, ``height`` and ``width`` of the
latent (``hidden_states``: the last two dimensions are height and width, another open one is the
frames); ``text``, the sequence of the text inputs (``encoder_*``); ``<input>_<dim>`` otherwise.
"""

from __future__ import annotations

from typing import Mapping

import sympy
import torch
from torch import fx
from torch.export import Dim

BATCH = "batch"
OPEN = "open"  # a dimension exported as Dim.AUTO: symbolic unless the model specializes it
EXPORT_BATCH = 2
LATENT = "hidden_states"  # diffusers' name of the video latent
TEXT = "text"

DynamicDims = Mapping[str, Mapping[int, str]]  # input -> {dimension: name}
Ranges = dict[str, tuple[int, int | None]]  # name -> (least, greatest or None: unbounded)


def batch_dims(sample: Mapping[str, torch.Tensor]) -> dict[str, dict[int, str]]:
    """The batch dimension of every input of a batch-1 sample (a leading 1)."""
    return {n: {0: BATCH} for n, t in sample.items() if t.dim() and t.shape[0] == 1}


def open_dims(sample: Mapping[str, torch.Tensor]) -> dict[str, dict[int, str]]:
    """The batch, and every other dimension of ``sample`` that could be symbolic (size 2 or more)."""
    dims = batch_dims(sample)
    for n, t in sample.items():
        dims.setdefault(n, {}).update({i: OPEN for i, size in enumerate(t.shape) if size > 1})
    return {n: spec for n, spec in dims.items() if spec}


def batched_example(sample: Mapping[str, torch.Tensor], dynamic: DynamicDims) -> dict[str, torch.Tensor]:
    """``sample`` with every input whose batch is symbolic repeated to ``EXPORT_BATCH``."""
    return {n: t.repeat_interleave(EXPORT_BATCH, dim=0) if dynamic.get(n, {}).get(0) == BATCH else t
            for n, t in sample.items()}


def export_dynamic_shapes(dynamic: DynamicDims, names: list[str]) -> dict[str, dict[int, Dim] | None]:
    """``torch.export``'s ``dynamic_shapes`` for inputs ``names``: the batch one ``Dim`` shared by
    all, any other named dimension ``Dim.AUTO`` (export finds which sizes are equal or derived)."""
    batch = Dim(BATCH, min=1)
    return {
        n: {i: batch if d == BATCH else Dim.AUTO for i, d in dynamic[n].items()} if n in dynamic else None
        for n in names
    }


def graph_dynamic_dims(gm: fx.GraphModule) -> dict[str, dict[int, str]]:
    """The symbolic dimensions of ``gm``'s inputs, by the symbol's expression (``s0``, shared
    across inputs whose sizes the export found equal), from the placeholders' fake values."""
    return {n: {i: str(e) for i, e in spec.items()} for n, spec in _input_expressions(gm).items()}


def reexport_dims(gm: fx.GraphModule, closed: set[sympy.Symbol] = frozenset()) -> dict[str, dict[int, str]]:
    """The export spec that opens the dimensions ``gm``'s inputs have open again, but those whose
    size depends on a symbol of ``closed``."""
    dynamic = _input_expressions(gm)
    batch_symbol = _batch_symbol(dynamic)
    return {
        n: {i: BATCH if e == batch_symbol else str(e) for i, e in spec.items() if not closed & e.free_symbols}
        for n, spec in dynamic.items()
    }


def _input_expressions(gm: fx.GraphModule) -> dict[str, dict[int, sympy.Expr]]:
    dims = {}
    for node in gm.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            symbolic = {i: d.node.expr for i, d in enumerate(val.shape)
                        if isinstance(d, torch.SymInt) and d.node.expr.free_symbols}  # not a specialized size
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


def named_dims(program: torch.export.ExportedProgram,
               example: Mapping[str, torch.Tensor]) -> tuple[dict[str, dict[int, str]], Ranges]:
    """The open dimensions of ``program``'s inputs ``example`` under readable names (see the module
    doc; a size derived from another reads ``2*height``), and the range of sizes the program takes for each
    name: how the manifest and ``qsc inspect`` show them, and what a loaded artifact checks calls
    against."""
    dynamic = _example_expressions(program, example)
    names = symbol_names(program, example)
    renamed = {n: {i: str(e.subs(names)) for i, e in spec.items()} for n, spec in dynamic.items()}
    ranges = {
        str(names[symbol]): (int(bounds.lower), int(bounds.upper) if bounds.upper.is_Integer else None)
        for symbol, bounds in program.range_constraints.items() if symbol in names
    }
    return renamed, ranges


def symbol_names(program: torch.export.ExportedProgram,
                 example: Mapping[str, torch.Tensor]) -> dict[sympy.Symbol, sympy.Symbol]:
    """A readable name for every symbol in the shapes of ``program``'s inputs ``example`` (see the
    module doc), the first input and dimension it appears at deciding."""
    dynamic = _example_expressions(program, example)
    batch_symbol = _batch_symbol(dynamic)
    names = {}
    for n, spec in dynamic.items():
        for i, e in spec.items():
            for symbol in sorted(e.free_symbols - names.keys(), key=str):
                name = BATCH if symbol == batch_symbol else _axis_name(n, i, example[n].dim())
                taken = sympy.Symbol(name) in names.values()
                names[symbol] = sympy.Symbol(f"{n}_{i}" if taken else name)  # two text inputs: one "text"
    return names


def _example_expressions(program: torch.export.ExportedProgram,
                         example: Mapping[str, torch.Tensor]) -> dict[str, dict[int, sympy.Expr]]:
    return {n: spec for n, spec in _input_expressions(program.graph_module).items() if n in example}


def _axis_name(name: str, dim: int, rank: int) -> str:
    if name == LATENT and rank >= 4:
        return {rank - 1: "width", rank - 2: "height"}.get(dim, "frames")
    if name.startswith("encoder_") and dim == 1:
        return TEXT
    return f"{name}_{dim}"


def _batch_symbol(dynamic: Mapping[str, Mapping[int, sympy.Expr]]) -> sympy.Expr | None:
    return next((spec[0] for spec in dynamic.values() if 0 in spec), None)
