"""Frontend: from a model source on disk to an FX graph (``torch.export``, ATen dialect).

Model sources, by what the path is:

* nothing: the bundled reference model;
* ``*.pt2``: a ``torch.export`` program (already a graph);
* a directory with ``config.json`` (a diffusers model) or ``model_index.json`` (a diffusers
  pipeline, whose ``transformer/`` is taken), loaded offline;
* ``*.safetensors``: a state dict, together with an architecture name and its config;
* ``*.pt``/``*.pth``/``*.bin``: a state dict (loaded with ``weights_only=True``), or a pickled whole
  ``nn.Module``, which executes code from the file and is therefore refused unless the caller
  passes ``trust_pickle=True`` (``--trust-pickle``).
"""

from __future__ import annotations

import inspect
import json
import pickle
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import sympy
import torch
from torch import fx

from .errors import ExportError, InputError
from .models import architecture_class
from .shapes import (
    DynamicDims,
    batch_dims,
    batched_example,
    export_dynamic_shapes,
    graph_dynamic_dims,
    open_dims,
    reexport_dims,
)

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl")


@dataclass
class ModelSource:
    """A loaded model: an eager module, or an exported program when the source was one."""

    description: dict[str, Any]  # how to load it again (kind, path, arch): goes in the manifest
    module: torch.nn.Module | None = None
    program: torch.export.ExportedProgram | None = None


def load_model(
    path: str | Path | None = None,
    *,
    arch: str | None = None,
    model_config: str | Path | None = None,
    trust_pickle: bool = False,
) -> ModelSource:
    if path is None:
        return bundled_model()
    path = Path(path)
    if not path.exists():
        raise InputError(f"model not found: {path}")
    if path.is_dir():
        return _load_diffusers_dir(path)
    if path.suffix == ".pt2":
        return _load_program(path)
    if path.suffix == ".safetensors":
        return _load_state_dict_model(path, _read_safetensors(path), arch, model_config)
    if path.suffix in PICKLE_SUFFIXES:
        return _load_torch_file(path, arch, model_config, trust_pickle)
    raise InputError(
        f"{path}: not a model qsc can read. Expected a .pt2 program, a diffusers model directory, "
        f"a .safetensors state dict (with --arch and --model-config), or a pickled module "
        f"({', '.join(PICKLE_SUFFIXES)}, with --trust-pickle)"
    )


def bundled_model() -> ModelSource:
    """The project's reference model: a small Wan2.1-class video DiT trained by qsc (qsc.refmodel)."""
    from .refmodel import load_reference_model

    return ModelSource({"kind": "bundled", "name": "qsc-reference-wan"}, module=load_reference_model())


def _load_program(path: Path) -> ModelSource:
    try:
        program = torch.export.load(path)
    except Exception as e:
        raise InputError(f"{path}: not a readable torch.export program ({type(e).__name__}: {e})") from None
    return ModelSource({"kind": "pt2", "path": str(path.resolve())}, program=program)


def program_input_names(program: torch.export.ExportedProgram) -> list[str]:
    """The names of ``program``'s inputs in call order: its positional parameters' names (as the
    exported forward declared them), then its keyword inputs."""
    spec = program.call_spec.in_spec  # a TreeSpec of (args, kwargs)
    args_spec, kwargs_spec = spec.child(0), spec.child(1)
    if args_spec.num_leaves + kwargs_spec.num_leaves != len(program.graph_signature.user_inputs):
        raise InputError(
            "the .pt2 program takes non-tensor inputs (Python numbers or strings fixed at export): "
            "export it again with tensor inputs only"
        )
    return [*program.graph_signature.user_inputs[: args_spec.num_leaves], *kwargs_spec.context]


def match_program_inputs(
    program: torch.export.ExportedProgram, inputs: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``inputs`` under ``program``'s input names, in its call order: by name where the names are
    the same, else by position (a calibration file keeps the forward's order), with a warning."""
    names = program_input_names(program)
    if set(names) == set(inputs):
        return {name: inputs[name] for name in names}
    if len(names) != len(inputs):
        raise InputError(f"the program takes inputs {names}, the calibration data has {list(inputs)}")
    warnings.warn(f"calibration inputs {list(inputs)} matched by position to the program's inputs {names}",
                  stacklevel=2)
    return dict(zip(names, inputs.values()))


def program_example(program: torch.export.ExportedProgram) -> dict[str, torch.Tensor] | None:
    """The example inputs saved with ``program``, under its input names; None if it has none."""
    if program.example_inputs is None:
        return None
    args, kwargs = program.example_inputs
    return dict(zip(program_input_names(program), [*args, *kwargs.values()]))


class ProgramAdapter(torch.nn.Module):
    """An exported program called with keyword inputs, however it was exported: its positional
    inputs are passed by position, in the order ``program_input_names`` gives them names."""

    def __init__(self, program: torch.export.ExportedProgram):
        super().__init__()
        self.model = program.module()  # attribute ``model``, as DenoiserAdapter's: the same layer paths
        self._positional = program_input_names(program)[: program.call_spec.in_spec.child(0).num_leaves]

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        args = [inputs.pop(name) for name in self._positional]
        out = self.model(*args, **inputs)
        return out[0] if isinstance(out, (tuple, list)) else out


def program_teacher(adapter: ProgramAdapter, program: torch.export.ExportedProgram, sample: dict[str, torch.Tensor],
                    fixed: Callable[[fx.GraphModule], set[sympy.Symbol]] | None = None) -> fx.GraphModule:
    """The FP graph of a .pt2 program, as a keyword program. A program exported for fixed shapes
    keeps them (it has no size to open, and says so in its guards); one with open sizes is opened
    as ``export_teacher`` does."""
    if graph_dynamic_dims(program.graph_module):
        return export_teacher(adapter, sample, fixed)
    return export_graph(adapter, sample)


def _load_diffusers_dir(path: Path) -> ModelSource:
    if (path / "model_index.json").is_file():
        if not (path / "transformer" / "config.json").is_file():
            raise InputError(f"{path} is a diffusers pipeline without a transformer/ model")
        path = path / "transformer"
    config_file = path / "config.json"
    if not config_file.is_file():
        raise InputError(f"{path}: a model directory needs a diffusers config.json")
    try:
        class_name = json.loads(config_file.read_text()).get("_class_name")
    except json.JSONDecodeError as e:
        raise InputError(f"{config_file}: not valid JSON: {e}") from None
    cls = architecture_class(class_name)
    try:
        model = cls.from_pretrained(path, local_files_only=True, use_safetensors=True)
    except Exception as e:
        raise InputError(f"{path}: could not load the {class_name} weights: {e}") from None
    return ModelSource({"kind": "diffusers", "path": str(path.resolve()), "arch": class_name}, module=model.eval())


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{path}: corrupt or not a safetensors file ({e})") from None


def _load_state_dict_model(
    path: Path, state: dict[str, torch.Tensor], arch: str | None, model_config: str | Path | None
) -> ModelSource:
    if arch is None or model_config is None:
        raise InputError(
            f"{path} holds only weights: name the architecture and its config, "
            f"e.g. --arch WanTransformer3DModel --model-config config.json"
        )
    cls = architecture_class(arch)
    try:
        config = json.loads(Path(model_config).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"model config {model_config}: {e}") from None
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        model = cls.from_config(config)
    except Exception as e:
        raise InputError(f"model config {model_config} does not fit {arch}: {e}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise InputError(f"{path}: weights do not match {arch} with config {model_config}: {e}") from None
    desc = {"kind": "state_dict", "path": str(path.resolve()), "arch": arch,
            "model_config": str(Path(model_config).resolve())}
    return ModelSource(desc, module=model.eval())


def _load_torch_file(path: Path, arch: str | None, model_config: Any, trust_pickle: bool) -> ModelSource:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not trust_pickle:
            raise InputError(
                f"{path} is a pickled Python object, and loading it would run code from the file. "
                f"If you trust its origin, pass --trust-pickle; better, save the model as a "
                f"torch.export program (.pt2) or a safetensors state dict."
            ) from None
        obj = _unpickle_trusted(path)
    except Exception as e:
        raise InputError(f"{path}: not a readable PyTorch file ({type(e).__name__}: {e})") from None
    if isinstance(obj, torch.nn.Module):
        return ModelSource({"kind": "pickle", "path": str(path.resolve())}, module=obj.eval())
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _load_state_dict_model(path, obj, arch, model_config)
    raise InputError(f"{path}: holds a {type(obj).__name__}, not a model or a state dict")


def _unpickle_trusted(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise InputError(f"{path}: could not unpickle ({type(e).__name__}: {e})") from None


class DenoiserAdapter(torch.nn.Module):
    """Calls a model with keyword inputs and returns its output tensor.

    diffusers transformers return a dataclass or a tuple unless asked otherwise; graphs and
    artifacts are simpler with one tensor out. The wrapped model sits at attribute ``model``,
    which is why parameter targets in the graph start with ``model.``. ``constants`` are the
    non-tensor arguments every call passes (LTX-Video's ``num_frames``, ``height``, ``width``):
    the export specializes the program to them.
    """

    def __init__(self, model: torch.nn.Module, constants: dict[str, Any] | None = None):
        super().__init__()
        self.model = model
        self.constants = dict(constants or {})
        self._return_dict_arg = "return_dict" in inspect.signature(model.forward).parameters

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        inputs = {**inputs, **self.constants}
        out = self.model(**inputs, return_dict=False) if self._return_dict_arg else self.model(**inputs)
        return out[0] if isinstance(out, (tuple, list)) else out

    def unset_arguments(self, given: Iterable[str]) -> list[str]:
        """The model's forward parameters typed as something other than a tensor (options aside)
        that neither ``given`` nor the constants set."""
        return [
            p.name for p in inspect.signature(self.model.forward).parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.annotation is not p.empty
            and "Tensor" not in str(p.annotation) and not is_option(p.name)
            and p.name not in given and p.name not in self.constants
        ]


def is_option(argument: str) -> bool:
    """Forward arguments that choose how a model answers, not what it computes: a compiled
    artifact has one answer (``qsc.dropin`` serves these)."""
    return argument == "return_dict" or argument.endswith("kwargs")


def model_dtype(module: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def cast_inputs(sample: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating inputs to the model's dtype; integer inputs (timesteps) as they are."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sample.items()}


def check_inputs_fit(module: torch.nn.Module, sample: dict[str, torch.Tensor]) -> torch.Tensor:
    """Run the eager model once; a failure means the calibration data does not fit the model."""
    try:
        with torch.no_grad():
            return module(**sample)
    except (RuntimeError, TypeError, ValueError, IndexError) as e:
        shapes = ", ".join(f"{k}={tuple(v.shape)}" for k, v in sample.items())
        unset = module.unset_arguments(sample) if isinstance(module, DenoiserAdapter) else []
        hint = (
            f"; the model also takes {', '.join(unset)}, which are not tensors and which the calibration "
            f"data does not set: record it from the pipeline (qsc record), or give them as "
            f"CalibrationSet(..., constants={{...}})" if unset else ""
        )
        raise InputError(
            f"the calibration inputs do not fit the model ({shapes}): {type(e).__name__}: {_first_line(e)}{hint}"
        ) from None


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else ""


_EXPORT_HINTS = (
    ("data-dependent", "the model branches on a tensor's value (e.g. `if x.sum() > 0` or `.item()`): "
                       "use torch.cond, or compute the condition from shapes or Python constants"),
    ("Unsupported", "the model uses a Python construct torch.export cannot trace: move it out of forward()"),
    ("not a Tensor", "forward() must return tensors (or tuples/dataclasses of tensors)"),
    ("Dynamic control flow", "rewrite the branch with torch.cond"),
)


def export_graph(
    module: torch.nn.Module, sample: dict[str, torch.Tensor], dynamic: DynamicDims | None = None
) -> fx.GraphModule:
    """Non-strict ``torch.export`` with ``sample`` as example keyword inputs; the unlifted graph.
    ``dynamic`` names the dimensions left open (``qsc.shapes``; exported from a batch-2 example)."""
    return export_program(module, sample, dynamic).module()


def export_teacher(module: torch.nn.Module, sample: dict[str, torch.Tensor],
                   fixed: Callable[[fx.GraphModule], set[sympy.Symbol]] | None = None) -> fx.GraphModule:
    """The FP graph compiles start from: with every size open that the model leaves open
    (``qsc.shapes``) but those depending on the symbols ``fixed(graph)`` names (the token count
    of sparse attention), exported again as calibrated. Where the model cannot have a symbolic
    batch, for the calibration batch (with a warning saying why), which batched calls are split into."""
    try:
        gm = _export_open(module, sample)
    except ExportError as e:
        static = export_graph(module, sample)  # a model that cannot be traced at all fails here
        reason = str(e).splitlines()[0].removeprefix("torch.export could not trace the model")
        warnings.warn(f"the model does not export with a symbolic batch{reason}; the artifact takes batch 1 "
                      f"and splits batched calls", stacklevel=2)
        return static
    dynamic = reexport_dims(gm, fixed(gm)) if fixed else None
    return gm if dynamic is None or dynamic == reexport_dims(gm) else export_graph(module, sample, dynamic)


def _export_open(module: torch.nn.Module, sample: dict[str, torch.Tensor]) -> fx.GraphModule:
    """Every size open; where the model fails with that, the batch alone (its error if that fails too)."""
    try:
        return export_graph(module, sample, open_dims(sample))
    except ExportError:
        return export_graph(module, sample, batch_dims(sample))


def export_program(
    module: torch.nn.Module, sample: dict[str, torch.Tensor], dynamic: DynamicDims | None = None
) -> torch.export.ExportedProgram:
    """``export_graph``'s program."""
    if dynamic:
        module, sample = _keyword_forward(module, list(sample)), batched_example(sample, dynamic)
    dynamic_shapes = export_dynamic_shapes(dynamic, list(sample)) if dynamic else None
    try:
        with torch.no_grad():
            return torch.export.export(module, (), sample, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as e:
        message = f"{type(e).__name__}: {_first_line(e)}"
        frame = _innermost_model_frame(e)
        hint = next((h for key, h in _EXPORT_HINTS if key in f"{type(e).__name__} {e}"), None)
        raise ExportError(
            f"torch.export could not trace the model{f' at {frame}' if frame else ''}: {message}"
            + (f"\n  fix: {hint}" if hint else "")
        ) from e


def _keyword_forward(module: torch.nn.Module, names: list[str]) -> torch.nn.Module:
    """``module`` whose forward declares ``names`` as keyword-only parameters: torch.export takes a
    dynamic shape per input only by parameter name, which a ``forward(**inputs)`` does not have."""
    parameters = inspect.signature(module.forward).parameters.values()
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return module
    forward = type(module).forward

    def named_forward(**inputs: torch.Tensor) -> Any:
        return forward(module, **inputs)

    named_forward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in names]
    )
    module.forward = named_forward  # this instance only; the class keeps its forward
    return module


def _innermost_model_frame(e: BaseException) -> str | None:
    """The deepest traceback frame outside torch itself: the user's construct that failed."""
    frames = [
        f for f in traceback.extract_tb(e.__traceback__)
        if "/torch/" not in f.filename and "/qsc/" not in f.filename.replace("\\", "/")
    ]
    return f"{frames[-1].filename}:{frames[-1].lineno} ({frames[-1].line})" if frames else None


def reload_model(description: dict[str, Any], *, trust_pickle: bool = False) -> ModelSource:
    """Load the FP model an artifact was compiled from, as its manifest describes it (absolute
    paths, so from any directory)."""
    kind = description.get("kind")
    if kind == "bundled":
        return bundled_model()
    if "path" in description and not Path(description["path"]).exists():
        raise InputError(
            f"the FP model the artifact was compiled from, {description['path']}, is not there: "
            f"name it with --model"
        )
    if kind in ("pt2", "diffusers", "pickle"):
        return load_model(description["path"], trust_pickle=trust_pickle)
    if kind == "state_dict":
        return load_model(description["path"], arch=description["arch"], model_config=description["model_config"])
    raise InputError(
        f"the artifact was compiled from an in-memory {description.get('class', 'model')}: "
        f"name the FP model to compare against with --model"
    )
