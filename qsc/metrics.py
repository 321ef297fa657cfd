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


def ssim(out: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean structural similarity over every 2-D image in ``[..., H, W]`` tensors (e.g. a video
    ``[C, F, H, W]``: every channel of every frame), Gaussian window 11 / sigma 1.5, the constants of
    Wang et al. 2004, valid-region averaging. Identical inputs give exactly 1."""
    out = out.double().reshape(-1, 1, *out.shape[-2:])
    ref = ref.double().reshape(-1, 1, *ref.shape[-2:])
    size = min(11, out.shape[-1], out.shape[-2])
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * 1.5**2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :])[None, None]
    blur = lambda x: torch.nn.functional.conv2d(x, window)  # noqa: E731
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_o, mu_r = blur(out), blur(ref)
    var_o = blur(out * out) - mu_o**2
    var_r = blur(ref * ref) - mu_r**2
    cov = blur(out * ref) - mu_o * mu_r
    s = ((2 * mu_o * mu_r + c1) * (2 * cov + c2)) / ((mu_o**2 + mu_r**2 + c1) * (var_o + var_r + c2))
    return float(s.mean())


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two ``[N, D]`` feature sets (as in FID/FVD):
    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))``, in float64. The matrix square root's trace
    is taken from the eigenvalues of ``S_a^(1/2) S_b S_a^(1/2)`` (symmetric, so ``eigh`` is stable even
    when few samples make the covariances singular)."""
    a, b = features_a.double(), features_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    evals, evecs = torch.linalg.eigh(cov_a)
    sqrt_a = evecs @ torch.diag(evals.clamp_min(0).sqrt()) @ evecs.T
    cross = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross)
