"""Block-sparse flash attention: each query tile runs the online softmax over its kept key tiles only.

One program owns one tile of BLOCK_M queries of one (batch, head). The bool block layout is turned
into per-row lists of kept key-tile indices (``layout_to_indices``) so the main loop touches only
kept tiles, with no branch per skipped tile; its trip count is the row's count, so at density rho
the work is rho of the dense work. Dense mode (layout None) loops over all key tiles and reads no
index list.

Numerics: fp16/bf16 inputs on the tensor cores, scores and the running max / sum / output in
float32, ``exp2`` with ``scale * log2(e)`` folded into the scores. The epilogue divides by the
softmax sum (a row with no kept tile has sum 0 and gets output 0) and adds the optional residual
(SSAR's ``O = O_sparse + R``) and its optional low-rank term ``U @ W`` (SSAR's second order; the
op's ``residual_u``, ``residual_v``): a ``[BLOCK_M, rank] x [rank, D]`` product per tile, so no
``R + U @ W`` is ever materialized. Then the one store.

Refresh mode (SSAR's refresh steps, ``refresh_attention``): the dense output and its residual
``O_dense - O_sparse`` over the layout, in one pass at the cost of dense attention. The index list
of a layout row holds its kept tiles first, then the others (``layout_to_indices``); the main loop
runs over the kept ones, the sparse output is taken there, and the same online softmax goes on over
the rest. The residual is the difference of the two outputs rounded to their dtype, as two kernels
and a subtraction would give it: a row that keeps every tile has a residual of exactly zero.

Optional INT8 QK^T (SageAttention-style, ``qk_scales``): q and k arrive as int8 codes with one
float32 scale per query tile / key tile (K smoothed by its mean first, see
``qsc.backends.reference.quantize_qk``); the scores come from the int8 tensor cores with int32
accumulation, scaled by ``q_scale * k_scale``. P.V stays in fp16/bf16.

The reference this kernel is tested against is ``qsc.backends.reference.sparse_attention``, which
also defines the layout format.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _tuning


def _config(bm: int, stages: int, warps: int, key_tiles: int = 1) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "KEY_TILES": key_tiles}, num_stages=stages, num_warps=warps)


# BLOCK_N is the layout's key tile (64). A main-loop step takes KEY_TILES kept tiles of a row at
# once (their keys need not be adjacent). With two, the per-step softmax bookkeeping (row max,
# rescaling the accumulator) is paid once per 128 keys: on sm_90 that is 332 instead of 429 SASS
# instructions per thread per 64 keys (benchmarks/results/aot-2026-11-21.jsonl). BLOCK_M must
# divide the layout's query tile (128) so that a program reads one layout row.
BLOCK_N = 64
MAX_BLOCK_M = 128
# Hopper: 128 queries x d=128 per program with 8 warps is the FlashAttention-2 sweet spot; deeper
# pipelines hide the gather latency of the sparse K/V tiles. Two key tiles per step fit two stages
# (160 KB of shared memory), not three. 128 queries on 4 warps would hold a 128-register
# accumulator per thread next to the score tile and spill.
HOPPER_CONFIGS = [_config(128, 2, 8, key_tiles=2), _config(128, 3, 8), _config(128, 4, 8), _config(64, 3, 4)]
# Other GPUs: fewer stages to fit 100 KB-class shared memory. No 64-query tile: with mma.sync every
# warp holds the whole K tile in registers, and 4 warps of 16 queries spill.
FALLBACK_CONFIGS = [_config(128, 2, 8), _config(128, 3, 8)]


def _prune(configs, named_args, **kwargs):
    return _tuning.device_configs(HOPPER_CONFIGS, FALLBACK_CONFIGS)


@triton.jit
def _normalize(acc, l_i):
    return acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]  # a row that saw no key: 0


@triton.jit
def _attend_step(
    q, m_i, l_i, acc, k_base, v_base, k_scales, idx_row, step, tiles, stride_kn, stride_vn, Lk, D, qk_scale,
    DENSE: tl.constexpr, QK_INT8: tl.constexpr, KEY_TILES: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
):
    """One online-softmax step of a query tile over its key tiles ``step : step + KEY_TILES`` (of
    ``tiles``: all key tiles in order when dense, else the row's list read from ``idx_row``).
    ``MASKED`` masks the keys past ``Lk``: the ragged last tile and absent tiles."""
    keys = tl.arange(0, KEY_TILES * BLOCK_N)
    first_key = tl.zeros([KEY_TILES * BLOCK_N], dtype=tl.int32)
    k_scale = tl.zeros([KEY_TILES * BLOCK_N], dtype=tl.float32)
    for t in tl.static_range(KEY_TILES):
        present = step + t < tiles  # the second tile of a row's last step may not exist
        if DENSE:
            tile = step + t
        else:
            tile = tl.load(idx_row + step + t, mask=present, other=0)
            first_key = tl.where(keys // BLOCK_N == t, tl.where(present, tile * BLOCK_N, Lk), first_key)
        if QK_INT8:
            k_scale = tl.where(keys // BLOCK_N == t, tl.load(k_scales + tile, mask=present, other=0.0), k_scale)
    if DENSE:  # consecutive tiles; keys of a tile past the last one are >= Lk
        offs_n = step * BLOCK_N + keys
    else:
        offs_n = first_key + keys % BLOCK_N
    offs_d = tl.arange(0, BLOCK_D)
    if MASKED:  # absent tiles are placed at Lk
        in_keys = offs_n < Lk
        k_mask = in_keys[None, :] & (offs_d[:, None] < D)
        v_mask = in_keys[:, None] & (offs_d[None, :] < D)
    else:
        k_mask = offs_d[:, None] < D
        v_mask = offs_d[None, :] < D
    k_t = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None], mask=k_mask, other=0)
    if QK_INT8:  # int8 codes, exact int32 products; qk_scale already holds the query tile's scale
        s = tl.dot(q, k_t, out_dtype=tl.int32).to(tl.float32) * (qk_scale * k_scale[None, :])
    else:
        s = tl.dot(q, k_t) * qk_scale
    if MASKED:
        s = tl.where(in_keys[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: a step's first tile has at least one key
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=v_mask, other=0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _attend_tiles(
    q, m_i, l_i, acc, k_base, v_base, k_scales, idx_row, first, end, stride_kn, stride_vn, Lk, D, qk_scale,
    DENSE: tl.constexpr, QK_INT8: tl.constexpr, KEY_TILES: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The online softmax over tiles ``first : end`` of the row's list, ``KEY_TILES`` a step. The
    list ascends, so only its last step can hold the ragged last key tile, or with two tiles a step
    a missing second one: that step alone is masked."""
    last = first + (end - first - 1) // KEY_TILES * KEY_TILES
    for step in range(first, last, KEY_TILES):
        m_i, l_i, acc = _attend_step(q, m_i, l_i, acc, k_base, v_base, k_scales, idx_row, step, end,
                                     stride_kn, stride_vn, Lk, D, qk_scale,
                                     DENSE, QK_INT8, KEY_TILES, BLOCK_N, BLOCK_D, MASKED=False)
    if first < end:
        m_i, l_i, acc = _attend_step(q, m_i, l_i, acc, k_base, v_base, k_scales, idx_row, last, end,
                                     stride_kn, stride_vn, Lk, D, qk_scale,
                                     DENSE, QK_INT8, KEY_TILES, BLOCK_N, BLOCK_D, MASKED=True)
    return m_i, l_i, acc


@triton.autotune(
    configs=HOPPER_CONFIGS + FALLBACK_CONFIGS,
    key=["Lq", "Lk", "BLOCK_D", "DENSE", "REFRESH", "HAS_RESIDUAL", "BLOCK_R", "QK_INT8", "LAYOUT_M"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _sparse_attention_kernel(
    q_ptr, k_ptr, v_ptr, r_ptr, u_ptr, w_ptr, o_ptr, d_ptr, idx_ptr, cnt_ptr, q_scale_ptr, k_scale_ptr,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_rb, stride_rh, stride_rm, stride_ub, stride_uh, stride_um, stride_wb, stride_wh, stride_wr,
    stride_ob, stride_oh, stride_om, stride_ib, stride_ih, stride_im, stride_cb, stride_ch,
    H, Lq, Lk, D, R, qk_scale,
    DENSE: tl.constexpr, REFRESH: tl.constexpr, HAS_RESIDUAL: tl.constexpr, QK_INT8: tl.constexpr,
    LAYOUT_M: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    KEY_TILES: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    row = pid_m * BLOCK_M // LAYOUT_M  # the program's row of the layout (and of the q scales)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    tile_mask = (offs_m[:, None] < Lq) & (offs_d[None, :] < D)
    q_base = q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh
    k_base = k_ptr + b.to(tl.int64) * stride_kb + h * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + h * stride_vh
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], mask=tile_mask, other=0)
    k_scales = k_scale_ptr  # QK_INT8: contiguous [B, H, ceil(Lk / BLOCK_N)] and [B, H, ceil(Lq / LAYOUT_M)]
    if QK_INT8:
        k_scales += pid_bh * tl.cdiv(Lk, BLOCK_N)
        qk_scale *= tl.load(q_scale_ptr + pid_bh * tl.cdiv(Lq, LAYOUT_M) + row)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    idx_row = idx_ptr + b * stride_ib + h * stride_ih + row * stride_im  # not read when dense
    if DENSE:
        tiles = tl.cdiv(Lk, BLOCK_N)
    else:
        tiles = tl.load(cnt_ptr + b * stride_cb + h * stride_ch + row)
    m_i, l_i, acc = _attend_tiles(q, m_i, l_i, acc, k_base, v_base, k_scales, idx_row, 0, tiles,
                                  stride_kn, stride_vn, Lk, D, qk_scale, DENSE, QK_INT8, KEY_TILES, BLOCK_N, BLOCK_D)
    out = _normalize(acc, l_i)

    if REFRESH:  # ``out`` is the sparse output; the row's other tiles make it the dense one
        # The sparse output waits in the residual's place (laid out as the output): held in
        # registers through the second loop, it would spill there.
        d_ptrs = d_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
        tl.store(d_ptrs, out.to(d_ptr.dtype.element_ty), mask=tile_mask)
        m_i, l_i, acc = _attend_tiles(q, m_i, l_i, acc, k_base, v_base, k_scales, idx_row, tiles, tl.cdiv(Lk, BLOCK_N),
                                      stride_kn, stride_vn, Lk, D, qk_scale, DENSE, QK_INT8, KEY_TILES, BLOCK_N,
                                      BLOCK_D)
        out = _normalize(acc, l_i).to(d_ptr.dtype.element_ty)
        tl.debug_barrier()  # other threads of the program may have stored the elements a thread loads
        sparse_out = tl.load(d_ptrs, mask=tile_mask, other=0.0)
        tl.store(d_ptrs, (out.to(tl.float32) - sparse_out.to(tl.float32)).to(d_ptr.dtype.element_ty), mask=tile_mask)
    if HAS_RESIDUAL:
        r_base = r_ptr + b.to(tl.int64) * stride_rb + h * stride_rh
        out += tl.load(r_base + offs_m[:, None] * stride_rm + offs_d[None, :], mask=tile_mask, other=0.0).to(tl.float32)
    if BLOCK_R > 0:  # the residual's low-rank term, U [Lq, R] @ W [R, D] of this (batch, head)
        offs_r = tl.arange(0, BLOCK_R)
        u_base = u_ptr + b.to(tl.int64) * stride_ub + h * stride_uh
        u = tl.load(u_base + offs_m[:, None] * stride_um + offs_r[None, :],
                    mask=(offs_m[:, None] < Lq) & (offs_r[None, :] < R), other=0)
        w = tl.load(w_ptr + b * stride_wb + h * stride_wh + offs_r[:, None] * stride_wr + offs_d[None, :],
                    mask=(offs_r[:, None] < R) & (offs_d[None, :] < D), other=0)
        out = tl.dot(u, w.to(u.dtype), acc=out)
    o_base = o_ptr + b.to(tl.int64) * stride_ob + h * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_om + offs_d[None, :], out.to(o_ptr.dtype.element_ty), mask=tile_mask)


def block_d(head_dim: int) -> int:
    """The padded head dimension of the tiles (a power of two; 16 is the MMA's smallest K)."""
    return max(16, triton.next_power_of_2(head_dim))


def layout_to_indices(layout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool ``[..., Mb, Nb]`` -> (int32 ``[..., Mb, Nb]``: each row's kept key-tile indices in
    ascending order, then its other tiles in ascending order; int32 ``[..., Mb]`` number of kept
    tiles per row). Sparse mode reads a row's kept part, refresh mode all of it."""
    counts = layout.sum(dim=-1, dtype=torch.int32)
    order = torch.argsort(layout.to(torch.int8), dim=-1, descending=True, stable=True)
    return order.to(torch.int32), counts


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _head_strides(t: torch.Tensor | None) -> tuple[int, ...]:
    """Batch, head and row strides of an optional ``[B, H, rows, cols]`` operand (0s when absent)."""
    return t.stride()[:3] if t is not None else (0, 0, 0)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor | None,
    residual: torch.Tensor | None,
    scale: float | None,
    layout_block_m: int,
    layout_block_n: int,
    qk_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    residual_factors: tuple[torch.Tensor, torch.Tensor] | None = None,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """Attention of q ``[B, H, Lq, D]`` over k, v ``[B, H, Lk, D]`` (any strides but the last), the
    tiles kept by the bool ``layout`` (``[H | B, H, Mb, Nb]`` of ``layout_block_m x layout_block_n``
    tiles, already validated) or all (None), plus ``residual`` and ``u @ w`` for
    ``residual_factors = (u [B, H, Lq, R], w [B, H, R, D])``, in the dtype of v.

    With ``qk_scales`` = (float32 ``[B, H, ceil(Lq / layout_block_m)]``, ``[B, H, ceil(Lk / 64)]``),
    q and k are int8 codes, one scale per tile, and QK^T runs on the int8 tensor cores.
    ``config`` pins a tile configuration instead of autotuning (tests and benchmarks)."""
    out, _ = _launch(q, k, v, layout, scale, layout_block_m, layout_block_n, qk_scales, config,
                     residual=residual, residual_factors=residual_factors)
    return out


def refresh_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor,
    scale: float | None,
    layout_block_m: int,
    layout_block_n: int,
    qk_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    config: triton.Config | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(O_dense, O_dense - O_sparse)`` of the attention ``sparse_attention`` computes with
    ``layout`` (no residual), in one pass over all key tiles."""
    return _launch(q, k, v, layout, scale, layout_block_m, layout_block_n, qk_scales, config, refresh=True)


def _launch(q, k, v, layout, scale, layout_block_m, layout_block_n, qk_scales, config,
            residual=None, residual_factors=None, refresh=False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The kernel on validated operands: (output, the refresh residual or None)."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    assert v.shape[-1] == d, "q, k and v must share the head dimension"
    assert layout_block_n == BLOCK_N and layout_block_m % MAX_BLOCK_M == 0, "layout tiles do not match the kernel's"
    assert layout is not None or not refresh, "a refresh needs the layout it measures the residual of"
    q, k, v = _rows_contiguous(q), _rows_contiguous(k), _rows_contiguous(v)
    out = torch.empty((b, h, lq, d), dtype=v.dtype, device=q.device)
    refresh_residual = torch.empty_like(out) if refresh else None
    if out.numel() == 0:
        return out, refresh_residual
    if layout is None:
        idx = counts = torch.empty((1, 1, 1), dtype=torch.int32, device=q.device)  # not read when dense
    else:
        idx, counts = layout_to_indices(layout.to(q.device))
        # A per-head layout is shared by the batch: stride 0 along B.
        idx, counts = idx.expand(b, h, *idx.shape[-2:]), counts.expand(b, h, counts.shape[-1])
    u, w = residual_factors if residual_factors is not None else (None, None)
    residual, u, w = (None if t is None else _rows_contiguous(t) for t in (residual, u, w))
    rank = u.shape[-1] if u is not None else 0
    q_scales, k_scales = (s.contiguous() for s in qk_scales) if qk_scales is not None else (None, None)
    scale = d**-0.5 if scale is None else scale

    args = (
        q, k, v, residual, u, w, out, refresh_residual, idx, counts, q_scales, k_scales,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *_head_strides(residual), *_head_strides(u),
        *_head_strides(w), *out.stride()[:3], *idx.stride()[:3], *counts.stride()[:2],
        h, lq, lk, d, rank, scale * math.log2(math.e),
    )
    meta = dict(
        DENSE=layout is None, REFRESH=refresh, HAS_RESIDUAL=residual is not None, QK_INT8=qk_scales is not None,
        LAYOUT_M=layout_block_m,
        BLOCK_D=block_d(d), BLOCK_R=block_d(rank) if rank else 0, BLOCK_N=BLOCK_N,
    )

    def grid(meta):
        return (triton.cdiv(lq, meta["BLOCK_M"]), b * h)

    if config is None:
        _sparse_attention_kernel[grid](*args, **meta)
    else:
        _sparse_attention_kernel.fn[grid](*args, **meta, **config.all_kwargs())
    return out, refresh_residual
