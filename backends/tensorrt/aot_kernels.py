"""qsc's Triton kernels with the argument list of a TensorRT ahead-of-time plugin.

TensorRT launches an AOT plugin's kernel with the plugin's input pointers, then its extra scalar
arguments (32-bit integers, ``tensorrt.plugin.SymInt32``: constants or expressions of the input
shapes), then its output pointers. Each kernel here takes exactly that list for one plugin of
``plugins.SIGNATURES`` and calls qsc's kernel as a device function (Triton inlines it), with the
strides of contiguous tensors computed from the shapes and the absent operands as ``None``. So the
kernel body is the one the Triton backend runs; only the way its arguments arrive differs.

Floats cannot be scalar arguments (TensorRT's are integers): the activation clip and the softmax
scale travel as the bits of their float32 (``float_bits``) and are reinterpreted in the kernel.
"""

from __future__ import annotations

import numpy as np
import triton
import triton.language as tl

from qsc.kernels import act_quant
from qsc.kernels import quant_gemm as gemm
from qsc.kernels import sparse_attention as attention

# The kernels' jitted functions, without the autotuners around them (a plugin's tactic picks the
# tile configuration instead).
_quantize_rows = act_quant._quantize_rows_kernel
_quant_gemm = gemm._quant_gemm_kernel.fn
_attention = attention._sparse_attention_kernel.fn


def float_bits(value: float) -> int:
    """The float32 nearest ``value`` as the int32 of its bits (how a float reaches the kernel)."""
    return int(np.array(value, dtype=np.float32).view(np.int32))


@triton.jit
def quantize_per_token(x_ptr, in_scale_ptr, K, clip_bits, codes_ptr, scales_ptr,
                       QMAX: tl.constexpr, BLOCK: tl.constexpr, ONE_CHUNK: tl.constexpr):
    """One program per row of ``x`` (``[..., K]``, rows contiguous)."""
    clip = clip_bits.to(tl.float32, bitcast=True)
    _quantize_rows(x_ptr, in_scale_ptr, codes_ptr, scales_ptr, K, K, K, clip,
                   QMAX=QMAX, HAS_IN_SCALE=True, BLOCK=BLOCK, ONE_CHUNK=ONE_CHUNK)


@triton.jit
def quant_gemm(codes_ptr, scales_ptr, weight_ptr, w_scale_ptr, bias_ptr, M, N, K, K_BYTES, GROUPS, y_ptr,
               INT4_PACKED: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SWAP_AB: tl.constexpr):
    """int8 codes ``[M, K]`` with their row scales times the packed weight ``[N, K_BYTES]``, whose
    scales are ``[N, GROUPS]``; ``y = ... + bias``, ``[M, N]``."""
    _quant_gemm(codes_ptr, scales_ptr, None, weight_ptr, w_scale_ptr, bias_ptr, y_ptr,
                M, N, K, K_BYTES, K, K_BYTES, GROUPS, N,
                INT4_PACKED=INT4_PACKED, GROUP_SIZE=GROUP_SIZE, A_INT8=True, HAS_IN_SCALE=False, HAS_BIAS=True,
                BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, GROUP_M=GROUP_M, SWAP_AB=SWAP_AB)


@triton.jit
def weight_only_linear(x_ptr, in_scale_ptr, weight_ptr, w_scale_ptr, bias_ptr, M, N, K, K_BYTES, GROUPS, y_ptr,
                       INT4_PACKED: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SWAP_AB: tl.constexpr):
    """The GEMM on float activations ``x * in_scale``."""
    _quant_gemm(x_ptr, None, in_scale_ptr, weight_ptr, w_scale_ptr, bias_ptr, y_ptr,
                M, N, K, K_BYTES, K, K_BYTES, GROUPS, N,
                INT4_PACKED=INT4_PACKED, GROUP_SIZE=GROUP_SIZE, A_INT8=False, HAS_IN_SCALE=True, HAS_BIAS=True,
                BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, GROUP_M=GROUP_M, SWAP_AB=SWAP_AB)


@triton.jit
def _contiguous_attention(q_ptr, k_ptr, v_ptr, tiles_ptr, counts_ptr, r_ptr, u_ptr, w_ptr, o_ptr, d_ptr,
                          H, Lq, Lk, D, R, Mb, Nb, scale_bits,
                          REFRESH: tl.constexpr, HAS_RESIDUAL: tl.constexpr, TILES_BATCHED: tl.constexpr,
                          LAYOUT_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, KEY_TILES: tl.constexpr):
    """The attention kernel on contiguous ``[B, H, L, D]`` operands, ``u [B, H, Lq, R]``,
    ``w [B, H, R, D]`` and the tile lists ``[H, Mb, Nb]`` (one layout for the batch: stride 0)
    or ``[B, H, Mb, Nb]`` (``TILES_BATCHED``)."""
    if TILES_BATCHED:
        stride_ib = H * Mb * Nb
        stride_cb = H * Mb
    else:
        stride_ib = 0
        stride_cb = 0
    _attention(q_ptr, k_ptr, v_ptr, r_ptr, u_ptr, w_ptr, o_ptr, d_ptr, tiles_ptr, counts_ptr, None, None,
               H * Lq * D, Lq * D, D, H * Lk * D, Lk * D, D, H * Lk * D, Lk * D, D, H * Lq * D, Lq * D, D,
               H * Lq * R, Lq * R, R, H * R * D, R * D, D, H * Lq * D, Lq * D, D,
               stride_ib, Mb * Nb, Nb, stride_cb, Mb,
               H, Lq, Lk, D, R, scale_bits.to(tl.float32, bitcast=True),
               DENSE=False, REFRESH=REFRESH, HAS_RESIDUAL=HAS_RESIDUAL, QK_INT8=False, LAYOUT_M=LAYOUT_M,
               BLOCK_D=BLOCK_D, BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N, BLOCK_M=BLOCK_M, KEY_TILES=KEY_TILES)


# ``scale_bits``: the softmax scale times log2(e) (the kernel's exp2 softmax), as float bits.
@triton.jit
def sparse_attention(q_ptr, k_ptr, v_ptr, tiles_ptr, counts_ptr, H, Lq, Lk, D, Mb, Nb, scale_bits, out_ptr,
                     TILES_BATCHED: tl.constexpr, LAYOUT_M: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, KEY_TILES: tl.constexpr):
    _contiguous_attention(q_ptr, k_ptr, v_ptr, tiles_ptr, counts_ptr, None, None, None, out_ptr, None,
                          H, Lq, Lk, D, 0, Mb, Nb, scale_bits,
                          REFRESH=False, HAS_RESIDUAL=False, TILES_BATCHED=TILES_BATCHED, LAYOUT_M=LAYOUT_M,
                          BLOCK_D=BLOCK_D, BLOCK_R=0, BLOCK_N=BLOCK_N, BLOCK_M=BLOCK_M, KEY_TILES=KEY_TILES)


@triton.jit
def ssar_attention(q_ptr, k_ptr, v_ptr, tiles_ptr, counts_ptr, r_ptr, u_ptr, w_ptr,
                   H, Lq, Lk, D, R, Mb, Nb, scale_bits, out_ptr,
                   TILES_BATCHED: tl.constexpr, LAYOUT_M: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, KEY_TILES: tl.constexpr):
    _contiguous_attention(q_ptr, k_ptr, v_ptr, tiles_ptr, counts_ptr, r_ptr, u_ptr, w_ptr, out_ptr, None,
                          H, Lq, Lk, D, R, Mb, Nb, scale_bits,
                          REFRESH=False, HAS_RESIDUAL=True, TILES_BATCHED=TILES_BATCHED, LAYOUT_M=LAYOUT_M,
                          BLOCK_D=BLOCK_D, BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N, BLOCK_M=BLOCK_M, KEY_TILES=KEY_TILES)


@triton.jit
def refresh_attention(q_ptr, k_ptr, v_ptr, tiles_ptr, counts_ptr, H, Lq, Lk, D, Mb, Nb, scale_bits,
                      out_ptr, residual_ptr,
                      TILES_BATCHED: tl.constexpr, LAYOUT_M: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, KEY_TILES: tl.constexpr):
    _contiguous_attention(q_ptr, k_ptr, v_ptr, tiles_ptr, counts_ptr, None, None, None, out_ptr, residual_ptr,
                          H, Lq, Lk, D, 0, Mb, Nb, scale_bits,
                          REFRESH=True, HAS_RESIDUAL=False, TILES_BATCHED=TILES_BATCHED, LAYOUT_M=LAYOUT_M,
                          BLOCK_D=BLOCK_D, BLOCK_R=0, BLOCK_N=BLOCK_N, BLOCK_M=BLOCK_M, KEY_TILES=KEY_TILES)


KERNELS = {fn.__name__: fn for fn in (quantize_per_token, quant_gemm, weight_only_linear, sparse_attention,
                                      ssar_attention, refresh_attention)}
