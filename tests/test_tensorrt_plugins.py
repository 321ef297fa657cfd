"""TensorRT's half of deployment, as far as a machine without a GPU or TensorRT can check it.

* Every tactic of every plugin compiles to PTX for sm_90 that takes TensorRT's argument list
  (Triton's scratch pointers dropped) and assembles with the ptxas Triton uses for sm_90.
* The packaged launch (grid and scalar arguments as expressions of the input shapes) gives the
  grid the Triton backend launches the same kernel with, for several shapes and every tactic.
* The AOT kernels, called with TensorRT's argument list under ``TRITON_INTERPRET=1``, equal the
  reference ops (float32: the interpreter has no bf16).
* Without TensorRT or a GPU, registering the plugins raises the one error that says what is missing;
  the tests that need them skip saying so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("onnx_ir")

from qsc.backends import reference  # noqa: E402
from qsc.backends.tensorrt import aot_plugins, engine, plugins  # noqa: E402
from qsc.errors import ConfigError  # noqa: E402
from qsc.quant import quantize_packed  # noqa: E402

# The plugins of a bf16 deployment (W4A8 per channel, W8A16 per group, SSAR attention at rank 16)
# at shapes with ragged edges: (input dtypes, input shapes, attributes).
BF16 = "bfloat16"
_Q, _KV, _TILES = [1, 12, 1000, 128], [1, 12, 900, 128], [[12, 8, 15], [12, 8]]
DEPLOYMENT = {
    "quantize_per_token": ([BF16, "float"], [[2, 300, 1536], [1536]], dict(bits=8, clip=1.0)),
    "quant_gemm": (["int8", "float", "int8", "float16", BF16], [[2, 300, 1536], [2, 300, 1], [256, 768], [256], [256]],
                   dict(w_bits=4, group_size=0, in_features=1536)),
    "weight_only_linear": ([BF16, "float", "int8", "float16", BF16],
                           [[2, 300, 1536], [1536], [256, 1536], [256, 12], [256]],
                           dict(w_bits=8, group_size=128, in_features=1536)),
    "sparse_attention": ([BF16] * 3 + ["int32"] * 2, [_Q, _KV, _KV, *_TILES], dict(scale=0.088)),
    "ssar_attention": ([BF16] * 3 + ["int32"] * 2 + [BF16] * 3,
                       [_Q, _KV, _KV, *_TILES, _Q, [1, 12, 1000, 16], [1, 12, 16, 128]], dict(scale=0.088)),
    "refresh_attention": ([BF16] * 3 + ["int32"] * 2, [_Q, _KV, _KV, *_TILES], dict(scale=0.088)),
}

_COMPILE_ALL = textwrap.dedent("""
    import json, subprocess, sys
    from concurrent.futures import ProcessPoolExecutor
    from triton.backends.nvidia.compiler import get_ptxas
    from qsc.backends.tensorrt import aot_plugins

    def build(job):
        name, (dtypes, shapes, attrs), tactic = job
        spec = aot_plugins.specialize(name, dtypes, shapes, attrs)
        config = aot_plugins.tactics(spec, 90)[tactic - 1]
        compiled = aot_plugins.compile_kernel(spec, config, 90)
        n_params = len(spec.pointers) + len(spec.scalars)
        path = f"{sys.argv[1]}/{spec.key}.t{tactic}.ptx"
        with open(path, "w") as f:
            f.write(aot_plugins.tensorrt_ptx(compiled, n_params))
        done = subprocess.run([get_ptxas(90).path, "--gpu-name=sm_90a", path, "-o", path + ".cubin"],
                              capture_output=True, text=True)
        entry = aot_plugins.package_entry(tactic, config, compiled, path)
        return dict(plugin=name, tactic=tactic, n_params=n_params, ptxas=done.returncode, error=done.stderr[-800:],
                    entry=entry, ptx=open(path).read())

    cases = json.loads(sys.argv[2])
    jobs = [(name, case, t) for name, case in cases.items()
            for t in range(1, len(aot_plugins.tactics(aot_plugins.specialize(name, *case), 90)) + 1)]
    with ProcessPoolExecutor(2) as pool:
        for result in pool.map(build, jobs):
            print(json.dumps(result), flush=True)
""")


@pytest.mark.slow
def test_every_tactic_of_every_plugin_assembles_for_sm90_with_tensorrts_arguments(tmp_path):
    # The interpreter replaces compiled kernels: compile in a process without it.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_ALL, str(tmp_path), json.dumps(DEPLOYMENT)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    results = [json.loads(line) for line in done.stdout.splitlines()]
    expected = {name: len(aot_plugins.tactics(aot_plugins.specialize(name, *case), 90))
                for name, case in DEPLOYMENT.items()}
    assert {name: sum(r["plugin"] == name for r in results) for name in DEPLOYMENT} == expected
    for r in results:
        assert r["ptxas"] == 0, r["error"]
        entry = aot_plugins._ENTRY.search(r["ptx"])
        assert entry.group(1) == r["entry"]["kernel"]
        assert len(entry.group(2).split(",")) == r["n_params"], r["plugin"]  # TensorRT's argument count
        assert r["entry"]["shared_bytes"] <= 232448 and r["entry"]["threads"] in (128, 256)


def _captured_grid(monkeypatch, jitted, call) -> tuple:
    """The grid the Triton backend launches ``jitted`` with in ``call()`` (the launch is not run)."""
    seen = {}

    def run(*args, grid, **meta):
        seen["grid"] = tuple(grid(meta) if callable(grid) else grid)

    monkeypatch.setattr(jitted, "run", run)
    call()
    return seen["grid"]


def _padded(grid) -> tuple:
    return (*grid, 1, 1)[:3]


@pytest.mark.parametrize("m, n, k", [(1, 96, 64), (300, 256, 1536), (4097, 8960, 1536)])
@pytest.mark.parametrize("arch", [90, 80])
def test_packaged_gemm_grid_is_the_triton_backends(monkeypatch, m, n, k, arch):
    from qsc.kernels import quant_gemm

    dtypes, _, attrs = DEPLOYMENT["quant_gemm"]
    shapes = [[m, k], [m, 1], [n, k // 2], [n], [n]]
    spec = aot_plugins.specialize("quant_gemm", dtypes, shapes, attrs)
    a, scales = torch.zeros(m, k, dtype=torch.int8), torch.ones(m)
    weight = torch.zeros(n, k // 2, dtype=torch.uint8)
    for config in aot_plugins.tactics(spec, arch):
        packaged, scalars = aot_plugins.launch({"constants": config.kwargs}, _as_dict(spec),
                                              dict(zip(plugins.SIGNATURES["quant_gemm"].inputs, shapes)))
        backend = _captured_grid(monkeypatch, quant_gemm._quant_gemm_kernel.fn, lambda: quant_gemm.quant_gemm(
            a, scales, None, weight, torch.ones(n), None, 4, 0, k, torch.float32, config=config, unpack_first=False))
        assert tuple(packaged) == _padded(backend), config
        assert scalars == [m, n, k, k // 2, 1]


@pytest.mark.parametrize("b, h, lq, lk", [(1, 2, 100, 70), (2, 12, 1000, 900)])
@pytest.mark.parametrize("arch", [90, 80])
def test_packaged_attention_grid_is_the_triton_backends(monkeypatch, b, h, lq, lk, arch):
    from qsc.kernels import sparse_attention

    q, kv = torch.zeros(b, h, lq, 16), torch.zeros(b, h, lk, 16)
    layout = torch.ones(h, *reference.block_layout_shape(lq, lk), dtype=torch.bool)
    shapes = [list(q.shape), list(kv.shape), list(kv.shape), list(layout.shape), list(layout.shape[:-1])]
    spec = aot_plugins.specialize("sparse_attention", ["float"] * 3 + ["int32"] * 2, shapes, dict(scale=0.25))
    for config in aot_plugins.tactics(spec, arch):
        packaged, _ = aot_plugins.launch({"constants": config.kwargs}, _as_dict(spec),
                                         dict(zip(plugins.SIGNATURES["sparse_attention"].inputs, shapes)))
        backend = _captured_grid(monkeypatch, sparse_attention._sparse_attention_kernel.fn, lambda: sparse_attention.sparse_attention(
            q, kv, kv, layout, None, None, reference.SPARSE_BLOCK_M, reference.SPARSE_BLOCK_N, config=config))
        assert tuple(packaged) == _padded(backend), config


def _as_dict(spec: aot_plugins.Specialization) -> dict:
    return {"grid": spec.grid, "scalars": spec.scalars}


def _run_aot(name: str, inputs: list[torch.Tensor], attrs: dict) -> list[torch.Tensor]:
    """The plugin's AOT kernel under the interpreter, called as TensorRT calls it: inputs, scalar
    arguments, outputs (allocated per the plugin's shape function), grid from the package."""
    from qsc.backends.tensorrt.aot_kernels import KERNELS

    shapes = [list(t.shape) for t in inputs]
    dtypes = [{torch.float32: "float", torch.int8: "int8", torch.int32: "int32"}[t.dtype] for t in inputs]
    spec = aot_plugins.specialize(name, dtypes, shapes, attrs)
    config = aot_plugins.tactics(spec, 80)[0]
    grid, scalars = aot_plugins.launch({"constants": config.kwargs}, _as_dict(spec),
                                       dict(zip(plugins.SIGNATURES[name].inputs, shapes)))
    kinds = {"int8": torch.int8, "float32": torch.float32}
    outputs = [torch.empty(shape, dtype=kinds[kind] if isinstance(kind, str) else inputs[kind].dtype)
               for kind, shape in plugins.output_specs(name, shapes)]
    KERNELS[name][tuple(grid)](*inputs, *scalars, *outputs, **dict(spec.constexprs), **config.kwargs,
                               num_warps=config.num_warps)
    return outputs


@pytest.mark.parametrize("w_bits, group_size", [(4, 0), (8, 32)])
def test_aot_linear_kernels_equal_the_reference(w_bits, group_size):
    g = torch.Generator().manual_seed(w_bits + group_size)
    x, in_scale = torch.randn(2, 5, 64, generator=g), torch.rand(64, generator=g) + 0.5
    bias = torch.randn(48, generator=g)
    qweight, w_scale = quantize_packed(torch.randn(48, 64, generator=g), w_bits, group_size)
    weight = qweight.view(torch.int8)
    geometry = dict(w_bits=w_bits, group_size=group_size, in_features=64)

    codes, scales = _run_aot("quantize_per_token", [x, in_scale], dict(bits=8, clip=0.9))
    ref_codes, ref_scales = reference.quantize_activations(x, in_scale, 8, 0.9)
    assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales)

    (y,) = _run_aot("quant_gemm", [codes, scales, weight, w_scale.float(), bias], geometry)
    expected = reference.quant_gemm(codes, scales, qweight, w_scale, bias, w_bits, group_size, 64, torch.float32)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)

    (y,) = _run_aot("weight_only_linear", [x, in_scale, weight, w_scale.float(), bias], geometry)
    expected = reference.quant_linear(x, qweight, w_scale, bias, in_scale, w_bits, 16, group_size, 64, 1.0)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)


def test_aot_attention_kernels_equal_the_reference():
    from qsc.kernels.sparse_attention import layout_to_indices

    g = torch.Generator().manual_seed(3)
    b, h, lq, lk, d, rank = 2, 2, 150, 100, 16, 4
    q, k, v = (torch.randn(b, h, n, d, generator=g) for n in (lq, lk, lk))
    layout = torch.rand(h, *reference.block_layout_shape(lq, lk), generator=g) < 0.6
    layout[0, 0] = False  # a query tile that attends to nothing
    tiles, counts = layout_to_indices(layout)
    r, u, w = torch.randn(b, h, lq, d, generator=g), torch.randn(b, h, lq, rank, generator=g), torch.randn(b, h, rank, d)
    attrs = dict(scale=0.3)

    (out,) = _run_aot("sparse_attention", [q, k, v, tiles, counts], attrs)
    torch.testing.assert_close(out, reference.sparse_attention(q, k, v, layout, None, 0.3), rtol=1e-4, atol=1e-4)
    (out,) = _run_aot("ssar_attention", [q, k, v, tiles, counts, r, u, w], attrs)
    expected = reference.sparse_attention(q, k, v, layout, r, 0.3, False, u, w)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    dense, residual = _run_aot("refresh_attention", [q, k, v, tiles, counts], attrs)
    ref_dense, ref_residual = reference.refresh_attention(q, k, v, layout, 0.3)
    torch.testing.assert_close(dense, ref_dense, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(residual, ref_residual, rtol=1e-4, atol=1e-4)


def test_evaluate_takes_only_launch_expressions():
    shapes = {"q": [2, 12, 1000, 128]}
    assert aot_plugins.evaluate("cdiv(q[2], BLOCK_M) * q[0] - 1", shapes, {"BLOCK_M": 128}) == 15
    with pytest.raises(aot_plugins.ExportError, match="unsupported launch expression"):
        aot_plugins.evaluate("__import__('os')", shapes)


def test_registration_without_tensorrt_raises_the_one_line_error(tmp_path):
    from qsc.backends.tensorrt import trt_plugins

    reason = engine.missing()
    if reason is None:
        pytest.skip("TensorRT and a GPU are here: registration is exercised by the engine build")
    with pytest.raises(ConfigError) as raised:
        trt_plugins.register(tmp_path)
    assert str(raised.value) == reason and "\n" not in reason

