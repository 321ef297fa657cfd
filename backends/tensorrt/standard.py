"""The ``qsc::`` ops written in standard ONNX: the plugin-free graph (``qsc export --no-plugins``).

Each function here is an onnxscript translation the ONNX exporter calls in place of a ``qsc::`` op
(``onnx_export.translations``). They compute what the reference
backend computes, in the same order and in float32:

* weights: ``DequantizeLinear`` of the integer codes, per output channel (``axis=0``) or per block
  of ``group_size`` input channels (``axis=1, block_size``, opset 21); 4-bit codes become an INT4
  initializer (``fold_int4_weights``), so TensorRT and onnxruntime see real INT4 weights;
* activations: dynamic per-token quantization written out, ``s = max(clip * max|x| / qmax, 1e-12)``,
  ``q = clip(round(x / s), -qmax, qmax)`` (ONNX ``Round`` is half-to-even, as ``torch.round``);
* block-sparse attention: softmax attention under the tile layout expanded to a token mask, rows
  whose query tile keeps no key tile give 0; SSAR's residual and its low-rank term added after.

This graph is slower than the plugin graph (the mask is ``Lq x Lk`` per head) but any ONNX runtime
runs it, and it is the numerical reference for the plugin graph.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript import opset21 as op

from qsc.backends.reference import SPARSE_BLOCK_M, SPARSE_BLOCK_N
from qsc.errors import ExportError

from .schemas import Signature, define

FLOAT = ir.DataType.FLOAT
# Ops of the exporter's own, applied to initializers: ``onnx_export.fold_constants`` replaces each
# by initializers of its result, so none reaches a file. UnpackInt4: packed uint8 -> INT4 codes.
FOLD_DOMAIN = "qsc.export"
UNPACK_INT4 = define(FOLD_DOMAIN, "UnpackInt4", Signature(("packed",), ("codes",), {"in_features": int}))


def quant_linear(x, qweight, w_scale, bias, in_scale, w_bits: int, a_bits: int, group_size: int,
                 in_features: int, a_clip: float):
    xf = smoothed(x, in_scale)
    if a_bits < 16:
        xf = fake_quantize_per_token(xf, a_bits, a_clip)
    return op.CastLike(linear(xf, qweight, w_scale, bias, w_bits, group_size, in_features), x)


def smoothed(x, in_scale):
    """``x * in_scale`` in float32 (SmoothQuant's ``diag(s)^-1``, folded into the op)."""
    xf = op.Cast(x, to=FLOAT)
    return xf if in_scale is None else op.Mul(xf, op.Cast(in_scale, to=FLOAT))


def fake_quantize_per_token(xf, bits: int, clip: float):
    """The codes of ``qsc.quant.quantize_per_token`` times their scales, in float32."""
    qmax = float(2 ** (bits - 1) - 1)
    amax = op.ReduceMax(op.Abs(xf), op.Constant(value_ints=[-1]), keepdims=1)
    scale = op.Max(op.Div(op.Mul(amax, _scalar(clip)), _scalar(qmax)), _scalar(1e-12))
    codes = op.Clip(op.Round(op.Div(xf, scale)), _scalar(-qmax), _scalar(qmax))
    return op.Mul(codes, scale)


def linear(xf, qweight, w_scale, bias, w_bits: int, group_size: int, in_features: int):
    """``xf @ W^T + bias`` in float32, W dequantized from its codes by ``DequantizeLinear``."""
    codes = UNPACK_INT4(qweight, in_features=in_features) if w_bits == 4 else qweight
    scale = op.Cast(w_scale, to=FLOAT)
    if len(w_scale.shape) == 2:  # one scale per group of input channels
        w = op.DequantizeLinear(codes, scale, axis=1, block_size=group_size)
    else:
        w = op.DequantizeLinear(codes, scale, axis=0)
    y = op.MatMul(xf, op.Transpose(w, perm=[1, 0]))
    return y if bias is None else op.Add(y, op.Cast(bias, to=FLOAT))


def sparse_attention(q, k, v, layout=None, residual=None, scale: float | None = None, qk_int8: bool = False,
                     residual_u=None, residual_v=None):
    _no_int8_qk(qk_int8)
    out = attention(q, k, v, layout, scale)
    if residual is not None:
        out = op.Add(out, op.Cast(residual, to=FLOAT))
    if residual_u is not None:
        out = op.Add(out, op.MatMul(op.Cast(residual_u, to=FLOAT), op.Cast(residual_v, to=FLOAT)))
    return op.CastLike(out, q)


def refresh_attention(q, k, v, layout, scale: float | None = None, qk_int8: bool = False):
    _no_int8_qk(qk_int8)
    dense = op.CastLike(attention(q, k, v, None, scale), q)
    return dense, op.Sub(dense, op.CastLike(attention(q, k, v, layout, scale), q))


def attention(q, k, v, layout, scale: float | None):
    """``softmax(q k^T * scale) v`` in float32 over the tiles ``layout`` keeps (all when None)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = op.Mul(op.MatMul(op.Cast(q, to=FLOAT), op.Transpose(op.Cast(k, to=FLOAT), perm=[0, 1, 3, 2])),
                    _scalar(scale))
    if layout is None:
        return op.MatMul(op.Softmax(scores, axis=-1), op.Cast(v, to=FLOAT))
    keep = token_mask(layout, q, k)
    p = op.Softmax(op.Where(keep, scores, _scalar(float("-inf"))), axis=-1)
    # A query tile that keeps no key tile attends to nothing: its softmax is 0/0, its output 0.
    attends = op.Greater(op.ReduceMax(op.Cast(keep, to=FLOAT), op.Constant(value_ints=[-1]), keepdims=1),
                         _scalar(0.0))
    return op.MatMul(op.Where(attends, p, _scalar(0.0)), op.Cast(v, to=FLOAT))


def token_mask(layout, q, k):
    """The bool tile layout ``[..., Mb, Nb]`` as a token mask ``[..., Lq, Lk]``: each tile repeated
    over its 128 queries x 64 keys, the partial last tiles cut to the sequence lengths."""
    *lead, mb, nb = layout.shape
    tiles = op.Unsqueeze(layout, op.Constant(value_ints=[-1, -3]))  # [..., Mb, 1, Nb, 1]
    full = op.Expand(tiles, op.Constant(value_ints=[*lead, mb, SPARSE_BLOCK_M, nb, SPARSE_BLOCK_N]))
    mask = op.Reshape(full, op.Constant(value_ints=[*lead, mb * SPARSE_BLOCK_M, nb * SPARSE_BLOCK_N]))
    lengths = op.Concat(op.Shape(q, start=2, end=3), op.Shape(k, start=2, end=3), axis=0)
    return op.Slice(mask, op.Constant(value_ints=[0, 0]), lengths, op.Constant(value_ints=[-2, -1]))


def _no_int8_qk(qk_int8: bool) -> None:
    if qk_int8:
        raise ExportError("ONNX export of attention with INT8 QK^T (qk_int8) is not supported yet")


def _scalar(value: float):
    return op.Constant(value_float=value)
