"""Models as users export and write them: a .pt2 with positional inputs, forward arguments that are
not tensors (LTX-Video's ``num_frames``, ``height``, ``width``), and joint text-video attention
whose length the text mask decides (Mochi). Tiny diffusers models built here, nothing downloaded."""

from __future__ import annotations

import warnings

import pytest
import torch
from diffusers import LTXVideoTransformer3DModel, MochiTransformer3DModel

import qsc
from qsc.calibration import CalibrationSet
from qsc.errors import CalibrationError, ConfigError, InputError
from qsc.frontend import DenoiserAdapter
from qsc.recording import PipelineRecorder

FAST = {"calib_samples": 1, "check_numerics": False}


class Denoiser(torch.nn.Module):
    """A small denoiser called positionally, as a user's own model often is."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = torch.nn.Linear(32, 64), torch.nn.Linear(64, 32)

    def forward(self, hidden_states, timestep):
        return self.fc2(torch.nn.functional.gelu(self.fc1(hidden_states))) * timestep[:, None, None]


def _positional_pt2(tmp_path):
    x, t = torch.randn(1, 16, 32), torch.tensor([0.5])
    path = tmp_path / "positional.pt2"
    torch.export.save(torch.export.export(Denoiser(), (x, t), strict=False), path)
    return path, x, t


def test_positional_pt2_calibrates_on_its_example_inputs_with_a_warning(tmp_path):
    path, x, t = _positional_pt2(tmp_path)
    with pytest.warns(UserWarning, match="example inputs"):
        result = qsc.compile(path, preset="w8a8", config=FAST)
    assert set(result.layers) == {"fc1", "fc2"}
    artifact = qsc.load(result.save(tmp_path / "positional.qsc"))
    # The artifact takes the inputs by the names the exported forward gave them.
    out = artifact(hidden_states=x, timestep=t)
    assert torch.nn.functional.cosine_similarity(out.flatten(), Denoiser()(x, t).flatten(), dim=0) > 0.99


def test_positional_pt2_takes_a_calibration_file_by_position(tmp_path):
    path, x, t = _positional_pt2(tmp_path)
    calib = tmp_path / "calib.safetensors"
    CalibrationSet.from_samples([{"x": x, "t": t}, {"x": -x, "t": 2 * t}]).save(calib)
    with pytest.warns(UserWarning, match=r"\['x', 't'\] matched by position to the program's inputs \['hidden_states', 'timestep'\]"):
        result = qsc.compile(path, calib, preset="w8a8", config={**FAST, "calib_samples": 2})
    assert list(result.example_inputs) == ["hidden_states", "timestep"]

    CalibrationSet.from_samples([{"x": x}]).save(calib)
    with pytest.raises(InputError, match=r"takes inputs \['hidden_states', 'timestep'\], the calibration data has \['x'\]"):
        qsc.compile(path, calib, preset="w8a8", config=FAST)


# --- LTX-Video: non-tensor forward arguments -----------------------------------------------------

LTX_SIZE = {"num_frames": 2, "height": 8, "width": 8}


@pytest.fixture(scope="module")
def ltx():
    torch.manual_seed(0)
    model = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16,
                                       cross_attention_dim=32, num_layers=1, caption_channels=16).eval()
    g = torch.Generator().manual_seed(0)
    sample = {"hidden_states": torch.randn(1, 2 * 8 * 8, 8, generator=g),
              "encoder_hidden_states": torch.randn(1, 8, 16, generator=g),
              "timestep": torch.tensor([500]), "encoder_attention_mask": torch.ones(1, 8)}
    return model, sample


def test_missing_non_tensor_arguments_are_named_in_one_line(ltx):
    model, sample = ltx
    with pytest.raises(InputError) as err:
        qsc.compile(model, CalibrationSet.from_samples([sample]), preset="w4a8", config=FAST)
    message = str(err.value)
    assert "\n" not in message
    assert "takes num_frames, height, width, which are not tensors" in message and "constants=" in message


def test_recorded_constants_compile_in_and_calls_must_repeat_them(ltx, tmp_path):
    model, sample = ltx
    with PipelineRecorder(model) as recorder:
        for scale in (1.0, 0.5):
            model(**{**sample, "hidden_states": scale * sample["hidden_states"]}, **LTX_SIZE,
                  rope_interpolation_scale=(0.04, 32.0, 32.0), return_dict=False)
    calib = recorder.calibration()
    calib.save(tmp_path / "calib.safetensors")
    calib = CalibrationSet.load(tmp_path / "calib.safetensors")
    # JSON holds no tuples: the model gets the tuple it was called with back.
    assert calib.constants == {**LTX_SIZE, "rope_interpolation_scale": (0.04, 32.0, 32.0)}

    result = qsc.compile(model, calib, preset="w4a8", config=FAST)
    assert result.dynamic_dims["hidden_states"] == {0: "batch"}
    artifact = qsc.load(result.save(tmp_path / "ltx.qsc"), like=model)
    batch = {n: torch.cat([t, t]) for n, t in sample.items()}
    out = artifact(**batch, **calib.constants, return_dict=False)[0]
    with torch.no_grad():
        fp = DenoiserAdapter(model, calib.constants)(**batch)
    assert qsc.metrics.relative_l2(out, fp) < 0.05
    with pytest.raises(InputError, match=r"argument 'num_frames': the artifact was compiled for 2, got 4"):
        artifact(**batch, **{**calib.constants, "num_frames": 4})


def test_recorder_refuses_a_constant_that_changes(ltx):
    model, sample = ltx
    with pytest.raises(CalibrationError, match=r"argument 'num_frames' changed between calls \(2, then 4\)"):
        with PipelineRecorder(model), torch.no_grad():
            model(**sample, **LTX_SIZE)
            model(**sample, num_frames=4, height=4, width=4)


# --- Mochi: joint text-video attention over the unmasked text tokens -----------------------------

def test_mochi_joint_attention_fails_sparse_in_one_line_and_compiles_dense():
    torch.manual_seed(0)
    model = MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=1,
                                    pooled_projection_dim=16, in_channels=4, text_embed_dim=16, time_embed_dim=16,
                                    max_sequence_length=8).eval()
    sample = {"hidden_states": torch.randn(1, 4, 2, 8, 8), "encoder_hidden_states": torch.randn(1, 8, 16),
              "timestep": torch.tensor([500]), "encoder_attention_mask": torch.ones(1, 8, dtype=torch.bool)}
    calib = CalibrationSet.from_samples([sample])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the batch stays fixed (the data-dependent length), said elsewhere
        with pytest.raises(ConfigError, match=r"attention layer 'transformer_blocks\.0\.attn1' attends over u\d+ \+ 32 "
                                              r"tokens, a number the inputs' values decide.*dense_attention"):
            qsc.compile(model, calib, preset="w4a8-sparse", config=FAST)
        assert qsc.compile(model, calib, preset="w4a8", config=FAST).layers
