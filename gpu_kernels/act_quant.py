"""Dynamic per-token activation quantization: one memory-bound pass in front of the int8 GEMM.

Each program owns one token (row). A row of up to 2048 features (the Wan attention and FFN-up
projections' 1536) is read once and kept in registers; a longer one is read twice, once for
``max|x|`` and once to write the codes, the second read hitting L2 (a row is a few tens of KB).
So the pass costs about one read of ``x`` plus one write of the int8 codes, as cheap as a
separate pass can be.

Numerics are bit-identical to the reference, ``qsc.quant.quantize_per_token`` applied to
``x * in_scale`` (that is what the tests assert):

* everything in float32; ``in_scale`` (SmoothQuant's folded ``diag(s)^-1``) multiplies x first;
* ``scale = max(clip * max|x| / qmax, 1e-12)`` with an IEEE division (``div_rn``: Triton's plain
  ``/`` on float32 is an approximate division on NVIDIA GPUs);
* codes ``= clamp(rint(x / scale), -qmax, qmax)``, rounding half to even.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qsc import quant

# Adding then subtracting 1.5 * 2**23 rounds a float32 of magnitude < 2**22 to an integer, half to
# even (the hardware's default rounding of the addition). Used instead of libdevice.rint, which the
# CPU interpreter cannot run; the codes here are at most 127 in magnitude.
_RINT_MAGIC = tl.constexpr(12582912.0)
_MIN_SCALE = tl.constexpr(1e-12)  # as in qsc.quant.quantize_per_token: an all-zero row gets codes 0, not NaN
_MAX_BLOCK = 2048  # elements of a row per iteration: 8 to 16 per thread, enough loads in flight


@triton.jit
def symmetric_scale(amax, clip, QMAX: tl.constexpr):
    """The float32 step of a symmetric grid whose ``QMAX``-th level is ``clip * amax``."""
    return tl.maximum(tl.math.div_rn(amax * clip, QMAX * 1.0), _MIN_SCALE)


@triton.jit
def codes(x, scale, QMAX: tl.constexpr):
    """int8 codes of float32 ``x`` on the grid of ``scale``: rounded half to even, clamped."""
    q = (tl.math.div_rn(x, scale) + _RINT_MAGIC) - _RINT_MAGIC
    return tl.minimum(tl.maximum(q, -QMAX), QMAX).to(tl.int8)


@triton.jit
def _load_row_chunk(x_ptr, in_scale_ptr, k, K, HAS_IN_SCALE: tl.constexpr):
    mask = k < K
    x = tl.load(x_ptr + k, mask=mask, other=0.0).to(tl.float32)
    if HAS_IN_SCALE:
        x = x * tl.load(in_scale_ptr + k, mask=mask, other=0.0)
    return x


@triton.jit
def _quantize_rows_kernel(
    x_ptr, in_scale_ptr, q_ptr, scale_ptr,
    K, stride_xm, stride_qm, clip,
    QMAX: tl.constexpr, HAS_IN_SCALE: tl.constexpr, BLOCK: tl.constexpr, ONE_CHUNK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    offs = tl.arange(0, BLOCK)

    if ONE_CHUNK:  # the row fits one chunk: read it once, keep it in registers
        x = _load_row_chunk(x_row, in_scale_ptr, offs, K, HAS_IN_SCALE)
        scale = symmetric_scale(tl.max(tl.abs(x), axis=0), clip, QMAX)
        tl.store(q_ptr + row * stride_qm + offs, codes(x, scale, QMAX), mask=offs < K)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            x = _load_row_chunk(x_row, in_scale_ptr, k0 + offs, K, HAS_IN_SCALE)
            amax = tl.maximum(amax, tl.abs(x))
        scale = symmetric_scale(tl.max(amax, axis=0), clip, QMAX)
        for k0 in range(0, K, BLOCK):
            k = k0 + offs
            x = _load_row_chunk(x_row, in_scale_ptr, k, K, HAS_IN_SCALE)
            tl.store(q_ptr + row * stride_qm + k, codes(x, scale, QMAX), mask=k < K)
    tl.store(scale_ptr + row, scale)


def block_size(k: int) -> int:
    return min(triton.next_power_of_2(k), _MAX_BLOCK)


def num_warps(block: int) -> int:
    return 4 if block <= 1024 else 8


def quantize_per_token(
    x: torch.Tensor, in_scale: torch.Tensor | None, bits: int, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``[M, K]`` (rows contiguous) -> int8 codes ``[M, K]`` and float32 scales ``[M]``."""
    m, k = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scale
    blk = block_size(k)
    _quantize_rows_kernel[(m,)](
        x, in_scale, q, scale,
        k, x.stride(0), q.stride(0), float(clip),
        QMAX=quant.qmax(bits), HAS_IN_SCALE=in_scale is not None, BLOCK=blk, ONE_CHUNK=k <= blk,
        num_warps=num_warps(blk),
    )
    return q, scale
