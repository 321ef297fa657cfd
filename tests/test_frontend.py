"""Frontend errors name the construct and the fix."""

import pytest
import torch

import qsc
from qsc.calibration import CalibrationSet
from qsc.errors import ExportError, InputError


class BranchesOnData(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, hidden_states):
        if hidden_states.sum() > 0:  # a Python branch on a tensor's value
            return self.proj(hidden_states)
        return hidden_states


def test_data_dependent_branch_is_named_with_a_fix():
    calib = CalibrationSet.from_samples([{"hidden_states": torch.randn(1, 4, 8)}])
    with pytest.raises(ExportError) as err:
        qsc.compile(BranchesOnData(), calib)
    message = str(err.value)
    assert "test_frontend.py" in message and "hidden_states.sum() > 0" in message
    assert "torch.cond" in message


def test_unknown_module_without_calibration_asks_for_it():
    with pytest.raises(InputError, match="--calib"):
        qsc.compile(torch.nn.Linear(4, 4))


def test_state_dict_in_a_pt_file_loads_without_trusting_pickle(tmp_path):
    from tiny_models import CONFIGS, tiny_model
    import json

    model = tiny_model("wan")
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS["wan"][1]))
    result = qsc.compile(tmp_path / "weights.pt", arch="WanTransformer3DModel", model_config=tmp_path / "config.json",
                         config={"calib_samples": 1, "check_numerics": False})
    assert result.source["kind"] == "state_dict" and result.layers
