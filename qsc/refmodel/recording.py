"""Calibration recording of the bundled model: transformer inputs and FP outputs, one sample per call.

``record_sampler`` runs the bundled sampler and keeps every denoiser call (prompt x step x
cond/uncond); ``reference_calibration`` is that on the reference model with calibration prompts.
A user's own diffusers pipeline is recorded by ``qsc.record`` (``qsc.recording``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..calibration import CalibrationSet
from ..errors import CalibrationError
from .prompts import CALIBRATION_PROMPTS, CALIBRATION_SEED_BASE, Prompt
from .sampler import DEFAULT_STEPS, Denoiser, denoiser_calls


@torch.no_grad()
def record_sampler(
    denoiser: Denoiser, prompts: Sequence[Prompt], seeds: Sequence[int], **options
) -> CalibrationSet:
    """Sample every (prompt, seed) pair and record every denoiser call with its output."""
    samples, outputs, records = [], [], []
    for prompt, seed in zip(prompts, seeds, strict=True):
        for kwargs, output, record in denoiser_calls(denoiser, prompt, seed, **options):
            samples.append({name: t.clone() for name, t in kwargs.items()})
            outputs.append(output.clone())
            records.append(record)
    return CalibrationSet.from_samples(samples, outputs, records)


def calibration_prompts(num_prompts: int, seed: int = 0) -> tuple[list[Prompt], list[int]]:
    """``num_prompts`` calibration prompts (a seeded draw) and their noise seeds; both are disjoint
    from the evaluation prompts and seeds."""
    if not 1 <= num_prompts <= len(CALIBRATION_PROMPTS):
        raise CalibrationError(f"num_prompts must be in 1..{len(CALIBRATION_PROMPTS)}, got {num_prompts}")
    order = torch.randperm(len(CALIBRATION_PROMPTS), generator=torch.Generator().manual_seed(seed))
    prompts = [CALIBRATION_PROMPTS[i] for i in order[:num_prompts].tolist()]
    return prompts, [CALIBRATION_SEED_BASE + 1000 * seed + i for i in range(num_prompts)]


def reference_calibration(num_prompts: int = 8, steps: int = DEFAULT_STEPS, seed: int = 0) -> CalibrationSet:
    """Calibration data of the bundled reference model: its sampler's trajectories on calibration
    prompts, every step, conditional and unconditional calls."""
    from .model import as_denoiser, load_reference_model

    prompts, seeds = calibration_prompts(num_prompts, seed)
    return record_sampler(as_denoiser(load_reference_model()), prompts, seeds, steps=steps)
