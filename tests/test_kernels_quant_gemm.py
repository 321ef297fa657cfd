"""The activation-quantization and low-bit GEMM kernels against their references at small shapes
with ragged edges: on Triton's CPU interpreter, or compiled on a GPU (tests/devices.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from devices import DEVICE, HALF_DTYPES, gen, rand, randn, require_kernels

require_kernels()

from qsc import quant  # noqa: E402
from qsc.backends import reference  # noqa: E402
from qsc.backends import triton as triton_backend  # noqa: E402
from qsc.kernels import act_quant, int4_unpack, quant_gemm  # noqa: E402


def _quantized_layer(n: int, k: int, w_bits: int, group_size: int, seed: int):
    g = gen(seed)
    w = torch.randn(n, k, generator=g)
    scale = quant.weight_scale(w, w_bits, group_size)
    qweight = quant.pack_weight(quant.quantize_weight(w, scale, w_bits, group_size), w_bits)
    bias = torch.randn(n, generator=g)
    in_scale = torch.rand(k, generator=g) + 0.5
    return qweight.to(DEVICE), scale.to(DEVICE), bias.to(DEVICE), in_scale.to(DEVICE)


def _assert_close_to_reference(y: torch.Tensor, ref: torch.Tensor) -> None:
    # The kernel accumulates integer products exactly and scales once; the reference multiplies
    # dequantized float32 values. They differ by float32 rounding, or by one rounding of the output
    # dtype. A wrong nibble order, scale index or rounding mode is off by far more.
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[ref.dtype]
    amax = ref.float().abs().max().item()
    torch.testing.assert_close(y.float(), ref.float(), rtol=tol, atol=tol * amax)


# --- activation quantization -----------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("dtype", [*HALF_DTYPES, torch.float32])
@pytest.mark.parametrize("with_in_scale", [False, True])
@pytest.mark.parametrize("m,k", [(1, 7), (5, 300), (3, 2500)])  # 2500 > one 2048-wide chunk
def test_act_quant_is_bit_exact(bits, dtype, with_in_scale, m, k):
    g = gen(m * k + bits)
    x = (randn(m, k, seed=g) * 3).to(dtype)
    in_scale = rand(k, seed=g) + 0.5 if with_in_scale else None
    q, scale = act_quant.quantize_per_token(x, in_scale, bits, 0.9)
    xf = x.float() * in_scale if with_in_scale else x.float()
    q_ref, scale_ref = quant.quantize_per_token(xf, bits, 0.9)
    assert torch.equal(scale, scale_ref.squeeze(-1))
    assert torch.equal(q, q_ref)


def test_act_quant_rounds_half_to_even_and_handles_zero_rows():
    # max|x| = 127 and clip 1 give scale 1 for A8: x / scale is exactly the .5 ties below.
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5, -126.5, 3.5], [0.0] * 8], device=DEVICE)
    q, scale = act_quant.quantize_per_token(x, None, 8, 1.0)
    assert q[0].tolist() == [127, 0, 2, 2, 0, -2, -126, 4]
    assert q[1].tolist() == [0] * 8 and scale[1].item() > 0


@settings(max_examples=15, deadline=None)
@given(
    m=st.integers(1, 6), k=st.integers(1, 300), bits=st.sampled_from([4, 6, 8]),
    clip=st.floats(0.3, 1.0), seed=st.integers(0, 2**16),
)
def test_act_quant_property(m, k, bits, clip, seed):
    x = randn(m, k, seed=seed) * 10
    q, scale = act_quant.quantize_per_token(x, None, bits, clip)
    q_ref, scale_ref = quant.quantize_per_token(x, bits, clip)
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref.squeeze(-1))


# --- the GEMM, through the backend's quant_linear ----------------------------------------------


@pytest.mark.parametrize("w_bits", [4, 6, 8])
@pytest.mark.parametrize("a_bits", [4, 6, 8, 16])
@pytest.mark.parametrize("group_size", [0, 32])
def test_quant_linear_matches_reference(w_bits, a_bits, group_size):
    m, k, n = 70, 160, 72  # ragged against every tile size (K: 2.5 tiles of 64, 5 groups of 32)
    qweight, scale, bias, in_scale = _quantized_layer(n, k, w_bits, group_size, seed=w_bits * 100 + a_bits + group_size)
    x = randn(m, k, seed=a_bits) * 2
    y = triton_backend.quant_linear(x, qweight, scale, bias, in_scale, w_bits, a_bits, group_size, k, 0.95)
    ref = reference.quant_linear(x, qweight, scale, bias, in_scale, w_bits, a_bits, group_size, k, 0.95)
    _assert_close_to_reference(y, ref)


@pytest.mark.parametrize("a_bits", [8, 16])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_quant_linear_half_precision_batched_input(a_bits, dtype):
    # Half-precision activations of shape [B, L, K], no bias, per-group W4, odd token count.
    k, n = 128, 48
    qweight, scale, _, in_scale = _quantized_layer(n, k, 4, 64, seed=7)
    x = randn(2, 37, k, seed=8).to(dtype)
    y = triton_backend.quant_linear(x, qweight, scale, None, in_scale, 4, a_bits, 64, k, 1.0)
    ref = reference.quant_linear(x, qweight, scale, None, in_scale, 4, a_bits, 64, k, 1.0)
    assert y.shape == (2, 37, n) and y.dtype == dtype
    _assert_close_to_reference(y, ref)


@pytest.mark.parametrize("a_bits,swap_ab", [(8, False), (8, True), (16, False)])
def test_int4_with_odd_k(a_bits, swap_ab):
    # An odd K is padded with one zero nibble: the last byte holds column K-1 and the padding.
    m, k, n = 9, 97, 40
    qweight, scale, bias, _ = _quantized_layer(n, k, 4, 0, seed=3)
    assert qweight.shape == (n, 49)
    x = randn(m, k, seed=4)
    if swap_ab:
        config = quant_gemm._config(16, 32, 32, stages=2, warps=4, swap_ab=True)
        a, a_scale = act_quant.quantize_per_token(x, None, a_bits, 1.0)
        y = quant_gemm.quant_gemm(a, a_scale, None, qweight, scale, bias, 4, 0, k, torch.float32, config)
    else:
        y = triton_backend.quant_linear(x, qweight, scale, bias, None, 4, a_bits, 0, k, 1.0)
    ref = reference.quant_linear(x, qweight, scale, bias, None, 4, a_bits, 0, k, 1.0)
    _assert_close_to_reference(y, ref)


@pytest.mark.parametrize(
    "w_bits,a_bits,group_size,swap_ab", [(4, 8, 0, False), (4, 8, 0, True), (4, 8, 64, False), (8, 16, 32, False)]
)
def test_small_tiles_cover_many_programs(w_bits, a_bits, group_size, swap_ab):
    # Pinned 32x32x32 tiles: a 4x4 grid of programs in GROUP_M=8 launch order, several K steps,
    # ragged in M and N; swap_ab computes the transposed tile (W4 x int8, per channel).
    config = quant_gemm._config(32, 32, 32, stages=2, warps=4, swap_ab=swap_ab)
    assert quant_gemm.adapt_config(config, w_bits, group_size, a_bits == 8).kwargs["SWAP_AB"] == swap_ab
    m, k, n = 100, 192, 110
    qweight, scale, bias, in_scale = _quantized_layer(n, k, w_bits, group_size, seed=11)
    x = randn(m, k, seed=12)
    a, a_scale = x, None
    if a_bits < 16:
        a, a_scale = act_quant.quantize_per_token(x, in_scale, a_bits, 1.0)
    y = quant_gemm.quant_gemm(a, a_scale, in_scale, qweight, scale, bias, w_bits, group_size, k, torch.float32, config)
    ref = reference.quant_linear(x, qweight, scale, bias, in_scale, w_bits, a_bits, group_size, k, 1.0)
    _assert_close_to_reference(y, ref)


@pytest.mark.parametrize("n,k", [(1, 1), (3, 7), (33, 300), (17, 513)])  # 513: two byte tiles, odd K
def test_int4_unpack_is_bit_exact(n, k):
    packed = torch.randint(0, 256, (n, (k + 1) // 2), generator=gen(n * k), dtype=torch.uint8)
    packed[0, : min(256, packed.shape[1])] = torch.arange(min(256, packed.shape[1]), dtype=torch.uint8)
    out = int4_unpack.unpack_int4(packed.to(DEVICE), k)
    assert torch.equal(out.cpu(), quant.unpack_int4(packed, k))


@pytest.mark.parametrize("a_bits,group_size,k", [(8, 0, 97), (8, 64, 192), (16, 32, 160), (4, 0, 128)])
def test_w4_unpacked_first_matches_reference(a_bits, group_size, k):
    # The large-M strategy: int4 weights unpacked to int8 by their own kernel, then the int8 GEMM.
    m, n = 45, 72
    qweight, scale, bias, in_scale = _quantized_layer(n, k, 4, group_size, seed=k + a_bits)
    x = randn(m, k, seed=13)
    a, a_scale = x, None
    if a_bits < 16:
        a, a_scale = act_quant.quantize_per_token(x, in_scale, a_bits, 1.0)
    y = quant_gemm.quant_gemm(a, a_scale, in_scale, qweight, scale, bias, 4, group_size, k, torch.float32,
                              unpack_first=True)
    ref = reference.quant_linear(x, qweight, scale, bias, in_scale, 4, a_bits, group_size, k, 1.0)
    _assert_close_to_reference(y, ref)


@pytest.mark.parametrize("m,unpacks", [(7, False), (8, True)])
def test_w4_strategy_is_chosen_by_rows(monkeypatch, m, unpacks):
    monkeypatch.setattr(quant_gemm, "UNPACK_MIN_ROWS", 8)
    calls = []
    monkeypatch.setattr(int4_unpack, "unpack_int4", lambda *args: calls.append(args) or quant.unpack_int4(*args))
    k, n = 64, 16
    qweight, scale, bias, _ = _quantized_layer(n, k, 4, 0, seed=9)
    x = randn(m, k, seed=10)
    y = triton_backend.quant_linear(x, qweight, scale, bias, None, 4, 8, 0, k, 1.0)
    assert bool(calls) == unpacks
    _assert_close_to_reference(y, reference.quant_linear(x, qweight, scale, bias, None, 4, 8, 0, k, 1.0))


@pytest.mark.parametrize("w_bits,a_bits,group_size", [(4, 8, 0), (8, 6, 32), (4, 4, 64), (8, 8, 48)])  # 48: reference
def test_quant_gemm_on_codes_quantized_beforehand(w_bits, a_bits, group_size):
    # qsc::quant_gemm, the half of quant_linear that torch.compile'd programs call after quantizing
    # the activations themselves: batched [B, L, K] codes, scales [B, L, 1].
    k, n = 192, 40
    qweight, scale, bias, in_scale = _quantized_layer(n, k, w_bits, group_size, seed=w_bits + a_bits + group_size)
    x = randn(2, 11, k, seed=14).to(torch.float16)
    codes, scales = reference.quantize_activations(x, in_scale, a_bits, 1.0)
    y = triton_backend.quant_gemm(codes, scales, qweight, scale, bias, w_bits, group_size, k, torch.float16)
    assert y.shape == (2, 11, n) and y.dtype == torch.float16
    _assert_close_to_reference(y, reference.quant_linear(x, qweight, scale, bias, in_scale, w_bits, a_bits,
                                                         group_size, k, 1.0))


def test_unsupported_group_size_falls_back_to_reference():
    k, n = 96, 16
    qweight, scale, bias, _ = _quantized_layer(n, k, 8, 48, seed=5)
    x = randn(4, k, seed=6)
    y = triton_backend.quant_linear(x, qweight, scale, bias, None, 8, 8, 48, k, 1.0)
    assert torch.equal(y, reference.quant_linear(x, qweight, scale, bias, None, 8, 8, 48, k, 1.0))


def test_enable_registers_cuda_kernels():
    triton_backend.enable()
    triton_backend.enable()  # idempotent
    for op in ("qsc::quant_linear", "qsc::quant_gemm", "qsc::sparse_attention"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
