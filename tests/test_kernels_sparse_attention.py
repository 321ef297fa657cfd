"""The block-sparse attention kernel against ``qsc.backends.reference.sparse_attention`` at small,
ragged shapes: on Triton's CPU interpreter, or compiled on a GPU (tests/devices.py)."""

from __future__ import annotations

import pytest
import torch

from devices import DEVICE, HALF_DTYPES, gen, rand, randn, require_kernels

require_kernels()

import qsc.ops  # noqa: E402,F401  (defines torch.ops.qsc.*)
from qsc.backends import reference  # noqa: E402
from qsc.backends import triton as triton_backend  # noqa: E402
from qsc.errors import InputError  # noqa: E402
from qsc.kernels import qk_quant  # noqa: E402
from qsc.kernels import sparse_attention as kernel  # noqa: E402


def _qkv(b, h, lq, lk, d, dtype, seed):
    g = gen(seed)
    return [randn(b, h, n, d, seed=g).to(dtype) for n in (lq, lk, lk)]


def _layout(shape, density, seed, empty_row=True):
    """Random bool layout of the given density; with ``empty_row``, query tile 1 of head 0 keeps nothing."""
    layout = rand(*shape, seed=seed) < density
    if empty_row:
        layout[..., 0, 1, :] = False
    return layout


def _assert_close(out, ref):
    # Half precision: the kernel rounds the probabilities to it for the P.V product, the reference
    # does not.
    tol = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[ref.dtype]
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


def _factors(b, h, lq, d, rank, dtype, seed):
    """A low-rank residual term: u ``[B, H, Lq, rank]``, w ``[B, H, rank, D]``."""
    g = gen(seed)
    return randn(b, h, lq, rank, seed=g).to(dtype), randn(b, h, rank, d, seed=g).to(dtype)


@pytest.mark.parametrize("density", [0.0, 0.15, 0.4, 1.0])
@pytest.mark.parametrize("dtype", [*HALF_DTYPES, torch.float32])
@pytest.mark.parametrize("correction", [None, "residual", "residual+low_rank"])
def test_matches_reference(density, dtype, correction):
    b, h, lq, lk, d = 1, 2, 300, 200, 32  # 3 query tiles (the last ragged) x 4 key tiles (ragged)
    q, k, v = _qkv(b, h, lq, lk, d, dtype, seed=int(density * 100))
    layout = _layout((h, *reference.block_layout_shape(lq, lk)), density, seed=1)
    residual = randn(b, h, lq, d, seed=2).to(dtype) if correction else None
    low_rank = correction == "residual+low_rank"
    u, w = _factors(b, h, lq, d, 5, dtype, seed=3) if low_rank else (None, None)  # rank 5, padded to 16
    out = triton_backend.sparse_attention(q, k, v, layout, residual, None, False, u, w)
    _assert_close(out, reference.sparse_attention(q, k, v, layout, residual, None, False, u, w))


def test_empty_rows_give_the_residual_or_zero():
    b, h, lq, lk, d = 1, 2, 256, 128, 16
    q, k, v = _qkv(b, h, lq, lk, d, torch.float32, seed=3)
    layout = _layout((h, *reference.block_layout_shape(lq, lk)), 0.5, seed=4)
    residual = randn(b, h, lq, d, seed=5)
    u, w = _factors(b, h, lq, d, 16, torch.float32, seed=6)
    rows = slice(reference.SPARSE_BLOCK_M, 2 * reference.SPARSE_BLOCK_M)  # query tile 1 of head 0
    with_residual = triton_backend.sparse_attention(q, k, v, layout, residual, None)
    with_factors = triton_backend.sparse_attention(q, k, v, layout, residual, None, False, u, w)
    without = triton_backend.sparse_attention(q, k, v, layout, None, None)
    assert torch.equal(with_residual[0, 0, rows], residual[0, 0, rows])
    _assert_close(with_factors[0, 0, rows], residual[0, 0, rows] + u[0, 0, rows] @ w[0, 0])
    assert torch.count_nonzero(without[0, 0, rows]) == 0
    assert torch.isfinite(without).all()


def test_dense_mode_is_attention():
    b, h, lq, lk, d = 2, 1, 150, 190, 32
    q, k, v = _qkv(b, h, lq, lk, d, torch.float32, seed=6)
    scale = 0.3
    dense = triton_backend.sparse_attention(q, k, v, None, None, scale)
    all_kept = torch.ones(h, *reference.block_layout_shape(lq, lk), dtype=torch.bool, device=DEVICE)
    _assert_close(dense, torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale))
    _assert_close(triton_backend.sparse_attention(q, k, v, all_kept, None, scale), dense)


@pytest.mark.parametrize("block_m,key_tiles", [(64, 1), (128, 1), (128, 2)])
def test_strided_inputs_odd_head_dim_and_batch_layouts(block_m, key_tiles):
    # q/k/v as transposed views of [B, L, H, D] (what a model's reshape gives), D = 24 padded to 32,
    # one layout per batch element, the query tile sizes and key tiles per step the configs use.
    b, h, lq, lk, d = 2, 3, 260, 130, 24
    g = gen(7)
    q, k, v = (randn(b, n, h, d, seed=g).half().transpose(1, 2) for n in (lq, lk, lk))
    layout = _layout((b, h, *reference.block_layout_shape(lq, lk)), 0.5, seed=8)
    residual = randn(b, h, lq, d, seed=g).half()
    u = randn(b, lq, h, 16, seed=g).half().transpose(1, 2)  # strided too
    w = randn(b, h, 16, d, seed=g).half()
    out = kernel.sparse_attention(
        q, k, v, layout, residual, None, reference.SPARSE_BLOCK_M, reference.SPARSE_BLOCK_N,
        residual_factors=(u, w), config=kernel._config(block_m, stages=2, warps=4, key_tiles=key_tiles),
    )
    _assert_close(out, reference.sparse_attention(q, k, v, layout, residual, None, False, u, w))


@pytest.mark.parametrize("density", [None, 0.15, 0.4, 0.7])
@pytest.mark.parametrize("qk_int8", [False, True])
def test_two_key_tiles_per_step(density, qk_int8):
    # Rows with odd and even kept-tile counts (the last step then has one tile, or two), the ragged
    # last key tile, an empty row; dense mode with an odd number of key tiles (7).
    b, h, lq, lk, d = 1, 2, 300, 420, 32
    q, k, v = _qkv(b, h, lq, lk, d, torch.float16, seed=15)
    layout = None if density is None else _layout((h, *reference.block_layout_shape(lq, lk)), density, seed=16)
    residual = randn(b, h, lq, d, seed=17).half()
    q_in, k_in, qk_scales = q, k, None
    if qk_int8:
        q_in, q_scales, k_in, k_scales = qk_quant.quantize_qk(q, k)
        qk_scales = (q_scales, k_scales)
    out = kernel.sparse_attention(
        q_in, k_in, v, layout, residual, None, reference.SPARSE_BLOCK_M, reference.SPARSE_BLOCK_N,
        qk_scales=qk_scales, config=kernel._config(128, stages=2, warps=4, key_tiles=2),
    )
    _assert_close(out, reference.sparse_attention(q, k, v, layout, residual, None, qk_int8))


def _refresh_reference(q, k, v, layout, qk_int8=False):
    return reference.refresh_attention(q, k, v, layout, None, qk_int8)


@pytest.mark.parametrize("density", [0.0, 0.15, 0.4, 1.0])
@pytest.mark.parametrize("dtype", [*HALF_DTYPES, torch.float32])
def test_refresh_matches_reference(density, dtype):
    # Ragged query and key tiles; a row with no kept tile (its residual is the dense output) and,
    # at density 1, rows that keep every tile (their residual is exactly zero).
    b, h, lq, lk, d = 1, 2, 300, 200, 32
    q, k, v = _qkv(b, h, lq, lk, d, dtype, seed=30 + int(density * 100))
    layout = _layout((h, *reference.block_layout_shape(lq, lk)), density, seed=31)
    dense, residual = triton_backend.refresh_attention(q, k, v, layout, None)
    want_dense, want_residual = _refresh_reference(q, k, v, layout)
    _assert_close(dense, want_dense)
    _assert_close(residual, want_residual)
    assert dense.dtype == residual.dtype == dtype
    rows = reference.SPARSE_BLOCK_M
    assert torch.equal(residual[0, 0, rows : 2 * rows], dense[0, 0, rows : 2 * rows])  # the empty row
    if density == 1.0:
        assert torch.count_nonzero(residual[:, 1]) == 0


@pytest.mark.parametrize("block_m,key_tiles", [(64, 1), (128, 1), (128, 2)])
@pytest.mark.parametrize("qk_int8", [False, True])
def test_refresh_tile_configurations(block_m, key_tiles, qk_int8):
    # Odd and even kept counts per row (with two key tiles per step, the step that crosses from
    # the kept tiles to the others), 7 key tiles of which the last is ragged, one layout per batch
    # element, and strided q, k, v.
    b, h, lq, lk, d = 2, 2, 300, 420, 32
    g = gen(32)
    q, k, v = (randn(b, n, h, d, seed=g).half().transpose(1, 2) for n in (lq, lk, lk))
    layout = _layout((b, h, *reference.block_layout_shape(lq, lk)), 0.4, seed=33)
    q_in, k_in, qk_scales = q, k, None
    if qk_int8:
        q_in, q_scales, k_in, k_scales = qk_quant.quantize_qk(q, k)
        qk_scales = (q_scales, k_scales)
    got = kernel.refresh_attention(
        q_in, k_in, v, layout, None, reference.SPARSE_BLOCK_M, reference.SPARSE_BLOCK_N, qk_scales=qk_scales,
        config=kernel._config(block_m, stages=2, warps=4, key_tiles=key_tiles),
    )
    for out, want in zip(got, _refresh_reference(q, k, v, layout, qk_int8), strict=True):
        _assert_close(out, want)


@pytest.mark.parametrize("key_tiles", [1, 2])
def test_only_the_last_step_of_a_row_is_masked(key_tiles):
    # The kernel masks keys past Lk in a row's last step only. Rows whose lists end in the ragged
    # last key tile after several full steps, in the middle (the ragged tile not kept), with an odd
    # count (a missing second tile) and an even one; refresh mode's second list the same way.
    b, h, lq, lk, d = 1, 1, 512, 500, 32  # 8 key tiles, the last one 52 keys long
    q, k, v = _qkv(b, h, lq, lk, d, torch.float16, seed=36)
    layout = torch.tensor([[
        [True] * 8,
        [True, False, True, False, True, False, False, True],
        [True, True, True, True, False, False, False, False],
        [False, True, True, True, False, True, True, False],
    ]], device=DEVICE)
    config = kernel._config(128, stages=2, warps=4, key_tiles=key_tiles)
    args = (reference.SPARSE_BLOCK_M, reference.SPARSE_BLOCK_N)
    out = kernel.sparse_attention(q, k, v, layout, None, None, *args, config=config)
    _assert_close(out, reference.sparse_attention(q, k, v, layout, None, None))
    for got, want in zip(kernel.refresh_attention(q, k, v, layout, None, *args, config=config),
                         _refresh_reference(q, k, v, layout), strict=True):
        _assert_close(got, want)
    _assert_close(kernel.sparse_attention(q, k, v, None, None, None, *args, config=config),
                  reference.sparse_attention(q, k, v, None, None, None))


def test_refresh_is_the_dense_and_the_sparse_kernel():
    # The one-pass pair against the two kernels it replaces: dense mode and sparse mode.
    b, h, lq, lk, d = 1, 2, 260, 330, 32
    q, k, v = _qkv(b, h, lq, lk, d, torch.float32, seed=34)
    layout = _layout((h, *reference.block_layout_shape(lq, lk)), 0.3, seed=35)
    dense, residual = triton_backend.refresh_attention(q, k, v, layout, 0.2)
    alone = triton_backend.sparse_attention(q, k, v, None, None, 0.2)
    sparse = triton_backend.sparse_attention(q, k, v, layout, None, 0.2)
    _assert_close(dense, alone)
    _assert_close(residual, alone - sparse)


def test_layout_to_indices():
    layout = torch.tensor(
        [[[False, True, False, True], [False, False, False, False], [True, True, True, True]]], device=DEVICE
    )
    idx, counts = kernel.layout_to_indices(layout)
    assert counts.tolist() == [[2, 0, 4]]
    # Kept tiles first, then the others (refresh mode reads on past the count), each ascending.
    assert idx[0].tolist() == [[1, 3, 0, 2], [0, 1, 2, 3], [0, 1, 2, 3]]


@pytest.mark.parametrize(
    "bad",
    [
        torch.ones(2, 3, 3, dtype=torch.bool),  # too few key tiles
        torch.ones(3, 3, 4, dtype=torch.bool),  # wrong head count
        torch.ones(2, 2, 3, 4, dtype=torch.bool),  # wrong batch
        torch.ones(2, 3, 4),  # not bool
    ],
)
def test_layout_shape_and_dtype_are_checked(bad):
    q, k, v = _qkv(1, 2, 300, 200, 16, torch.float32, seed=9)  # expects bool [2, 3, 4] or [1, 2, 3, 4]
    bad = bad.to(DEVICE)
    with pytest.raises(InputError, match="layout"):
        triton_backend.sparse_attention(q, k, v, bad, None, None)
    with pytest.raises(InputError, match="layout"):
        reference.sparse_attention(q, k, v, bad, None, None)


def test_op_exports_with_its_layout():
    class Attention(torch.nn.Module):
        def forward(self, q, k, v, layout, residual, u, w):
            return torch.ops.qsc.sparse_attention(q, k, v, layout, residual, residual_u=u, residual_v=w)

    q, k, v = _qkv(1, 2, 130, 70, 16, torch.float32, seed=10)
    layout = _layout((2, *reference.block_layout_shape(130, 70)), 0.5, seed=11)
    args = (q, k, v, layout, torch.zeros_like(q), *_factors(1, 2, 130, 16, 4, torch.float32, seed=12))
    ep = torch.export.export(Attention(), args)
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.qsc.sparse_attention.default in targets
    expected = reference.sparse_attention(*args[:5], None, False, *args[5:])
    torch.testing.assert_close(ep.module()(*args), expected)


@pytest.mark.parametrize(
    "shapes", [((1, 2, 300, 4), None), ((1, 2, 300, 4), (1, 2, 5, 16)), ((1, 2, 299, 4), (1, 2, 4, 16))]
)
def test_residual_factors_are_checked(shapes):
    q, k, v = _qkv(1, 2, 300, 200, 16, torch.float32, seed=9)
    u, w = (None if s is None else torch.zeros(s, device=DEVICE) for s in shapes)
    for backend in (reference, triton_backend):
        with pytest.raises(InputError, match="residual factors"):
            backend.sparse_attention(q, k, v, None, None, None, False, u, w)


@pytest.mark.parametrize("density", [None, 0.4])
def test_int8_qk_matches_reference(density):
    b, h, lq, lk, d = 1, 2, 300, 200, 32
    q, k, v = _qkv(b, h, lq, lk, d, torch.float16, seed=12)
    layout = None if density is None else _layout((h, *reference.block_layout_shape(lq, lk)), density, seed=13)
    residual = randn(b, h, lq, d, seed=14).half()
    u, w = _factors(b, h, lq, d, 16, torch.float16, seed=15)
    out = triton_backend.sparse_attention(q, k, v, layout, residual, None, True, u, w)
    assert out.dtype == torch.float16
    _assert_close(out, reference.sparse_attention(q, k, v, layout, residual, None, True, u, w))


@pytest.mark.parametrize("dtype", [*HALF_DTYPES, torch.float32])
@pytest.mark.parametrize("lq,lk,d,heads_last", [(300, 200, 32, False), (128, 64, 48, True), (1, 5, 16, False)])
def test_qk_quantization_is_bit_exact(dtype, lq, lk, d, heads_last):
    # Ragged last tiles, a head dimension that is not a power of two, and q/k read in place from
    # the [B, L, H, D] layout of the projections (heads_last); K carries an offset to smooth away.
    b, h = 2, 3

    def shape(length):
        return (b, length, h, d) if heads_last else (b, h, length, d)

    q = randn(*shape(lq), seed=20).to(dtype)
    k = (randn(*shape(lk), seed=21) + 4.0 * rand(d, seed=22)).to(dtype)
    if heads_last:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    for got, want in zip(qk_quant.quantize_qk(q, k), reference.quantize_qk(q, k), strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_int8_qk_smoothing_removes_the_shared_key_offset():
    # A large offset shared by all keys would eat the int8 range of K; subtracting the mean of K
    # removes it without changing the softmax, so INT8 scores stay close to the float ones.
    q, k, v = _qkv(1, 2, 256, 256, 32, torch.float32, seed=15)
    k = k + 100.0
    exact = reference.sparse_attention(q, k, v, None, None, None)
    int8 = reference.sparse_attention(q, k, v, None, None, None, qk_int8=True)
    assert ((int8 - exact).norm() / exact.norm()).item() < 0.05
