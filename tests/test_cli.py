"""The command line: every model source, bad input ending in one clear error, determinism."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from qsc.calibration import CalibrationSet
from qsc.cli import cli
from qsc.models import synthetic_calibration

from tiny_models import CONFIGS, tiny_model

FAST = ["--set", "calib_samples=2"]


def run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def assert_clean_failure(result, out: Path, *phrases: str) -> None:
    assert result.exit_code != 0
    message = result.output.lower()
    assert "error" in message and "traceback" not in message, result.output
    for phrase in phrases:
        assert phrase.lower() in message, (phrase, result.output)
    assert not out.exists(), "a failed compile must leave no artifact"
    assert not any(p.name.startswith(f".{out.name}") for p in out.parent.iterdir()), "temporary files left"


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "wan"
    tiny_model("wan").save_pretrained(path)
    return path


def test_help_lists_every_command():
    result = run("--help")
    assert result.exit_code == 0
    for command in ("compile", "inspect", "eval", "generate"):
        assert command in result.output
    compile_help = run("compile", "--help").output
    for option in ("--preset", "--config", "--backend", "--output", "--calib", "--dump-ir", "--seed", "--trust-pickle"):
        assert option in compile_help


def test_compile_diffusers_directory_then_inspect_and_eval(wan_dir, tmp_path):
    out = tmp_path / "wan.qsc"
    dump = tmp_path / "ir"
    result = run("compile", wan_dir, "-p", "w4a8", "-o", out, "--dump-ir", dump, *FAST)
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {"program.pt2", "weights.safetensors", "manifest.json"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["w_bits"] == 4 and manifest["source"]["kind"] == "diffusers"
    assert sorted(p.name for p in dump.iterdir())[0] == "00-input.txt"
    assert "qsc.quant_linear" in (dump / "04-quantize_linear.txt").read_text()

    shown = run("inspect", out)
    assert shown.exit_code == 0 and "qsc.quant_linear" in shown.output and "blocks.0.attn1.to_q" in shown.output

    evaluated = run("eval", out, "-n", "2", "--json", tmp_path / "eval.json")
    assert evaluated.exit_code == 0, evaluated.output
    rows = json.loads((tmp_path / "eval.json").read_text())["rows"]
    assert len(rows) == 2 and all(r["rel_l2"] < 0.05 for r in rows)


def test_inspect_model_shows_the_quantization_plan(wan_dir):
    result = run("inspect", wan_dir, "-p", "w4a8")
    assert result.exit_code == 0, result.output
    assert "aten.linear.default" in result.output and "W4A8" in result.output


def test_safetensors_state_dict_with_arch_and_config(wan_dir, tmp_path):
    out = tmp_path / "sd.qsc"
    weights = wan_dir / "diffusion_pytorch_model.safetensors"
    missing_arch = run("compile", weights, "-o", out)
    assert_clean_failure(missing_arch, out, "--arch", "--model-config")
    ok = run("compile", weights, "--arch", "WanTransformer3DModel", "--model-config", wan_dir / "config.json", "-o", out, *FAST)
    assert ok.exit_code == 0, ok.output


def test_pickled_module_needs_explicit_trust(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(tiny_model("wan"), path)
    out = tmp_path / "model.qsc"
    refused = run("compile", path, "-o", out)
    assert_clean_failure(refused, out, "--trust-pickle")
    trusted = run("compile", path, "--trust-pickle", "-o", out, *FAST)
    assert trusted.exit_code == 0, trusted.output


def test_exported_program_with_calibration_file(tmp_path):
    from qsc.frontend import DenoiserAdapter

    model = tiny_model("wan")
    calib = synthetic_calibration(model, 2, seed=0)
    calib.save(tmp_path / "calib.safetensors")
    program = torch.export.export(DenoiserAdapter(model), (), calib.sample(0), strict=False)
    torch.export.save(program, tmp_path / "wan.pt2")
    out = tmp_path / "pt2.qsc"
    result = run("compile", tmp_path / "wan.pt2", "--calib", tmp_path / "calib.safetensors", "-o", out, *FAST)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["layers"]


def test_eval_and_generate_end_unexpected_failures_and_warnings_in_one_line_each(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        warnings.warn("inputs [batch, 4]\n\nwere cast", UserWarning)
        raise RuntimeError("out of memory\nwhile running [batch, 4]")

    monkeypatch.setattr("qsc.evaluate.evaluate", broken)
    monkeypatch.setattr("qsc.refmodel.load_reference_model", broken)
    for command in (["eval", tmp_path], ["generate", "--prompt", "a red circle moving left", "-o", tmp_path / "v.gif"]):
        result = run(*command)
        assert result.exit_code == 2, result.output
        assert result.output.splitlines() == [
            "warning: inputs [batch, 4] were cast",
            f"error: qsc {command[0]} failed: RuntimeError: out of memory while running [batch, 4]",
        ]


def test_missing_file(tmp_path):
    out = tmp_path / "x.qsc"
    assert_clean_failure(run("compile", tmp_path / "nope.pt2", "-o", out), out, "not found")


def test_a_file_that_is_not_a_model(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    out = tmp_path / "x.qsc"
    assert_clean_failure(run("compile", path, "-o", out), out, "not a model")


def test_corrupt_safetensors(tmp_path):
    path = tmp_path / "broken.safetensors"
    save_file({"w": torch.randn(4, 4)}, path)
    path.write_bytes(path.read_bytes()[:40])
    out = tmp_path / "x.qsc"
    result = run("compile", path, "--arch", "WanTransformer3DModel", "--model-config", path, "-o", out)
    assert_clean_failure(result, out, "corrupt")


def test_unsupported_bit_width(wan_dir, tmp_path):
    out = tmp_path / "x.qsc"
    assert_clean_failure(run("compile", wan_dir, "--set", "w_bits=3", "-o", out), out, "bit width 3")


def test_unknown_setting_is_named(wan_dir, tmp_path):
    out = tmp_path / "x.qsc"
    assert_clean_failure(run("compile", wan_dir, "--set", "wbits=4", "-o", out), out, "'wbits'")


def test_calibration_with_nan(wan_dir, tmp_path):
    calib = synthetic_calibration(tiny_model("wan"), 3, seed=0)
    calib.inputs["hidden_states"][1, 0, 0, 0, 0, 0] = float("nan")
    calib.save(tmp_path / "nan.safetensors")
    out = tmp_path / "x.qsc"
    result = run("compile", wan_dir, "--calib", tmp_path / "nan.safetensors", "-o", out)
    assert_clean_failure(result, out, "hidden_states", "sample 1", "nan")


def test_calibration_shape_that_does_not_fit(wan_dir, tmp_path):
    calib = synthetic_calibration(tiny_model("wan"), 2, seed=0)
    wrong = CalibrationSet({**calib.inputs, "hidden_states": torch.randn(2, 1, 7, 2, 8, 8)})
    wrong.save(tmp_path / "wrong.safetensors")
    out = tmp_path / "x.qsc"
    result = run("compile", wan_dir, "--calib", tmp_path / "wrong.safetensors", "-o", out)
    assert_clean_failure(result, out, "do not fit", "hidden_states=(1, 7, 2, 8, 8)")


def test_failed_compile_keeps_an_existing_artifact_intact(wan_dir, tmp_path):
    out = tmp_path / "keep.qsc"
    assert run("compile", wan_dir, "-o", out, *FAST).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = run("compile", wan_dir, "--set", "a_bits=5", "-o", out, "--force")
    assert result.exit_code != 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_seed_same_inputs_byte_identical_artifact(name, tmp_path):
    path = tmp_path / "model"
    tiny_model(name).save_pretrained(path)
    first, second = tmp_path / "a.qsc", tmp_path / "b.qsc"
    for out in (first, second):
        assert run("compile", path, "-p", "w4a8", "--seed", "7", "-o", out, *FAST).exit_code == 0
    assert _digest(first) == _digest(second)


def test_bundled_reference_model_compiles_and_evaluates(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run("compile", "-p", "w4a8", *FAST)
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "reference.qsc" / "manifest.json").read_text())
    assert manifest["source"] == {"kind": "bundled", "name": "qsc-reference-wan"}
    assert "blocks.3.ffn.net.2" in manifest["layers"]
    evaluated = run("eval", "reference.qsc", "-n", "2", "--json", "eval.json")
    assert evaluated.exit_code == 0, evaluated.output
    assert all(row["cosine"] > 0.9 for row in json.loads(Path("eval.json").read_text())["rows"])
