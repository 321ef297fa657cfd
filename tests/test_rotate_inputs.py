"""The Hadamard rotation of quantized linears' inputs: orthogonal, exact in float, shared by the
linears of one input, and what it is for: an outlier channel quantizes with less error."""

import pytest
import torch

import qsc
from qsc.fake_quant import fake_quantize_tokens
from qsc.frontend import DenoiserAdapter, export_graph
from qsc.models import synthetic_calibration
from qsc.passes.smooth_quant import lowered_output
from qsc.passes.rotate_inputs import RotateInputs, block_size, signed_hadamard, rotate
from qsc.metrics import relative_l2
from qsc.schemes import LinearScheme

from tiny_models import OUTLIER_LAYER, tiny_model, with_outlier_channel

aten = torch.ops.aten


@pytest.mark.parametrize("width,block", [(128, 128), (512, 128), (1536, 128), (8960, 128), (40, 8)])
def test_the_rotation_is_block_diagonal_and_orthogonal(width, block):
    assert block_size(width) == block
    signed = signed_hadamard(block, torch.Generator().manual_seed(width))
    assert signed.dtype == torch.int8 and set(signed.unique().tolist()) == {-1, 1}
    rotation = signed.float() / block ** 0.5
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(block), atol=1e-5, rtol=0)
    x = torch.randn(3, 5, width)
    full = torch.block_diag(*[rotation] * (width // block))
    torch.testing.assert_close(rotate(x, signed), x @ full, atol=1e-4, rtol=1e-4)


def test_the_seed_decides_the_signs():
    draw = lambda seed: signed_hadamard(256, torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(draw(0), draw(0)) and not torch.equal(draw(0), draw(1))


def _rotated(model, preset="w4a4"):
    calib = synthetic_calibration(model, 2, seed=0)
    sample = calib.sample(0)
    teacher = export_graph(DenoiserAdapter(model), sample)
    ctx = qsc.PassContext(qsc.resolve_config(preset, overrides={"calib_samples": 2}), calib, teacher=teacher)
    gm = qsc.PassManager([RotateInputs()]).run(export_graph(DenoiserAdapter(model), sample), ctx)
    return gm, teacher, sample, ctx


def test_the_rotated_graph_computes_the_float_model_and_q_k_v_share_one_rotation():
    gm, teacher, sample, ctx = _rotated(tiny_model("wan"))
    with torch.no_grad():
        assert relative_l2(gm(**sample), teacher(**sample)) < 1e-5
    rotated = ctx.analyses["rotations"]
    # Every block linear with quantized activations; embedders (float activations) and proj_out not.
    linears = [f"{attn}.{p}" for attn in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")]
    assert set(rotated) == {f"blocks.{b}.{layer}" for b in (0, 1) for layer in linears + ["ffn.net.0.proj", "ffn.net.2"]}
    products = [n for n in gm.graph.nodes if n.target == aten.matmul.default]
    # Per block: q/k/v of self-attention share one; cross-attention's q and its k/v (the text) two;
    # the outputs of both attentions and the FFN's two linears one each.
    assert len(products) == 2 * 7
    # One matrix per block size for the whole model: width 64 and the FFN's 128.
    assert sorted(name for name, _ in gm.named_buffers() if "rotation" in name) == ["input_rotation_128", "input_rotation_64"]


def test_an_outlier_channel_quantizes_with_less_error_rotated():
    """The tiny Wan with one FFN channel 40x the rest: rotated, 4-bit per-token quantization of the
    layer's input costs a fraction of its output error unrotated; the rotated weight quantizes a
    little worse (the outlier's weight column is spread over all), and the layer at W4A4 still
    gains."""
    model = with_outlier_channel(tiny_model("wan"))
    sample = synthetic_calibration(model, 1, seed=0).sample(0)
    captured = {}
    hook = model.get_submodule(OUTLIER_LAYER).register_forward_pre_hook(lambda m, i: captured.update(x=i[0]))
    with torch.no_grad():
        DenoiserAdapter(model)(**sample)
    hook.remove()
    x = captured["x"].reshape(-1, captured["x"].shape[-1])
    weight = model.get_submodule(OUTLIER_LAYER).weight.detach()
    rotation = signed_hadamard(block_size(weight.shape[1]), torch.Generator().manual_seed(0))
    target = torch.nn.functional.linear(x, weight)
    rotated = rotate(x, rotation), rotate(weight, rotation)

    def activation_error(x, w):  # the weight in float
        return float((torch.nn.functional.linear(fake_quantize_tokens(x, 4, 1.0), w) - target).square().mean())

    def w4a4_error(x, w):  # round-to-nearest per output channel and per token
        out = lowered_output(x, w, torch.ones(w.shape[1]), LinearScheme(4, 4, 0), 1.0)
        return float((out - target).square().mean())

    assert activation_error(*rotated) < 0.25 * activation_error(x, weight)
    assert w4a4_error(*rotated) < 0.8 * w4a4_error(x, weight)
