"""Attention sparsification and SSAR: layouts from measured attention, the step/refresh programs,
the runtime that threads the residual caches, and the artifact that carries both programs."""

import warnings

import pytest
import torch

import qsc
from qsc.calibration import CalibrationSet
from qsc.errors import ConfigError, InputError
from qsc.evaluate import evaluate
from qsc.frontend import DenoiserAdapter
from qsc.graph import state_inputs
from qsc.lowrank import change_factors
from qsc.passes.sparsify_attention import HeadOrders, TileMass, position_major
from qsc.runtime import SSARRuntime, SSARSchedule

from tiny_models import VideoAttention, temporal_and_spatial_video, tiny_model

aten, qsc_ops = torch.ops.aten, torch.ops.qsc


def _ops(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == target]


# --- Layouts from measured attention -------------------------------------------------------------

def _tokens(frames: int, positions: int, d: int, by: str) -> torch.Tensor:
    """Frame-major tokens whose keys match the queries of the same position (``by="position"``:
    temporal heads) or of the same frame and nearby position (``"frame"``: spatial heads)."""
    g = torch.Generator().manual_seed(0)
    if by == "position":
        per_position = torch.randn(positions, d, generator=g)
        x = per_position.repeat(frames, 1)
    else:
        x = torch.randn(frames * positions, d, generator=g)
    return (x * 4)[None, None]  # [1, 1, L, d], sharp softmax


def test_spatial_head_keeps_the_diagonal_tiles():
    q = k = _tokens(4, 256, 32, by="frame")  # attention of every token is on itself
    mass = TileMass()
    mass.add(q, k, None)
    layout = mass.layout(0.125)[0]  # 8 x 16 tiles: 16 kept, 2 per query tile of 128 here
    assert layout.shape == (8, 16)
    assert (layout.sum(-1) == 2).all()
    for i in range(8):
        assert layout[i, 2 * i] and layout[i, 2 * i + 1], layout[i]


def test_temporal_head_keeps_the_same_position_in_every_frame():
    q = k = _tokens(4, 256, 32, by="position")  # a token attends its position in all 4 frames
    mass = TileMass()
    mass.add(q, k, None)
    layout = mass.layout(0.5)[0]  # keep 8 of 16 key tiles
    for i in range(8):
        position_tiles = {(2 * i) % 4 + 4 * f for f in range(4)} | {(2 * i + 1) % 4 + 4 * f for f in range(4)}
        assert set(torch.nonzero(layout[i]).flatten().tolist()) == position_tiles


def test_a_head_spends_its_budget_where_attention_is_spread():
    q = k = _tokens(4, 256, 32, by="frame")
    q = q.clone()
    q[..., :128, :] = 0  # the first query tile attends uniformly: 1/16 of its mass in each key tile
    mass = TileMass()
    mass.add(q, k, None)
    layout = mass.layout(0.15)[0]  # round(0.15 * 8 * 16) = 19 tiles
    assert layout.sum() == 19
    # Each peaked query tile keeps its two diagonal tiles (half its mass each); the 19 - 14 left go
    # to the spread one, whose every tile outweighs the peaked tiles' off-diagonal ones.
    assert layout.sum(-1).tolist() == [5, 2, 2, 2, 2, 2, 2, 2]
    for i in range(1, 8):
        assert layout[i, 2 * i] and layout[i, 2 * i + 1], layout[i]


def test_kept_mass_is_the_share_of_attention_the_layout_holds():
    q, k = _tokens(4, 256, 32, by="frame"), _tokens(4, 256, 32, by="frame")
    q = q.clone()
    q[..., :128, :] = 0  # uniform attention in query tile 0; the others attend themselves
    mass = TileMass()
    mass.add(q, k, None)
    layout = mass.layout(0.15)  # query tile 0 keeps 5 of its 16 key tiles, the others their 2 diagonal ones
    probabilities = torch.softmax(q[0, 0] @ k[0, 0].T * 32**-0.5, dim=-1)
    keep = layout[0].repeat_interleave(128, 0).repeat_interleave(64, 1)
    # Every query row here; the pass measures 32 of each tile's 128.
    assert mass.kept(layout) == pytest.approx(float((probabilities * keep).sum() / 1024), abs=0.01)
    assert mass.kept(torch.ones_like(layout)) == pytest.approx(1.0)


def test_layout_handles_a_ragged_last_tile_and_keeps_at_least_one_tile():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 3, 200, 16, generator=g), torch.randn(2, 3, 200, 16, generator=g)
    mass = TileMass()
    mass.add(q, k, 0.3)
    mass.add(k, q, 0.3)
    layout = mass.layout(0.01)
    assert layout.shape == (3, 2, 4) and layout.dtype == torch.bool
    assert (layout.sum(-1) == 1).all()  # round(0.08) = 0 tiles would leave rows empty: one is kept
    # Each row keeps its heaviest tile.
    assert torch.equal(layout.float().argmax(-1), mass.mean.argmax(-1).cpu())


def test_a_temporal_head_moves_to_position_major_order_and_a_spatial_head_stays():
    """A head that attends its position in all 4 frames needs 8 of 16 key tiles per query tile in
    frame-major order and its own 2 in position-major order; a head attending itself keeps its
    diagonal in both and stays as traced."""
    temporal, spatial = _tokens(4, 256, 32, by="position"), _tokens(4, 256, 32, by="frame")
    q = k = torch.cat([temporal, spatial], dim=1)  # [1, 2 heads, 1024, 32]
    orders = HeadOrders(1024, [4])
    orders.add(q, k, None)
    frames, layout, kept = orders.choose(0.125)  # 2 key tiles per query tile
    assert frames.tolist() == [4, 1]
    assert kept[0] > 0.99 and kept[1] > 0.99
    assert orders.masses[1].kept(orders.masses[1].layout(0.125))[0] < 0.3  # frame-major: 2 of its 8 tiles
    for i in range(8):  # both heads on the diagonal of their own order
        assert set(torch.nonzero(layout[0, i]).flatten().tolist()) == {2 * i, 2 * i + 1}
    assert torch.equal(q[0, 0, position_major(1024, 4)][::4], temporal[0, 0, :256])  # position p's 4 frames adjacent


# --- The pass on a model ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wan():
    """The tiny Wan at 2 frames of 8 x 16 patches: 256 tokens, 2 query tiles x 4 key tiles."""
    model = tiny_model("wan")
    g = torch.Generator().manual_seed(0)
    samples = [{
        "hidden_states": torch.randn(1, 4, 2, 16, 32, generator=g),
        "timestep": torch.tensor([t]),
        "encoder_hidden_states": torch.randn(1, 16, 32, generator=g),
    } for t in (900, 500)]
    with torch.no_grad():
        outputs = [DenoiserAdapter(model)(**s) for s in samples]
    return model, CalibrationSet.from_samples(samples, outputs=outputs)


def _compile(wan, preset="w8a8", **config):
    model, calib = wan
    return qsc.compile(model, calib, preset=preset, config={"calib_samples": 2, **config})


def test_self_attention_becomes_block_sparse_and_cross_attention_stays(wan):
    result = _compile(wan, density=0.5)
    gm = result.program.graph_module
    sparse = _ops(gm, qsc_ops.sparse_attention.default)
    assert len(sparse) == 2 and len(_ops(gm, aten.scaled_dot_product_attention.default)) == 2  # attn2
    assert set(result.attention) == {"blocks.0.attn1", "blocks.1.attn1"}
    for info in result.attention.values():
        assert info["tiles"] == [2, 2, 4] and info["density"] == 0.5 and 0.5 <= info["kept_mass"] <= 1
    layout = result.program.state_dict["model.blocks.0.attn1.attn_layout"]
    assert layout.dtype == torch.bool and (layout.sum((-2, -1)) == 4).all() and (layout.sum(-1) >= 1).all()
    assert result.metrics["rel_l2"] > _compile(wan).metrics["rel_l2"]  # dropping tiles costs accuracy


def test_keeping_every_tile_is_the_dense_program(wan):
    """At a density that keeps all tiles the rewrite changes nothing but the op that computes it.
    Activations stay float: their per-token codes would turn the float32 rounding differences of a
    tiled softmax against SDPA's into whole quantization steps."""
    dense, full = _compile(wan, "w8a16"), _compile(wan, "w8a16", density=0.99)
    assert _ops(full.program.graph_module, qsc_ops.sparse_attention.default)
    sample = wan[1].sample(0)
    with torch.no_grad():
        torch.testing.assert_close(full.module(**sample), dense.module(**sample), rtol=1e-4, atol=1e-5)


def test_dense_attention_setting_keeps_a_layer_dense(wan):
    result = _compile(wan, density=0.5, dense_attention=[r"^blocks\.0\."])
    assert set(result.attention) == {"blocks.1.attn1"}


def _rounding_warnings(wan, density):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _compile(wan, density=density)
    return result, [str(w.message) for w in caught if "asked" in str(w.message)]


def test_a_density_whole_tiles_miss_warns_once_per_compile_with_the_achieved_figure(wan):
    result, messages = _rounding_warnings(wan, 0.15)  # of 2 x 4 tiles: 1 per query tile, a quarter
    assert messages == ["density 0.15 asked, 0.25 achieved on 2 x 4 tiles (each query tile keeps at least one 64-key tile)"]
    assert [info["density"] for info in result.attention.values()] == [0.25, 0.25]  # two layers, one warning
    assert _rounding_warnings(wan, 0.25)[1] == []


class _ThreeAttentions(torch.nn.Module):
    """Causal, masked and plain self-attention over 256 tokens: only the plain one is sparsified."""

    def forward(self, x):
        q = x.unflatten(-1, (2, 16)).transpose(1, 2)
        mask = torch.ones(256, 256, dtype=torch.bool).tril()
        sdpa = torch.nn.functional.scaled_dot_product_attention
        out = sdpa(q, q, q, is_causal=True) + sdpa(q, q, q, attn_mask=mask) + sdpa(q, q, q)
        return out.transpose(1, 2).flatten(-2)


def test_only_unmasked_non_causal_self_attention_is_sparsified():
    samples = [{"x": torch.randn(1, 256, 32)}]
    result = qsc.compile(_ThreeAttentions(), CalibrationSet.from_samples(samples), preset="w8a8",
                         config={"density": 0.5, "calib_samples": 1})
    gm = result.program.graph_module
    assert len(_ops(gm, qsc_ops.sparse_attention.default)) == 1
    assert len(_ops(gm, aten.scaled_dot_product_attention.default)) == 2
    assert [info["density"] for info in result.attention.values()] == [0.5]


def _video_attention(**config):
    samples = [{"video": temporal_and_spatial_video(seed=s)} for s in (0, 1)]
    return qsc.compile(VideoAttention(), CalibrationSet.from_samples(samples), preset="w8a16",
                       config={"density": 0.5, "calib_samples": 2, **config})


def test_the_program_runs_a_temporal_head_in_position_major_order():
    """4 frames of 8 x 8 tokens: 2 x 4 tiles, 2 kept per query tile. Reordered, the temporal head
    keeps all its attention and the program is dense attention to rounding; as traced it drops the
    keys of 2 of the 4 frames."""
    result = _video_attention(reorder_tokens=True)
    (info,) = result.attention.values()
    assert info["frames"] == [4, 1] and info["kept_mass"] > 0.99
    gm = result.program.graph_module
    assert len(_ops(gm, aten.where.self)) == 4  # q, k and v into the order, the output back: head 0 only
    video = temporal_and_spatial_video(seed=2)
    dense = VideoAttention()(video)
    traced = _video_attention(reorder_tokens=False)
    assert [info["frames"] for info in traced.attention.values()] == [[1, 1]]
    with torch.no_grad():
        error = (result.module(video=video) - dense).abs().max()
        assert (traced.module(video=video) - dense).abs().max() > max(100 * error, 1e-2)


# --- SSAR: programs and runtime --------------------------------------------------------------------

def test_a_step_with_the_residual_of_its_own_input_is_the_dense_output(wan):
    """Refresh: O_dense, and D = O_dense - O_sparse per layer. A sparse step on the same input with
    the first-order cache D must give O_dense back: sparse attention + D is dense attention."""
    result = _compile(wan, density=0.25, ssar_tau=5, ssar_rank=0)  # 0: low-rank term of full width
    runtime = result.module
    assert isinstance(runtime, SSARRuntime)
    sample = wan[1].sample(0)
    zeros = state_inputs(runtime.step_program, sample)
    with torch.no_grad():
        dense_out, residuals = runtime.refresh_program(**sample)
        assert set(residuals) == {"ssar_blocks_0_attn1", "ssar_blocks_1_attn1"}
        assert all(r.abs().max() > 0 for r in residuals.values())
        corrected = runtime.step_program(**sample, **{**zeros, **residuals})
        uncorrected = runtime.step_program(**sample, **zeros)
        # The same correction given as the low-rank term instead: D = D @ I.
        as_factors = {}
        for name, d in residuals.items():
            (u, v), = change_factors([d], [torch.zeros_like(d)], 0)
            as_factors.update({f"{name}_u": u, f"{name}_v": v})
        corrected_by_factors = runtime.step_program(**sample, **{**zeros, **as_factors})
    torch.testing.assert_close(corrected, dense_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(corrected_by_factors, dense_out, rtol=1e-4, atol=1e-5)
    assert (uncorrected - dense_out).abs().max() > 100 * (corrected - dense_out).abs().max()
    # The step program takes the caches as inputs (residual and its two factors per layer); the
    # refresh program returns the residuals.
    assert sorted(zeros) == sorted(f"{name}{suffix}" for name in residuals for suffix in ("", "_u", "_v"))
    assert zeros["ssar_blocks_0_attn1_u"].shape[-1] == zeros["ssar_blocks_0_attn1_v"].shape[-2] == 32
    assert len(result.refresh_program.graph_signature.user_outputs) == 3
    # Each layer's refresh is one op (dense attention and its residual in one pass).
    targets = [n.target for n in result.refresh_program.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.qsc.refresh_attention.default) == 2
    assert torch.ops.qsc.sparse_attention.default not in targets


class _Recorder(torch.nn.Module):
    """Stand-in programs that log which one ran, with the caches they were given."""

    def __init__(self, log, kind):
        super().__init__()
        self.log, self.kind = log, kind

    def forward(self, **inputs):
        t = float(inputs["timestep"])
        if self.kind == "refresh":
            self.log.append(("refresh", t))
            return torch.tensor(t), {"ssar_a": torch.full((1, 1, 4, 2), t)}
        correction = inputs["ssar_a"] + inputs["ssar_a_u"] @ inputs["ssar_a_v"]
        self.log.append(("step", t, float(correction[0, 0, 0, 0])))
        return torch.tensor(t)


def _runtime(tau=3, dense_steps=0, extrapolation="hold"):
    log = []
    schedule = SSARSchedule(tau, 0, dense_steps, extrapolation)
    return SSARRuntime(_Recorder(log, "step"), _Recorder(log, "refresh"), schedule), log


def test_runtime_refreshes_every_tau_steps_with_first_then_second_order_caches():
    runtime, log = _runtime(tau=3)
    for t in (900, 800, 700, 600, 500, 400, 300):
        runtime(timestep=torch.tensor([t]))
    assert log == [
        ("refresh", 900), ("step", 800, 900), ("step", 700, 900),  # first refresh: first order, D
        ("refresh", 600), ("step", 500, 300), ("step", 400, 300),  # D + (D - D_prev) = 600 - 300
        ("refresh", 300),
    ]


def test_linear_extrapolation_follows_the_trend_of_the_residual_step_by_step():
    runtime, log = _runtime(tau=3, extrapolation="linear")
    for t in (900, 800, 700, 600, 500, 400, 300):
        runtime(timestep=torch.tensor([t]))
    # D fell by 300 over the 3 steps between refreshes: 100 per step, continued after the refresh.
    assert log[4:6] == [("step", 500, 500), ("step", 400, 400)]


def test_guidance_branches_keep_caches_of_their_own_and_a_new_video_resets():
    runtime, log = _runtime(tau=2)
    for t in (900, 900, 800, 800):  # conditional and unconditional call per step
        runtime(timestep=torch.tensor([t]))
    assert log == [("refresh", 900), ("refresh", 900), ("step", 800, 900), ("step", 800, 900)]
    assert runtime.step_index == 1
    runtime(timestep=torch.tensor([1000]))  # noise level up: the next video
    assert runtime.step_index == 0 and log[-1] == ("refresh", 1000)


def test_dense_steps_all_refresh():
    runtime, log = _runtime(tau=3, dense_steps=2)
    for t in (900, 800, 700, 600, 500):
        runtime(timestep=torch.tensor([t]))
    assert [entry[0] for entry in log] == ["refresh", "refresh", "refresh", "step", "step"]


def _truncated(x: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    (u, v), = change_factors([x], [torch.zeros_like(x)], rank)
    return u, v


def test_low_rank_factors_are_the_truncated_svd_of_each_head():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 40, 8, generator=g)
    for rank in (0, 8):  # not truncated: the matrix itself, times the identity
        u, v = _truncated(x, rank)
        assert torch.equal(u, x) and torch.equal(v, torch.eye(8).expand(2, 3, 8, 8))
    # A decaying spectrum (as residual changes have): the best rank-8 approximation, exactly.
    basis = torch.linalg.qr(torch.randn(64, 64, generator=g))[0]
    x = torch.randn(2, 3, 300, 64, generator=g) @ torch.diag(torch.logspace(0, -3, 64)) @ basis
    u, v = _truncated(x, 8)
    assert u.shape == (2, 3, 300, 8) and v.shape == (2, 3, 8, 64)
    torch.testing.assert_close(v @ v.mT, torch.eye(8).expand(2, 3, 8, 8), rtol=0, atol=1e-5)
    left, s, right = torch.linalg.svd(x, full_matrices=False)
    best = (left[..., :8] * s[..., None, :8]) @ right[..., :8, :]
    torch.testing.assert_close(u @ v, best, rtol=0, atol=1e-4 * float(s[..., 0].max()))
    # A flat spectrum (noise) is the hardest case for the iteration: still within 1% of optimal.
    x = torch.randn(2, 3, 300, 64, generator=g)
    u, v = _truncated(x, 8)
    optimal = torch.linalg.svdvals(x)[..., 8:].square().sum(-1).sqrt()
    assert (torch.linalg.matrix_norm(x - u @ v) < 1.01 * optimal).all()
    # No change at all: zero factors, not NaN.
    u, v = _truncated(torch.zeros(1, 2, 100, 64), 8)
    assert not u.any() and not v.any()


def test_the_layers_of_a_refresh_are_factored_together_as_each_alone():
    g = torch.Generator().manual_seed(1)
    new, old = ([torch.randn(1, 2, 200, 64, generator=g) for _ in range(3)] for _ in range(2))
    together = change_factors(new, old, 8)
    for a, b, (u, v) in zip(new, old, together, strict=True):
        (u_alone, v_alone), = change_factors([a], [b], 8)
        torch.testing.assert_close(u @ v, u_alone @ v_alone, rtol=0, atol=1e-4)


# --- Presets, artifact, determinism ----------------------------------------------------------------

@pytest.fixture(scope="module")
def ssar(wan, tmp_path_factory):
    """A W8A8 compile at a quarter of the tiles, refreshed every second step, and its artifact."""
    result = _compile(wan, density=0.25, ssar_tau=2)
    return result, result.save(tmp_path_factory.mktemp("ssar") / "s.qsc")


def test_sparse_preset_artifact_round_trip_over_a_trajectory(wan, ssar):
    result, path = ssar
    loaded = qsc.load(path)
    assert sorted(p.name for p in path.iterdir()) == [
        "manifest.json", "program.pt2", "refresh.pt2", "weights.safetensors"]
    assert loaded.manifest["attention"] == result.attention
    base = wan[1].sample(1)
    with torch.no_grad():
        for t in (900, 900, 700, 700, 500, 500, 300, 300):
            x = dict(base, timestep=torch.tensor([t]))
            assert torch.equal(loaded(**x), result.module(**x))
    loaded.reset()
    assert loaded.program.step_index == -1


def test_a_sparse_artifact_fixes_the_token_count_and_its_caches_follow_the_other_sizes(wan, ssar):
    """The layouts are measured for 256 tokens: the latent's size is fixed and another is refused in
    one line; batch and text stay open, and SSAR's caches start over when they change mid-trajectory."""
    loaded = qsc.load(ssar[1])
    assert loaded.manifest["inputs"]["hidden_states"]["shape"] == ["batch", 4, 2, 16, 32]
    assert loaded.manifest["inputs"]["encoder_hidden_states"]["shape"] == ["batch", "text", 32]
    base = wan[1].sample(0)
    with pytest.raises(InputError, match=r"^input 'hidden_states': the artifact takes shape \[batch, 4, 2, 16, 32\], "
                                         r"got \[1, 4, 2, 32, 32\]; .*sparse attention layouts.*qsc record") as e:
        loaded(**{**base, "hidden_states": torch.randn(1, 4, 2, 32, 32)})
    assert "\n" not in str(e.value)
    pair = {n: torch.cat([t, t]) for n, t in base.items()}
    short_text = {**base, "encoder_hidden_states": base["encoder_hidden_states"][:, :8]}
    with torch.no_grad():
        for t, inputs in ((900, base), (800, base), (700, pair), (600, short_text), (500, short_text)):
            out = loaded(**{**inputs, "timestep": torch.full((len(inputs["hidden_states"]),), t)})
            assert out.shape == inputs["hidden_states"].shape and torch.isfinite(out).all()
            # a changed shape refreshes at once, however the schedule goes (step 3 of tau 2 is sparse)
            assert loaded.program._branches[0].refreshed_at == {900: 0, 800: 0, 700: 2, 600: 3, 500: 4}[t]


def test_same_seed_same_sparse_artifact(wan, tmp_path):
    a = _compile(wan, density=0.25, ssar_tau=2, check_numerics=False).save(tmp_path / "a.qsc")
    b = _compile(wan, density=0.25, ssar_tau=2, check_numerics=False).save(tmp_path / "b.qsc")
    for name in ("program.pt2", "refresh.pt2", "weights.safetensors", "manifest.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_w4a8_sparse_preset():
    cfg = qsc.resolve_config("w4a8-sparse")
    assert (cfg.w_bits, cfg.a_bits, cfg.density, cfg.ssar_tau, cfg.ssar_rank, cfg.ssar_extrapolation) == (
        4, 8, 0.15, 3, 16, "linear")
    from qsc.passes import default_pass_names

    assert default_pass_names(cfg)[-2:] == ["sparsify_attention", "second_order_reparam"]
    with pytest.raises(ConfigError):
        qsc.resolve_config("w4a8", overrides={"ssar_tau": 5})


def test_uncorrected_is_the_sparse_step_with_zero_caches_outside_the_schedule(wan, ssar):
    """What ``qsc eval`` measures of an SSAR artifact: one sparse step, no correction, no state change."""
    runtime = qsc.load(ssar[1]).program
    sample = wan[1].sample(0)
    with torch.no_grad():
        uncorrected = runtime.uncorrected(**sample)
        assert torch.equal(uncorrected, runtime.step_program(**sample, **state_inputs(runtime.step_program, sample)))
    assert runtime.step_index == -1 and runtime.residuals() == {}


def test_ssar_follows_the_dense_program_along_a_trajectory_better_than_sparse_alone(wan):
    """Euler steps of the tiny model: at every sparse step, the corrected output is closer to the
    dense program's than the uncorrected sparse output is (the correction was measured at an
    earlier step, on other inputs)."""
    dense, ssar = _compile(wan), _compile(wan, density=0.25, ssar_tau=3)
    x = wan[1].sample(0)["hidden_states"].clone()
    text = wan[1].sample(0)["encoder_hidden_states"]
    errors = []
    with torch.no_grad():
        for t in range(900, 300, -100):
            inputs = {"hidden_states": x, "timestep": torch.tensor([t]), "encoder_hidden_states": text}
            reference = dense.module(**inputs)
            corrected = ssar.module(**inputs)
            if not ssar.module.schedule.refreshes(ssar.module.step_index):
                assert ssar.module.caches()["ssar_blocks_0_attn1_u"].shape[-1] == 16  # head dim 32, rank 16
                uncorrected = ssar.module.uncorrected(**inputs)
                errors.append((qsc.metrics.relative_l2(corrected, reference), qsc.metrics.relative_l2(uncorrected, reference)))
            x = x - 0.1 * reference
    assert len(errors) == 4 and all(c < u for c, u in errors), errors


def test_eval_runs_an_ssar_artifact_along_the_held_out_trajectory(wan, tmp_path):
    """``qsc eval --data`` on a recorded trajectory: refresh steps are dense (quantization error
    only) and the sparse steps between are corrected, closer to the FP model than uncorrected."""
    model, _ = wan
    model.save_pretrained(tmp_path / "wan")
    artifact = _compile(wan, density=0.25, ssar_tau=3).save(tmp_path / "s.qsc")
    fp = DenoiserAdapter(model)
    x = wan[1].sample(0)["hidden_states"].clone()
    text = wan[1].sample(0)["encoder_hidden_states"]
    steps = []
    with torch.no_grad():
        for t in range(900, 300, -100):  # Euler steps of the FP model: its trajectory
            steps.append({"hidden_states": x, "timestep": torch.tensor([t]), "encoder_hidden_states": text})
            x = x - 0.1 * fp(**steps[-1])
    CalibrationSet.from_samples(steps).save(tmp_path / "trajectory.pt")

    rows = evaluate(artifact, model=tmp_path / "wan", data=tmp_path / "trajectory.pt", samples=len(steps))
    runtime = qsc.load(artifact).program
    with torch.no_grad():
        uncorrected = [qsc.metrics.relative_l2(runtime.uncorrected(**s), fp(**s)) for s in steps]
    assert [r["sample"] for r in rows] == list(range(6))
    refreshes, corrected = [rows[i]["rel_l2"] for i in (0, 3)], [rows[i]["rel_l2"] for i in (1, 2, 4, 5)]
    assert max(refreshes) < min(corrected)
    assert all(rows[i]["rel_l2"] < uncorrected[i] for i in (1, 2, 4, 5)), (rows, uncorrected)
