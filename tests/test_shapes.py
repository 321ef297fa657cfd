"""Programs export with a symbolic batch; a model that cannot have one is compiled for batch 1 and
its artifact splits batched calls."""

from __future__ import annotations

import pytest
import torch

import qsc
from qsc.calibration import CalibrationSet
from qsc.errors import InputError
from qsc.frontend import DenoiserAdapter
from qsc.metrics import relative_l2
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


def test_a_dimension_that_is_not_symbolic_fails_with_one_line(wan_artifact):
    path, calib, _ = wan_artifact
    sample = calib.sample(0)
    taller = {**sample, "hidden_states": torch.randn(1, 4, 2, 32, 16)}
    with pytest.raises(InputError, match=r"^input 'hidden_states': the artifact takes shape "
                                         r"\[batch, 4, 2, 16, 16\], got \[1, 4, 2, 32, 16\]"):
        qsc.load(path)(**taller)


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
