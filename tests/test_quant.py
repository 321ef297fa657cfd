"""The quantizer arithmetic every pass, op and kernel shares."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qsc import quant
from qsc.backends import reference

shapes = st.tuples(st.integers(1, 9), st.integers(1, 40))


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_int4_pack_unpack_is_exact(shape, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-8, 8, shape, generator=g, dtype=torch.int8)
    packed = quant.pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0], (shape[1] + 1) // 2)
    assert torch.equal(quant.unpack_int4(packed, shape[1]), codes)


def test_int4_nibble_layout_low_nibble_is_even_column():
    codes = torch.tensor([[1, -1, 7, -8]], dtype=torch.int8)
    assert quant.pack_int4(codes).tolist() == [[0xF1, 0x87]]


@settings(max_examples=60, deadline=None)
@given(shape=shapes, bits=st.sampled_from(quant.WEIGHT_BITS), group=st.sampled_from([0, 2, 4, 8]),
       seed=st.integers(0, 2**16))
def test_weight_round_trip_error_is_at_most_half_a_step(shape, bits, group, seed):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    group = quant.effective_group_size(shape[1], group)
    scale = quant.weight_scale(w, bits, group)
    codes = quant.quantize_weight(w, scale, bits, group)
    assert codes.abs().max() <= quant.qmax(bits)
    step = scale.float().reshape(shape[0], -1).repeat_interleave(group or shape[1], dim=1)
    err = (quant.dequantize_weight(codes, scale, group) - w).abs()
    # Half a step, plus the rounding of the scale itself to fp16 (relative 2^-11 of the range).
    assert (err <= step * (0.5 + quant.qmax(bits) * 2**-10) + 1e-7).all()


@settings(max_examples=60, deadline=None)
@given(shape=shapes, bits=st.sampled_from([4, 6, 8]), seed=st.integers(0, 2**16))
def test_per_token_quantization_bounds(shape, bits, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3
    codes, scale = quant.quantize_per_token(x, bits)
    assert scale.shape == (shape[0], 1)
    assert codes.abs().max() <= quant.qmax(bits)
    # every token's largest element lands on the top code: the grid spans the token exactly
    assert torch.equal(codes.abs().amax(dim=1), torch.full((shape[0],), quant.qmax(bits), dtype=torch.int8))
    assert ((codes.float() * scale - x).abs() <= scale / 2 + 1e-6).all()


def test_zero_rows_quantize_to_zero_not_nan():
    w = torch.zeros(3, 8)
    scale = quant.weight_scale(w, 4)
    assert torch.equal(quant.dequantize_weight(quant.quantize_weight(w, scale, 4), scale), w)
    codes, scale = quant.quantize_per_token(torch.zeros(2, 8), 8)
    assert torch.equal(codes, torch.zeros(2, 8, dtype=torch.int8)) and (scale > 0).all()


def test_packed_size_formula_matches_real_tensors():
    for n, k, bits, group in [(16, 64, 4, 0), (16, 64, 4, 16), (8, 33, 4, 0), (8, 64, 8, 32), (8, 64, 6, 0)]:
        w = torch.randn(n, k)
        g = quant.effective_group_size(k, group)
        scale = quant.weight_scale(w, bits, g)
        packed = quant.pack_weight(quant.quantize_weight(w, scale, bits, g), bits)
        real = packed.numel() * packed.element_size() + scale.numel() * scale.element_size()
        assert quant.packed_weight_nbytes(n, k, bits, group) == real


@settings(max_examples=30, deadline=None)
@given(w_bits=st.sampled_from(quant.WEIGHT_BITS), a_bits=st.sampled_from(quant.ACTIVATION_BITS),
       group=st.sampled_from([0, 16]), seed=st.integers(0, 2**16))
def test_quant_linear_reference_error_shrinks_with_bits(w_bits, a_bits, group, seed):
    g = torch.Generator().manual_seed(seed)
    x, w, b = torch.randn(5, 32, generator=g), torch.randn(24, 32, generator=g), torch.randn(24, generator=g)
    scale = quant.weight_scale(w, w_bits, group)
    packed = quant.pack_weight(quant.quantize_weight(w, scale, w_bits, group), w_bits)
    y = torch.ops.qsc.quant_linear(x, packed, scale, b, None, w_bits, a_bits, group, 32, 1.0)
    ref = torch.nn.functional.linear(x, w, b)
    rel = float((y - ref).norm() / ref.norm())
    # Loose per-bit budget: each lost bit roughly doubles the error of random Gaussian data.
    budget = 0.8 * (2.0 ** -(min(w_bits, a_bits) - 2))
    assert rel < budget, (rel, budget)


def test_quant_linear_in_scale_is_applied_before_activation_quantization():
    torch.manual_seed(0)
    x, w = torch.randn(4, 16), torch.randn(8, 16)
    s = torch.rand(16) + 0.5
    scale = quant.weight_scale(w * s, 8)
    packed = quant.quantize_weight(w * s, scale, 8)
    fused = reference.quant_linear(x, packed, scale, None, 1.0 / s, 8, 6, 0, 16, 1.0)
    explicit = reference.quant_linear(x * (1.0 / s), packed, scale, None, None, 8, 6, 0, 16, 1.0)
    assert torch.equal(fused, explicit)
    assert (fused - x @ w.T).norm() / (x @ w.T).norm() < 0.1  # and it is still the linear
