"""SmoothQuant's per-layer alpha search: never worse than no smoothing, finds outliers, deterministic."""

import pytest
import torch

import qsc
from qsc import quant
from qsc.backends import reference
from qsc.frontend import DenoiserAdapter, export_graph
from qsc.models import synthetic_calibration
from qsc.passes import REGISTRY
from qsc.passes.insert_observers import SAMPLE_ROWS, ActivationObserver
from qsc.passes.smooth_quant import ALPHA_GRID, lowered_output, smoothing_factors
from qsc.pipeline import no_progress
from qsc.schemes import LinearScheme, SchemePlan

from tiny_models import OUTLIER_LAYER, tiny_model, with_outlier_channel

def smooth(model, preset="w4a8", progress=no_progress, **overrides):
    """Run the pipeline up to ``smooth_quant``; returns its context and the FP graph."""
    calib = synthetic_calibration(model, 2, seed=0)
    teacher = export_graph(DenoiserAdapter(model), calib.sample(0))
    cfg = qsc.resolve_config(preset, overrides={"calib_samples": 2, **overrides})
    ctx = qsc.PassContext(cfg, calib, teacher=teacher, progress=progress)
    passes = [REGISTRY[n]() for n in ("insert_observers", "calibrate", "smooth_quant")]
    qsc.PassManager(passes).run(export_graph(DenoiserAdapter(model), calib.sample(0)), ctx)
    return ctx, teacher


def sample_error(ctx, teacher, layer, factors):
    """Output MSE on the layer's calibration sample, lowered with smoothing ``factors``."""
    weight = teacher.get_parameter(f"model.{layer}.weight").detach()
    x = ctx.analyses["activation_stats"][layer].sample
    scheme = SchemePlan(ctx.config).scheme(layer, weight.shape[1])
    target = torch.nn.functional.linear(x.float(), weight.float())
    return float((lowered_output(x, weight, factors, scheme, 1.0).float() - target).square().mean())


@pytest.fixture(scope="module")
def outlier_run():
    return smooth(with_outlier_channel(tiny_model("wan")))


def test_search_is_never_worse_than_no_smoothing(outlier_run):
    ctx, teacher = outlier_run
    smoothing = ctx.analyses["smoothing"]
    assert smoothing
    for layer, choice in smoothing.items():
        no_smoothing = sample_error(ctx, teacher, layer, torch.ones_like(choice.factors))
        assert sample_error(ctx, teacher, layer, choice.factors) <= no_smoothing
        assert choice.alpha is None or choice.alpha in ALPHA_GRID


def test_outlier_channel_is_migrated_and_beats_round_to_nearest(outlier_run):
    ctx, teacher = outlier_run
    choice = ctx.analyses["smoothing"][OUTLIER_LAYER]
    assert choice.alpha is not None and choice.alpha > 0
    rtn = sample_error(ctx, teacher, OUTLIER_LAYER, torch.ones_like(choice.factors))
    assert sample_error(ctx, teacher, OUTLIER_LAYER, choice.factors) < 0.9 * rtn


@pytest.mark.parametrize("w_bits,group_size,k", [(4, 0, 33), (4, 16, 64), (8, 0, 40), (8, 16, 64)])
def test_search_lowers_a_candidate_exactly_as_the_stored_layer_runs(w_bits, group_size, k):
    gen = torch.Generator().manual_seed(k + w_bits)
    x = torch.randn(7, k, generator=gen).to(torch.bfloat16)
    weight = torch.randn(24, k, generator=gen).to(torch.bfloat16)
    s = torch.rand(k, generator=gen) + 0.5
    scheme = LinearScheme(w_bits, 8, group_size)
    packed, scale = quant.quantize_packed(weight * s.to(weight.dtype), w_bits, group_size, 0.9)
    stored = reference.quant_linear(x, packed, scale, None, (1.0 / s).to(weight.dtype), w_bits, 8, group_size, k, 1.0)
    assert torch.equal(lowered_output(x, weight, s, scheme, 0.9), stored)


def test_the_search_reports_progress_layer_by_layer():
    reported = []

    def progress(items, description, total=None):
        for item in items:
            reported.append((description, total))
            yield item

    ctx, _ = smooth(tiny_model("wan"), progress=progress)
    layers = len(ctx.analyses["activation_stats"])
    assert reported.count(("searching smoothing strengths", layers)) == layers > 0


def test_same_seed_same_alphas_and_artifact_weights():
    def compiled():
        result = qsc.compile(tiny_model("wan"), preset="w4a8", config={"calib_samples": 2, "check_numerics": False})
        return {k: v.get("smooth_alpha") for k, v in result.layers.items()}, result.module.state_dict()

    (alphas, weights), (alphas_again, weights_again) = compiled(), compiled()
    assert alphas == alphas_again and any(a is not None for a in alphas.values())
    assert weights.keys() == weights_again.keys()
    assert all(torch.equal(weights[k], weights_again[k]) for k in weights)


def test_fixed_alpha_smooths_every_layer_with_it_and_samples_nothing():
    ctx, _ = smooth(tiny_model("wan"), smooth_alpha=0.5)
    stats, weight_stats = ctx.analyses["activation_stats"], ctx.analyses["weight_stats"]
    for layer, choice in ctx.analyses["smoothing"].items():
        expected = smoothing_factors(stats[layer].channel_absmax, weight_stats[layer].in_channel_absmax, 0.5)
        assert choice.alpha == 0.5 and torch.equal(choice.factors, expected)
    assert all(s.sample is None for s in stats.values())  # no search, no memory spent on rows


def test_float_activations_are_not_smoothed():
    ctx, _ = smooth(tiny_model("wan"), preset="w8a16", smooth_quant=True)
    assert ctx.analyses["smoothing"] == {}
    assert all(s.sample is None for s in ctx.analyses["activation_stats"].values())


def test_observer_sample_is_bounded_and_fixed_by_the_seed():
    batches = [torch.randn(2, 300, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]

    def observed(seed):
        obs = ActivationObserver("layer", seed)
        obs.enabled = True
        for x in batches:
            obs(x)
        return obs.sample

    rows = torch.cat([x.reshape(-1, 8) for x in batches])
    sample = observed(0)
    assert sample.shape == (SAMPLE_ROWS, 8)
    assert (sample[:, None] == rows[None]).all(-1).any(-1).all()  # every kept row is an input row
    assert torch.equal(sample, observed(0)) and not torch.equal(sample, observed(1))
