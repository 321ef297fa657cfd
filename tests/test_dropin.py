"""Artifacts inside real diffusers pipelines: ``pipe.transformer = qsc.load(path, like=pipe.transformer)``.

Tiny offline Wan and CogVideoX pipelines are recorded (``qsc.record``), their transformers
compiled, and the pipelines run again with the artifact in place of the transformer: with guidance
(two calls, or one stacked call of batch 2), without, and with two videos per prompt. The videos
must stay within a stated PSNR of the FP pipeline's, and must differ from them (the artifact ran).
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput

import qsc
from qsc.errors import InputError
from qsc.metrics import psnr
from qsc.runtime import SSARRuntime

from tiny_pipelines import COGVIDEOX_TEXT_TOKENS, cogvideox_pipeline, wan_pipeline

PROMPT = "a red circle moving left"
STEPS = 4
# Video PSNR (peak 1) of the compressed pipeline against the FP one, same noise. Measured: Wan
# W4A8 ~68 dB (68.8 dB at another resolution, 96 x 64 x 9), Wan W4A8-sparse + SSAR ~65 dB,
# CogVideoX W4A8 ~48 dB; two FP videos of different noise seeds are 26 dB (Wan) and 5 dB
# (CogVideoX) apart.
MIN_PSNR = {"wan": 55.0, "wan-sparse": 55.0, "cogvideox": 40.0}
CASES = {
    "guidance": dict(guidance_scale=5.0),
    "no-guidance": dict(guidance_scale=1.0),
    "two-videos": dict(guidance_scale=5.0, num_videos_per_prompt=2),
}
WAN_SIZE = dict(height=64, width=64, num_frames=5)  # 2 latent frames of 8 x 8: 32 tokens
WAN_SPARSE_SIZE = dict(height=256, width=256, num_frames=5)  # 512 tokens: 8 key tiles per query tile
COGVIDEOX_SIZE = dict(num_frames=9, max_sequence_length=COGVIDEOX_TEXT_TOKENS)


def _video(pipe, size, **options):
    options = {"prompt": PROMPT, "negative_prompt": "", **options}
    return pipe(**options, num_inference_steps=STEPS, output_type="pt", generator=torch.Generator().manual_seed(0),
                **size).frames


def _compiled(pipe, size, preset, path):
    calib = qsc.record(pipe, [PROMPT], num_inference_steps=STEPS, guidance_scale=5.0, **size)
    # One epoch where a preset learns its scales: what is tested here is the drop-in, not the learning.
    qsc.compile(pipe.transformer, calib, preset=preset, config={"calib_samples": 4, "scale_epochs": 1}).save(path)
    return path


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    pipe = wan_pipeline()
    return pipe, _compiled(pipe, WAN_SIZE, "w4a8", tmp_path_factory.mktemp("wan") / "wan.qsc")


@pytest.fixture(scope="module")
def cogvideox(tmp_path_factory):
    pipe = cogvideox_pipeline()
    return pipe, _compiled(pipe, COGVIDEOX_SIZE, "w4a8", tmp_path_factory.mktemp("cog") / "cog.qsc")


def _compare(pipe, path, size, options):
    """(FP video, compressed video) of the same call, the transformer swapped for the artifact."""
    fp = pipe.transformer
    reference = _video(pipe, size, **options)
    pipe.transformer = qsc.load(path, like=fp)
    try:
        return reference, _video(pipe, size, **options), pipe.transformer
    finally:
        pipe.transformer = fp


@pytest.mark.parametrize("case", list(CASES))
def test_wan_pipeline_runs_the_artifact_as_its_transformer(wan, case):
    pipe, path = wan
    reference, video, _ = _compare(pipe, path, WAN_SIZE, CASES[case])
    assert video.shape == reference.shape
    assert MIN_PSNR["wan"] <= psnr(video, reference, peak=1.0) < math.inf


@pytest.mark.parametrize("case", list(CASES))
def test_cogvideox_pipeline_runs_the_artifact_as_its_transformer(cogvideox, case):
    pipe, path = cogvideox
    options = dict(CASES[case])
    if options.pop("num_videos_per_prompt", 1) > 1:  # CogVideoXPipeline makes one video per prompt
        options.update(prompt=[PROMPT, "a blue square moving up"], negative_prompt=["", ""])
    reference, video, _ = _compare(pipe, path, COGVIDEOX_SIZE, options)
    assert video.shape == reference.shape
    assert MIN_PSNR["cogvideox"] <= psnr(video, reference, peak=1.0) < math.inf


def test_wan_artifact_serves_the_pipeline_at_another_resolution_and_length(wan):
    """Compiled at 64 x 64 x 5 frames (2 x 8 x 8 latents), run at 96 x 64 x 9 frames (3 x 12 x 8)."""
    pipe, path = wan
    other = dict(height=96, width=64, num_frames=9)
    reference, video, _ = _compare(pipe, path, other, CASES["guidance"])
    assert video.shape == reference.shape == (1, 9, 3, 96, 64)
    assert MIN_PSNR["wan"] <= psnr(video, reference, peak=1.0) < math.inf


def test_cogvideox_fixes_its_resolution_and_refuses_another_in_one_line(cogvideox):
    """CogVideoX's sin-cos position table is built for the configured sample size: torch.export
    specializes the latent's size to it, and the artifact keeps only the batch open."""
    pipe, path = cogvideox
    dropin = qsc.load(path, like=pipe.transformer)
    shapes = {n: entry["shape"] for n, entry in dropin.compressed.manifest["inputs"].items()}
    assert shapes["hidden_states"] == ["batch", 3, 4, 8, 8] and dropin.compressed.manifest["dims"] == {"batch": [1, None]}
    sample = {"hidden_states": torch.randn(1, 3, 4, 16, 8), "timestep": torch.tensor([500]),
              "encoder_hidden_states": torch.randn(1, COGVIDEOX_TEXT_TOKENS, 32)}
    with pytest.raises(InputError, match=r"^input 'hidden_states': the artifact takes shape \[batch, 3, 4, 8, 8\], "
                                         r"got \[1, 3, 4, 16, 8\]; only the named dimensions may change: .*qsc record"):
        dropin(**sample)


def test_ssar_artifact_in_the_wan_pipeline_keeps_caches_per_guidance_branch(tmp_path):
    pipe = wan_pipeline()
    path = _compiled(pipe, WAN_SPARSE_SIZE, "w4a8-sparse", tmp_path / "sparse.qsc")
    reference, video, dropin = _compare(pipe, path, WAN_SPARSE_SIZE, CASES["two-videos"])
    runtime = dropin.compressed.program
    assert isinstance(runtime, SSARRuntime)
    assert runtime.step_index == STEPS - 1
    # (cond, uncond), each one call of batch 2 (the two videos) with caches of batch 2
    assert len(runtime._branches) == 2
    assert {d.shape[0] for branch in runtime._branches for d in branch.residuals.values()} == {2}
    assert MIN_PSNR["wan-sparse"] <= psnr(video, reference, peak=1.0) < math.inf


def test_dropin_speaks_the_transformer_calling_convention(wan):
    pipe, path = wan
    dropin = qsc.load(path, like=pipe.transformer)
    assert dropin.config is pipe.transformer.config and dropin.dtype == torch.float32
    assert dropin.device == torch.device("cpu")
    calib = qsc.record(pipe, [PROMPT], num_inference_steps=1, guidance_scale=1.0, **WAN_SIZE)
    sample = calib.sample(0)
    with dropin.cache_context("cond"):
        out = dropin(**sample)
    assert isinstance(out, Transformer2DModelOutput) and out.sample.shape == sample["hidden_states"].shape
    (tuple_out,) = dropin(**sample, attention_kwargs=None, return_dict=False)
    assert torch.equal(tuple_out, out.sample)
    positional = dropin(sample["hidden_states"], sample["timestep"], sample["encoder_hidden_states"], return_dict=False)
    assert torch.equal(positional[0], out.sample)
    # bf16 latents in: cast to the artifact's float dtype, the output back to bf16
    half = dropin(**{**sample, "hidden_states": sample["hidden_states"].bfloat16()}, return_dict=False)[0]
    assert half.dtype == torch.bfloat16


def test_calls_the_artifact_cannot_serve_fail_with_one_line_naming_the_input(wan):
    pipe, path = wan
    dropin = qsc.load(path, like=pipe.transformer)
    sample = qsc.record(pipe, [PROMPT], num_inference_steps=1, guidance_scale=1.0, **WAN_SIZE).sample(0)
    beyond_rope = torch.randn(1, 4, 2, 8, 72)  # 36 patches; the rotary table has 32 positions
    with pytest.raises(InputError, match=r"^input 'hidden_states': dimension 4 \(width\) takes 2 to 65, got 72 "
                                         r"\(shape \[1, 4, 2, 8, 72\]\); .*qsc record") as e:
        dropin(**{**sample, "hidden_states": beyond_rope})
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match=r"^input 'timestep': the artifact takes \[batch\] float32, got int64"):
        dropin(**{**sample, "timestep": torch.tensor([500])})
    with pytest.raises(InputError, match="attention_kwargs"):
        dropin(**sample, attention_kwargs={"scale": 0.5})
    with pytest.raises(InputError, match=r"encoder_hidden_states_image"):
        dropin(**sample, encoder_hidden_states_image=torch.randn(1, 4, 32))
    with pytest.raises(InputError, match="disagree on the batch size"):
        dropin(**{**sample, "timestep": sample["timestep"].expand(2)})


def test_record_labels_prompt_step_and_guidance_branch():
    wan, cog = wan_pipeline(), cogvideox_pipeline()
    calib = qsc.record(wan, [PROMPT, "a blue square"], num_inference_steps=2, guidance_scale=5.0, seed=3, **WAN_SIZE)
    labels = [(r["prompt"], r["seed"], r["step"], r["branch"]) for r in calib.records]
    assert labels == [(p, s, step, b) for p, s in ((PROMPT, 3), ("a blue square", 4))
                      for step in (0, 1) for b in ("cond", "uncond")]
    # CogVideoX stacks [uncond, cond] into one call of batch 2, or runs cond alone without guidance
    stacked = qsc.record(cog, [PROMPT], num_inference_steps=1, guidance_scale=5.0, **COGVIDEOX_SIZE)
    assert [(r["branch"], r["batch_index"], r["call"]) for r in stacked.records] == [("uncond", 0, 0), ("cond", 1, 0)]
    alone = qsc.record(cog, [PROMPT], num_inference_steps=1, guidance_scale=1.0, **COGVIDEOX_SIZE)
    assert [r["branch"] for r in alone.records] == ["cond"]
    assert "cache_context" not in cog.transformer.__dict__  # the recorder put the method back
