"""GPTQ: a weight rounded column by column, each column's rounding error pushed onto the columns
not yet rounded, so that the layer's *output* on its calibration inputs moves as little as
possible (Frantar et al., 2023; Optimal Brain Quantization solved one column at a time).

For inputs ``X`` the output error of a weight change is ``||X dW^T||^2 = tr(dW H dW^T)`` with
``H = X^T X``. Rounding column ``j`` leaves an error ``e_j = w_j - q_j``; the change of the
remaining columns that cancels it best is ``-e_j / [H^-1]_jj * [H^-1]_j,>j``, where ``H^-1`` is
the inverse over the columns still free; the upper Cholesky factor of ``H^-1`` holds all these
rows at once. qsc's variant keeps the quantizer's scales fixed in advance (min-max, with the
clipping ratios learned before): only the integer codes change, so the packed layout, the kernels
and the op stay those of round-to-nearest. Columns are visited in order of decreasing ``H_jj``
(the inputs with most energy first, "act order"), which the fixed scales allow at no cost.
"""

from __future__ import annotations

import torch

from . import quant

DAMPING = 0.01  # of the mean diagonal, added to H: keeps the inverse of a rank-deficient H finite
COLUMN_BLOCK = 128  # columns rounded between two updates of the rest (the result does not depend on it)


class Gram:
    """``X^T X`` of a layer's inputs, accumulated over calls (float64: sums of many tokens)."""

    def __init__(self, in_features: int):
        self.matrix = torch.zeros(in_features, in_features, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        self.matrix += x.T @ x


def gptq_codes(
    w: torch.Tensor, gram: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int = 0,
    damping: float = DAMPING,
) -> torch.Tensor:
    """Integer codes (int8 ``[N, K]``) of ``w`` under the fixed ``scale`` (``quant`` layout:
    ``[N]`` or ``[N, K // group_size]``) that minimise, column by column, the output error on the
    inputs whose Gram matrix is ``gram``. With ``gram = I`` they are round-to-nearest's codes."""
    n, k = w.shape
    w = w.detach().double().clone()
    h = gram.double().clone()
    dead = h.diagonal() == 0  # inputs that were always zero: their weights never matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damping * h.diagonal().mean())
    order = torch.argsort(h.diagonal(), descending=True, stable=True)
    h = h[order][:, order]
    w = w[:, order]
    group = (order // group_size) if group_size else torch.zeros(k, dtype=torch.long)
    col_scale = scale.double().reshape(n, -1)[:, group]  # [N, K]: each (permuted) column's scale
    # Upper Cholesky factor of H^-1: row j holds [H_{>=j}^-1]_j scaled by 1 / sqrt([H_{>=j}^-1]_jj).
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    qmax = quant.qmax(bits)
    codes = torch.empty(n, k, dtype=torch.float64)
    for start in range(0, k, COLUMN_BLOCK):
        end = min(start + COLUMN_BLOCK, k)
        errors = torch.empty(n, end - start, dtype=torch.float64)
        for j in range(start, end):
            codes[:, j] = torch.round(w[:, j] / col_scale[:, j]).clamp(-qmax, qmax)
            error = (w[:, j] - codes[:, j] * col_scale[:, j]) / u[j, j]
            w[:, j + 1 : end] -= error[:, None] * u[j, j + 1 : end][None, :]
            errors[:, j - start] = error
        w[:, end:] -= errors @ u[start:end, end:]
    return codes[:, torch.argsort(order)].to(torch.int8)
