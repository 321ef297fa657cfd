"""The ``qsc::`` custom operators that compressed graphs are made of.

Each op is a ``torch.library`` custom op, so it is a single visible node of the exported graph
(never a hidden Python closure), re-exports through ``torch.export`` thanks to its fake
implementation, and can get per-device kernels from a backend
(``torch.library.register_kernel("qsc::quant_linear", "cuda", ...)``). The default implementation
is the reference backend.
"""

from __future__ import annotations

import torch

from qsc.backends import reference


@torch.library.custom_op("qsc::quant_linear", mutates_args=())
def quant_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    in_scale: torch.Tensor | None,
    w_bits: int,
    a_bits: int,
    group_size: int,
    in_features: int,
    a_clip: float,
) -> torch.Tensor:
    """``linear(x, W, bias)`` with W stored as integer codes and x quantized per token at run time.

    x: ``[..., K]`` float; qweight: int8 ``[N, K]`` (6/8 bit) or packed uint8 ``[N, ceil(K/2)]``
    (4 bit, see ``qsc.quant.pack_int4``); w_scale: fp16 ``[N]`` or ``[N, K // group_size]``;
    in_scale: optional fp32 ``[K]`` multiplied into x before quantization (SmoothQuant's
    ``diag(s)^-1``, folded out of the graph into the op); a_bits 16 means x stays in float.
    """
    return reference.quant_linear(
        x, qweight, w_scale, bias, in_scale, w_bits, a_bits, group_size, in_features, a_clip
    )


@quant_linear.register_fake
def _(x, qweight, w_scale, bias, in_scale, w_bits, a_bits, group_size, in_features, a_clip):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


@torch.library.custom_op("qsc::quant_gemm", mutates_args=())
def quant_gemm(
    codes: torch.Tensor,
    scales: torch.Tensor,
    qweight: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    w_bits: int,
    group_size: int,
    in_features: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The GEMM of ``quant_linear`` on activations quantized beforehand: int8 ``codes [..., K]``
    and float32 per-token ``scales [..., 1]`` (``reference.quantize_activations``); the weight
    arguments as in ``quant_linear``; the output in ``out_dtype``. Compressed programs hold
    ``quant_linear``; ``qsc.backends.inductor`` splits it into the two halves for ``torch.compile``.
    """
    return reference.quant_gemm(codes, scales, qweight, w_scale, bias, w_bits, group_size, in_features, out_dtype)


@quant_gemm.register_fake
def _(codes, scales, qweight, w_scale, bias, w_bits, group_size, in_features, out_dtype):
    return codes.new_empty(*codes.shape[:-1], qweight.shape[0], dtype=out_dtype)


@torch.library.custom_op("qsc::sparse_attention", mutates_args=())
def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    scale: float | None = None,
    qk_int8: bool = False,
    residual_u: torch.Tensor | None = None,
    residual_v: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-sparse attention ``softmax(q k^T * scale) v`` over the kept tiles only, plus
    ``residual + residual_u @ residual_v``.

    q: ``[B, H, Lq, D]``; k, v: ``[B, H, Lk, D]`` (the layout of ``scaled_dot_product_attention``);
    layout: bool ``[H, ceil(Lq/128), ceil(Lk/64)]`` or ``[B, H, ...]``, tiles of 128 queries x 64
    keys (``reference.SPARSE_BLOCK_M/N``), None = dense; a query tile with no kept key tile gets 0.
    residual: optional ``[B, H, Lq, D]`` added to the output (SSAR's cached correction);
    residual_u, residual_v: optional ``[B, H, Lq, R]`` and ``[B, H, R, D]``, a low-rank term of
    the correction (SSAR's second order), both or neither;
    scale: softmax scale, default ``D ** -0.5``;
    qk_int8: compute q k^T from INT8 tiles of q and mean-smoothed k (``reference.quantize_qk``).
    """
    return reference.sparse_attention(q, k, v, layout, residual, scale, qk_int8, residual_u, residual_v)


@sparse_attention.register_fake
def _(q, k, v, layout=None, residual=None, scale=None, qk_int8=False, residual_u=None, residual_v=None):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


@torch.library.custom_op("qsc::refresh_attention", mutates_args=())
def refresh_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor,
    scale: float | None = None,
    qk_int8: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SSAR's refresh of one attention: ``(O_dense, O_dense - O_sparse)``, dense attention and its
    residual over the block-sparse attention of ``layout``; the arguments as in ``sparse_attention``.
    One pass: a kernel computes the kept tiles first, takes the sparse output there, and goes on
    over the other tiles, so the pair costs what dense attention costs."""
    return reference.refresh_attention(q, k, v, layout, scale, qk_int8)


@refresh_attention.register_fake
def _(q, k, v, layout, scale=None, qk_int8=False):
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    return out, torch.empty_like(out)
