"""Salient calibration and block-wise scale learning: selection, the losses against brute force,
learning that lowers a block's loss, folding that equals the fake quantization it trained, and
checkpoints that resume to the same artifact."""

import json

import pytest
import torch

import qsc
from qsc import distill, quant
from qsc.backends import reference
from qsc.calibration import CalibrationSet
from qsc.fake_quant import LearnedLinear
from qsc.frontend import DenoiserAdapter, export_graph
from qsc.graph import quantizable_linears
from qsc.partition import Stream, partition_blocks
from qsc.passes import REGISTRY
from qsc.passes.learn_scales import CHECKPOINT, _fold, _student
from qsc.passes.quantize_linear import QuantizeLinear
from qsc.passes.select_calibration import salient_indices, salient_indices_per_step
from qsc.schemes import LinearScheme, SchemePlan

from tiny_models import tiny_model

# --- Salient data selection ----------------------------------------------------------------------


def _trajectories(model, planted: int | None) -> CalibrationSet:
    """Two prompts x 4 steps x both guidance branches of smoothly changing latents; sample
    ``planted`` moves its latent far at its step and carries a 4x larger text embedding (large
    activations in the cross-attention's k/v inputs)."""
    g = torch.Generator().manual_seed(0)
    samples, outputs, records = [], [], []
    for prompt in ("red circle", "blue square"):
        text = torch.randn(1, 16, 32, generator=g)
        latent = torch.randn(1, 4, 2, 8, 8, generator=g)
        for step in range(4):
            for cfg in ("cond", "uncond"):
                index = len(samples)
                scale = 4.0 if index == planted else 1.0
                samples.append({"hidden_states": latent.clone(), "timestep": torch.tensor([1000.0 - 250 * step]),
                                "encoder_hidden_states": text * scale if cfg == "cond" else text * 0})
                records.append({"prompt": prompt, "step": step, "cfg": cfg, "seed": 0, "t": 1 - step / 4})
            moved = 3.0 if planted in (index - 1, index) else 0.05
            latent = latent + moved * torch.randn(latent.shape, generator=g)
    with torch.no_grad():
        outputs = [DenoiserAdapter(model)(**s) for s in samples]
    return CalibrationSet.from_samples(samples, outputs, records)


def _select(model, calib, **overrides):
    cfg = qsc.resolve_config("w4a8", overrides={"calib_samples": 1, "calib_selection": "salient", **overrides})
    gm = export_graph(DenoiserAdapter(model), calib.sample(0))
    ctx = qsc.PassContext(cfg, calib, teacher=gm)
    REGISTRY["select_calibration"]().run(gm, ctx)
    return ctx


def test_salient_selection_ranks_the_planted_sample_first():
    model = tiny_model("wan")
    planted = 10  # second prompt, step 1, conditional: salient in both scores
    calib = _trajectories(model, planted)
    ctx = _select(model, calib)
    assert ctx.analyses["calibration_selection"] == [planted]
    assert ctx.analyses["calibration_records"]["samples"] == [{"prompt": "blue square", "step": 1, "cfg": "cond"}]
    assert ctx.calibration_indices() == [planted]
    # A candidate is the step with both guidance branches; within it the conditional call (the
    # same latent, a larger text input) is the more salient sample.
    both = _select(model, calib, calib_samples=2).analyses["calibration_records"]["samples"]
    assert both == [{"prompt": "blue square", "step": 1, "cfg": branch} for branch in ("cond", "uncond")]


def test_selection_without_trajectory_records_falls_back_to_uniform_with_one_warning():
    model = tiny_model("wan")
    calib = _trajectories(model, None)
    calib.records = [{} for _ in calib.records]
    with pytest.warns(UserWarning, match="records with prompt and step"):
        ctx = _select(model, calib, calib_samples=3)
    assert ctx.analyses["calibration_selection"] == calib.spread(3)
    assert ctx.analyses["calibration_records"]["method"] == "uniform"


def test_per_step_selection_takes_the_most_salient_candidate_of_every_step():
    groups = [[0, 1], [2, 3], [4, 5], [6, 7]]  # (prompt, step): (0, 0), (0, 1), (1, 0), (1, 1)
    steps = [0, 1, 0, 1]
    score = torch.tensor([0.1, 0.9, 0.3, 1.0])
    sample_score = torch.tensor([0.0, 0.1, 0.0, 0.1, 0.2, 0.1, 0.3, 0.4])
    assert salient_indices(score, groups, sample_score, 4) == [2, 3, 6, 7]  # the paper's ranking: step 1 only
    assert salient_indices_per_step(score, groups, sample_score, steps, 4) == [4, 5, 6, 7]  # each step's best
    assert salient_indices_per_step(score, groups, sample_score, steps, 6) == [2, 3, 4, 5, 6, 7]  # then the second
    # A candidate cut short gives its most salient sample.
    assert salient_indices_per_step(score, groups, sample_score, steps, 3) == [4, 6, 7]


def test_random_selection_is_a_seeded_draw():
    model = tiny_model("wan")
    calib = _trajectories(model, None)
    draws = [_select(model, calib, calib_selection="random", calib_samples=5, seed=s).analyses["calibration_selection"]
             for s in (0, 0, 1)]
    assert draws[0] == draws[1] != draws[2] and len(draws[0]) == 5


# --- Losses against brute force -------------------------------------------------------------------


def _qk(seed: int, length: int = 50, heads: int = 2, d: int = 8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, heads, length, d, generator=g) * 2 for _ in range(2))


def _full_attention(q, k, scale):
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 3 queries (2 heads x 50 keys): every statistic crosses chunk boundaries."""
    monkeypatch.setattr(distill, "CHUNK_ELEMENTS", 2 * 50 * 3)


def test_token_weights_equal_brute_force(small_chunks):
    q, k = _qk(0)
    scale = 8**-0.5
    column_sums = _full_attention(q, k, scale).sum(dim=(1, 2))
    torch.testing.assert_close(distill.token_saliency(q, k, scale), column_sums)
    weights = distill.token_weights(column_sums, 0.5)
    expected = 0.5 + 0.5 * (column_sums - column_sums.min()) / (column_sums.max() - column_sums.min())
    torch.testing.assert_close(weights, expected)
    assert float(weights.min()) == 0.5 and float(weights.max()) == 1.0
    out, target = torch.randn(1, 50, 4), torch.randn(1, 50, 4)
    brute = sum(expected[0, j] * (out[0, j] - target[0, j]).square().sum() for j in range(50)) / out.numel()
    torch.testing.assert_close(distill.weighted_mse(out, target, weights), brute)


def test_msad_global_equals_pooled_full_attention():
    (q, k), (q_ref, k_ref) = _qk(1), _qk(2)
    q.requires_grad_(True)
    scale, stride = 0.3, 8  # 50 tokens: 6 windows of 8 and a last one of 2

    def pooled(x):
        return torch.stack([x[:, :, i : i + stride].mean(dim=2) for i in range(0, 50, stride)], dim=2)

    brute = (_full_attention(pooled(q), pooled(k), scale) - _full_attention(pooled(q_ref), pooled(k_ref), scale)).square().mean()
    loss = distill.msad_global(q, k, q_ref, k_ref, scale, stride)
    torch.testing.assert_close(loss, brute)
    torch.testing.assert_close(torch.autograd.grad(loss, q)[0], torch.autograd.grad(brute, q)[0])


def test_msad_local_equals_full_attention_of_the_salient_queries(small_chunks):
    (q, k), (q_ref, k_ref) = _qk(3), _qk(4)
    q.requires_grad_(True)
    scale = 0.3
    saliency = _full_attention(q_ref, k_ref, scale).sum(dim=(1, 2))
    index = distill.salient_queries(saliency, 7)
    assert index[0].tolist() == saliency[0].argsort(descending=True)[:7].tolist()
    rows = index[0]
    brute = (_full_attention(q, k, scale)[:, :, rows] - _full_attention(q_ref, k_ref, scale)[:, :, rows]).square().mean()
    loss = distill.msad_local(q, k, q_ref, k_ref, scale, index)
    torch.testing.assert_close(loss, brute)
    # The chunks are recomputed in the backward pass: the gradient must be the full one.
    torch.testing.assert_close(torch.autograd.grad(loss, q)[0], torch.autograd.grad(brute, q)[0])


def test_attention_statistics_never_hold_an_L_by_L_map(monkeypatch):
    monkeypatch.setattr(distill, "CHUNK_ELEMENTS", 2**16)
    largest = []
    probabilities = distill._probabilities

    def recording(q, k, scale):
        p = probabilities(q, k, scale)
        largest.append(p.numel())
        return p

    monkeypatch.setattr(distill, "_probabilities", recording)
    q, k = _qk(5, length=1024, heads=2, d=16)
    saliency = distill.token_saliency(q, k, 0.25)
    distill.msad_local(q.requires_grad_(True), k, q.detach(), k, 0.25, distill.salient_queries(saliency, 256)).backward()
    assert max(largest) <= 2**16 < 2 * 1024 * 1024  # one chunk's scores, never the 2 x 1024 x 1024 map


# --- Learning, folding -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wan_calibration():
    model = tiny_model("wan")
    return model, _trajectories(model, None)


def test_learning_lowers_every_blocks_loss(wan_calibration):
    model, calib = wan_calibration
    result = qsc.compile(model, calib, preset="w4a4",
                         config={"learn_scales": True, "scale_epochs": 3, "calib_samples": 4, "recon_loss": "token",
                                 "msad_global": 1.0, "msad_local": 1.0, "msad_topk": 16})
    (row,) = [r for r in result.pass_log if r["pass"] == "learn_scales"]
    assert set(row["blocks"]) == {"blocks.0", "blocks.1"}
    for block in row["blocks"].values():
        assert block["kept"] and block["loss_after"] < block["loss_before"], row


def test_the_w4a6_s2q_preset_learns_the_smoothing_of_rotated_layers(wan_calibration):
    """Rotation first (its nodes belong to the layers' blocks), then the salient samples, the learned
    smoothing and GPTQ: every block's loss drops and every quantized layer reads a rotated input."""
    model, calib = wan_calibration
    result = qsc.compile(model, calib, preset="w4a6-s2q", config={"scale_epochs": 3, "calib_samples": 4})
    passes = [r["pass"] for r in result.pass_log]
    assert passes[0] == "rotate_inputs" and {"learn_scales", "compensate_weights"} <= set(passes)
    (row,) = [r for r in result.pass_log if r["pass"] == "learn_scales"]
    assert set(row["blocks"]) == {"blocks.0", "blocks.1"}
    for block in row["blocks"].values():
        assert block["kept"] and block["loss_after"] < block["loss_before"], row
    in_blocks = {name: info for name, info in result.layers.items() if name.startswith("blocks.")}
    assert in_blocks and all("rotation_block" in info and info["smoothed"] for info in in_blocks.values())


def test_without_smooth_quant_the_blocks_learn_clipping_from_round_to_nearest(wan_calibration):
    model, calib = wan_calibration
    result = qsc.compile(model, calib, preset="w4a4",
                         config={"smooth_quant": False, "learn_scales": True, "scale_epochs": 2, "calib_samples": 4})
    assert "smooth_quant" not in [r["pass"] for r in result.pass_log]
    (row,) = [r for r in result.pass_log if r["pass"] == "learn_scales"]
    assert all(block["kept"] for block in row["blocks"].values()), row
    # No smoothing to learn on: no op holds an in_scale (smooth_quant's smooth_inv).
    assert not any(name.endswith("smooth_inv") for name in result.program.state_dict)


def _smoothed_graph(model, calib):
    cfg = qsc.resolve_config("w4a6", overrides={"calib_samples": 4})
    gm = export_graph(DenoiserAdapter(model), calib.sample(0))
    ctx = qsc.PassContext(cfg, calib, teacher=gm)
    passes = [REGISTRY[n]() for n in ("insert_observers", "calibrate", "smooth_quant")]
    return qsc.PassManager(passes).run(gm, ctx), ctx


def test_folded_program_equals_the_fake_quantized_block(wan_calibration):
    model, calib = wan_calibration
    gm, ctx = _smoothed_graph(model, calib)
    plan = SchemePlan(ctx.config)
    sample = calib.sample(3)
    glue, block = partition_blocks(gm, ctx.config.include)[:2]
    stream = Stream(gm, sample)
    with torch.no_grad():
        stream.values.update(zip(glue.outputs, glue.module(gm)(*stream.inputs(glue))))
    sites = {s.layer: s for s in quantizable_linears(gm, ctx.config.include, ctx.config.exclude) if s.node in set(block.nodes)}
    schemes = {layer: plan.scheme(layer, gm.get_parameter(s.weight_target).shape[1]) for layer, s in sites.items()}
    student, learned = _student(gm, block, schemes, [])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # somewhere training could have taken them
        for module in learned.values():
            module.log_smooth.copy_(0.3 * torch.randn(module.log_smooth.shape, generator=g))
            module.w_clip.uniform_(0.6, 1.0, generator=g)
            module.a_clip.fill_(0.8)
        fake = student(*stream.inputs(block))
        for layer, module in learned.items():
            folded = module.folded()
            _fold(gm, sites[layer], folded)
            ctx.analyses.setdefault("weight_clip", {})[layer] = folded.w_clip
            ctx.analyses.setdefault("activation_clip", {})[layer] = folded.a_clip
    gm = QuantizeLinear().run(gm, ctx).graph_module
    lowered = partition_blocks(gm, ctx.config.include)[1]
    learnable = ("log_smooth", "w_clip", "a_clip")
    assert not any(name.endswith(learnable) for name, _ in [*gm.named_parameters(), *gm.named_buffers()])
    assert len(lowered.inputs) == len(block.inputs)  # the same values (the embedders are lowered too)
    with torch.no_grad():
        program = lowered.module(gm)(*stream.inputs(block))
    for a, b in zip(program, fake, strict=True):
        assert torch.equal(a, b)


def test_learned_linear_equals_the_reference_op_on_fresh_data():
    g = torch.Generator().manual_seed(1)
    for w_bits, a_bits, group in ((4, 6, 0), (4, 8, 16), (8, 4, 0)):
        weight, x = torch.randn(24, 32, generator=g), torch.randn(2, 10, 32, generator=g) * 3
        scheme = LinearScheme(w_bits, a_bits, group)
        layer = LearnedLinear(weight, torch.randn(24, generator=g), torch.rand(32, generator=g) + 0.5, scheme)
        with torch.no_grad():
            layer.log_smooth.normal_(0, 0.2, generator=g)
            layer.w_clip.uniform_(0.5, 1.0, generator=g)
            layer.a_clip.fill_(0.9)
        f = layer.folded()
        packed, scale = quant.quantize_packed(f.weight, w_bits, group, f.w_clip)
        expected = reference.quant_linear(x, packed, scale, layer.bias, f.in_scale, w_bits, a_bits, group, 32, f.a_clip)
        assert torch.equal(layer(x).detach(), expected)


# --- Checkpoints and resume ------------------------------------------------------------------------


class _Interrupt:
    """A progress callable that raises KeyboardInterrupt after ``after`` steps of ``block``,
    reading the checkpoint file as it was when that block started."""

    def __init__(self, block: str, after: int, checkpoint):
        self.block, self.after, self.checkpoint, self.seen = block, after, checkpoint, None

    def __call__(self, items, description, total=None, status=None):
        for i, item in enumerate(items):
            if description == f"learning {self.block}":
                if i == 0:
                    self.seen = self.checkpoint.read_bytes()
                if i == self.after:
                    raise KeyboardInterrupt
            yield item


def _artifact_bytes(path):
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())}


def test_interrupted_compile_resumes_to_the_same_artifact(wan_calibration, tmp_path):
    model, calib = wan_calibration
    config = {"learn_scales": True, "scale_epochs": 1, "calib_samples": 4}
    whole = qsc.compile(model, calib, preset="w4a8", config=config)
    whole.save(tmp_path / "whole.qsc")

    checkpoints = tmp_path / "ckpt"
    interrupt = _Interrupt("blocks.1", after=3, checkpoint=checkpoints / CHECKPOINT)
    with pytest.raises(KeyboardInterrupt):
        qsc.compile(model, calib, preset="w4a8", config=config, checkpoint_dir=checkpoints, progress=interrupt)
    # The checkpoint written after blocks.0 is what the interruption inside blocks.1 left.
    assert (checkpoints / CHECKPOINT).read_bytes() == interrupt.seen
    from safetensors import safe_open

    with safe_open(str(checkpoints / CHECKPOINT), framework="pt") as f:
        assert json.loads(f.metadata()["blocks"]) == ["blocks.0"]

    resumed = qsc.compile(model, calib, preset="w4a8", config=config, checkpoint_dir=checkpoints, resume=True)
    (row,) = [r for r in resumed.pass_log if r["pass"] == "learn_scales"]
    assert row["blocks"]["blocks.0"] == "resumed" and row["blocks"]["blocks.1"]["kept"] in (True, False)
    resumed.save(tmp_path / "resumed.qsc")
    assert _artifact_bytes(tmp_path / "resumed.qsc") == _artifact_bytes(tmp_path / "whole.qsc")


def test_resume_refuses_another_compiles_checkpoint(wan_calibration, tmp_path):
    model, calib = wan_calibration
    config = {"learn_scales": True, "scale_epochs": 1, "calib_samples": 2}
    with torch.no_grad():  # where a user's script compiles: the pass still trains
        qsc.compile(model, calib, preset="w4a8", config=config, checkpoint_dir=tmp_path)
    with pytest.raises(qsc.errors.InputError, match="checkpoint of another compile"):
        qsc.compile(model, calib, preset="w4a6", config=config, checkpoint_dir=tmp_path, resume=True)
