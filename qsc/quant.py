"""Quantizer arithmetic: the plain-PyTorch definitions every pass, op and kernel agrees on.

Conventions (shared with the reference backend and the Triton kernels, so change them nowhere else):

* Symmetric signed integers with the symmetric range ``[-qmax, qmax]``, ``qmax = 2**(bits-1) - 1``
  (the code ``-2**(bits-1)`` is never produced, so negation is exact and int8 tensor cores can run
  A6/A4 as narrower int8).
* Rounding is round-half-to-even (``torch.round``; ``rint`` in kernels).
* Weights ``[N, K]`` are quantized per output channel (``group_size == 0``, scales ``[N]``) or per
  group of ``group_size`` consecutive input channels (scales ``[N, K // group_size]``). Scales are
  stored as float16: they cost 16 bits per row or group, and fp16 keeps 10 mantissa bits.
* 4-bit weights are packed two per byte along K: byte ``j`` of a row holds column ``2j`` in its low
  nibble and column ``2j+1`` in its high nibble, each as a 4-bit two's complement value. An odd K is
  padded with one zero column.
* Activations are quantized dynamically per token (per row of the last dimension):
  ``scale = clip * max|x| / qmax``, computed in float32 at run time.
"""

from __future__ import annotations

import torch

from .errors import ConfigError

WEIGHT_BITS = (4, 6, 8)
ACTIVATION_BITS = (4, 6, 8, 16)  # 16 = activations stay in floating point (weight-only)
SCALE_DTYPE = torch.float16
_MIN_SCALE = 2.0**-24  # smallest positive fp16: an all-zero row quantizes to zeros, not NaN


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def check_bits(w_bits: int, a_bits: int) -> None:
    if w_bits not in WEIGHT_BITS:
        raise ConfigError(f"unsupported weight bit width {w_bits}: choose one of {WEIGHT_BITS}")
    if a_bits not in ACTIVATION_BITS:
        raise ConfigError(
            f"unsupported activation bit width {a_bits}: choose one of {ACTIVATION_BITS} (16 = no activation quantization)"
        )


def effective_group_size(k: int, group_size: int) -> int:
    """The group size a layer with ``k`` input channels uses: per channel (0) if groups don't tile K."""
    return group_size if group_size and k % group_size == 0 and group_size < k else 0


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = w.shape
    return w.reshape(n, k // group_size, group_size) if group_size else w.reshape(n, 1, k)


def weight_scale(
    w: torch.Tensor, bits: int, group_size: int = 0, clip: torch.Tensor | float = 1.0
) -> torch.Tensor:
    """Round-to-nearest min-max scales (optionally shrunk by a clip ratio), as stored (fp16)."""
    amax = _grouped(w.float(), group_size).abs().amax(dim=-1)  # [N, G]
    scale = (amax * clip / qmax(bits)).clamp_min(_MIN_SCALE).to(SCALE_DTYPE)
    return scale if group_size else scale.squeeze(1)


def quantize_weight(w: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int = 0) -> torch.Tensor:
    """Integer codes (int8 tensor) of ``w`` under ``scale``."""
    s = scale.float().reshape(w.shape[0], -1, 1)
    q = torch.round(_grouped(w.float(), group_size) / s).clamp(-qmax(bits), qmax(bits))
    return q.reshape(w.shape).to(torch.int8)


def quantize_packed(
    w: torch.Tensor, bits: int, group_size: int = 0, clip: torch.Tensor | float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored form of ``w``: packed round-to-nearest codes and their scales."""
    scale = weight_scale(w, bits, group_size, clip)
    return pack_weight(quantize_weight(w, scale, bits, group_size), bits), scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, group_size: int = 0) -> torch.Tensor:
    """float32 weights from int8 codes ``[N, K]`` and their scales."""
    s = scale.float().reshape(q.shape[0], -1, 1)
    return (_grouped(q.float(), group_size) * s).reshape(q.shape)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7], ``[N, K]`` -> uint8 ``[N, ceil(K/2)]`` (low nibble = even column)."""
    if q.shape[-1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    nib = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return nib[..., 0::2] | (nib[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 ``[N, ceil(K/2)]`` -> int8 codes ``[N, K]`` (sign-extended nibbles)."""
    p = packed.to(torch.int16)
    lo, hi = p & 0xF, (p >> 4) & 0xF
    q = torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], -1)[..., :k]
    return torch.where(q > 7, q - 16, q).to(torch.int8)


def pack_weight(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Storage form of integer weight codes: packed uint8 for 4 bits, int8 otherwise."""
    return pack_int4(q) if bits == 4 else q.to(torch.int8)


def unpack_weight(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    return unpack_int4(packed, k) if bits == 4 else packed


def quantize_per_token(
    x: torch.Tensor, bits: int, clip: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token quantization: (int8 codes, float32 scales of shape ``[..., 1]``)."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) * clip / qmax(bits)).clamp_min(1e-12)
    q = torch.round(xf / scale).clamp(-qmax(bits), qmax(bits))
    return q.to(torch.int8), scale


def packed_weight_nbytes(n: int, k: int, bits: int, group_size: int = 0) -> int:
    """Bytes of a packed ``[N, K]`` weight plus its scales, without building it."""
    codes = n * ((k + 1) // 2 if bits == 4 else k)
    groups = k // group_size if effective_group_size(k, group_size) else 1
    return codes + n * groups * torch.finfo(SCALE_DTYPE).bits // 8
