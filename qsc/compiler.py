"""``qsc.compile``: model source + calibration data -> compressed, re-exported program."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import sympy
import torch
from torch import fx

from qsc import backends

from . import metrics
from .calibration import CalibrationSet
from .config import CompileConfig, resolve_config
from .errors import ExportError, InputError
from .frontend import (
    DenoiserAdapter,
    ModelSource,
    ProgramAdapter,
    cast_inputs,
    check_inputs_fit,
    export_program,
    export_teacher,
    load_model,
    match_program_inputs,
    model_dtype,
    program_example,
    program_teacher,
)
from .graph import deepcopy, state_inputs
from .shapes import named_dims, reexport_dims
from .instruments import DumpIR, NumericCheck, Timing
from .models import synthetic_calibration
from .pipeline import PassContext, PassManager, Progress, no_progress
from .runtime import SSARRuntime


# Sampler trajectories recorded for the bundled model when no calibration file is given: every step
# of 4 calibration prompts, conditional and unconditional (160 forwards, ~15 s on a CPU core).
BUNDLED_CALIBRATION_PROMPTS = 4


@dataclass
class CompileResult:
    module: torch.nn.Module  # the compressed program, runnable with the calibration inputs
    program: torch.export.ExportedProgram
    config: CompileConfig
    source: dict[str, Any]
    example_inputs: dict[str, torch.Tensor]
    layers: dict[str, dict[str, Any]]  # per quantized layer: bits, group, bytes
    attention: dict[str, dict[str, Any]]  # per sparsified attention layer: tiles, density
    pass_log: list[dict[str, Any]]
    sizes: dict[str, int | float]
    metrics: dict[str, float]  # the compressed program vs FP on the first calibration sample (SSAR: uncorrected)
    seconds: float = 0.0
    refresh_program: torch.export.ExportedProgram | None = None  # SSAR's dense refresh (qsc.runtime)
    calibration: dict[str, Any] | None = None  # the samples select_calibration chose, where it ran
    dynamic_dims: dict[str, dict[int, str]] = field(default_factory=dict)  # input -> {dim: name} left symbolic
    dim_ranges: dict[str, tuple[int, int | None]] = field(default_factory=dict)  # name -> sizes the program takes
    constants: dict[str, Any] = field(default_factory=dict)  # non-tensor arguments compiled in (qsc.calibration)

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        from .artifact import save_artifact

        return save_artifact(self, path, overwrite=overwrite)


def compile(
    model: torch.nn.Module | str | Path | ModelSource | None = None,
    calibration: CalibrationSet | str | Path | None = None,
    *,
    preset: str | None = None,
    config: CompileConfig | Mapping[str, Any] | str | Path | None = None,
    dump_ir: str | Path | None = None,
    progress: Progress = no_progress,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    **load_options: Any,
) -> CompileResult:
    """Compress ``model`` (a module, a path understood by ``qsc.frontend.load_model``, or None
    for the bundled reference model) with the pipeline of ``preset`` / ``config``.

    ``config`` is a full ``CompileConfig``, a mapping of overrides to the preset, or a TOML/YAML
    file. ``calibration`` is a ``CalibrationSet`` or its file; without one, the bundled model is
    calibrated on its sampler's trajectories and known architectures on synthetic inputs.
    ``load_options`` go to ``load_model`` (``arch``, ``model_config``, ``trust_pickle``).
    Long passes (``learn_scales``) checkpoint into ``checkpoint_dir`` after each block; with
    ``resume``, they continue from its checkpoints (the same artifact as an uninterrupted run).
    """
    start = time.perf_counter()
    cfg = _resolve(preset, config)
    from qsc.passes import pipeline_for
    from qsc.passes.second_order_reparam import refresh_graph

    passes = pipeline_for(cfg)
    source = _as_source(model, load_options)
    teacher, calib, fp_out = _trace(source, _calibration(calibration, source, cfg),
                                    lambda gm: set().union(*(p.fixed_sizes(gm, cfg) for p in passes)))
    sample = calib.sample(0)

    ctx = PassContext(cfg, calib, teacher, progress=progress,
                      checkpoint_dir=None if checkpoint_dir is None else Path(checkpoint_dir), resume=resume)
    instruments = [Timing()]
    if dump_ir is not None:
        instruments.append(DumpIR(dump_ir))
    if cfg.check_numerics:
        instruments.append(NumericCheck(sample, fp_out))
    backends.enable(cfg.backend)

    gm = PassManager(passes, instruments).run(_working_copy(teacher), ctx)
    # State the program threads (SSAR's caches) is zero at the first step: sparse, uncorrected.
    state = state_inputs(gm, sample)
    program = _reexport(gm, {**sample, **state})
    module = program.module().requires_grad_(False)
    with torch.no_grad():
        out = module(**sample, **state)
    refresh_program = _reexport(refresh_graph(gm), sample) if "ssar_caches" in ctx.analyses else None
    dynamic_dims, dim_ranges = named_dims(program, sample)
    return CompileResult(
        module=module if refresh_program is None else SSARRuntime.of(program, refresh_program, cfg),
        program=program,
        refresh_program=refresh_program,
        dynamic_dims=dynamic_dims,
        dim_ranges=dim_ranges,
        config=cfg,
        source=source.description,
        example_inputs=sample,
        layers=ctx.analyses.get("quantized_layers", {}),
        attention=ctx.analyses.get("attention_layouts", {}),
        pass_log=ctx.pass_log,
        sizes=_sizes(teacher, module),
        metrics=output_metrics(out, fp_out),
        seconds=time.perf_counter() - start,
        calibration=ctx.analyses.get("calibration_records"),
        constants=calib.constants,
    )


def _trace(source: ModelSource, calib: CalibrationSet,
           fixed: Callable[[fx.GraphModule], set[sympy.Symbol]]) -> tuple[fx.GraphModule, CalibrationSet, torch.Tensor]:
    """The FP graph (with the sizes open that the model and the symbols ``fixed`` names leave
    open), the calibration set in the model's dtype and input order, and the FP output of its first
    sample (running the model once first turns a shape mismatch into a clear error)."""
    if source.program is not None:
        if calib.constants:
            raise InputError(f"the calibration data sets {list(calib.constants)}, which a .pt2 program fixed "
                             f"when it was exported: compile the model itself, or drop them")
        adapter = ProgramAdapter(source.program)
        inputs = cast_inputs(match_program_inputs(source.program, calib.inputs), model_dtype(adapter))
        calib = CalibrationSet(inputs, calib.outputs, calib.records)
        fp_out = check_inputs_fit(adapter, calib.sample(0))
        return program_teacher(adapter, source.program, calib.sample(0), fixed), calib, fp_out
    adapter = DenoiserAdapter(source.module, calib.constants).eval()
    inputs = cast_inputs(calib.inputs, model_dtype(adapter))
    calib = CalibrationSet(inputs, calib.outputs, calib.records, calib.constants)
    fp_out = check_inputs_fit(adapter, calib.sample(0))
    return export_teacher(adapter, calib.sample(0), fixed), calib, fp_out


def _working_copy(teacher: fx.GraphModule) -> fx.GraphModule:
    """The graph passes edit; the teacher (which shares the user's weights) stays untouched."""
    return deepcopy(teacher)


def output_metrics(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    return {"rel_l2": metrics.relative_l2(out, ref), "cosine": metrics.cosine(out, ref), "psnr": metrics.psnr(out, ref)}


def _resolve(preset: str | None, config: Any) -> CompileConfig:
    if isinstance(config, CompileConfig):
        return config
    if isinstance(config, (str, Path)):
        return resolve_config(preset, config_file=config)
    return resolve_config(preset, overrides=config)


def _as_source(model: Any, load_options: dict[str, Any]) -> ModelSource:
    if isinstance(model, ModelSource):
        return model
    if isinstance(model, torch.nn.Module):
        return ModelSource({"kind": "module", "class": type(model).__name__}, module=model.eval())
    return load_model(model, **load_options)


def _calibration(calibration: Any, source: ModelSource, cfg: CompileConfig) -> CalibrationSet:
    if isinstance(calibration, (str, Path)):
        return CalibrationSet.load(calibration)
    if isinstance(calibration, CalibrationSet):
        return calibration.validate()
    if source.description.get("kind") == "bundled":
        from .refmodel import reference_calibration

        return reference_calibration(num_prompts=BUNDLED_CALIBRATION_PROMPTS, seed=cfg.seed)
    if source.program is not None:
        example = program_example(source.program)
        if example is None:
            raise InputError("the .pt2 program was saved without example inputs: pass calibration data (--calib)")
        warnings.warn("no calibration data: calibrating on the .pt2 program's example inputs, one call; "
                      "--calib with calls recorded from the pipeline (qsc record) calibrates for what it runs",
                      stacklevel=3)
        return CalibrationSet.from_samples([example])
    return synthetic_calibration(source.module, cfg.calib_samples, cfg.seed)


def _reexport(gm: fx.GraphModule, sample: dict[str, torch.Tensor]) -> torch.export.ExportedProgram:
    """Export the compressed graph again: proves it is still a program, and is what gets saved. The
    dimensions the graph leaves symbolic stay symbolic."""
    try:
        return export_program(gm, sample, reexport_dims(gm))
    except Exception as e:
        raise ExportError(f"the compressed graph no longer exports (a qsc bug): {type(e).__name__}: {e}") from e


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers: the model's weights, as a user counts them."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _sizes(teacher: torch.nn.Module, compressed: torch.nn.Module) -> dict[str, int | float]:
    fp, packed = module_bytes(teacher), module_bytes(compressed)
    return {"fp_bytes": fp, "compressed_bytes": packed, "ratio": fp / max(packed, 1)}
