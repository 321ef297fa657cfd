"""An artifact's programs as ONNX: ``program.onnx`` (and, with SSAR, ``refresh.onnx``).

Each program is re-exported from the loaded artifact with ``torch.export`` and converted by
PyTorch's ONNX exporter; the ``qsc::`` ops go through a translation table: standard operators
(``standard``) or plugin nodes (``plugins``). Everything else in the graph is ATen, which the
exporter knows. The programs' inputs and outputs stay as they are, so SSAR's caches are explicit
graph inputs of the step program and its residuals outputs of the refresh program, under the same
names (``ssar_<layer>``, ``ssar_<layer>_u``, ``ssar_<layer>_v``).

The graphs keep the dimensions the program leaves open (``qsc.shapes``) as symbolic ONNX dimensions
named as in the artifact's manifest (``batch``, ``frames``, ``height``, ``width``, ``text``; an
expression such as ``2*height`` for a derived size); what a program fixes (a sparse program's
token count) is a number.

The output directory holds the ONNX files and ``onnx.json``, which says what each file takes and
returns (a shape lists sizes and dimension names), each program's open dimensions with their
least and greatest size and the size the export was traced at (``min``, ``max``: null when
unbounded, ``opt``): what an engine's optimization profile is made from; and the SSAR schedule a
deployment loop follows.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx_ir as ir
import torch
from torch.utils import _pytree as pytree

from qsc import quant, shapes
from qsc.errors import ExportError, InputError
from qsc.fsutil import atomic_directory
from qsc.runtime import SSARRuntime, SSARSchedule

from . import plugins, standard

FORMAT = "qsc-onnx/2"  # 2: open dimensions
OPSET = 21  # blocked DequantizeLinear (per-group weight scales) and INT4 appear in opset 21
INDEX = "onnx.json"
PROGRAM, REFRESH = "program.onnx", "refresh.onnx"
# ONNX protobufs cannot exceed 2 GiB: larger models keep their weights in a file beside the graph.
_EXTERNAL_DATA_BYTES = 1 << 30


def default_output(artifact: str | Path, *, use_plugins: bool) -> Path:
    """Inside the artifact: ``onnx/`` (plugin graph) or ``onnx-standard/`` (no plugins)."""
    return Path(artifact) / ("onnx" if use_plugins else "onnx-standard")


def export_artifact(artifact: str | Path, output: str | Path | None = None, *, use_plugins: bool = True,
                    overwrite: bool = False) -> Path:
    """Write the ONNX form of ``artifact`` (a ``NAME.qsc`` directory) to the directory ``output``."""
    output = Path(output) if output is not None else default_output(artifact, use_plugins=use_plugins)
    models, index = export_models(artifact, use_plugins=use_plugins)
    with atomic_directory(output, overwrite=overwrite) as tmp:
        write(tmp, models, index)
    return output


def export_models(artifact: str | Path, *, use_plugins: bool) -> tuple[dict[str, ir.Model], dict[str, Any]]:
    """The ONNX models of ``artifact``'s programs by file name, and the index that describes them."""
    import qsc

    module = qsc.load(artifact, backend="reference")
    programs = _programs(module.program)
    table = translations(plugins if use_plugins else standard)
    exported = {name: to_onnx(gm, table) for name, gm in programs.items()}
    models = {name: model for name, (model, _) in exported.items()}
    config = module.manifest["config"]
    index = {
        "format": FORMAT,
        "opset": OPSET,
        "plugins": sorted(plugins.used(models.values())) if use_plugins else [],
        "artifact_files": module.manifest["files"],
        "programs": {name: {**_signature(model), "dims": dims} for name, (model, dims) in exported.items()},
        "ssar": {k: config[k] for k in ("ssar_tau", "ssar_rank", "dense_steps", "ssar_extrapolation")}
        if REFRESH in models else None,
    }
    return models, index


def write(directory: Path, models: dict[str, ir.Model], index: dict[str, Any]) -> None:
    """The models and ``onnx.json`` into the existing directory ``directory``."""
    for name, model in models.items():
        _save(model, directory / name)
    (directory / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


# The ``qsc::`` ops a compressed program holds, each translated by the function of the same name.
TRANSLATED_OPS = ("quant_linear", "sparse_attention", "refresh_attention")


def translations(module) -> dict:
    """The exporter's table for the translations in ``module`` (``standard`` or ``plugins``)."""
    return {getattr(torch.ops.qsc, name).default: getattr(module, name) for name in TRANSLATED_OPS}


def _programs(program: torch.nn.Module) -> dict[str, torch.fx.GraphModule]:
    if isinstance(program, SSARRuntime):
        return {PROGRAM: program.step_program, REFRESH: program.refresh_program}
    return {PROGRAM: program}


def example_inputs(gm: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    """Zeros of every input of ``gm`` in its order (the program guards its inputs by position), an
    open dimension at the size the program was exported with."""
    return {
        n.target: torch.zeros([_hint(d) for d in n.meta["val"].shape], dtype=n.meta["val"].dtype)
        for n in gm.graph.nodes if n.op == "placeholder"
    }


def _hint(dim: int | torch.SymInt) -> int:
    return dim if isinstance(dim, int) else dim.node.hint


def to_onnx(gm: torch.fx.GraphModule, table: dict) -> tuple[ir.Model, dict[str, dict[str, int | None]]]:
    """One program as an ONNX model, and its open dimensions' ranges (``onnx.json``'s ``dims``):
    inputs named as the program's, outputs ``output`` then the names of a returned dict's keys (the
    refresh program's residuals); the dimensions ``gm`` leaves open stay open, under their names."""
    inputs = example_inputs(gm)
    dynamic_shapes = shapes.export_dynamic_shapes(shapes.reexport_dims(gm), list(inputs))
    try:
        program = torch.export.export(gm, (), kwargs=inputs, dynamic_shapes=dynamic_shapes, strict=False)
        onnx_program = torch.onnx.export(program, kwargs=inputs, dynamo=True, opset_version=OPSET,
                                         custom_translation_table=table, verbose=False)
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    model = onnx_program.model
    for value, name in zip(model.graph.outputs, _output_names(program), strict=True):
        value.name = name
    fold_constants(model)
    bool_where_as_logic(model)
    type_plugin_outputs(model)
    names = shapes.symbol_names(program, inputs)
    name_dims(model, {str(symbol): str(name) for symbol, name in names.items()})
    return model, dim_ranges(program, inputs, names)


def dim_ranges(program: torch.export.ExportedProgram, inputs: dict[str, torch.Tensor],
               names: dict) -> dict[str, dict[str, int | None]]:
    """Each open dimension's least and greatest size (None: unbounded) and its size in ``inputs``."""
    _, ranges = shapes.named_dims(program, inputs)
    traced = {str(names[s]): size for s, size in shapes.symbol_sizes(program.graph_module, inputs).items()}
    return {name: {"min": least, "opt": traced[name], "max": most} for name, (least, most) in ranges.items()}


def name_dims(model: ir.Model, names: dict[str, str]) -> None:
    """Rename the exporter's symbolic dimensions (``s47``, ``2*((s20//2))``) by ``names`` (symbol
    -> ``batch``, ``height``, ...) in every shape of the graph."""
    if not names:
        return
    symbol = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    for value in [*model.graph.inputs, *(v for node in model.graph for v in node.outputs)]:
        if value.shape is not None and any(isinstance(d, ir.SymbolicDim) and d.value for d in value.shape):
            value.shape = ir.Shape([
                ir.SymbolicDim(symbol.sub(lambda m: names[m.group(1)], d.value))
                if isinstance(d, ir.SymbolicDim) and d.value else d for d in value.shape])


def _output_names(program: torch.export.ExportedProgram) -> list[str]:
    spec = program.call_spec.out_spec
    paths = [path for path, _ in pytree.tree_flatten_with_path(pytree.tree_unflatten(range(spec.num_leaves), spec))[0]]
    names = []
    for i, path in enumerate(paths):
        key = path[-1] if path else None
        names.append(key.key if isinstance(key, pytree.MappingKey) else "output" if i == 0 else f"output_{i}")
    return names


def _unpack_int4(packed: np.ndarray, in_features: int) -> list[np.ndarray]:
    return [quant.unpack_int4(torch.from_numpy(packed), in_features).numpy().astype(ml_dtypes.int4)]


def _tile_indices(layout: np.ndarray) -> list[np.ndarray]:
    from qsc.kernels.sparse_attention import layout_to_indices

    return [t.numpy() for t in layout_to_indices(torch.from_numpy(layout))]


# What each of the translations' private ops (``standard.FOLD``) computes from its initializer,
# and the names of the initializers that replace its outputs (the first keeps the input's name).
_FOLDS = {
    "UnpackInt4": (_unpack_int4, ("",)),
    "AsInt8": (lambda packed: [packed.view(np.int8)], ("",)),
    "TileIndices": (_tile_indices, (".tiles", ".counts")),
}


def fold_constants(model: ir.Model) -> None:
    """Replace each private op of the translations by initializers of its result: 4-bit weights
    become INT4 initializers (two per byte, as in the artifact), read by ``DequantizeLinear``; for
    plugins their packed bytes become int8 and tile layouts the kernel's index lists."""
    graph = model.graph
    for node in [n for n in graph if n.domain == standard.FOLD_DOMAIN]:
        source = node.inputs[0]
        if source.const_value is None:
            raise ExportError(f"{source.name!r} is computed in the graph; ONNX export needs it constant")
        fold, suffixes = _FOLDS[node.op_type]
        attributes = {name: attr.value for name, attr in node.attributes.items()}
        results = fold(source.const_value.numpy(), **attributes)
        if suffixes == ("",):  # replaces its input
            graph.initializers.pop(source.name)
        for output, result, suffix in zip(node.outputs, results, suffixes, strict=True):
            value = ir.Value(name=source.name + suffix, const_value=ir.tensor(result, name=source.name + suffix))
            value.shape, value.type = value.const_value.shape, ir.TensorType(value.const_value.dtype)
            output.replace_all_uses_with(value)
            graph.register_initializer(value)
        graph.remove(node, safe=True)
        if suffixes != ("",) and not source.uses():
            graph.initializers.pop(source.name)
    model.opset_imports.pop(standard.FOLD_DOMAIN, None)


def type_plugin_outputs(model: ir.Model) -> None:
    """Give every plugin output the type and shape of the plugin's shape function, which ONNX
    shape inference cannot know for an operator outside the standard."""
    fixed = {"int8": ir.DataType.INT8, "float32": ir.DataType.FLOAT}
    for node in model.graph:
        if node.domain != plugins.DOMAIN:
            continue
        specs = plugins.output_specs(node.op_type, [tuple(v.shape) for v in node.inputs])
        for value, (dtype, shape) in zip(node.outputs, specs, strict=True):
            value.dtype = fixed[dtype] if isinstance(dtype, str) else node.inputs[dtype].dtype
            value.shape = ir.Shape(shape)


def bool_where_as_logic(model: ir.Model) -> None:
    """``Where(c, x, y)`` on bool ``x, y`` (the exporter's ``masked_fill`` of a bool mask, in
    HunyuanVideo) as ``(c and x) or (not c and y)``: onnxruntime has no bool ``Where``."""
    graph = model.graph
    for node in [n for n in graph if n.op_type == "Where" and n.domain == "" and n.inputs[1].dtype == ir.DataType.BOOL]:
        c, x, y = node.inputs
        taken = ir.node("And", [c, x])
        negated = ir.node("Not", [c])
        other = ir.node("And", [negated.outputs[0], y])
        either = ir.node("Or", [taken.outputs[0], other.outputs[0]], name=node.name)
        graph.insert_before(node, [taken, negated, other, either])
        node.outputs[0].replace_all_uses_with(either.outputs[0], replace_graph_outputs=True)
        either.outputs[0].name, either.outputs[0].shape = node.outputs[0].name, node.outputs[0].shape
        either.outputs[0].type = node.outputs[0].type
        graph.remove(node, safe=True)


def _signature(model: ir.Model) -> dict[str, Any]:
    def describe(values):  # in the graph's order, the order the program takes its inputs in
        return [{"name": v.name, "shape": [d if isinstance(d, int) else d.value for d in v.shape],
                 "dtype": v.dtype.name.lower()} for v in values]

    return {"inputs": describe(model.graph.inputs), "outputs": describe(model.graph.outputs)}


def _save(model: ir.Model, path: Path) -> None:
    weight_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values())
    external = f"{path.name}.data" if weight_bytes > _EXTERNAL_DATA_BYTES else None
    ir.save(model, path, external_data=external)


def assemble(index: dict[str, Any], programs: dict[str, Any]) -> Any:
    """The model that runs an export's ``programs`` (callables by file name): the program itself,
    or for SSAR an ``SSARRuntime`` that threads the caches between the step and refresh programs."""
    if REFRESH not in programs:
        return programs[PROGRAM]
    ssar = index["ssar"]
    schedule = SSARSchedule(ssar["ssar_tau"], ssar["ssar_rank"], ssar["dense_steps"], ssar["ssar_extrapolation"])
    return SSARRuntime(programs[PROGRAM], programs[REFRESH], schedule)


def read_index(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    index_file = directory / INDEX
    if not index_file.is_file():
        raise InputError(f"{directory} is not a qsc ONNX export (no {INDEX})")
    index = json.loads(index_file.read_text())
    if index.get("format") != FORMAT:
        raise InputError(f"{directory}: unsupported ONNX export format {index.get('format')!r} (expected {FORMAT})")
    return index
