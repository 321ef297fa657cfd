"""INT8 Q and K for the attention kernel's QK^T, one pass each: per-tile scales, K smoothed first.

One program quantizes one tile of ``ROWS`` tokens x the head dimension of one (batch, head): it
loads the tile once (any token and head strides, so the ``[B, L, H, D]`` projections are read in
place), subtracts K's mean over the tokens when given, and writes the int8 codes and the tile's
float32 scale. The PyTorch formulation it replaces makes a float32 copy of K and several passes
more; here the cost is one read of the bf16 input and one int8 write.

Numerics are bit-identical to the reference ``qsc.backends.reference.quantize_qk`` given the same
mean (the wrapper computes it with the same PyTorch reduction): float32 subtraction, the tile's
``max|x|`` over its valid rows (a ragged last tile has fewer), the shared rounding of ``act_quant``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qsc.backends import reference

from .act_quant import codes, symmetric_scale

_QMAX = tl.constexpr(127)


@triton.jit
def _quantize_tiles_kernel(
    x_ptr, mean_ptr, q_ptr, scale_ptr,
    H, L, D, stride_xb, stride_xh, stride_xl,
    HAS_MEAN: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    offs_l = tile * ROWS + tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_l[:, None] < L) & (offs_d[None, :] < D)
    x_base = x_ptr + (bh // H).to(tl.int64) * stride_xb + (bh % H) * stride_xh
    x = tl.load(x_base + offs_l[:, None] * stride_xl + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_MEAN:  # contiguous float32 [B, H, D]; the padding must stay 0, not -mean
        mean = tl.load(mean_ptr + bh * D + offs_d, mask=offs_d < D, other=0.0)
        x = tl.where(mask, x - mean[None, :], 0.0)
    scale = symmetric_scale(tl.max(tl.max(tl.abs(x), axis=1), axis=0), 1.0, _QMAX)
    tl.store(scale_ptr + bh * tl.num_programs(0) + tile, scale)
    q_base = q_ptr + bh.to(tl.int64) * L * D
    tl.store(q_base + offs_l[:, None] * D + offs_d[None, :], codes(x, scale, _QMAX), mask=mask)


def num_warps(rows: int, block_d: int) -> int:
    """Enough threads that a tile is at most 64 float32 registers a thread."""
    return max(1, min(8, rows * block_d // (64 * 32)))


def quantize_tiles(
    x: torch.Tensor, rows: int, mean: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, H, L, D]`` (last dimension contiguous) minus ``mean`` (float32 ``[B, H, D]``) -> int8
    codes ``[B, H, L, D]`` and float32 scales ``[B, H, ceil(L / rows)]``, one per tile of ``rows``
    tokens (``rows`` a power of two)."""
    b, h, length, d = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    tiles = triton.cdiv(length, rows)
    q = torch.empty((b, h, length, d), dtype=torch.int8, device=x.device)
    scales = torch.empty((b, h, tiles), dtype=torch.float32, device=x.device)
    if q.numel() == 0:
        return q, scales
    block_d = triton.next_power_of_2(d)
    _quantize_tiles_kernel[(tiles, b * h)](
        x, None if mean is None else mean.float().contiguous(), q, scales,
        h, length, d, *x.stride()[:3],
        HAS_MEAN=mean is not None, ROWS=rows, BLOCK_D=block_d, num_warps=num_warps(rows, block_d),
    )
    return q, scales


def quantize_qk(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``reference.quantize_qk`` on the GPU: (q codes, q scales per query tile, k codes, k scales
    per key tile)."""
    return (
        *quantize_tiles(q, reference.SPARSE_BLOCK_M),
        *quantize_tiles(k, reference.SPARSE_BLOCK_N, reference.key_mean(k)),
    )
