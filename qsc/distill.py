"""The distillation losses of scale learning, and the attention statistics they need.

Notation as in ``shared/ALGORITHMS.md``: ``A(Q, K) = softmax(Q K^T * scale)`` per head, Q and K of
shape ``[B, H, L, d]``; "FP" is the teacher block, "quant" the fake-quantized student.

* ``token_saliency``: ``S_j = sum_h sum_i A[h, i, j]``, the attention token ``j`` receives
  (S2Q-VDiT's sparse token distillation and MSAD's salient queries both rank tokens by it);
* ``token_weights``: ``lambda_j`` = S min-max normalised into ``[lambda_min, 1]``;
* ``weighted_mse``: ``(1/n) sum_j lambda_j ||f_FP(x)_j - f_quant(x)_j||^2``;
* ``msad_global``: MSE between the attention maps of Q and K average-pooled along the tokens with
  stride ``s`` (``ceil(L / s)`` pooled tokens);
* ``msad_local``: MSE between the ``k x L`` attention maps of the ``k`` most salient tokens as
  queries against all keys.

No L x L map is ever held: the statistics run over chunks of queries sized so that one chunk's
scores take at most ``CHUNK_ELEMENTS`` floats, and the local loss recomputes each chunk in the
backward pass (``torch.utils.checkpoint``) instead of keeping its probabilities.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

CHUNK_ELEMENTS = 2**24  # scores per chunk of queries: 64 MiB of float32


def query_chunk(heads: int, keys: int, batch: int = 1) -> int:
    return max(1, CHUNK_ELEMENTS // (batch * heads * keys))


def _probabilities(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.softmax((q.float() @ k.float().transpose(-1, -2)) * scale, dim=-1)


@torch.no_grad()
def token_saliency(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``[B, L]``: the attention each key token receives, summed over heads and queries."""
    b, h, length, _ = q.shape
    total = torch.zeros(b, k.shape[2], dtype=torch.float64, device=q.device)
    step = query_chunk(h, k.shape[2], b)
    for start in range(0, length, step):
        p = _probabilities(q[:, :, start : start + step], k, scale)
        total += p.sum(dim=(1, 2), dtype=torch.float64)
    return total.float()


def token_weights(saliency: torch.Tensor, lambda_min: float, lambda_max: float = 1.0) -> torch.Tensor:
    """Saliency ``[B, L]`` min-max normalised per sample into ``[lambda_min, lambda_max]``."""
    low, high = saliency.amin(dim=-1, keepdim=True), saliency.amax(dim=-1, keepdim=True)
    unit = (saliency - low) / (high - low).clamp_min(1e-30)
    return unit * (lambda_max - lambda_min) + lambda_min


def weighted_mse(out: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error, each token (dim -2) weighted where ``weights [B, L]`` fits the output."""
    err = (out.float() - target.float()).square()
    if weights is not None and err.dim() >= 2 and err.shape[-2] == weights.shape[-1]:
        err = err * weights.reshape(weights.shape[0], *[1] * (err.dim() - 3), weights.shape[-1], 1)
    return err.mean()


def pool_tokens(x: torch.Tensor, stride: int) -> torch.Tensor:
    """Average of every ``stride`` consecutive tokens (dim -2), the last window as long as it is."""
    *lead, length, d = x.shape
    windows = math.ceil(length / stride)
    padded = torch.nn.functional.pad(x.float(), (0, 0, 0, windows * stride - length))
    sums = padded.reshape(*lead, windows, stride, d).sum(dim=-2)
    counts = torch.full((windows, 1), float(stride), device=x.device)
    counts[-1] = length - (windows - 1) * stride
    return sums / counts


def msad_global(q: torch.Tensor, k: torch.Tensor, q_ref: torch.Tensor, k_ref: torch.Tensor,
                scale: float, stride: int) -> torch.Tensor:
    maps = _probabilities(pool_tokens(q, stride), pool_tokens(k, stride), scale)
    with torch.no_grad():
        reference = _probabilities(pool_tokens(q_ref, stride), pool_tokens(k_ref, stride), scale)
    return (maps - reference).square().mean()


def salient_queries(saliency: torch.Tensor, count: int) -> torch.Tensor:
    """``[B, count]`` indices of the most attended tokens (ties: the earlier token)."""
    order = torch.argsort(saliency, dim=-1, descending=True, stable=True)
    return order[:, : min(count, saliency.shape[-1])]


def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, :, index[b]]`` for ``x [B, H, L, d]`` and ``index [B, n]``."""
    b, h, _, d = x.shape
    return x.gather(2, index[:, None, :, None].expand(b, h, index.shape[1], d))


def _local_chunk(q: torch.Tensor, k: torch.Tensor, q_ref: torch.Tensor, k_ref: torch.Tensor,
                 scale: float) -> torch.Tensor:
    with torch.no_grad():
        reference = _probabilities(q_ref, k_ref, scale)
    return (_probabilities(q, k, scale) - reference).square().sum()


def msad_local(q: torch.Tensor, k: torch.Tensor, q_ref: torch.Tensor, k_ref: torch.Tensor,
               scale: float, index: torch.Tensor) -> torch.Tensor:
    """MSE of ``A(Q[I], K)`` against the FP maps, ``I = index`` (``salient_queries`` of the FP block)."""
    queries, queries_ref = _gather_tokens(q, index), _gather_tokens(q_ref, index)
    b, h, count, _ = queries.shape
    step = query_chunk(h, k.shape[2], b)
    total = sum(
        checkpoint(_local_chunk, queries[:, :, i : i + step], k, queries_ref[:, :, i : i + step], k_ref, scale,
                   use_reentrant=False)
        for i in range(0, count, step)
    )
    return total / (b * h * count * k.shape[2])
