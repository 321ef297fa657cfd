"""Truncated SVDs of SSAR's residual changes: every head of every layer of a refresh, as factors.

``change_factors(new, old, rank)`` gives, for each layer, ``u @ v``: the best rank-``rank``
approximation of every ``[L, D]`` head matrix of ``new - old``. No SVD and no ``D x D``
eigensolver: on CUDA, ``torch.linalg.eigh`` of a batch of 128 x 128 matrices loops over them one
by one (it batches only up to 32 x 32) and waits for the GPU after each call, hundreds of solver
calls per refresh. Instead, subspace iteration on each head's Gram matrix ``x^T x`` finds the top
right singular vectors with batched GEMMs; the only eigensolves are of ``2 * rank``-wide matrices
(32 at the default rank 16), which CUDA batches, once for all layers together.

Everything below the Gram matrices runs in float64: a Gram squares the condition number, and the
matrices are small.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_ITERATIONS = 4  # a flat spectrum (noise) is within 0.5% of the optimal error; a decaying one exact
_SEED = 0  # the starting block is fixed: the same residuals give the same caches


def factor_width(rank: int, rows: int, cols: int) -> int:
    """Inner width of the factors of ``[rows, cols]`` matrices: ``rank``, or ``cols`` when the
    approximation is the matrix itself (rank 0 means "not truncated")."""
    return cols if rank == 0 or rank >= min(rows, cols) else rank


def factor_shapes(shape: Sequence[int], rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of the factors ``u``, ``v`` of ``[..., L, D]`` matrices at ``rank``."""
    *batch, rows, cols = shape
    width = factor_width(rank, rows, cols)
    return (*batch, rows, width), (*batch, width, cols)


def change_factors(
    new: Sequence[torch.Tensor], old: Sequence[torch.Tensor], rank: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each pair of same-shaped ``[..., L, D]`` tensors, ``(u [..., L, r], v [..., r, D])`` with
    ``u @ v`` the rank-``rank`` truncated SVD of each matrix of ``new - old``
    (``r = factor_width(rank, L, D)``), in new's dtype; ``v`` has orthonormal rows. Each difference
    is formed twice (for the Gram matrix, then for ``u``) rather than kept: at Wan's sizes all of
    them at once would be another full set of residuals in memory."""
    rows, cols = new[0].shape[-2:]
    if factor_width(rank, rows, cols) == cols:
        return [(a - b, torch.eye(cols, dtype=a.dtype, device=a.device).expand(*a.shape[:-2], cols, cols))
                for a, b in zip(new, old, strict=True)]
    grams = torch.stack([_gram((a - b).float()) for a, b in zip(new, old, strict=True)])
    bases = _top_eigenvectors(grams.double(), rank).float()  # [layers, ..., D, rank]
    return [(((a - b).float() @ basis).to(a.dtype), basis.mT.to(a.dtype))
            for a, b, basis in zip(new, old, bases, strict=True)]


def _gram(x: torch.Tensor) -> torch.Tensor:
    return x.mT @ x


def _top_eigenvectors(gram: torch.Tensor, rank: int) -> torch.Tensor:
    """The eigenvectors of the ``rank`` largest eigenvalues of each symmetric PSD ``gram``: subspace
    iteration on a block twice as wide, then Rayleigh-Ritz in that block."""
    n = gram.shape[-1]
    width = min(n, 2 * rank)
    start = torch.randn(n, width, generator=torch.Generator().manual_seed(_SEED), dtype=gram.dtype)
    block = _orthonormalize(start.to(gram.device).expand(*gram.shape[:-2], n, width))
    for _ in range(_ITERATIONS):
        block = _orthonormalize(gram @ block)
    block = _orthonormalize(block)  # a second pass restores what the first lost to rounding
    _, ritz = torch.linalg.eigh(block.mT @ gram @ block)  # eigenvalues ascend
    return block @ ritz[..., -rank:]


def _orthonormalize(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning ``y``'s, from the eigendecomposition of the small ``y^T y``
    (SVQB); directions ``y`` does not span numerically become zero columns."""
    values, vectors = torch.linalg.eigh(y.mT @ y)
    floor = values[..., -1:] * (y.shape[-1] * torch.finfo(y.dtype).eps)
    inv_norms = torch.where(values > floor, values.clamp_min(torch.finfo(y.dtype).tiny).rsqrt(), 0.0)
    return (y @ vectors) * inv_norms[..., None, :]
