"""The reference backend: every ``qsc::`` op in plain PyTorch, on any device.

These functions are the numerical truth. Kernels are tested against them; the artifact's
bit-for-bit reproducibility is defined by them on the CPU. They favour clarity over speed: weights
are dequantized to float32 and multiplied in float32, which equals the integer-GEMM formulation
``(q_x @ q_w^T) * s_x * s_w`` up to float32 rounding.
"""

from __future__ import annotations

import torch

from qsc import quant


def quant_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    in_scale: torch.Tensor | None,
    w_bits: int,
    a_bits: int,
    group_size: int,
    in_features: int,
    a_clip: float,
) -> torch.Tensor:
    xf = x.float()
    if in_scale is not None:
        xf = xf * in_scale.float()
    if a_bits < 16:
        xf = quant.fake_quantize_per_token(xf, a_bits, a_clip)
    w = quant.dequantize_weight(quant.unpack_weight(qweight, w_bits, in_features), w_scale, group_size)
    y = torch.nn.functional.linear(xf, w, None if bias is None else bias.float())
    return y.to(x.dtype)
