"""``qsc record`` on a saved diffusers pipeline, then compile and eval from the command line, from
another directory than the one the artifact was compiled in."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from qsc.calibration import CalibrationSet
from qsc.cli import cli

from tiny_pipelines import wan_pipeline


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipes") / "wan-pipeline"
    wan_pipeline().save_pretrained(path)
    return path


def _run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result


def test_record_compile_eval_from_the_command_line(pipeline_dir, tmp_path, monkeypatch):
    calib = tmp_path / "calib.safetensors"
    result = _run("record", pipeline_dir, "--prompt", "a red circle", "--prompt", "a blue square",
                  "--steps", "2", "--guidance", "5", "--height", "64", "--width", "64", "--frames", "5", "-o", calib)
    assert result.exit_code == 0, result.output
    assert "recorded 8 calls of WanTransformer3DModel (4 cond, 4 uncond)" in result.output
    assert "\n\n" not in result.output
    records = CalibrationSet.load(calib).records
    assert {(r["prompt"], r["step"], r["branch"]) for r in records} == {
        (p, s, b) for p in ("a red circle", "a blue square") for s in (0, 1) for b in ("cond", "uncond")}

    monkeypatch.chdir(tmp_path)
    artifact = tmp_path / "wan.qsc"
    result = _run("compile", pipeline_dir, "--calib", calib, "-p", "w4a8",
                  "-s", "calib_samples=4", "-o", artifact)
    assert result.exit_code == 0, result.output
    assert json.loads((artifact / "manifest.json").read_text())["source"]["path"] == str(pipeline_dir / "transformer")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = _run("eval", artifact, "--data", calib, "-n", "2")
    assert result.exit_code == 0, result.output
    result = _run("inspect", artifact)
    assert result.exit_code == 0 and "hidden_states" in result.output and "[batch, 4, frames, height, width]" in result.output


def test_record_of_a_directory_without_a_pipeline_is_one_line(tmp_path):
    result = _run("record", tmp_path, "--prompt", "a red circle", "-o", tmp_path / "c.safetensors")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: {tmp_path} is not a diffusers pipeline directory (no model_index.json)"]


def test_eval_names_model_when_the_source_is_gone(pipeline_dir, tmp_path):
    from qsc.artifact import MANIFEST

    calib = tmp_path / "calib.safetensors"
    assert _run("record", pipeline_dir, "--prompt", "a red circle", "--steps", "1", "--height", "64", "--width", "64",
                "--frames", "5", "-o", calib).exit_code == 0
    artifact = tmp_path / "a.qsc"
    assert _run("compile", pipeline_dir, "--calib", calib, "-o", artifact).exit_code == 0
    manifest = json.loads((artifact / MANIFEST).read_text())
    manifest["source"]["path"] = str(tmp_path / "moved")
    (artifact / MANIFEST).write_text(json.dumps(manifest))
    result = _run("eval", artifact, "--data", calib)
    assert result.exit_code == 2 and "name it with --model" in result.output
    assert len(result.output.strip().splitlines()) == 1
