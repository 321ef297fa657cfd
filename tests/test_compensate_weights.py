"""GPTQ's error compensation: the column-by-column rounding against plain PyTorch references, and
the pass that applies it block by block and hands its codes to ``quantize_linear`` unchanged."""

import pytest
import torch

import qsc
from qsc import quant
from qsc.gptq import gptq_codes
from qsc.models import synthetic_calibration
from qsc.passes.compensate_weights import output_error

from tiny_models import tiny_model


def _layer(seed: int, n: int = 24, k: int = 64, tokens: int = 256):
    """A weight and inputs with correlated channels (what makes compensation pay)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5
    x = torch.randn(tokens, k, generator=g) @ (torch.eye(k) + 2 * mix)
    return torch.randn(n, k, generator=g), x


@pytest.mark.parametrize("bits, group_size", [(4, 0), (4, 16), (8, 0)])
def test_identity_hessian_gives_round_to_nearest(bits, group_size):
    w, _ = _layer(0)
    scale = quant.weight_scale(w, bits, group_size)
    codes = gptq_codes(w, torch.eye(w.shape[1]), scale, bits, group_size)
    assert torch.equal(codes, quant.quantize_weight(w, scale, bits, group_size))


@pytest.mark.parametrize("group_size", [0, 16])
def test_compensation_lowers_the_output_error_on_fresh_data(group_size):
    for seed in range(3):
        w, x = _layer(seed)
        gram = (x.T @ x).double()
        scale = quant.weight_scale(w, 4, group_size)
        rtn = quant.dequantize_weight(quant.quantize_weight(w, scale, 4, group_size), scale, group_size)
        codes = gptq_codes(w, gram, scale, 4, group_size)
        assert codes.abs().max() <= quant.qmax(4)
        gptq = quant.dequantize_weight(codes, scale, group_size)
        # The error measured directly on the outputs, not through the Gram matrix the method uses.
        rtn_error = (x @ (rtn - w).T).square().sum()
        gptq_error = (x @ (gptq - w).T).square().sum()
        assert gptq_error < 0.6 * rtn_error
        assert output_error(w, gptq, gram) == pytest.approx(float(gptq_error / (x @ w.T).square().sum()), rel=1e-4)


def test_pass_keeps_its_codes_through_quantize_linear():
    model = tiny_model("wan")
    calib = synthetic_calibration(model, 4, seed=0)
    result = qsc.compile(model, calib, preset="w4a8", config={"compensate_weights": True, "calib_samples": 4})
    row = next(r for r in result.pass_log if r["pass"] == "compensate_weights")
    assert row["output_error_compensated"] < row["output_error_round_to_nearest"]
    plain = qsc.compile(model, calib, preset="w4a8", config={"calib_samples": 4})
    ours, theirs = result.program.state_dict, plain.program.state_dict
    codes = [name for name in ours if name.endswith("qweight")]
    scales = [name for name in ours if name.endswith("w_scale")]
    assert codes and len(scales) == len(codes)
    assert any(not torch.equal(ours[name], theirs[name]) for name in codes)  # other codes
    assert all(torch.equal(ours[name], theirs[name]) for name in scales)  # under the same scales
