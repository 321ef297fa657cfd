"""Programs export with a symbolic batch and every other size the model leaves open (frames, height,
width, text length): one artifact serves other batches, resolutions and prompts. A size outside
what the program takes fails in one line; a model that cannot have a symbolic batch is compiled for
batch 1 and its artifact splits batched calls."""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner

import qsc
from qsc.cli import cli
from qsc.calibration import CalibrationSet
from qsc.errors import InputError
from qsc.frontend import DenoiserAdapter
from qsc.metrics import psnr, relative_l2
from qsc.models import synthetic_calibration

from tiny_models import tiny_model


def _stacked(calib, count):
    return {n: torch.cat([calib.sample(i)[n] for i in range(count)]) for n in calib.input_names}


@pytest.fixture(scope="module")
def wan_artifact(tmp_path_factory):
    model = tiny_model("wan")
    calib = synthetic_calibration(model, 3, seed=0)
    path = qsc.compile(model, calib, preset="w4a8", config={"calib_samples": 2}).save(
        tmp_path_factory.mktemp("dyn") / "wan.qsc")
    return path, calib, model


def test_one_artifact_serves_any_batch_in_one_call(wan_artifact):
    path, calib, model = wan_artifact
    artifact = qsc.load(path)
    assert all(entry["shape"][0] == "batch" for entry in artifact.manifest["inputs"].values())
    batch = _stacked(calib, 3)
    assert len(artifact.inputs.split(batch)) == 1  # one call of batch 3, nothing split
    with torch.no_grad():
        together = artifact(**batch)
        apart = torch.cat([artifact(**calib.sample(i)) for i in range(3)])
        fp = DenoiserAdapter(model)(**batch)
    # Per-token activation scales: a sample's output does not depend on the others in its batch, up
    # to the float rounding of GEMMs of another size, which moves a few codes by one step: far
    # below the quantization error itself.
    assert relative_l2(together, apart) < 0.1 * relative_l2(apart, fp)


# The tiny W4A8 Wan against the FP model on random latents: 46.6 dB at the compiled 2 x 16 x 16
# with 512 text tokens, 49.0 dB at 3 x 24 x 16 with 77 (PSNR of the transformer's output).
OTHER_SIZE_MIN_PSNR = 40.0


def test_one_dense_artifact_serves_other_resolutions_and_text_lengths(wan_artifact):
    path, calib, model = wan_artifact
    artifact = qsc.load(path)
    assert artifact.manifest["inputs"]["hidden_states"]["shape"] == ["batch", 4, "frames", "height", "width"]
    assert artifact.manifest["inputs"]["encoder_hidden_states"]["shape"] == ["batch", "text", 32]
    # Wan's rotary tables (rope_max_seq_len = 32) bound the patches per axis; size 1 is never symbolic
    assert artifact.manifest["dims"] == {"batch": [1, None], "frames": [2, 32], "height": [2, 65], "width": [2, 65],
                                         "text": [2, None]}
    g = torch.Generator().manual_seed(1)
    other = {"hidden_states": torch.randn(2, 4, 3, 24, 16, generator=g), "timestep": torch.tensor([700.0, 300.0]),
             "encoder_hidden_states": torch.randn(2, 77, 32, generator=g)}
    with torch.no_grad():
        out, fp = artifact(**other), DenoiserAdapter(model)(**other)
    assert out.shape == fp.shape and OTHER_SIZE_MIN_PSNR <= psnr(out, fp) < math.inf
    shown = CliRunner().invoke(cli, ["inspect", str(path)])
    assert "[batch, 4, frames, height, width]" in shown.output and "frames 2..32" in shown.output


def test_a_size_beyond_what_the_program_takes_fails_with_one_line(wan_artifact):
    path, calib, _ = wan_artifact
    longer = {**calib.sample(0), "hidden_states": torch.randn(1, 4, 40, 16, 16)}
    with pytest.raises(InputError, match=r"^input 'hidden_states': dimension 2 \(frames\) takes 2 to 32, got 40 "
                                         r"\(shape \[1, 4, 40, 16, 16\]\); .*qsc record") as e:
        qsc.load(path)(**longer)
    assert "\n" not in str(e.value)


class OneTimestep(torch.nn.Module):
    """Assumes one timestep per call (a reshape to [1]): its batch cannot be symbolic."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, hidden_states, timestep):
        return self.proj(hidden_states) * timestep.reshape(1, 1, 1) / 1000


def test_model_whose_batch_cannot_be_symbolic_compiles_for_batch_one_and_splits(tmp_path):
    torch.manual_seed(0)
    model = OneTimestep().eval()
    samples = [{"hidden_states": torch.randn(1, 4, 8), "timestep": torch.tensor([100.0 * (i + 1)])} for i in range(3)]
    calib = CalibrationSet.from_samples(samples)
    with pytest.warns(UserWarning, match="does not export with a symbolic batch.*splits batched calls"):
        result = qsc.compile(model, calib, preset="w8a8")
    artifact = qsc.load(result.save(tmp_path / "one.qsc"))
    assert artifact.manifest["inputs"]["hidden_states"]["shape"] == [1, 4, 8]
    batch = _stacked(calib, 3)
    assert len(artifact.inputs.split(batch)) == 3
    with torch.no_grad():
        torch.testing.assert_close(artifact(**batch), torch.cat([artifact(**s) for s in samples]))

