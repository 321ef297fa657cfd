"""Operators outside the ONNX standard, declared so the exporter can emit them.

The ONNX exporter records an onnxscript call only for an operator with an ONNX ``OpSchema``; a
``Signature`` here registers one (inputs, outputs, attributes; any tensor type) with
``onnx.defs`` and returns the onnxscript op to call in a translation. The same signatures describe
the plugins to onnxruntime (``ort``) and TensorRT (``trt_plugins``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx
from onnx.defs import OpSchema
from onnxscript.values import Op, Opset

_ATTR_TYPES = {int: OpSchema.AttrType.INT, float: OpSchema.AttrType.FLOAT, str: OpSchema.AttrType.STRING}
_ANY_TENSOR = sorted({f"tensor({t})" for t in (
    "float", "float16", "bfloat16", "double", "int8", "uint8", "int16", "int32", "int64", "bool", "int4")})


@dataclass(frozen=True)
class Signature:
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attributes: dict[str, type] = field(default_factory=dict)  # name -> int, float or str


def define(domain: str, name: str, signature: Signature) -> Op:
    """The onnxscript op ``domain::name`` (version 1), its schema registered once per process."""
    if not onnx.defs.has(name, domain):
        params = [(f"T{i}", p) for i, p in enumerate(signature.inputs)]
        results = [(f"O{i}", p) for i, p in enumerate(signature.outputs)]
        onnx.defs.register_schema(OpSchema(
            name, domain, 1,
            inputs=[OpSchema.FormalParameter(p, t) for t, p in params],
            outputs=[OpSchema.FormalParameter(p, t) for t, p in results],
            type_constraints=[(t, _ANY_TENSOR, "") for t, _ in params + results],
            attributes=[OpSchema.Attribute(a, _ATTR_TYPES[kind]) for a, kind in signature.attributes.items()],
        ))
    return Op(Opset(domain, 1), name)
