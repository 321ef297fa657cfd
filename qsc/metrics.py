"""Numerical agreement between a compressed model's output and the FP reference.

PSNR convention: signals are compared on the reference's own range, ``peak = max|ref|`` unless a
peak is given (use ``peak=1.0`` for videos in [0, 1]). Identical inputs give ``inf``; reports that
need a finite number cap it at ``PSNR_CAP`` dB.
"""

from __future__ import annotations

import math

import torch

PSNR_CAP = 100.0


def relative_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64."""
    out, ref = out.double(), ref.double()
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-30))


def cosine(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Cosine similarity of the flattened tensors, in float64."""
    return float(torch.nn.functional.cosine_similarity(out.double().flatten(), ref.double().flatten(), dim=0))


def psnr(out: torch.Tensor, ref: torch.Tensor, peak: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB; ``inf`` for identical tensors."""
    out, ref = out.double(), ref.double()
    mse = float(torch.mean((out - ref) ** 2))
    if mse == 0.0:
        return math.inf
    peak = float(ref.abs().max()) if peak is None else peak
    return 10.0 * math.log10(peak * peak / mse)
