"""Low-bit GEMM: ``y = dequant(A) @ dequant(W)^T + bias`` on the tensor cores.

A is either int8 codes with one float32 scale per row (activations quantized per token by
``act_quant``; A6/A4 are int8 codes of a narrower range, so they run on the same int8 MMA) or, in
the weight-only path (a_bits 16), the float activations themselves. W is ``[N, K]`` int8 codes
(W8/W6) or int4 codes packed two per byte along K (W4, low nibble = even column, see
``qsc.quant.pack_int4``). Below ``UNPACK_MIN_ROWS`` rows W4 tiles are unpacked in registers right
after the load (HBM traffic: half a byte per weight, what a memory-bound GEMM needs); from there
on the weight is unpacked to int8 by ``int4_unpack`` first and the main loop is the plain int8
one (the GEMM is compute bound, see that module).

Accumulation: int8 x int8 products accumulate in int32 (exact); weight-only multiplies fp16/bf16
activations (TF32 for float32 ones, on the GPU) with the weights converted to that type (integer
codes are exact in it) and accumulates in float32; its ``in_scale`` is applied to the A tiles.
Scales: per-channel weight scales and the per-token activation scales are applied once, in the
epilogue. Per-group weight scales cannot wait that long: each K group is accumulated on its own
(exactly, in int32), then scaled and added to a float32 accumulator in the main loop.

The reference this kernel is tested against is ``qsc.backends.reference.quant_linear``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _tuning, int4_unpack


def _config(bm: int, bn: int, bk: int, stages: int, warps: int, swap_ab: bool = False) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "SWAP_AB": swap_ab},
        num_stages=stages, num_warps=warps,
    )


# Hopper: int8 tiles are 1 byte per element, so 128x256x128 with 3-4 stages still fits the 228 KB of
# shared memory; the big tiles keep the wgmma pipes fed at the compute-bound Wan shapes
# (M = 32760, K/N in {1536, 8960}). Smaller tiles are there for small M or N.
#
# W4 tiles can also run transposed (SWAP_AB): out^T = W A^T, so the weights, unpacked in registers,
# feed the wgmma as its register operand instead of being stored back to shared memory for it. Per
# 128x256x128 step that saves the 32 KB store and the 32 KB wgmma read of the unpacked tile, about
# half of the kernel's shared-memory traffic; the autotuner measures which orientation wins.
HOPPER_CONFIGS = [
    _config(128, 256, 128, 4, 8, swap_ab=True),
    _config(256, 128, 128, 4, 8, swap_ab=True),
    _config(128, 128, 128, 4, 4, swap_ab=True),
    _config(128, 256, 128, 3, 8),
    _config(256, 128, 128, 4, 8),
    _config(128, 128, 128, 4, 4),
    _config(128, 256, 64, 4, 8),
    _config(128, 128, 64, 4, 4),
    _config(64, 128, 128, 4, 4),
]
# Other GPUs (sm_80/86/89, about 100-164 KB of shared memory): classic mma.sync tiles.
FALLBACK_CONFIGS = [
    _config(128, 128, 64, 3, 4),
    _config(64, 128, 64, 3, 4),
    _config(128, 64, 64, 3, 4),
    _config(64, 64, 64, 3, 4),
]
# Float A tiles (weight-only path) are twice the bytes of int8 ones: cap BLOCK_K to stay within
# shared memory with the same stage counts.
_FLOAT_A_MAX_BLOCK_K = 64
# The int8 MMA consumes K in steps of 32, so a per-group layer needs groups that are multiples of it.
MIN_GROUP_SIZE = 32
# An int32 accumulator holds K products of |16 * 8 * 128| (W4 codes carry a factor 16 until the
# epilogue) without overflow.
MAX_K = 2**31 // (16 * 8 * 128)


# From this many rows on, W4 weights are unpacked to int8 in a pass of their own and the GEMM runs on
# int8 weights (see int4_unpack): the pass costs as much as 300-450 rows of int8 MMA work at peak
# (H200, H100), while unpacking in the loop about doubles the instructions of each main-loop step.
UNPACK_MIN_ROWS = 4096


def unpacks_first(m: int) -> bool:
    """Whether a W4 GEMM of ``m`` rows unpacks its weight to int8 before the main loop."""
    return m >= UNPACK_MIN_ROWS


# Accumulator registers per thread a tile may take. At 128 (a 128x256 int32 tile over 8 warps) the
# per-channel kernel still fits in 255 registers with its pipelined operands; the per-group kernel
# keeps two accumulators (the group's int32 one and the float32 total), so each gets half.
_ACC_REGISTERS = 128


def adapt_config(config: triton.Config, w_bits: int, group_size: int, a_int8: bool) -> triton.Config:
    """``config`` fitted to a specialization: BLOCK_K shrunk so that it divides the weight group and
    fits float A tiles; for per-group scales, the output tile shrunk (N first) so that its two
    accumulators stay in registers rather than spilling to local memory. The transposed orientation
    is kept only where it pays, per-channel W4 x int8: W8 tiles feed the wgmma from shared memory
    as loaded, and float A tiles scaled in registers would need the store it avoids."""
    bm, bn, bk = (config.kwargs[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    if group_size:
        bk = math.gcd(bk, group_size)
    if not a_int8:
        bk = min(bk, _FLOAT_A_MAX_BLOCK_K)
    accumulators = 2 if group_size else 1
    threads = 32 * config.num_warps
    budget = _ACC_REGISTERS if a_int8 else _ACC_REGISTERS // 2
    while accumulators * bm * bn > budget * threads:
        if bn >= bm:
            bn //= 2
        else:
            bm //= 2
    swap_ab = config.kwargs["SWAP_AB"] and w_bits == 4 and a_int8 and not group_size
    return _tuning.with_meta(config, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SWAP_AB=swap_ab)


def fitted_configs(configs: list[triton.Config], w_bits: int, group_size: int, a_int8: bool) -> list[triton.Config]:
    """``configs`` fitted to a specialization (``adapt_config``), without repeats: the list the
    autotuner tries (and TensorRT's plugin tactics)."""
    adapted = [adapt_config(c, w_bits, group_size, a_int8) for c in configs]
    unique = {str(c): c for c in adapted}  # adapting can make two configs equal
    return list(unique.values())


def _prune(configs, named_args, **kwargs):
    chosen = _tuning.device_configs(HOPPER_CONFIGS, FALLBACK_CONFIGS)
    return fitted_configs(chosen, 4 if kwargs["INT4_PACKED"] else 8, kwargs["GROUP_SIZE"], kwargs["A_INT8"])


@triton.jit
def _dot_tile(
    acc, a_ptrs, w_ptrs, in_scale_ptr, offs_m, offs_n, k0, M, N, K, K_BYTES,
    INT4_PACKED: tl.constexpr, HAS_IN_SCALE: tl.constexpr,
    BLOCK_K: tl.constexpr, SWAP_AB: tl.constexpr,
):
    """acc += A[offs_m, k0:k0+BLOCK_K] @ W[offs_n, k0:k0+BLOCK_K]^T (out-of-range rows/columns are 0),
    or its transpose into a ``[BLOCK_N, BLOCK_M]`` acc with ``SWAP_AB``."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    a = tl.load(a_ptrs + offs_k[None, :], mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0)
    if HAS_IN_SCALE:  # weight-only path only: the int8 path applied it while quantizing
        a = (a.to(tl.float32) * tl.load(in_scale_ptr + offs_k, mask=offs_k < K, other=0.0)[None, :]).to(
            a_ptrs.dtype.element_ty
        )
    if INT4_PACKED:
        offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        packed = tl.load(
            w_ptrs + offs_b[None, :], mask=(offs_n[:, None] < N) & (offs_b[None, :] < K_BYTES), other=0
        )
        # Each nibble moved to the high half of its byte (packed << 4, packed & 0xF0) is, as int8,
        # exactly 16x its signed code: two bitwise ops per byte, where sign-extending takes three
        # shifts, the arithmetic ones not vectorizable on the GPU's 32-bit ALU (this loop is bound
        # by its integer instructions). `_without_w4_factor` takes the 16 back out, exactly.
        # interleave puts column 2j (low nibble) before column 2j+1 (high), as qsc.quant.pack_int4.
        w = tl.interleave(packed << 4, packed & -16)
    else:
        w = tl.load(w_ptrs + offs_k[None, :], mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0)
    # out_dtype named although it is acc's: Triton 3.6 defaults it to float32 and then rejects an
    # int32 acc.
    if SWAP_AB:
        acc = tl.dot(w.to(a.dtype), tl.trans(a), acc, out_dtype=acc.dtype)
    else:
        acc = tl.dot(a, tl.trans(w.to(a.dtype)), acc, out_dtype=acc.dtype)
    return acc


@triton.jit
def _without_w4_factor(acc, INT4_PACKED: tl.constexpr, A_INT8: tl.constexpr):
    """The accumulator as float32 without the factor 16 of the W4 unpacking: an int32 sum of
    multiples of 16 shifts right exactly; a float one scales by a power of two, also exactly."""
    if INT4_PACKED:
        if A_INT8:
            acc = acc >> 4
        else:
            acc = acc * 0.0625
    return acc.to(tl.float32)


@triton.autotune(
    configs=HOPPER_CONFIGS + FALLBACK_CONFIGS,
    # Autotune keys only on what is listed here plus tensor dtypes, so every flag that changes the
    # compiled kernel must be listed too.
    key=["M", "N", "K", "INT4_PACKED", "GROUP_SIZE", "A_INT8", "HAS_IN_SCALE", "HAS_BIAS"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _quant_gemm_kernel(
    a_ptr, a_scale_ptr, in_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr,
    M, N, K, K_BYTES, stride_am, stride_wn, stride_wsn, stride_om,
    INT4_PACKED: tl.constexpr, GROUP_SIZE: tl.constexpr, A_INT8: tl.constexpr,
    HAS_IN_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SWAP_AB: tl.constexpr,
):
    # Grouped launch order: GROUP_M row tiles sweep the N tiles together, so the W tiles they
    # share are still in L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    first_m = (pid // (GROUP_M * tiles_n)) * GROUP_M
    rows = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % rows
    pid_n = (pid % (GROUP_M * tiles_n)) // rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    acc_dtype: tl.constexpr = tl.int32 if A_INT8 else tl.float32

    if GROUP_SIZE == 0:
        if SWAP_AB:  # adapt_config keeps it for this path only
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=acc_dtype)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc_dtype)
        for k0 in range(0, K, BLOCK_K):
            acc = _dot_tile(acc, a_ptrs, w_ptrs, in_scale_ptr, offs_m, offs_n, k0, M, N, K, K_BYTES,
                            INT4_PACKED, HAS_IN_SCALE, BLOCK_K, SWAP_AB)
        if SWAP_AB:
            acc = tl.trans(acc)
        w_scale = tl.load(w_scale_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        out = _without_w4_factor(acc, INT4_PACKED, A_INT8) * w_scale[None, :]
    else:
        out = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, GROUP_SIZE):
            part = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc_dtype)
            # Unrolled, so the pipeliner sees one flat loop over groups.
            for kk in tl.static_range(0, GROUP_SIZE, BLOCK_K):
                part = _dot_tile(part, a_ptrs, w_ptrs, in_scale_ptr, offs_m, offs_n, k0 + kk, M, N, K, K_BYTES,
                                 INT4_PACKED, HAS_IN_SCALE, BLOCK_K, False)
            group_scale = tl.load(w_scale_ptr + offs_n * stride_wsn + k0 // GROUP_SIZE, mask=offs_n < N, other=0.0)
            out += _without_w4_factor(part, INT4_PACKED, A_INT8) * group_scale.to(tl.float32)[None, :]

    if A_INT8:
        out *= tl.load(a_scale_ptr + offs_m, mask=offs_m < M, other=0.0)[:, None]
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def quant_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor | None,
    in_scale: torch.Tensor | None,
    qweight: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    w_bits: int,
    group_size: int,
    in_features: int,
    out_dtype: torch.dtype,
    config: triton.Config | None = None,
    unpack_first: bool | None = None,
) -> torch.Tensor:
    """``[M, K]`` A (int8 codes with float32 ``a_scale [M]``, or float with ``a_scale`` None) times
    the packed weight ``[N, K]`` -> ``[M, N]`` in ``out_dtype``.

    ``in_scale`` is only taken here in the weight-only path (the int8 path folds it into the codes).
    ``group_size`` 0 means per-channel scales ``[N]``; otherwise scales are ``[N, K // group_size]``
    and ``group_size`` must be a multiple of ``MIN_GROUP_SIZE``. ``config`` pins a tile
    configuration instead of autotuning, ``unpack_first`` the W4 strategy instead of choosing it by
    M (tests and benchmarks).
    """
    m, k = a.shape
    n = qweight.shape[0]
    assert k == in_features, f"activation has {k} features, the weight {in_features}"
    assert group_size == 0 or group_size % MIN_GROUP_SIZE == 0, f"group size {group_size}"
    assert k <= MAX_K, f"{k} input features overflow the int32 accumulator (at most {MAX_K})"
    if a.stride(1) != 1:
        a = a.contiguous()
    qweight = qweight.contiguous().view(torch.int8)  # packed int4 bytes are read as signed
    if w_bits == 4 and (unpacks_first(m) if unpack_first is None else unpack_first):
        qweight, w_bits = int4_unpack.unpack_int4(qweight, in_features), 8
    w_scale = w_scale.reshape(n, -1).contiguous()
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0:
        return out
    a_int8 = a.dtype == torch.int8
    meta = dict(
        INT4_PACKED=w_bits == 4, GROUP_SIZE=group_size, A_INT8=a_int8,
        HAS_IN_SCALE=in_scale is not None and not a_int8, HAS_BIAS=bias is not None,
    )
    args = (
        a, a_scale, in_scale, qweight, w_scale, bias, out,
        m, n, k, qweight.shape[1], a.stride(0), qweight.stride(0), w_scale.stride(0), out.stride(0),
    )

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    if config is None:
        _quant_gemm_kernel[grid](*args, **meta)
    else:
        config = adapt_config(config, w_bits, group_size, a_int8)
        _quant_gemm_kernel.fn[grid](*args, **meta, **config.all_kwargs())
    return out
