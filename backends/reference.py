"""The reference backend: every ``qsc::`` op in plain PyTorch, on any device.

These functions are the numerical truth. Kernels are tested against them; the artifact's
bit-for-bit reproducibility is defined by them on the CPU. They favour clarity over speed: weights
are dequantized to float32 and multiplied in float32, which equals the integer-GEMM formulation
``(q_x @ q_w^T) * s_x * s_w`` up to float32 rounding.
"""

from __future__ import annotations

import torch

from qsc import quant
from qsc.errors import InputError


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
    if a_bits < 16:
        codes, scales = quantize_activations(x, in_scale, a_bits, a_clip)
        return quant_gemm(codes, scales, qweight, w_scale, bias, w_bits, group_size, in_features, x.dtype)
    return _linear(_smoothed(x, in_scale), qweight, w_scale, bias, w_bits, group_size, in_features).to(x.dtype)


def quantize_activations(
    x: torch.Tensor, in_scale: torch.Tensor | None, bits: int, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first half of ``quant_linear``: ``x * in_scale`` quantized per token, in float32 (int8
    codes ``[..., K]``, scales ``[..., 1]``)."""
    return quant.quantize_per_token(_smoothed(x, in_scale), bits, clip)


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
    """The second half of ``quant_linear``: the GEMM on quantized activations."""
    return _linear(codes.float() * scales, qweight, w_scale, bias, w_bits, group_size, in_features).to(out_dtype)


def _smoothed(x: torch.Tensor, in_scale: torch.Tensor | None) -> torch.Tensor:
    """``x * in_scale`` in float32: SmoothQuant's ``diag(s)^-1``, folded into the op."""
    return x.float() if in_scale is None else x.float() * in_scale.float()


def _linear(xf, qweight, w_scale, bias, w_bits: int, group_size: int, in_features: int) -> torch.Tensor:
    w = quant.dequantize_weight(quant.unpack_weight(qweight, w_bits, in_features), w_scale, group_size)
    return torch.nn.functional.linear(xf, w, None if bias is None else bias.float())


# --- Block-sparse attention (qsc::sparse_attention) -------------------------------------------
#
# Block layout format: a bool tensor ``[H, Mb, Nb]`` (one layout per head, shared by the batch) or
# ``[B, H, Mb, Nb]``, with ``Mb = ceil(Lq / SPARSE_BLOCK_M)`` query tiles and
# ``Nb = ceil(Lk / SPARSE_BLOCK_N)`` key tiles; ``layout[h, i, j]`` keeps the attention of query
# tile i to key tile j. The last tiles of a ragged sequence are partial. A query tile whose row
# is empty attends to nothing: its output is 0 (plus the residual, if one is given).
# The tile sizes are the attention kernel's tiles, so every kept tile is computed whole.
SPARSE_BLOCK_M = 128
SPARSE_BLOCK_N = 64


def block_layout_shape(lq: int, lk: int) -> tuple[int, int]:
    return -(-lq // SPARSE_BLOCK_M), -(-lk // SPARSE_BLOCK_N)


def check_block_layout(q: torch.Tensor, k: torch.Tensor, layout: torch.Tensor) -> None:
    b, h, lq, _ = q.shape
    expected = block_layout_shape(lq, k.shape[2])
    heads_ok = (layout.dim() == 3 and layout.shape[0] == h) or (layout.dim() == 4 and layout.shape[:2] == (b, h))
    if layout.dtype != torch.bool or not heads_ok or tuple(layout.shape[-2:]) != expected:
        raise InputError(
            f"sparse attention layout must be bool [{h}, {expected[0]}, {expected[1]}] or "
            f"[{b}, {h}, {expected[0]}, {expected[1]}] for q {tuple(q.shape)} and k {tuple(k.shape)} "
            f"(tiles of {SPARSE_BLOCK_M} queries x {SPARSE_BLOCK_N} keys); got {layout.dtype} {tuple(layout.shape)}"
        )


def check_residual_factors(q: torch.Tensor, v: torch.Tensor, u: torch.Tensor | None, w: torch.Tensor | None) -> None:
    """The low-rank term ``u @ w`` of the residual: both or neither, ``[B, H, Lq, R] @ [B, H, R, D]``."""
    if u is None and w is None:
        return
    (b, h, lq, _), d = q.shape, v.shape[-1]
    if u is None or w is None or u.shape[:3] != (b, h, lq) or w.shape != (b, h, u.shape[-1], d):
        shapes = [None if t is None else tuple(t.shape) for t in (u, w)]
        raise InputError(
            f"sparse attention residual factors must be [{b}, {h}, {lq}, R] and [{b}, {h}, R, {d}] "
            f"for q {tuple(q.shape)}; got {shapes[0]} and {shapes[1]}"
        )


def _quantize_tiles(x: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, H, L, D]`` -> int8 codes of the same shape and float32 scales ``[B, H, ceil(L/rows)]``:
    one symmetric 8-bit scale per tile of ``rows`` tokens (the zero padding leaves max|x| alone)."""
    b, h, length, d = x.shape
    tiles = torch.nn.functional.pad(x.float(), (0, 0, 0, -length % rows)).reshape(b, h, -1, rows * d)
    codes, scales = quant.quantize_per_token(tiles, 8)
    return codes.reshape(b, h, -1, d)[:, :, :length], scales.squeeze(-1)


def quantize_qk(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """INT8 Q and K for the QK^T product, SageAttention-style: (q codes, q scales per 128-query
    tile, k codes, k scales per 64-key tile). K first loses its mean over the tokens: that shifts
    every score of a query by the same amount, which softmax ignores, and takes the large shared
    offset of K (channel outliers) out of the quantization range."""
    return (*_quantize_tiles(q, SPARSE_BLOCK_M), *_quantize_tiles(k.float() - key_mean(k)[:, :, None], SPARSE_BLOCK_N))


def key_mean(k: torch.Tensor) -> torch.Tensor:
    """K's float32 mean over the tokens, ``[B, H, D]`` (accumulated in float32, no float32 copy of K)."""
    return k.mean(dim=2, dtype=torch.float32)


def _dequantize_tiles(codes: torch.Tensor, scales: torch.Tensor, rows: int) -> torch.Tensor:
    return codes.float() * scales.repeat_interleave(rows, dim=-1)[..., : codes.shape[2], None]


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor | None,
    residual: torch.Tensor | None,
    scale: float | None,
    qk_int8: bool = False,
    residual_u: torch.Tensor | None = None,
    residual_v: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked softmax attention in float32, one query tile at a time (memory ``B*H*128*Lk``);
    with ``qk_int8`` the scores come from the INT8 Q and K of ``quantize_qk``."""
    check_residual_factors(q, v, residual_u, residual_v)
    out = _attention(q, k, v, layout, scale, qk_int8)
    if residual is not None:
        out += residual.float()
    if residual_u is not None:
        out += residual_u.float() @ residual_v.float()
    return out.to(q.dtype)


def refresh_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: torch.Tensor, scale: float | None, qk_int8: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """SSAR's refresh: dense attention and its residual over the block-sparse attention of
    ``layout``, ``(O_dense, O_dense - O_sparse)``, the difference of the two outputs in their dtype."""
    dense = _attention(q, k, v, None, scale, qk_int8).to(q.dtype)
    return dense, dense - _attention(q, k, v, layout, scale, qk_int8).to(q.dtype)


def _attention(q, k, v, layout: torch.Tensor | None, scale: float | None, qk_int8: bool) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` over the tiles ``layout`` keeps (all when None), in float32."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    scale = d**-0.5 if scale is None else scale
    if layout is not None:
        check_block_layout(q, k, layout)
        layout = layout.expand(b, h, *layout.shape[-2:])
    kf, vf = k.float(), v.float()
    if qk_int8:
        q_codes, q_scales, k_codes, k_scales = quantize_qk(q, k)
        q = _dequantize_tiles(q_codes, q_scales, SPARSE_BLOCK_M)
        kf = _dequantize_tiles(k_codes, k_scales, SPARSE_BLOCK_N)
    out = torch.zeros(b, h, lq, v.shape[-1], dtype=torch.float32, device=q.device)
    for i, r0 in enumerate(range(0, lq, SPARSE_BLOCK_M)):
        s = q[:, :, r0 : r0 + SPARSE_BLOCK_M].float() @ kf.transpose(-1, -2) * scale
        if layout is None:
            p = torch.softmax(s, dim=-1)
        else:
            keep = layout[:, :, i].repeat_interleave(SPARSE_BLOCK_N, dim=-1)[..., :lk]  # [B, H, Lk]
            p = torch.softmax(s.masked_fill(~keep[:, :, None, :], float("-inf")), dim=-1)
            p = p.masked_fill(~keep.any(dim=-1)[:, :, None, None], 0.0)  # empty row: 0, not NaN
        out[:, :, r0 : r0 + SPARSE_BLOCK_M] = p @ vf
    return out
