"""Packed int4 weights to int8 codes, in one bandwidth-bound pass.

The low-bit GEMM can unpack int4 tiles in its main loop, and that is the right choice while the
GEMM is bound by memory (few rows: half the weight bytes read). With many rows it is bound by the
tensor cores, and the unpacking instructions sit between its MMAs: Triton waits for each int32
wgmma before the next step's integer work, so the two add up. On sm_90 (``qsc.kernels.aot``) the
256x128x128 main loop issues 322 instructions per thread with in-loop unpacking and 151 on int8
weights. Unpacking the whole weight first costs one read of its N*K/2 bytes and one write of N*K:
by the H100's datasheet bandwidth and int8 peak, about 6 us for a 1536 x 8960 layer against at
least 0.45 ms of int8 MMA work at M = 32760. ``quant_gemm`` picks the strategy by M (``UNPACK_MIN_ROWS`` there).

The int8 weight lives only for the one GEMM: storage and resident weights stay 4-bit.
Numerics are those of ``qsc.quant.unpack_int4`` exactly (the test asserts equality).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 32
BLOCK_BYTES = 128  # packed bytes per row per program: 256 output columns, 16-byte vector loads


@triton.jit
def _unpack_int4_kernel(
    packed_ptr, out_ptr, N, K, K_BYTES, stride_pn, stride_on,
    BLOCK_N: tl.constexpr, BLOCK_BYTES: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = tl.program_id(1) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    rows = offs_n.to(tl.int64)[:, None]
    packed = tl.load(packed_ptr + rows * stride_pn + offs_b[None, :],
                     mask=(offs_n[:, None] < N) & (offs_b[None, :] < K_BYTES), other=0)
    # int8 shifts are arithmetic: the left shift then right shift sign-extends the low nibble.
    codes = tl.interleave((packed << 4) >> 4, packed >> 4)  # column 2j (low nibble) before 2j+1
    offs_k = tl.program_id(1) * 2 * BLOCK_BYTES + tl.arange(0, 2 * BLOCK_BYTES)
    tl.store(out_ptr + rows * stride_on + offs_k[None, :], codes,
             mask=(offs_n[:, None] < N) & (offs_k[None, :] < K))


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 or int8 ``[N, ceil(K/2)]`` packed codes (rows contiguous) -> int8 codes ``[N, K]``."""
    n, k_bytes = packed.shape
    assert k_bytes == (k + 1) // 2, f"{k_bytes} packed bytes per row cannot hold {k} columns"
    packed = packed.view(torch.int8)
    if packed.stride(1) != 1:
        packed = packed.contiguous()
    out = torch.empty((n, k), dtype=torch.int8, device=packed.device)
    if out.numel() == 0:
        return out
    grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(k_bytes, BLOCK_BYTES))
    _unpack_int4_kernel[grid](packed, out, n, k, k_bytes, packed.stride(0), out.stride(0),
                              BLOCK_N=BLOCK_N, BLOCK_BYTES=BLOCK_BYTES, num_warps=4)
    return out
