"""qsc's plugins registered with TensorRT's Python plugin API (``tensorrt.plugin``).

``register(package)`` defines, for every plugin of ``plugins.SIGNATURES``, under the id
``qsc::NAME`` the ONNX parser binds the plugin nodes to:

* the shape and type function (``trtp.register``): ``plugins.output_specs`` over TensorRT's
  shape expressions;
* the tactics (``trtp.autotune``): the node's types as they are (the network is strongly typed)
  and one tactic per tile configuration packaged for this GPU;
* the AOT implementation (``trtp.aot_impl``): the packaged PTX of the node's specialization and
  tactic, its launch (grid and scalar arguments evaluated over the shape expressions, threads,
  shared memory). TensorRT embeds it in the engine, which then runs with no Python.

TensorRT hands a plugin's attributes to these functions by position, in the order of the ONNX
node's attributes, which is the order of the plugin's ``Signature`` (``plugins``); the functions
are given that signature. Importing this module needs no TensorRT; ``register`` does.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Tuple

from . import aot_plugins, plugins
from .engine import require_tensorrt

# The parser's own attributes: they choose the plugin and its implementation, and are not handed on.
_PARSER_ATTRIBUTES = ("plugin_namespace", "aot")
# sm_90 PTX uses Hopper's instructions; every other GPU gets the sm_80 PTX, which the driver
# compiles for it.
_ARCH = {9: 90}


def register(package: str | Path) -> None:
    """Register every plugin with TensorRT, its kernels from the package directory ``package``."""
    require_tensorrt()
    import tensorrt as trt
    import tensorrt.plugin as trtp
    import torch

    index = aot_plugins.read_package(package)
    arch = str(_ARCH.get(torch.cuda.get_device_capability()[0], 80))
    for name in plugins.SIGNATURES:
        _define(trt, trtp, name, index, Path(package), arch)


def _dtype_names(trt) -> dict:
    return {trt.float32: "float", trt.float16: "float16", trt.bfloat16: "bfloat16", trt.int8: "int8",
            trt.int32: "int32"}


def _define(trt, trtp, name: str, index: dict, package: Path, arch: str) -> None:
    signature = plugins.SIGNATURES[name]
    plugin_id = f"{plugins.NAMESPACE}::{name}"
    attrs = {a: kind for a, kind in signature.attributes.items() if a not in _PARSER_ATTRIBUTES}
    tensor_params = [inspect.Parameter(p, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=trtp.TensorDesc)
                     for p in signature.inputs]
    attr_params = [inspect.Parameter(a, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=kind)
                   for a, kind in attrs.items()]
    outputs = inspect.Parameter("outputs", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                annotation=Tuple[trtp.TensorDesc, ...])
    names = _dtype_names(trt)

    def split(args):
        return args[:len(signature.inputs)], dict(zip(attrs, args[len(signature.inputs):]))

    def shape_and_type(*args):
        descs, _ = split(args)
        specs = plugins.output_specs(name, [tuple(d.shape_expr) for d in descs])
        fixed = {"int8": trt.int8, "float32": trt.float32}
        result = tuple(trtp.from_shape_expr(tuple(shape), dtype=descs[kind].dtype if isinstance(kind, int) else fixed[kind])
                       for kind, shape in specs)
        return result if len(result) > 1 else result[0]

    def specialization(descs, attr_values):
        dtypes = [names[d.dtype] for d in descs]
        shapes = [[e.constant_value() if e.is_constant() else None for e in d.shape_expr] for d in descs]
        key = aot_plugins.specialize(name, dtypes, shapes, attr_values).key
        return index["specializations"][key]

    def tune(*args):
        descs, attr_values = split(args[:-1])
        spec = specialization(descs, attr_values)
        io_types = ",".join(_trt_type_name(d.dtype) for d in (*descs, *args[-1]))
        return [trtp.AutoTuneCombination(io_types, None, [k["tactic"] for k in spec["kernels"][arch]])]

    def aot(*args):
        descs, attr_values = split(args[:-2])
        tactic = args[-1]
        spec = specialization(descs, attr_values)
        (kernel,) = [k for k in spec["kernels"][arch] if k["tactic"] == tactic]
        shapes = dict(zip(signature.inputs, (d.shape_expr for d in descs)))
        grid, scalars = aot_plugins.launch(kernel, spec, shapes, cdiv=trtp.cdiv)
        params = trtp.KernelLaunchParams()
        params.grid_x, params.grid_y, params.grid_z = grid
        params.block_x = kernel["threads"]
        params.shared_mem = kernel["shared_bytes"]
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(s) for s in scalars])
        return kernel["kernel"], (package / kernel["ptx"]).read_text(), params, extra

    returns = Tuple[(trtp.TensorDesc,) * len(signature.outputs)] if len(signature.outputs) > 1 else trtp.TensorDesc
    shape_and_type.__signature__ = inspect.Signature([*tensor_params, *attr_params], return_annotation=returns)
    tune.__signature__ = inspect.Signature([*tensor_params, *attr_params, outputs],
                                           return_annotation=list[trtp.AutoTuneCombination])
    tactic = inspect.Parameter("tactic", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=int)
    aot.__signature__ = inspect.Signature(
        [*tensor_params, *attr_params, outputs, tactic],
        return_annotation=Tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs])
    trtp.register(plugin_id)(shape_and_type)
    trtp.autotune(plugin_id)(tune)
    trtp.aot_impl(plugin_id)(aot)


def _trt_type_name(dtype) -> str:
    """``trt.DataType`` as ``AutoTuneCombination`` spells it (FP32, FP16, BF16, INT8, INT32)."""
    return {"FLOAT": "FP32", "HALF": "FP16"}.get(dtype.name, dtype.name)
