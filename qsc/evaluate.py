"""``qsc eval``: how far a compressed artifact's outputs are from the FP model's, on held-out inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .artifact import load, read_manifest
from .calibration import CalibrationSet
from .compiler import output_metrics
from .frontend import DenoiserAdapter, ModelSource, cast_inputs, load_model, model_dtype, reload_model
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
    """Per-sample relative L2, cosine and PSNR of the artifact against the FP model.

    Samples are independent inputs, not a trajectory: an SSAR artifact is measured by its sparse
    step without correction (what the compile report shows too); its corrected quality over whole
    videos is what ``benchmarks/quality.py`` measures."""
    manifest = read_manifest(artifact)
    compressed = load(artifact)
    source = load_model(model, trust_pickle=trust_pickle) if model else reload_model(manifest["source"], trust_pickle=trust_pickle)
    fp = _fp_callable(source)
    held_out = _held_out(data, source, samples, manifest["config"]["seed"] + HELD_OUT_SEED_OFFSET)
    dtype = model_dtype(fp)
    rows = []
    with torch.no_grad():
        for i in range(min(samples, len(held_out))):
            sample = cast_inputs(held_out.sample(i), dtype)
            out = compressed.program.uncorrected(**sample) if isinstance(compressed.program, SSARRuntime) else compressed(**sample)
            rows.append({"sample": i, **output_metrics(out, fp(**sample))})
    return rows


def _fp_callable(source: ModelSource) -> torch.nn.Module:
    return source.program.module() if source.program is not None else DenoiserAdapter(source.module).eval()


def _held_out(data: Any, source: ModelSource, samples: int, seed: int) -> CalibrationSet:
    if data is not None:
        return CalibrationSet.load(data)
    if source.description.get("kind") == "bundled":
        return _reference_model_held_out(source.module, samples)
    if source.module is None:
        from .errors import InputError

        raise InputError("evaluating against a .pt2 program needs held-out inputs: pass --data FILE")
    return synthetic_calibration(source.module, samples, seed)


def _reference_model_held_out(model: torch.nn.Module, samples: int) -> CalibrationSet:
    """Denoiser calls of the reference sampler on an evaluation prompt and seed (disjoint from the
    calibration ones), evenly spread over the trajectory."""
    from .refmodel import as_denoiser
    from .refmodel.prompts import EVAL_PROMPTS, EVAL_SEED_BASE
    from .refmodel.recording import record_sampler

    trajectory = record_sampler(as_denoiser(model), EVAL_PROMPTS[:1], [EVAL_SEED_BASE])
    return trajectory.subset(torch.linspace(0, len(trajectory) - 1, samples).round().long().tolist())
