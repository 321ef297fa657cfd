"""The ``qsc::`` ops as plugin nodes: the ONNX graph TensorRT builds an engine from.

A plugin node is an ONNX node of the ``qsc`` domain whose ``op_type`` is the plugin's name and
whose string attribute ``plugin_namespace`` is ``qsc``: TensorRT's ONNX parser binds such a node
to the plugin ``qsc::NAME`` registered with ``tensorrt.plugin`` (``trt_plugins``); ``aot = 1``
picks the plugin's ahead-of-time implementation (PTX, no Python at run time).

Each plugin runs one kernel, so the nodes follow qsc's kernels rather than its ops:

* ``quantize_per_token`` (x, in_scale) -> (int8 codes, float32 scales ``[..., 1]``) and
  ``quant_gemm`` (codes, scales, weight, w_scale, bias): an activation-quantized ``quant_linear``,
  the two kernels the Triton backend runs for it;
* ``weight_only_linear`` (x, in_scale, weight, w_scale, bias): ``quant_linear`` at 16-bit
  activations, the GEMM on float activations;
* ``sparse_attention`` (q, k, v, tiles, counts), ``ssar_attention`` (the same plus the residual
  cache ``r`` and its low-rank factors ``u``, ``w``) and ``refresh_attention`` (-> output, residual).

Inputs are never optional (a plugin has a fixed number of inputs): an absent bias is zeros, an
absent ``in_scale`` ones, which change no value. 4-bit weights stay packed two per byte and travel
as int8 bytes, which the GEMM kernel unpacks; a tile layout travels as the kernel reads it, each
query tile's key-tile indices (kept ones first) and its count of kept tiles, int32 initializers.
Attributes carry the integers and floats the kernels specialize on.
"""

from __future__ import annotations

from typing import Iterable

import onnx_ir as ir
from onnxscript import opset21 as op

from . import standard
from .schemas import Signature, define

DOMAIN = NAMESPACE = "qsc"
_ATTRS = dict(plugin_namespace=NAMESPACE, aot=1)
_COMMON = {name: type(value) for name, value in _ATTRS.items()}
_GEMM = dict(w_bits=int, group_size=int, in_features=int, **_COMMON)
_TILES = ("q", "k", "v", "tiles", "counts")
_ATTENTION = dict(scale=float, **_COMMON)
SIGNATURES = {
    "quantize_per_token": Signature(("x", "in_scale"), ("codes", "scales"), dict(bits=int, clip=float, **_COMMON)),
    "quant_gemm": Signature(("codes", "scales", "weight", "w_scale", "bias"), ("y",), _GEMM),
    "weight_only_linear": Signature(("x", "in_scale", "weight", "w_scale", "bias"), ("y",), _GEMM),
    "sparse_attention": Signature(_TILES, ("out",), _ATTENTION),
    "ssar_attention": Signature((*_TILES, "r", "u", "w"), ("out",), _ATTENTION),
    "refresh_attention": Signature(_TILES, ("out", "residual"), _ATTENTION),
}
_plugin = {name: define(DOMAIN, name, signature) for name, signature in SIGNATURES.items()}
# The exporter's private ops (folded into initializers): 4-bit codes' bytes as int8; a bool tile
# layout as the kernel's (key-tile indices, kept counts).
_AS_INT8 = define(standard.FOLD_DOMAIN, "AsInt8", Signature(("packed",), ("bytes",)))
_TILE_INDICES = define(standard.FOLD_DOMAIN, "TileIndices", Signature(("layout",), ("tiles", "counts")))


def quant_linear(x, qweight, w_scale, bias, in_scale, w_bits: int, a_bits: int, group_size: int,
                 in_features: int, a_clip: float):
    in_scale = _or_ones(in_scale, in_features)
    weight = _weight_bytes(qweight)
    bias = _or_zeros(bias, qweight.shape[0], x)
    geometry = dict(w_bits=w_bits, group_size=group_size, in_features=in_features)
    if a_bits == 16:
        return _plugin["weight_only_linear"](x, in_scale, weight, w_scale, bias, **geometry, **_ATTRS)
    codes, scales = _plugin["quantize_per_token"](x, in_scale, bits=a_bits, clip=a_clip, **_ATTRS)
    return _plugin["quant_gemm"](codes, scales, weight, w_scale, bias, **geometry, **_ATTRS)


def sparse_attention(q, k, v, layout=None, residual=None, scale: float | None = None, qk_int8: bool = False,
                     residual_u=None, residual_v=None):
    if layout is None:  # no pass makes a dense qsc attention; written out, it needs no plugin
        return standard.sparse_attention(q, k, v, None, residual, scale, qk_int8, residual_u, residual_v)
    standard._no_int8_qk(qk_int8)
    tiles, counts = _tiles(layout)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if residual is None and residual_u is None:
        return _plugin["sparse_attention"](q, k, v, tiles, counts, scale=scale, **_ATTRS)
    residual = residual if residual is not None else op.CastLike(op.ConstantOfShape(op.Shape(q)), q)
    if residual_u is None:  # a residual without its low-rank term: rank-0 factors
        residual_u = op.Slice(residual, *_ints([0], [0], [-1]))
        residual_v = op.Slice(residual, *_ints([0], [0], [-2]))
    return _plugin["ssar_attention"](q, k, v, tiles, counts, residual, residual_u, residual_v, scale=scale, **_ATTRS)


def refresh_attention(q, k, v, layout, scale: float | None = None, qk_int8: bool = False):
    standard._no_int8_qk(qk_int8)
    tiles, counts = _tiles(layout)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _plugin["refresh_attention"](q, k, v, tiles, counts, scale=scale, **_ATTRS)


def _weight_bytes(qweight):
    """4-bit codes stay packed; their bytes are handed over as int8, the type the kernel reads."""
    return _AS_INT8(qweight) if qweight.dtype == ir.DataType.UINT8 else qweight


def _tiles(layout):
    return _TILE_INDICES(layout)


def _or_ones(in_scale, k: int):
    return in_scale if in_scale is not None else op.Constant(value_floats=[1.0] * k)


def _or_zeros(bias, n: int, like):
    return bias if bias is not None else op.CastLike(op.Constant(value_floats=[0.0] * n), like)


def _ints(*lists):
    return [op.Constant(value_ints=v) for v in lists]


def output_specs(name: str, shapes: list[tuple]) -> list[tuple[int | str, tuple]]:
    """The shape function of plugin ``name``: from its input shapes (sequences of dimensions of any
    kind: ints, ONNX dims, TensorRT shape expressions), each output's (dtype, shape); a dtype is
    ``"int8"`` or ``"float32"``, or the index of the input whose dtype the output has."""
    if name == "quantize_per_token":
        x = shapes[0]
        return [("int8", tuple(x)), ("float32", (*x[:-1], 1))]
    if name in ("quant_gemm", "weight_only_linear"):
        out = (*shapes[0][:-1], shapes[2][0])  # [..., N], N the weight's rows
        return [(4 if name == "quant_gemm" else 0, out)]  # the bias's dtype / the activations'
    out = (0, (*shapes[0][:-1], shapes[2][-1]))  # q's dtype, [B, H, Lq, Dv]
    return [out, out] if name == "refresh_attention" else [out]


def used(models: Iterable[ir.Model]) -> set[str]:
    """The plugins the models' graphs call."""
    return {n.op_type for m in models for n in m.graph if n.domain == DOMAIN}
