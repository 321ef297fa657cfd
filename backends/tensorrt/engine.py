"""TensorRT engines from the plugin graph: the export, the build, and a runner.

``export_engine`` writes, atomically into one directory (default ``ARTIFACT/tensorrt``), the
plugin graph (``program.onnx``, ``refresh.onnx`` with SSAR, ``onnx.json``), the plugins' kernels
compiled ahead of time (``plugins/``, ``aot_plugins``) and, where TensorRT and a GPU are there,
the engines (``model.engine``, with SSAR also ``refresh.engine``). Elsewhere the engine step is
skipped and ``skipped`` in ``engine.json`` says why; the ONNX and PTX are complete, and
``build_engines`` on a machine with TensorRT and a GPU finishes the job from them.

An engine is built from a strongly typed network (the ONNX types are the engine's types: no
precision is chosen by TensorRT), with an optimization profile where the graph has dynamic
dimensions. The runner binds a program's inputs and outputs by name, as ``onnx.json`` lists them.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from qsc.errors import ConfigError, ExportError
from qsc.fsutil import atomic_directory

PACKAGE = "plugins"
INDEX = "engine.json"
ENGINES = {"program.onnx": "model.engine", "refresh.onnx": "refresh.engine"}


def default_output(artifact: str | Path) -> Path:
    return Path(artifact) / "tensorrt"


def require_tensorrt() -> None:
    """Raise the one error that says what this machine lacks for TensorRT engines."""
    if importlib.util.find_spec("tensorrt") is None:
        raise ConfigError("TensorRT engines need the 'tensorrt' package (pip install 'qsc[tensorrt]') "
                          "and an NVIDIA GPU; 'qsc export --format onnx' works without them")
    if not torch.cuda.is_available():
        raise ConfigError("TensorRT engines need an NVIDIA GPU (torch.cuda.is_available() is False here); "
                          "'qsc export --format onnx' works without one")


def missing() -> str | None:
    """What this machine lacks for building engines, or None."""
    try:
        require_tensorrt()
    except ConfigError as e:
        return str(e)
    return None


def export_engine(artifact: str | Path, output: str | Path, *, overwrite: bool = False) -> dict:
    """The plugin graph of ``artifact``, its plugins' PTX and, where possible, its engines, in the
    directory ``output``; returns ``engine.json`` (``engines`` written, or why ``skipped``)."""
    from . import aot_plugins, onnx_export

    models, index = onnx_export.export_models(artifact, use_plugins=True)
    with atomic_directory(output, overwrite=overwrite) as tmp:
        onnx_export.write(tmp, models, index)
        aot_plugins.write_package(tmp / PACKAGE, models.values())
        reason = missing()
        record = {"engines": [] if reason else build_engines(tmp), "skipped": reason}
        (tmp / INDEX).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def build_engines(directory: str | Path) -> list[str]:
    """Build an engine for each ONNX program of an export (``plugins/`` beside them)."""
    require_tensorrt()
    from . import onnx_export, trt_plugins

    directory = Path(directory)
    index = onnx_export.read_index(directory)
    trt_plugins.register(directory / PACKAGE)
    built = []
    for onnx_name, signature in index["programs"].items():
        sizes = {v["name"]: v["shape"] for v in signature["inputs"]}
        (directory / ENGINES[onnx_name]).write_bytes(build_engine(directory / onnx_name, sizes))
        built.append(ENGINES[onnx_name])
    return built


def build_engine(onnx_path: Path, sizes: dict[str, list]) -> bytes:
    """The serialized engine of one ONNX program (qsc's plugins registered); ``sizes``: each
    input's shape at export, what a dynamic dimension is tuned for."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    profile = _profile(builder, network, sizes)
    if profile is not None:
        config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise ExportError(f"TensorRT could not build an engine from {onnx_path.name} (see its log above)")
    return bytes(engine)


def _profile(builder, network, sizes: dict[str, list]):
    """An optimization profile over the dynamic dimensions (-1) of the network's inputs: from 1 up
    to, and tuned at, the size of the export. None when every dimension is static."""
    profile, dynamic = builder.create_optimization_profile(), False
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tuple(tensor.shape)
        if -1 not in shape:
            continue
        exported = sizes.get(tensor.name, [])
        if not all(isinstance(d, int) for d in exported):
            raise ExportError(f"input {tensor.name!r} has a dynamic dimension and no exported size to tune for")
        dynamic = True
        profile.set_shape(tensor.name, tuple(1 if d == -1 else d for d in shape), tuple(exported), tuple(exported))
    return profile if dynamic else None


def load(directory: str | Path):
    """The engines of an export in ``directory`` as a callable model, like ``ort.load`` (an
    ``SSARRuntime`` threading the caches between the two engines for SSAR)."""
    from . import onnx_export

    directory = Path(directory)
    index = onnx_export.read_index(directory)
    missing_engines = [ENGINES[n] for n in index["programs"] if not (directory / ENGINES[n]).exists()]
    if missing_engines:
        raise ConfigError(f"{directory} has no {', '.join(missing_engines)}: build with "
                          "qsc.backends.tensorrt.engine.build_engines on a machine with TensorRT and a GPU")
    programs = {name: EngineProgram(directory / ENGINES[name], signature)
                for name, signature in index["programs"].items()}
    return onnx_export.assemble(index, programs)


class EngineProgram:
    """One engine, called like ``ort.OnnxProgram``: keyword tensors in; the output, or (output,
    {name: tensor}) when the program returns more (the refresh program's residuals)."""

    def __init__(self, engine_path: Path, signature: dict):
        require_tensorrt()
        import tensorrt as trt

        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
        self.context = self.engine.create_execution_context()
        self.input_names = [v["name"] for v in signature["inputs"]]
        self.output_names = [v["name"] for v in signature["outputs"]]

    def __call__(self, **inputs: torch.Tensor):
        kept = []  # the engine reads these after this loop: they must stay alive until it has run
        for name in self.input_names:
            tensor = inputs[name].cuda().contiguous()
            kept.append(tensor)
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = []
        for name in self.output_names:
            dtype = _TORCH_DTYPES[self.engine.get_tensor_dtype(name).name]
            outputs.append(torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=dtype, device="cuda"))
            self.context.set_tensor_address(name, outputs[-1].data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise ExportError("TensorRT failed to run the engine")
        stream.synchronize()
        out, *rest = outputs
        return (out, dict(zip(self.output_names[1:], rest, strict=True))) if rest else out


_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
                 "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool}
