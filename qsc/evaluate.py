"""``qsc eval``: how far a compressed artifact's outputs are from the FP model's, on held-out inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .artifact import load, read_manifest
from .calibration import CalibrationSet, constants_from_json
from .compiler import output_metrics
from .frontend import (
    DenoiserAdapter,
    ModelSource,
    ProgramAdapter,
    cast_inputs,
    load_model,
    match_program_inputs,
    model_dtype,
    reload_model,
)
from .models import synthetic_calibration
from .runtime import SSARRuntime

HELD_OUT_SEED_OFFSET = 1  # synthetic eval inputs use seed + 1, never the calibration seed


def evaluate(
    artifact: str | Path,
    *,
    model: str | Path | None = None,
    data: str | Path | None = None,
    samples: int = 4,
    trust_pickle: bool = False,
) -> list[dict[str, Any]]:
    """Per-sample relative L2, cosine and PSNR of the artifact against the FP model, on ``samples``
    held-out calls evenly spread over the held-out set.

    An SSAR artifact runs its schedule along the held-out trajectory (the bundled model's sampler,
    or the recorded calls of ``data``, in order): every call gets the FP trajectory's input, and
    the sparse steps are corrected by what the refreshes before them measured, as in a sampling
    loop. Synthetic inputs are independent samples, not a trajectory: there it is measured by its
    sparse step without correction (what the compile report shows too). Its quality over whole
    generated videos is what ``benchmarks/quality.py`` measures."""
    manifest = read_manifest(artifact)
    compressed = load(artifact)
    source = load_model(model, trust_pickle=trust_pickle) if model else reload_model(manifest["source"], trust_pickle=trust_pickle)
    fp = _fp_callable(source, manifest.get("constants"))
    held_out, is_trajectory = _held_out(data, source, samples, manifest["config"]["seed"] + HELD_OUT_SEED_OFFSET)
    if source.program is not None:  # named as the program names its inputs, as the artifact's are
        held_out = CalibrationSet(match_program_inputs(source.program, held_out.inputs), held_out.outputs)
    picks = held_out.spread(samples)
    runtime = compressed.program if isinstance(compressed.program, SSARRuntime) else None
    along_trajectory = runtime is not None and is_trajectory
    dtype = model_dtype(fp)
    rows = []
    with torch.no_grad():
        for i in range(len(held_out)) if along_trajectory else picks:
            sample = cast_inputs(held_out.sample(i), dtype)
            if runtime is not None and not along_trajectory:
                out = runtime.uncorrected(**sample)  # no trajectory to run the schedule along
            else:
                out = compressed(**sample)
            if i in picks:
                rows.append({"sample": i, **output_metrics(out, fp(**sample))})
    return rows


def _fp_callable(source: ModelSource, constants: dict[str, Any] | None) -> torch.nn.Module:
    """The FP model called as the artifact is: keyword tensors, the compiled constants bound."""
    if source.program is not None:
        return ProgramAdapter(source.program)
    return DenoiserAdapter(source.module, constants_from_json(constants or {})).eval()


def _held_out(data: Any, source: ModelSource, samples: int, seed: int) -> tuple[CalibrationSet, bool]:
    """The held-out calls, and whether they are a trajectory (sampling order) or independent."""
    if data is not None:
        return CalibrationSet.load(data), True
    if source.description.get("kind") == "bundled":
        return _reference_model_held_out(source.module), True
    if source.module is None:
        from .errors import InputError

        raise InputError("evaluating against a .pt2 program needs held-out inputs: pass --data FILE")
    return synthetic_calibration(source.module, samples, seed), False


def _reference_model_held_out(model: torch.nn.Module) -> CalibrationSet:
    """Every denoiser call of the reference sampler on an evaluation prompt and seed (disjoint from
    the calibration ones)."""
    from .refmodel import as_denoiser
    from .refmodel.prompts import EVAL_PROMPTS, EVAL_SEED_BASE
    from .refmodel.recording import record_sampler

    return record_sampler(as_denoiser(model), EVAL_PROMPTS[:1], [EVAL_SEED_BASE])
