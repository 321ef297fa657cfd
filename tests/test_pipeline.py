"""The pass manager: dependency checks, failures that name pass and node, instruments."""

import pytest
import torch

import qsc
from qsc.errors import PassError, PipelineError
from qsc.frontend import DenoiserAdapter, export_graph
from qsc.graph import at_node, linear_sites
from qsc.instruments import DumpIR
from qsc.models import synthetic_calibration
from qsc.passes import REGISTRY, pipeline_for

from tiny_models import tiny_model


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("wan")
    calib = synthetic_calibration(model, 2, seed=0)
    return model, calib


def fresh(setup):
    model, calib = setup
    gm = export_graph(DenoiserAdapter(model), calib.sample(0))
    ctx = qsc.PassContext(qsc.resolve_config("w8a8", overrides={"calib_samples": 2}), calib, teacher=gm)
    return gm, ctx


class Explodes(qsc.Pass):
    name = "explodes"

    def run(self, gm, ctx):
        site = linear_sites(gm)[3]
        with at_node(site.node):
            raise ValueError("weights are upside down")


def test_missing_requirement_is_refused_before_anything_runs(setup):
    gm, ctx = fresh(setup)
    manager = qsc.PassManager([REGISTRY["calibrate"](), REGISTRY["quantize_linear"]()])
    with pytest.raises(PipelineError, match="'calibrate' requires \\['observers'\\]"):
        manager.run(gm, ctx)
    assert ctx.pass_log == []


def test_invalidated_analysis_cannot_be_required_later(setup):
    gm, ctx = fresh(setup)
    names = ["insert_observers", "calibrate", "calibrate"]
    with pytest.raises(PipelineError, match="observers"):
        qsc.PassManager([REGISTRY[n]() for n in names]).validate(ctx.analyses)


def test_failure_names_pass_and_node_and_dumps_a_reproducer(setup, tmp_path):
    gm, ctx = fresh(setup)
    node_name = linear_sites(gm)[3].node.name
    manager = qsc.PassManager([REGISTRY["insert_observers"](), Explodes()], [DumpIR(tmp_path)])
    with pytest.raises(PassError) as err:
        manager.run(gm, ctx)
    assert err.value.pass_name == "explodes" and err.value.node == node_name
    assert f"pass 'explodes' at node '{node_name}'" in str(err.value) and "upside down" in str(err.value)
    crash = tmp_path / "02-explodes.crash.txt"
    assert crash.is_file() and "qsc_observers" in crash.read_text()  # the graph the pass was given


def test_pipeline_follows_the_config():
    names = lambda **kw: [p.name for p in pipeline_for(qsc.resolve_config("w4a8", overrides=kw))]
    assert names() == ["insert_observers", "calibrate", "smooth_quant", "quantize_linear"]
    assert names(smooth_quant=False) == ["insert_observers", "calibrate", "quantize_linear"]
    assert names(passes=["quantize_linear"]) == ["quantize_linear"]
    rotated = [p.name for p in pipeline_for(qsc.resolve_config("w4a6-rot"))]
    assert rotated == ["rotate_inputs", "insert_observers", "calibrate", "compensate_weights", "quantize_linear"]
    with pytest.raises(PipelineError, match="unknown pass"):
        names(passes=["quantise"])


def test_smooth_quant_preserves_the_function_and_leaves_the_teacher_alone(setup):
    model, calib = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm, ctx = fresh(setup)
    passes = [REGISTRY[n]() for n in ("insert_observers", "calibrate", "smooth_quant")]
    smoothed = qsc.PassManager(passes).run(export_graph(DenoiserAdapter(model), calib.sample(0)), ctx)
    sample = calib.sample(1)
    with torch.no_grad():
        torch.testing.assert_close(smoothed(**sample), gm(**sample), rtol=1e-4, atol=1e-5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert ctx.analyses["smoothing"] and "observers" not in ctx.analyses
