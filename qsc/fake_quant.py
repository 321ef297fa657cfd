"""Fake quantization that trains: a linear layer as ``quantize_linear`` will lower it, with the
transforms scale learning adjusts as parameters and a straight-through estimator for rounding.

The forward pass is the reference backend's ``qsc::quant_linear`` computed from the *unrounded*
parameters, operation for operation (``qsc.quant`` and ``backends/reference.py``): once the
parameters are folded (``LearnedLinear.folded``) into the weight, the op's ``in_scale`` and
``a_clip`` and the clipping ratios ``quantize_linear`` applies, the compressed program computes
exactly what this module computed. Rounding passes gradients straight through; clamping does not,
so a clipping ratio learns from both the rounding error inside the range and the values it clips
(the gradient of LSQ and OmniQuant's learnable weight clipping).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import quant
from .schemes import FLOAT_ACTIVATIONS, LinearScheme

W_CLIP_RANGE = (0.25, 1.0)  # a weight clipping ratio below a quarter of the range only loses
A_CLIP_RANGE = (0.5, 1.0)  # per-token maxima are already local: activations clip less


class _RoundSTE(torch.autograd.Function):
    """``torch.round`` forward (half to even, as every quantizer of qsc), identity backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def fake_quantize_weight(w: torch.Tensor, bits: int, group_size: int, clip: torch.Tensor) -> torch.Tensor:
    """``dequantize(quantize(w))`` under clipped min-max scales (``clip``: ``[N, groups]``), in
    float32, equal to ``quant.dequantize_weight`` of ``quant.quantize_packed(w, ..., clip)``."""
    n, k = w.shape
    grouped = w.float().reshape(n, k // group_size, group_size) if group_size else w.float().reshape(n, 1, k)
    scale = (grouped.abs().amax(dim=-1) * clip / quant.qmax(bits)).clamp_min(quant._MIN_SCALE)
    s = scale.to(quant.SCALE_DTYPE).float().reshape(n, -1, 1)
    codes = _RoundSTE.apply(grouped / s).clamp(-quant.qmax(bits), quant.qmax(bits))
    return (codes * s).reshape(n, k)


def fake_quantize_tokens(x: torch.Tensor, bits: int, clip: torch.Tensor | float) -> torch.Tensor:
    """Per-token dynamic quantization of float32 ``x``, dequantized: ``quant.quantize_per_token``."""
    scale = (x.abs().amax(dim=-1, keepdim=True) * clip / quant.qmax(bits)).clamp_min(1e-12)
    return _RoundSTE.apply(x / scale).clamp(-quant.qmax(bits), quant.qmax(bits)) * scale


@dataclass(frozen=True)
class Folded:
    """What a trained ``LearnedLinear`` leaves behind: plain tensors and a number."""

    weight: torch.Tensor  # the smoothed weight, to be quantized with ``w_clip``
    in_scale: torch.Tensor | None  # the op's ``in_scale`` (the smoothing's inverse)
    w_clip: torch.Tensor  # ``[N, groups]``, for ``quant.quantize_packed``
    a_clip: float  # the op's ``a_clip``


class LearnedLinear(torch.nn.Module):
    """``y = x W^T + b`` fake-quantized under ``scheme``, learning (where ``in_scale`` is given, i.e.
    ``smooth_quant`` put a smoothing in front of the layer) a per-input-channel smoothing
    ``exp(log_smooth)`` on top of it, per-output-channel (per group) weight clipping ratios and a
    per-layer activation clipping ratio. At initialisation it computes what round-to-nearest on
    the smoothed layer computes."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, in_scale: torch.Tensor | None, scheme: LinearScheme
    ):
        super().__init__()
        n, k = weight.shape
        self.scheme = scheme
        self.register_buffer("weight", weight.detach())
        self.register_buffer("bias", None if bias is None else bias.detach())
        self.register_buffer("in_scale", None if in_scale is None else in_scale.detach())
        groups = k // scheme.group_size if scheme.group_size else 1
        self.log_smooth = torch.nn.Parameter(torch.zeros(k), requires_grad=in_scale is not None)
        self.w_clip = torch.nn.Parameter(torch.ones(n, groups))
        self.a_clip = torch.nn.Parameter(torch.tensor(float(scheme.a_clip)))

    def clip_parameters(self) -> list[torch.nn.Parameter]:
        return [self.w_clip, self.a_clip]

    def transformed(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(weight, in_scale, weight clip, activation clip) as the op will hold them."""
        weight, in_scale = self.weight, self.in_scale
        if in_scale is not None:
            s = self.log_smooth.exp()
            weight = (weight.float() * s).to(weight.dtype)
            in_scale = (in_scale.float() / s).to(in_scale.dtype)
        return weight, in_scale, self.w_clip.clamp(*W_CLIP_RANGE), self.a_clip.clamp(*A_CLIP_RANGE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, in_scale, w_clip, a_clip = self.transformed()
        s = self.scheme
        xf = x.float() if in_scale is None else x.float() * in_scale.float()
        w = fake_quantize_weight(weight, s.w_bits, s.group_size, w_clip)
        y = torch.nn.functional.linear(fake_quantize_tokens(xf, s.a_bits, a_clip), w,
                                       None if self.bias is None else self.bias.float())
        return y.to(x.dtype)

    @torch.no_grad()
    def folded(self) -> Folded:
        weight, in_scale, w_clip, a_clip = self.transformed()
        return Folded(weight.clone(), None if in_scale is None else in_scale.clone(), w_clip.clone(), float(a_clip))


class QuantizedLinear(torch.nn.Module):
    """A linear as the quantized op computes it, from a weight already on its quantization grid
    (the dequantized codes): ``x * in_scale`` quantized per token (unless ``a_bits`` is 16), then
    the GEMM. Runs the calibration activations through a block whose codes are decided."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, in_scale: torch.Tensor | None,
                 a_bits: int, a_clip: float):
        super().__init__()
        self.register_buffer("weight", weight.detach())
        self.register_buffer("bias", None if bias is None else bias.detach())
        self.register_buffer("in_scale", None if in_scale is None else in_scale.detach())
        self.a_bits, self.a_clip = a_bits, a_clip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float() if self.in_scale is None else x.float() * self.in_scale.float()
        if self.a_bits < FLOAT_ACTIVATIONS:
            xf = fake_quantize_tokens(xf, self.a_bits, self.a_clip)
        y = torch.nn.functional.linear(xf, self.weight.float(), None if self.bias is None else self.bias.float())
        return y.to(x.dtype)
