"""The reference model and its quality harness: data, sampler, calibration, metrics, judge, CLI."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from qsc.calibration import CalibrationSet
from qsc.errors import InputError
from qsc.metrics import frechet_distance, psnr, ssim
from qsc.recording import PipelineRecorder
from qsc.refmodel import as_denoiser, load_reference_model, reference_calibration
from qsc.refmodel.data import FRAMES, SIZE, random_batch, render
from qsc.refmodel.prompts import (
    ALL_PROMPTS,
    CALIBRATION_PROMPTS,
    EVAL_PROMPTS,
    TEXT_DIM,
    TEXT_TOKENS,
    Prompt,
    embed,
)
from qsc.refmodel.recording import record_sampler
from qsc.refmodel.sampler import sample

RED_CIRCLE_LEFT = Prompt("circle", "red", "left")


@pytest.fixture(scope="module")
def model():
    return load_reference_model()


# --- prompts and procedural data ---------------------------------------------------------------

def test_prompt_text_round_trips_and_rejects_unknown_words():
    for p in ALL_PROMPTS:
        assert Prompt.parse(p.text) == p
    with pytest.raises(ValueError, match="exactly one shape"):
        Prompt.parse("a purple circle moving left")


def test_evaluation_and_calibration_prompts_are_disjoint_and_cover_the_vocabulary():
    assert not set(EVAL_PROMPTS) & set(CALIBRATION_PROMPTS)
    assert set(EVAL_PROMPTS) | set(CALIBRATION_PROMPTS) == set(ALL_PROMPTS)
    for attribute in ("shape", "color", "motion"):
        assert {getattr(p, attribute) for p in EVAL_PROMPTS} == {getattr(p, attribute) for p in ALL_PROMPTS}


def test_text_embedding_is_a_fixed_table_and_the_empty_prompt_is_zero():
    e = embed(RED_CIRCLE_LEFT)
    assert e.shape == (1, TEXT_TOKENS, TEXT_DIM)
    assert torch.equal(e, embed(Prompt.parse("a red circle moving left")))
    assert not torch.equal(e, embed(Prompt("circle", "blue", "left")))
    assert torch.count_nonzero(embed(None)) == 0


def test_generator_is_deterministic_and_seed_dependent():
    clip = render(RED_CIRCLE_LEFT, seed=7)
    assert clip.shape == (3, FRAMES, SIZE, SIZE)
    assert 0 <= clip.min() and clip.max() <= 1
    assert torch.equal(clip, render(RED_CIRCLE_LEFT, seed=7))
    assert not torch.equal(clip, render(RED_CIRCLE_LEFT, seed=8))
    prompts_a, clips_a = random_batch(4, seed=3)
    prompts_b, clips_b = random_batch(4, seed=3)
    assert prompts_a == prompts_b and torch.equal(clips_a, clips_b)


@pytest.mark.parametrize("motion, axis, sign", [("left", -1, -1), ("right", -1, 1), ("up", -2, -1), ("down", -2, 1)])
def test_the_shape_moves_the_way_the_prompt_says(motion, axis, sign):
    clip = render(Prompt("square", "red", motion), seed=11)
    redness = (clip[0] - clip[1]).clamp_min(0)  # [F, H, W]: the red shape, not the grey background
    coords = torch.arange(SIZE, dtype=torch.float32)
    profile = redness.sum(dim=-2 if axis == -1 else -1)  # [F, SIZE] along the moving axis
    centre = (profile * coords).sum(-1) / profile.sum(-1)
    assert sign * (centre[-1] - centre[0]) > 8


# --- metrics ---------------------------------------------------------------------------------

def test_psnr_and_ssim_of_identical_videos_and_a_shifted_one():
    video = render(RED_CIRCLE_LEFT, seed=1)
    shifted = torch.roll(video, shifts=2, dims=-1)
    assert psnr(video, video, peak=1.0) == math.inf
    assert ssim(video, video) == pytest.approx(1.0, abs=1e-12)
    assert ssim(shifted, video) < 0.9
    assert psnr(shifted, video, peak=1.0) < 30
    assert ssim(video + 0.01, video) > ssim(shifted, video)


def test_frechet_distance_of_known_gaussians():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 8, generator=g, dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(a, a + 1.0) == pytest.approx(8.0, rel=1e-6)  # mean shift only
    assert frechet_distance(a, 2 * a) == pytest.approx(8.0, rel=0.1)  # (2 - 1)^2 per unit variance


# --- training ----------------------------------------------------------------------------------

def test_learning_rate_warms_up_holds_then_cools_down_to_zero():
    from qsc.refmodel.train import learning_rate

    lr = [learning_rate(step, peak=1.0, warmup=10, steps=100, cooldown=20) for step in range(100)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == 1.0
    assert lr[10:80] == [1.0] * 70
    assert lr[80:] == sorted(lr[80:], reverse=True) and lr[-1] == pytest.approx(1 / 20)


def test_a_resumed_training_run_equals_an_uninterrupted_one(tmp_path):
    """Also with batches rendered by a DataLoader worker: a batch is a function of its step alone."""
    from safetensors.torch import load_file

    from qsc.refmodel.train import main as train

    # The warmup-stable-decay recipe: stop in the stable phase, resume with the cooldown scheduled.
    common = ["--batch", "1", "--warmup", "1", "--save-every", "100", "--log-every", "1"]
    train(["--out", str(tmp_path / "straight"), "--steps", "3", "--cooldown", "2", "--workers", "1", *common])
    train(["--out", str(tmp_path / "resumed"), "--steps", "1", *common])
    train(["--out", str(tmp_path / "resumed"), "--steps", "3", "--cooldown", "2", "--resume", *common])
    for weights in ("model", "ema"):
        straight = load_file(str(tmp_path / "straight" / "checkpoint" / f"{weights}.safetensors"))
        resumed = load_file(str(tmp_path / "resumed" / "checkpoint" / f"{weights}.safetensors"))
        assert all(torch.equal(straight[k], resumed[k]) for k in straight)



def test_a_new_stage_starts_from_the_given_weights(tmp_path):
    """``--init``: the shipped weights, not a fresh initialisation, are what a new stage trains on."""
    from safetensors.torch import load_file

    from qsc.refmodel.model import WEIGHTS
    from qsc.refmodel.train import main as train

    train(["--out", str(tmp_path), "--init", str(WEIGHTS), "--lr", "0", "--steps", "1", "--batch", "1"])
    shipped = load_file(str(WEIGHTS))
    for weights in ("model", "ema"):
        trained = load_file(str(tmp_path / "checkpoint" / f"{weights}.safetensors"))
        assert all(torch.equal(shipped[k], trained[k]) for k in shipped)


def test_training_log_joins_stages_and_keeps_the_finished_path(tmp_path):
    from qsc.refmodel.report import training_log

    def write(run, steps_losses):
        (tmp_path / run).mkdir()
        lines = [json.dumps({"step": k, "loss": loss, "lr": 1.0}) for k, loss in steps_losses]
        (tmp_path / run / "train_log.jsonl").write_text("\n".join(lines) + "\n")

    write("one", [(25, 0.9), (50, 0.5)])
    write("two", [(25, 0.4), (50, 0.3), (25, 0.35), (50, 0.2)])  # resumed from step 0: 25 and 50 again
    log = training_log([tmp_path / "one", tmp_path / "two"])
    assert [(r["stage"], r["step"], r["loss"]) for r in log] == [(1, 25, 0.9), (1, 50, 0.5), (2, 75, 0.35), (2, 100, 0.2)]

# --- model, sampler, calibration --------------------------------------------------------------

def test_missing_weights_give_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="python -m qsc.refmodel.train"):
        load_reference_model(tmp_path / "absent.safetensors")


def test_sampler_is_deterministic(model):
    a = sample(as_denoiser(model), RED_CIRCLE_LEFT, seed=5, steps=2)
    assert a.shape == (3, FRAMES, SIZE, SIZE)
    assert torch.equal(a, sample(as_denoiser(model), RED_CIRCLE_LEFT, seed=5, steps=2))


def test_fp_model_reproduces_recorded_calibration_outputs(model, tmp_path):
    calib = reference_calibration(num_prompts=1, steps=2)
    assert len(calib) == 4  # 2 steps x (cond, uncond)
    assert [r["cfg"] for r in calib.records] == ["cond", "uncond", "cond", "uncond"]
    assert calib.sample(0)["hidden_states"].shape == (1, 3, FRAMES, SIZE, SIZE)
    assert not {r["prompt"] for r in calib.records} & {p.text for p in EVAL_PROMPTS}
    calib.save(tmp_path / "calib.safetensors")
    loaded = CalibrationSet.load(tmp_path / "calib.safetensors")
    assert loaded.records == calib.records
    with torch.no_grad():
        for i, kwargs in enumerate(loaded):
            torch.testing.assert_close(as_denoiser(model)(**kwargs), loaded.outputs[i], rtol=1e-5, atol=1e-5)


def test_pipeline_recorder_splits_batched_calls_into_batch_one_samples(model):
    pipe = SimpleNamespace(transformer=model)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 3, FRAMES, SIZE, SIZE, generator=g)
    text = torch.cat([embed(RED_CIRCLE_LEFT), embed(None)])
    with PipelineRecorder(pipe.transformer) as recorder, torch.no_grad():
        pipe.transformer(hidden_states=latents, timestep=torch.full((2,), 700.0), encoder_hidden_states=text)
        pipe.transformer(latents[:1], torch.tensor([300.0]), text[:1], return_dict=False)
    calib = recorder.calibration()
    assert len(calib) == 3
    assert [r["timestep"] for r in calib.records] == [700.0, 700.0, 300.0]
    assert calib.sample(1)["timestep"].shape == (1,)
    with torch.no_grad():
        for i, kwargs in enumerate(calib):
            torch.testing.assert_close(as_denoiser(model)(**kwargs), calib.outputs[i], rtol=1e-4, atol=1e-5)
    # hooks are gone after the block
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_record_sampler_keeps_one_sample_per_denoiser_call():
    calls = []

    def denoiser(**kw):
        calls.append(kw)
        return torch.zeros_like(kw["hidden_states"])

    calib = record_sampler(denoiser, [RED_CIRCLE_LEFT], [0], steps=3)
    assert len(calib) == len(calls) == 6
    assert [r["step"] for r in calib.records] == [0, 0, 1, 1, 2, 2]


# --- judge -----------------------------------------------------------------------------------

def test_judge_classifies_real_clips_near_its_reported_accuracy():
    from safetensors import safe_open

    from qsc.refmodel.judge import WEIGHTS, adherence, held_out_clips, load_judge

    with safe_open(str(WEIGHTS), framework="pt") as f:
        reported = json.loads(f.metadata()["held_out_accuracy"])["all"]
    clips, prompts = held_out_clips(per_prompt=4)
    assert adherence(load_judge(), clips, prompts)["all"] >= reported - 0.1


# --- CLI -------------------------------------------------------------------------------------

def test_generate_writes_a_gif(tmp_path):
    from click.testing import CliRunner

    from qsc.cli.generate import generate

    out = tmp_path / "v.gif"
    result = CliRunner().invoke(generate, ["--prompt", "a blue square moving up", "--steps", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 0
    bad = CliRunner().invoke(generate, ["--prompt", "a cat", "-o", str(out)])
    assert bad.exit_code != 0 and "exactly one shape" in bad.output
