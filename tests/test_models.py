"""The diffusers video transformers go through compile -> save -> load -> run, at W8A8 and W4A8."""

import pytest
import torch

import qsc
from qsc.config import DEFAULT_EXCLUDE, DEFAULT_INCLUDE
from qsc.frontend import DenoiserAdapter, export_graph
from qsc.graph import LayerFilter, layer_path, linear_sites
from qsc.models import synthetic_calibration

from tiny_models import CONFIGS, tiny_model

# Relative L2 error of the whole transformer's output against FP on a calibration sample.
ERROR_BOUND = {"w8a8": 0.01, "w4a8": 0.05}


def _ops(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == target]


@pytest.fixture(scope="module", params=list(CONFIGS))
def model_and_data(request):
    model = tiny_model(request.param)
    return request.param, model, synthetic_calibration(model, 4, seed=0)


@pytest.mark.parametrize("preset", ["w8a8", "w4a8"])
def test_compile_save_load_run(model_and_data, preset, tmp_path):
    name, model, calib = model_and_data
    result = qsc.compile(model, calib, preset=preset, config={"calib_samples": 4})

    # Every linear inside the blocks (and outside the skip list) became one qsc op ...
    fp_graph = export_graph(DenoiserAdapter(model), calib.sample(0))
    all_linears = {s.layer for s in linear_sites(fp_graph)}
    in_blocks = {layer for layer in all_linears if LayerFilter(DEFAULT_INCLUDE, DEFAULT_EXCLUDE)(layer)}
    assert in_blocks and set(result.layers) == all_linears - {"proj_out"}
    w_bits, a_bits = int(preset[1]), int(preset[3])
    for layer, info in result.layers.items():
        expected = (w_bits, a_bits) if layer in in_blocks else (8, 16)  # embedders: int8 weight-only
        assert (info["w_bits"], info["a_bits"]) == expected, layer
    compressed = result.program.graph_module
    assert len(_ops(compressed, torch.ops.qsc.quant_linear.default)) == len(all_linears) - 1
    # ... and only the final projection remains a float linear.
    remaining = {layer_path(n.args[1].target) for n in _ops(result.module, torch.ops.aten.linear.default)}
    assert remaining == {"proj_out"}

    with torch.no_grad():
        fp_out = DenoiserAdapter(model)(**calib.sample(0))
        out = result.module(**calib.sample(0))
    assert qsc.metrics.relative_l2(out, fp_out) < ERROR_BOUND[preset]
    assert result.sizes["ratio"] > 1.3

    loaded = qsc.load(result.save(tmp_path / f"{name}.qsc"))
    for i in range(2):
        sample = calib.sample(i)
        with torch.no_grad():
            assert torch.equal(loaded(**sample), result.module(**sample))

    # The loaded program is still a program: it exports again.
    reexported = torch.export.export(loaded, (), calib.sample(0), strict=False)
    assert _ops(reexported.graph_module, torch.ops.qsc.quant_linear.default)


def test_weights_are_packed_four_bit_in_the_artifact(tmp_path):
    from safetensors.torch import load_file

    model = tiny_model("wan")
    result = qsc.compile(model, preset="w4a8", config={"calib_samples": 2, "check_numerics": False})
    weights = load_file(result.save(tmp_path / "w.qsc") / "weights.safetensors")
    qweight = weights["model.blocks.0.attn1.to_q.qweight"]
    n, k = model.blocks[0].attn1.to_q.weight.shape
    assert qweight.dtype == torch.uint8 and qweight.shape == (n, k // 2)
    assert "model.blocks.0.attn1.to_q.weight" not in weights  # the float weight is gone
    assert weights["model.proj_out.weight"].dtype == torch.float32  # kept layers stay float


def test_planning_without_compiling_matches_the_compiler():
    """The storage benchmark plans on the meta device; its plan must equal what compile does."""
    from qsc.compiler import module_bytes
    from qsc.inspection import plan_layers

    model = tiny_model("hunyuan")
    result = qsc.compile(model, preset="w4a8", config={"calib_samples": 1, "group_size": 16, "check_numerics": False})
    weights = {name: m.weight for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    layers, sizes = plan_layers(weights, module_bytes(model), result.config)
    # The plan fixes schemes and bytes; which alpha a smooth_alpha = "auto" search picks is data.
    assert layers == {name: {k: v for k, v in record.items() if k != "smooth_alpha"}
                      for name, record in result.layers.items()}
    assert sizes["compressed_bytes"] == result.sizes["compressed_bytes"]
