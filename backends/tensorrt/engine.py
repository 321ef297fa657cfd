"""TensorRT engines from the plugin graph: the export, the build, and a runner.

``export_engine`` writes, atomically into one directory (default ``ARTIFACT/tensorrt``), the
plugin graph (``program.onnx``, ``refresh.onnx`` with SSAR, ``onnx.json``), the plugins' kernels
compiled ahead of time (``plugins/``, ``aot_plugins``) and, where TensorRT and a GPU are there,
the engines (``model.engine``, with SSAR also ``refresh.engine``). Elsewhere the engine step is
skipped and ``skipped`` in ``engine.json`` says why; the ONNX and PTX are complete, and
``build_engines`` on a machine with TensorRT and a GPU finishes the job from them.

An engine is built from a strongly typed network (the ONNX types are the engine's types: no
precision is chosen by TensorRT), with an optimization profile over the program's open dimensions
(``profile_shapes``, from the ranges in ``onnx.json``). The runner binds a program's inputs and
outputs by name, as ``onnx.json`` lists them; ``load_artifact`` is ``qsc.load(path,
backend="tensorrt")``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Mapping

import sympy
import torch

from qsc.errors import ConfigError, ExportError, InputError
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


def export_engine(artifact: str | Path, output: str | Path, *, overwrite: bool = False,
                  max_sizes: Mapping[str, int] | None = None) -> dict:
    """The plugin graph of ``artifact``, its plugins' PTX and, where possible, its engines, in the
    directory ``output``; returns ``engine.json`` (``engines`` written, or why ``skipped``).
    ``max_sizes``: as for ``build_engines``."""
    from . import aot_plugins, onnx_export

    models, index = onnx_export.export_models(artifact, use_plugins=True)
    for signature in index["programs"].values():  # a wrong max_sizes fails here, not at a later build
        profile_shapes(signature, max_sizes)
    with atomic_directory(output, overwrite=overwrite) as tmp:
        onnx_export.write(tmp, models, index)
        aot_plugins.write_package(tmp / PACKAGE, models.values())
        reason = missing()
        if reason:
            _write_record(tmp, [], reason)
        else:
            build_engines(tmp, max_sizes)
        record = read_record(tmp)
    return record


def build_engines(directory: str | Path, max_sizes: Mapping[str, int] | None = None) -> list[str]:
    """Build an engine for each ONNX program of an export (``plugins/`` beside them) and record
    them in ``engine.json``. ``max_sizes``: the greatest size of open dimensions by name
    (``profile_shapes``), e.g. ``{"batch": 4, "text": 512}``."""
    require_tensorrt()
    from . import onnx_export, trt_plugins

    directory = Path(directory)
    index = onnx_export.read_index(directory)
    trt_plugins.register(directory / PACKAGE)
    built = []
    for onnx_name, signature in index["programs"].items():
        shapes = profile_shapes(signature, max_sizes)
        (directory / ENGINES[onnx_name]).write_bytes(build_engine(directory / onnx_name, shapes))
        built.append(ENGINES[onnx_name])
    _write_record(directory, built, None)
    return built


def read_record(directory: str | Path) -> dict:
    """``engine.json`` of an export: the engines written, or why the engine step was ``skipped``."""
    return json.loads((Path(directory) / INDEX).read_text())


def _write_record(directory: Path, engines: list[str], skipped: str | None) -> None:
    record = {"engines": engines, "skipped": skipped}
    (directory / INDEX).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


Profile = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # (min, opt, max) shape


def profile_shapes(signature: Mapping[str, Any], max_sizes: Mapping[str, int] | None = None) -> dict[str, Profile]:
    """The optimization profile of one program from its ``onnx.json`` entry: the (min, opt, max)
    shape of each input with an open dimension. An open dimension runs from its least size to its
    greatest, tuned at the size the export was traced at. TensorRT needs a greatest size, and
    memory is planned for it: an unbounded dimension (the batch, the text length) gets its traced
    size unless ``max_sizes`` names one; ``max_sizes`` may also narrow a bounded dimension."""
    dims, max_sizes = signature["dims"], dict(max_sizes or {})
    unknown = sorted(set(max_sizes) - set(dims))
    if unknown:
        raise ConfigError(f"max_sizes names {unknown}: the open dimensions of this program are {sorted(dims)}")
    bounds = {}
    for name, d in dims.items():
        most = max_sizes.get(name, d["opt"] if d["max"] is None else d["max"])
        if most < d["min"] or (d["max"] is not None and most > d["max"]):
            raise ConfigError(f"max size {most} of {name!r} is outside its range {d['min']}..{d['max'] or ''}")
        bounds[name] = (d["min"], min(d["opt"], most), most)
    symbols = {name: sympy.Symbol(name) for name in dims}

    def size(dim: int | str, k: int) -> int:  # a size, a name or an expression of names (2*height)
        if isinstance(dim, int):
            return dim
        return int(sympy.sympify(dim, locals=symbols).subs({symbols[n]: b[k] for n, b in bounds.items()}))

    return {v["name"]: tuple(tuple(size(d, k) for d in v["shape"]) for k in range(3))
            for v in signature["inputs"] if not all(isinstance(d, int) for d in v["shape"])}


def build_engine(onnx_path: Path, shapes: Mapping[str, Profile]) -> bytes:
    """The serialized engine of one ONNX program (qsc's plugins registered); ``shapes``: the
    optimization profile (``profile_shapes``)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    if shapes:  # a program with open dimensions
        profile = builder.create_optimization_profile()
        for name, (least, opt, most) in shapes.items():
            profile.set_shape(name, least, opt, most)
        config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise ExportError(f"TensorRT could not build an engine from {onnx_path.name} (see its log above)")
    return bytes(engine)


def load_artifact(path: Path, manifest: Mapping[str, Any]):
    """The engines of the artifact ``path`` (in ``path/tensorrt``, ``qsc export --format tensorrt``)
    as a callable model (``load``), for ``qsc.load(path, backend="tensorrt")``; one error that says
    why where they cannot run: no export, engines skipped at export (and why), engines from another
    compile of the artifact, no TensorRT or no GPU here."""
    from . import onnx_export

    directory = default_output(path)
    build = (f"build them where TensorRT and an NVIDIA GPU are: qsc export {path} --format tensorrt --force "
             f"(or qsc.backends.tensorrt.engine.build_engines('{directory}'))")
    if not (directory / INDEX).is_file():
        raise ConfigError(f"{path} has no TensorRT engines (no {directory / INDEX}); {build}")
    skipped = read_record(directory)["skipped"]
    if skipped:
        raise ConfigError(f"{path} has no TensorRT engines: the export skipped them ({skipped.rstrip('.')}); {build}")
    if onnx_export.read_index(directory)["artifact_files"] != manifest["files"]:
        raise ConfigError(f"the engines in {directory} were built from another compile of {path}; {build}")
    require_tensorrt()
    return load(directory)


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
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise InputError(f"input '{name}': shape {list(tensor.shape)} is outside the engine's optimization "
                                 f"profile: build the engines with larger max_sizes (engine.build_engines)")
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
