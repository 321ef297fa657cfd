"""An ONNX export run by onnxruntime, called like the artifact it came from.

``load(directory)`` gives a module whose forward takes the model's keyword inputs; for SSAR it is
``qsc.runtime.SSARRuntime`` over the two ONNX programs, so the caches are threaded between the
sessions by the same code that threads them between the PyTorch programs (the refresh's residuals
``D`` in, ``D``, ``U``, ``V`` of the second-order rule out to the step program's cache inputs).

Plugin nodes run here through onnxruntime-extensions: ``bind_plugins`` registers each plugin as a
Python custom op (domain ``ai.onnx.contrib``) that calls the reference backend, which is how the
plugin graph is tested without TensorRT.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
import onnxruntime
import torch

from qsc.backends import reference
from qsc.runtime import SSARRuntime

from . import plugins
from .onnx_export import assemble, read_index

CONTRIB_DOMAIN = "ai.onnx.contrib"  # the domain onnxruntime-extensions serves Python ops in


def session_options() -> onnxruntime.SessionOptions:
    options = onnxruntime.SessionOptions()
    # onnxruntime rewrites DequantizeLinear -> MatMul into MatMulNBits, which by default quantizes
    # the activations to int8 (accuracy level 4); level 1 keeps the product in float32, the
    # reference's arithmetic.
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return options


class OnnxProgram:
    """One exported program as a callable: keyword tensors in; the output, or (output, {name:
    tensor}) when the program returns more (the refresh program's residuals)."""

    def __init__(self, path: Path, signature: dict):
        self.path = path
        self.input_names = [v["name"] for v in signature["inputs"]]
        self.output_names = [v["name"] for v in signature["outputs"]]
        model = onnx.load(path)
        options = session_options()
        if any(node.domain == plugins.DOMAIN for node in model.graph.node):
            options.register_custom_ops_library(bind_plugins())
            model = _contrib_domain(model)
        self.session = onnxruntime.InferenceSession(model.SerializeToString(), options)

    def __call__(self, **inputs: torch.Tensor):
        feed = {name: inputs[name].detach().cpu().numpy() for name in self.input_names}
        out, *rest = (torch.from_numpy(a) for a in self.session.run(self.output_names, feed))
        return (out, dict(zip(self.output_names[1:], rest, strict=True))) if rest else out


def load(directory: str | Path) -> OnnxProgram | SSARRuntime:
    """The export in ``directory`` as a callable model (an ``SSARRuntime`` for SSAR)."""
    directory = Path(directory)
    index = read_index(directory)
    programs = {name: OnnxProgram(directory / name, signature) for name, signature in index["programs"].items()}
    return assemble(index, programs)


def _contrib_domain(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose plugin nodes are in onnxruntime-extensions' domain. Their float16 initializers
    (weight scales) become float32, exactly, since Python ops take no float16; the reference
    computes with them in float32 anyway."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    plugin_inputs = set()
    for node in model.graph.node:
        if node.domain == plugins.DOMAIN:
            node.domain = CONTRIB_DOMAIN
            plugin_inputs.update(node.input)
    for i, init in enumerate(model.graph.initializer):
        if init.name in plugin_inputs and init.data_type == onnx.TensorProto.FLOAT16:
            as_float = numpy_helper.to_array(init).astype(np.float32)
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(as_float, init.name))
    for opset in model.opset_import:
        if opset.domain == plugins.DOMAIN:
            opset.domain = CONTRIB_DOMAIN
    return model


def layout_of(tiles: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The bool tile layout a plugin's (key-tile indices, kept counts) stand for."""
    keep = torch.arange(tiles.shape[-1]) < counts[..., None]
    return torch.zeros_like(keep).scatter(-1, tiles.long(), keep)


_bound: str | None = None


def bind_plugins() -> str:
    """Register every plugin as an onnxruntime-extensions Python op calling the reference backend
    (once per process); returns the custom-op library to give onnxruntime. float32 models only:
    a Python op has one signature."""
    global _bound
    if _bound is None:
        _bound = _register()
    return _bound


def _register() -> str:
    from onnxruntime_extensions import PyCustomOpDef as T
    from onnxruntime_extensions import get_library_path, onnx_op

    common = dict(plugin_namespace=T.dt_string, aot=T.dt_int64)
    gemm = dict(w_bits=T.dt_int64, group_size=T.dt_int64, in_features=T.dt_int64, **common)
    attention = dict(scale=T.dt_float, **common)
    t = torch.from_numpy

    def weight(codes: np.ndarray, w_bits: int) -> torch.Tensor:
        return t(codes.view(np.uint8) if w_bits == 4 else codes)  # 4-bit: packed bytes

    @onnx_op(op_type="quantize_per_token", inputs=[T.dt_float, T.dt_float], outputs=[T.dt_int8, T.dt_float],
             attrs=dict(bits=T.dt_int64, clip=T.dt_float, **common))
    def _(x, in_scale, bits, clip, **_):
        codes, scales = reference.quantize_activations(t(x), t(in_scale), bits, clip)
        return codes.numpy(), scales.numpy()

    @onnx_op(op_type="quant_gemm", inputs=[T.dt_int8, T.dt_float, T.dt_int8, T.dt_float, T.dt_float],
             outputs=[T.dt_float], attrs=gemm)
    def _(codes, scales, qweight, w_scale, bias, w_bits, group_size, in_features, **_):
        return reference.quant_gemm(t(codes), t(scales), weight(qweight, w_bits), t(w_scale), t(bias), w_bits,
                                    group_size, in_features, torch.float32).numpy()

    @onnx_op(op_type="weight_only_linear", inputs=[T.dt_float, T.dt_float, T.dt_int8, T.dt_float, T.dt_float],
             outputs=[T.dt_float], attrs=gemm)
    def _(x, in_scale, qweight, w_scale, bias, w_bits, group_size, in_features, **_):
        return reference.quant_linear(t(x), weight(qweight, w_bits), t(w_scale), t(bias), t(in_scale), w_bits, 16,
                                      group_size, in_features, 1.0).numpy()

    tiles = [T.dt_float, T.dt_float, T.dt_float, T.dt_int32, T.dt_int32]

    @onnx_op(op_type="sparse_attention", inputs=tiles, outputs=[T.dt_float], attrs=attention)
    def _(q, k, v, idx, counts, scale, **_):
        return reference.sparse_attention(t(q), t(k), t(v), layout_of(t(idx), t(counts)), None, scale).numpy()

    @onnx_op(op_type="ssar_attention", inputs=tiles + [T.dt_float] * 3, outputs=[T.dt_float], attrs=attention)
    def _(q, k, v, idx, counts, r, u, w, scale, **_):
        return reference.sparse_attention(t(q), t(k), t(v), layout_of(t(idx), t(counts)), t(r), scale, False,
                                          t(u), t(w)).numpy()

    @onnx_op(op_type="refresh_attention", inputs=tiles, outputs=[T.dt_float, T.dt_float], attrs=attention)
    def _(q, k, v, idx, counts, scale, **_):
        dense, residual = reference.refresh_attention(t(q), t(k), t(v), layout_of(t(idx), t(counts)), scale)
        return dense.numpy(), residual.numpy()

    return get_library_path()
