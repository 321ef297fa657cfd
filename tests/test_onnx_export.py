"""ONNX export: the plugin-free graph run by onnxruntime against the PyTorch artifact (reference
backend), also at sizes other than the exported ones, the plugin graph with its plugin nodes bound
to the reference ops in Python, SSAR's caches threaded across steps through the exported programs,
``qsc export``, the engine profiles made from the open dimensions, and ``qsc.load(...,
backend="tensorrt")``: its errors here, its run where TensorRT and a GPU are.

Tolerance. Outside the ``qsc::`` ops, onnxruntime and PyTorch round float32 differently (fused
layer norms, GEMM summation order). A linear then sees inputs a few ulps apart, and where a token's
value sits on a rounding boundary of per-token quantization its code moves by one step. So with
quantized activations the outputs agree to ``REL_L2`` (relative L2 over the output), and with float
activations (W8A16: no rounding boundaries to cross) to float32 rounding, ``REL_L2_FLOAT``.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from rich.console import Console

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

import qsc  # noqa: E402
from qsc.backends.tensorrt import engine, onnx_export, ort, plugins  # noqa: E402
from qsc.calibration import CalibrationSet  # noqa: E402
from qsc.cli import cli  # noqa: E402
from qsc.errors import ConfigError  # noqa: E402
from qsc.metrics import relative_l2  # noqa: E402
from qsc.models import synthetic_calibration  # noqa: E402
from qsc.report import layer_table  # noqa: E402

from tiny_models import VideoAttention, temporal_and_spatial_video, tiny_model  # noqa: E402

REL_L2 = 2e-3
REL_L2_FLOAT = 1e-6
STANDARD_DOMAINS = {"", "ai.onnx"}


# W4A8 with weight groups of 32 input channels: blocked DequantizeLinear of INT4 weights.
GROUP_SIZE = {"w4a8": 32}


@functools.cache
def _artifact(tmp_root, model: str, preset: str):
    source = tiny_model(model) if model != "reference" else None
    calib = synthetic_calibration(source, 2, seed=0) if source is not None else None
    config = {"calib_samples": 2, "check_numerics": False, "group_size": GROUP_SIZE.get(preset, 0), "scale_epochs": 1}
    result = qsc.compile(source, calib, preset=preset, config=config)
    return result.save(tmp_root / f"{model}-{preset}.qsc")


@functools.cache
def _export(artifact, use_plugins: bool):
    return onnx_export.export_artifact(artifact, use_plugins=use_plugins)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("artifacts")
    return lambda model, preset: _artifact(root, model, preset)


def _inputs(program, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random model inputs (no SSAR caches) in the program's order, timestep 500."""
    gm = getattr(program, "step_program", program)
    g = torch.Generator().manual_seed(seed)
    inputs = {k: v for k, v in onnx_export.example_inputs(gm).items() if not k.startswith("ssar_")}
    return {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else torch.full_like(v, 500)
            for k, v in inputs.items()}


def _compare(artifact_dir, export_dir, tolerance: float) -> float:
    expected = qsc.load(artifact_dir, backend="reference").program
    inputs = _inputs(expected)
    with torch.no_grad():
        reference = expected(**inputs)
    error = relative_l2(ort.load(export_dir)(**inputs), reference)
    assert error <= tolerance, f"onnxruntime vs PyTorch: relative L2 {error:.2e} > {tolerance:.0e}"
    return error


def _checked(export_dir) -> list:
    models = [onnx.load(p) for p in sorted(export_dir.glob("*.onnx"))]
    for model in models:
        onnx.checker.check_model(model, full_check=True)
        assert {o.domain: o.version for o in model.opset_import}.get("", 0) >= onnx_export.OPSET
    return models


@pytest.mark.parametrize("model", ["wan", "cogvideox", "hunyuan"])
@pytest.mark.parametrize("preset", ["w8a8", "w4a8"])
def test_plugin_free_graph_matches_pytorch(artifact, model, preset):
    path = artifact(model, preset)
    exported = _export(path, use_plugins=False)
    (graph,) = _checked(exported)
    assert {n.domain for n in graph.graph.node} <= STANDARD_DOMAINS
    _compare(path, exported, REL_L2)


def test_plugin_free_graph_equals_pytorch_to_rounding_with_float_activations(artifact):
    path = artifact("wan", "w8a16")
    _compare(path, _export(path, use_plugins=False), REL_L2_FLOAT)


def test_reference_model(artifact):
    path = artifact("reference", "w4a8")
    _compare(path, _export(path, use_plugins=False), REL_L2)


def test_heads_in_position_major_order_export_as_standard_operators(tmp_path):
    samples = [{"video": temporal_and_spatial_video(seed=s)} for s in (0, 1)]
    result = qsc.compile(VideoAttention(), CalibrationSet.from_samples(samples), preset="w8a16",
                         config={"density": 0.5, "calib_samples": 2, "reorder_tokens": True})
    assert [info["frames"] for info in result.attention.values()] == [[4, 1]]  # head 0 reordered
    path = result.save(tmp_path / "video.qsc")
    exported = _export(path, use_plugins=False)
    (graph,) = _checked(exported)
    assert {"Where", "Transpose"} <= {n.op_type for n in graph.graph.node}
    _compare(path, exported, REL_L2_FLOAT)


def test_rotated_inputs_export_as_standard_matmuls(tmp_path):
    model = tiny_model("wan")
    result = qsc.compile(model, synthetic_calibration(model, 2, seed=0), preset="w4a8",
                         config={"calib_samples": 2, "check_numerics": False, "rotate_inputs": True})
    path = result.save(tmp_path / "rotated.qsc")
    # The manifest says which layers take a rotated input, and in blocks of how many channels.
    layers = qsc.load(path, backend="reference").manifest["layers"]
    blocks = {name: info["rotation_block"] for name, info in layers.items() if "rotation_block" in info}
    assert blocks["blocks.0.attn1.to_q"] == 64 and blocks["blocks.1.ffn.net.2"] == 128 and len(blocks) == 2 * 10
    console = Console(width=200, record=True)
    console.print(layer_table(layers))
    assert {"+rot64", "+rot128"} <= set(console.export_text().split())
    exported = _export(path, use_plugins=False)
    (graph,) = _checked(exported)
    assert sum(n.op_type == "MatMul" for n in graph.graph.node) >= 2 * 7  # the rotations of 2 blocks
    _compare(path, exported, REL_L2)


def _other_size(batch: int, frames: int, height: int, width: int, text: int, seed: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, 4, frames, height, width, generator=g),
            "timestep": torch.linspace(800, 200, batch),
            "encoder_hidden_states": torch.randn(batch, text, 32, generator=g)}


def test_open_dimensions_stay_open_and_onnxruntime_runs_another_batch_resolution_and_text_length(artifact):
    path = artifact("wan", "w4a8")
    exported = _export(path, use_plugins=False)
    _checked(exported)
    manifest = qsc.load(path, backend="reference").manifest
    (program,) = json.loads((exported / onnx_export.INDEX).read_text())["programs"].values()
    assert {v["name"]: v["shape"] for v in program["inputs"]} == {n: e["shape"] for n, e in manifest["inputs"].items()}
    assert {n: [d["min"], d["max"]] for n, d in program["dims"].items()} == manifest["dims"]
    assert {n: d["opt"] for n, d in program["dims"].items()} == dict(batch=2, frames=2, height=16, width=16, text=512)
    inputs = _other_size(batch=3, frames=3, height=24, width=16, text=77)  # compiled: 2 x 16 x 16, 512 tokens
    with torch.no_grad():
        reference = qsc.load(path, backend="reference")(**inputs)
    error = relative_l2(ort.load(exported)(**inputs), reference)
    assert reference.shape == inputs["hidden_states"].shape and error <= REL_L2, error


def test_a_sparse_program_keeps_its_token_count_static_and_batch_and_text_open(artifact):
    path = artifact("wan", "w4a8-sparse")
    exported = _export(path, use_plugins=False)
    manifest = qsc.load(path, backend="reference").manifest
    programs = json.loads((exported / onnx_export.INDEX).read_text())["programs"]
    for program in programs.values():
        assert program["dims"].keys() == manifest["dims"].keys() == {"batch", "text"}
        shapes = {v["name"]: v["shape"] for v in [*program["inputs"], *program["outputs"]]}
        assert shapes["hidden_states"] == manifest["inputs"]["hidden_states"]["shape"] == ["batch", 4, 2, 16, 16]
        caches = [shape for name, shape in shapes.items() if name.startswith("ssar_")]
        assert caches and all(shape[0] == "batch" and all(isinstance(d, int) for d in shape[1:]) for shape in caches)


def test_engine_profiles_come_from_the_open_dimensions(artifact):
    (program,) = json.loads((_export(artifact("wan", "w4a8"), use_plugins=False) / onnx_export.INDEX)
                            .read_text())["programs"].values()
    profile = engine.profile_shapes(program)
    # least, traced and greatest sizes; the unbounded batch and text up to their traced sizes
    assert profile["hidden_states"] == ((1, 4, 2, 2, 2), (2, 4, 2, 16, 16), (2, 4, 32, 65, 65))
    assert profile["encoder_hidden_states"] == ((1, 2, 32), (2, 512, 32), (2, 512, 32))
    assert profile["timestep"] == ((1,), (2,), (2,))
    wider = engine.profile_shapes(program, {"batch": 4, "text": 1024, "height": 8})
    assert wider["hidden_states"] == ((1, 4, 2, 2, 2), (2, 4, 2, 8, 16), (4, 4, 32, 8, 65))
    assert wider["encoder_hidden_states"][2] == (4, 1024, 32)
    derived = {"inputs": [{"name": "x", "shape": ["batch", "2*((height//2))"]}],
               "dims": {"batch": program["dims"]["batch"], "height": program["dims"]["height"]}}
    assert engine.profile_shapes(derived)["x"] == ((1, 2), (2, 16), (2, 64))
    with pytest.raises(ConfigError, match=r"max_sizes names \['frame'\]"):
        engine.profile_shapes(program, {"frame": 8})
    with pytest.raises(ConfigError, match="max size 66 of 'width' is outside its range 2..65"):
        engine.profile_shapes(program, {"width": 66})


def _engine_artifact(artifact, tmp_path, engines: list[str], skipped: str | None):
    """A copy of the tiny W4A8 Wan with its plugin graph in ``tensorrt/`` and ``engine.json`` as
    ``qsc export --format tensorrt`` writes it (the PTX left out)."""
    path = shutil.copytree(artifact("wan", "w4a8"), tmp_path / "wan.qsc")
    directory = shutil.copytree(_export(artifact("wan", "w4a8"), use_plugins=True), engine.default_output(path))
    (directory / engine.INDEX).write_text(json.dumps({"engines": engines, "skipped": skipped}))
    for name in engines:
        (directory / name).write_bytes(b"")
    return path, directory


def test_loading_engines_that_were_never_built_says_why_and_how_to_build_them(artifact, tmp_path):
    with pytest.raises(ConfigError, match=r"has no TensorRT engines \(no .*engine.json\); build them where "
                                          r"TensorRT and an NVIDIA GPU are: qsc export .* --format tensorrt"):
        qsc.load(artifact("wan", "w8a8"), backend="tensorrt")
    reason = "TensorRT engines need the 'tensorrt' package"
    path, _ = _engine_artifact(artifact, tmp_path, [], reason)
    with pytest.raises(ConfigError) as raised:
        qsc.load(path, backend="tensorrt")
    message = str(raised.value)
    assert f"the export skipped them ({reason})" in message and "build_engines(" in message and "\n" not in message


@pytest.mark.skipif(engine.missing() is None, reason="TensorRT and a GPU are here: the engines run in the test below")
def test_loading_built_engines_without_tensorrt_or_a_gpu_raises_the_one_error(artifact, tmp_path):
    path, directory = _engine_artifact(artifact, tmp_path, ["model.engine"], None)
    with pytest.raises(ConfigError) as raised:
        qsc.load(path, backend="tensorrt")
    assert str(raised.value) == engine.missing()
    index = json.loads((directory / onnx_export.INDEX).read_text())
    index["artifact_files"]["weights.safetensors"] = "0" * 64  # exported from an earlier compile
    (directory / onnx_export.INDEX).write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="were built from another compile of"):
        qsc.load(path, backend="tensorrt")


@pytest.mark.slow
@pytest.mark.skipif(engine.missing() is not None, reason=f"needs what this machine lacks: {engine.missing()}")
def test_tensorrt_engines_run_as_the_artifact_at_the_exported_and_another_size(artifact, tmp_path):
    path = shutil.copytree(artifact("wan", "w4a8"), tmp_path / "wan.qsc")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiling kernels needs Triton
    done = subprocess.run([sys.executable, "-c", "from qsc.cli import main; main()", "export", str(path),
                           "--format", "tensorrt", "--max-size", "batch=3", "--max-size", "text=512"],
                          env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-2000:]
    engines, expected = qsc.load(path, backend="tensorrt"), qsc.load(path, backend="reference")
    for inputs in (_other_size(2, 2, 16, 16, 512), _other_size(3, 3, 24, 16, 77)):
        with torch.no_grad():
            error = relative_l2(engines(**inputs).cpu(), expected(**inputs))
        assert error <= REL_L2, error


def test_int4_weights_are_int4_initializers_read_by_blocked_dequantization(artifact):
    path = artifact("wan", "w4a8")
    (graph,) = _checked(_export(path, use_plugins=False))
    initializers = {i.name: i for i in graph.graph.initializer}
    dequantized = [n for n in graph.graph.node if n.op_type == "DequantizeLinear"]
    int4 = [n for n in dequantized if initializers[n.input[0]].data_type == onnx.TensorProto.INT4]
    layers = qsc.load(path, backend="reference").manifest["layers"].values()
    assert len(int4) == sum(layer["w_bits"] == 4 for layer in layers)
    assert all(onnx.helper.get_attribute_value(a) == GROUP_SIZE["w4a8"]
               for n in int4 for a in n.attribute if a.name == "block_size")
    assert not [i for i in initializers.values() if i.data_type == onnx.TensorProto.UINT8]


def _ssar_along_a_trajectory(path, export_dir, steps: int = 7) -> list[float]:
    """Euler steps of the model: both runtimes refresh and correct on the same schedule; the
    ONNX one threads the caches between its two ONNX programs."""
    expected, exported = qsc.load(path, backend="reference").program, ort.load(export_dir)
    inputs = _inputs(expected)
    errors, sparse_steps = [], 0
    with torch.no_grad():
        for t in torch.linspace(900, 300, steps).round().long():
            inputs["timestep"] = torch.full_like(inputs["timestep"], t)
            reference = expected(**inputs)
            errors.append(relative_l2(exported(**inputs), reference))
            if not expected.schedule.refreshes(expected.step_index):
                sparse_steps += 1
                caches = exported.caches()
                assert caches.keys() == expected.caches().keys()
                assert any(c.abs().sum() > 0 for c in caches.values()), "the step ran without a correction"
            inputs["hidden_states"] = inputs["hidden_states"] - 0.1 * reference
    assert sparse_steps >= steps // 2 and exported.step_index == steps - 1
    assert max(errors) <= REL_L2, errors
    return errors


def test_ssar_artifact_over_several_steps_with_caches_threaded(artifact):
    path = artifact("wan", "w4a8-sparse")
    exported = _export(path, use_plugins=False)
    step, refresh = _checked(exported)  # program.onnx, refresh.onnx
    cache_inputs = {i.name for i in step.graph.input if i.name.startswith("ssar_")}
    residual_outputs = {o.name for o in refresh.graph.output} - {"output"}
    assert residual_outputs and {f"{r}{s}" for r in residual_outputs for s in ("", "_u", "_v")} == cache_inputs
    _ssar_along_a_trajectory(path, exported)


def test_plugin_graph_binds_plugins_and_matches_pytorch(artifact):
    path = artifact("wan", "w4a8")
    exported = _export(path, use_plugins=True)
    (graph,) = _checked(exported)
    nodes = [n for n in graph.graph.node if n.domain == plugins.DOMAIN]
    assert {n.op_type for n in nodes} == {"quantize_per_token", "quant_gemm", "weight_only_linear"}
    for node in nodes:
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attributes["plugin_namespace"] == b"qsc" and attributes["aot"] == 1
        assert len(node.input) == len(plugins.SIGNATURES[node.op_type].inputs)
    assert not [n for n in graph.graph.node if n.op_type == "DequantizeLinear"]
    _compare(path, exported, REL_L2)


def test_plugin_graph_of_an_ssar_artifact_over_several_steps(artifact):
    path = artifact("wan", "w4a8-sparse")
    exported = _export(path, use_plugins=True)
    step, refresh = _checked(exported)
    assert "ssar_attention" in {n.op_type for n in step.graph.node}
    assert "refresh_attention" in {n.op_type for n in refresh.graph.node}
    _ssar_along_a_trajectory(path, exported)


def test_cli_export_writes_the_same_bytes_as_the_api(artifact, tmp_path):
    from click.testing import CliRunner

    path = artifact("wan", "w8a8")
    out = tmp_path / "wan-onnx"
    run = lambda: CliRunner().invoke(cli, ["export", str(path), "--no-plugins", "-o", str(out)])  # noqa: E731
    assert run().exit_code == 0
    for name in ("program.onnx", onnx_export.INDEX):  # deterministic: the same bytes from another run
        assert (out / name).read_bytes() == (_export(path, use_plugins=False) / name).read_bytes(), name
    refused = run()
    assert refused.exit_code == 2 and "--force" in refused.output


def test_cli_max_size_is_dim_equals_size_and_only_for_engines(artifact):
    from click.testing import CliRunner

    path = str(artifact("wan", "w8a8"))
    onnx_only = CliRunner().invoke(cli, ["export", path, "--max-size", "batch=4"])
    assert onnx_only.exit_code == 2 and "use it with --format tensorrt" in onnx_only.output
    malformed = CliRunner().invoke(cli, ["export", path, "--format", "tensorrt", "--max-size", "batch"])
    assert malformed.exit_code == 2 and "'batch' is not DIM=N" in malformed.output


@pytest.mark.slow
def test_compile_for_tensorrt_writes_the_plugin_graph_and_ptx_and_says_why_the_engine_was_skipped(tmp_path):
    from qsc.backends.tensorrt import aot_plugins

    reason = engine.missing()
    if reason is None:
        pytest.skip("TensorRT and a GPU are here: the engine build is exercised on the GPU machine")
    tiny_model("wan").save_pretrained(tmp_path / "wan")
    out = tmp_path / "wan.qsc"
    # Compiling kernels needs Triton without its interpreter (which this process runs under).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", "from qsc.cli import main; main()", "compile", str(tmp_path / "wan"), "-p", "w8a8",
         "--backend", "tensorrt", "-s", "calib_samples=2", "-o", str(out)],
        env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"engine step skipped: {reason}" in " ".join(done.stderr.split())
    export = engine.default_output(out)
    assert (export / "program.onnx").is_file() and engine.read_record(export) == {"engines": [], "skipped": reason}
    package = aot_plugins.read_package(export / "plugins")
    assert {s["plugin"] for s in package["specializations"].values()} >= {"quantize_per_token", "quant_gemm"}
    for spec in package["specializations"].values():
        for arch in aot_plugins.ARCHS:
            assert spec["kernels"][str(arch)], spec["plugin"]
            assert all((export / "plugins" / k["ptx"]).is_file() for k in spec["kernels"][str(arch)])
    with pytest.raises(ConfigError, match="the export skipped them"):
        qsc.load(out, backend="tensorrt")


@pytest.mark.parametrize("b, lq, lk, d, k, n", [(1, 128, 128, 32, 64, 96), (2, 200, 72, 16, 48, 32)])
def test_plugin_shape_functions_agree_with_the_reference_ops(b, lq, lk, d, k, n):
    from qsc.backends import reference
    from qsc.quant import quantize_packed

    g = torch.Generator().manual_seed(0)
    x, bias = torch.randn(b, lq, k, generator=g), torch.randn(n, generator=g)
    qweight, w_scale = quantize_packed(torch.randn(n, k, generator=g), 4)
    codes, scales = reference.quantize_activations(x, None, 8, 1.0)
    q, kk, v = torch.randn(b, 2, lq, d, generator=g), torch.randn(b, 2, lk, d, generator=g), torch.randn(b, 2, lk, d)
    layout = torch.rand(2, *reference.block_layout_shape(lq, lk), generator=g) < 0.5
    r, u, w = torch.randn(b, 2, lq, d), torch.randn(b, 2, lq, 4), torch.randn(b, 2, 4, d)
    cases = {
        "quantize_per_token": ((x, torch.ones(k)), (codes, scales)),
        "quant_gemm": ((codes, scales, qweight, w_scale, bias),
                       (reference.quant_gemm(codes, scales, qweight, w_scale, bias, 4, 0, k, torch.float32),)),
        "weight_only_linear": ((x, torch.ones(k), qweight, w_scale, bias),
                               (reference.quant_linear(x, qweight, w_scale, bias, None, 4, 16, 0, k, 1.0),)),
        "sparse_attention": ((q, kk, v, layout, layout), (reference.sparse_attention(q, kk, v, layout, None, None),)),
        "ssar_attention": ((q, kk, v, layout, layout, r, u, w),
                           (reference.sparse_attention(q, kk, v, layout, r, None, False, u, w),)),
        "refresh_attention": ((q, kk, v, layout, layout), reference.refresh_attention(q, kk, v, layout, None)),
    }
    assert cases.keys() == plugins.SIGNATURES.keys()
    for name, (inputs, outputs) in cases.items():
        specs = plugins.output_specs(name, [tuple(t.shape) for t in inputs])
        dtype = lambda kind: getattr(torch, kind) if isinstance(kind, str) else inputs[kind].dtype  # noqa: E731
        assert [(dtype(kind), shape) for kind, shape in specs] == [(o.dtype, tuple(o.shape)) for o in outputs], name
