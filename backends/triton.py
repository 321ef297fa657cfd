"""The Triton backend: Triton kernels as the CUDA implementations of the ``qsc::`` ops.

``enable()`` registers them with ``torch.library.register_kernel``; the ops themselves (their schema,
fake implementation and CPU reference) are untouched, so a lowered graph exports exactly as before
and simply runs these kernels when its tensors are on a GPU. Importing this module needs neither a
GPU nor Triton; ``enable()`` needs Triton.

Shapes the kernels do not cover fall back to the reference implementation (which runs on CUDA too):
weight groups that are not a multiple of 32 input channels.
"""

from __future__ import annotations

import torch

from qsc.backends import reference
from qsc.errors import ConfigError

_enabled = False


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
    """``qsc::quant_linear`` as two kernels: per-token activation quantization, then the GEMM."""
    from qsc.kernels import act_quant, quant_gemm

    kernel_group_size = _kernel_group_size(qweight, w_scale, group_size)
    if kernel_group_size is None:
        return reference.quant_linear(
            x, qweight, w_scale, bias, in_scale, w_bits, a_bits, group_size, in_features, a_clip
        )
    x2d = x.reshape(-1, x.shape[-1])
    if in_scale is not None:
        in_scale = in_scale.float().contiguous()
    a, a_scale = x2d, None
    if a_bits < 16:
        a, a_scale = act_quant.quantize_per_token(x2d, in_scale, a_bits, a_clip)
    y = quant_gemm.quant_gemm(
        a, a_scale, in_scale, qweight, w_scale, bias, w_bits, kernel_group_size, in_features, x.dtype
    )
    return y.reshape(*x.shape[:-1], qweight.shape[0])


def quant_gemm(
    codes: torch.Tensor,
    scales: torch.Tensor,
    qweight: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    w_bits: int,
    group_size: int,
    in_features: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``qsc::quant_gemm``: the GEMM kernel alone, on codes quantized elsewhere."""
    from qsc.kernels import quant_gemm as kernel

    kernel_group_size = _kernel_group_size(qweight, w_scale, group_size)
    if kernel_group_size is None:
        return reference.quant_gemm(codes, scales, qweight, w_scale, bias, w_bits, group_size, in_features, out_dtype)
    y = kernel.quant_gemm(
        codes.reshape(-1, codes.shape[-1]), scales.reshape(-1).float(), None, qweight, w_scale, bias,
        w_bits, kernel_group_size, in_features, out_dtype,
    )
    return y.reshape(*codes.shape[:-1], qweight.shape[0])


def _kernel_group_size(qweight: torch.Tensor, w_scale: torch.Tensor, group_size: int) -> int | None:
    """The weight groups the GEMM kernel runs with (0: one scale per row, applied in the epilogue),
    or None where it has no kernel for them."""
    from qsc.kernels import quant_gemm

    if w_scale.numel() == qweight.shape[0]:
        return 0
    return None if group_size % quant_gemm.MIN_GROUP_SIZE else group_size


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor | None,
    residual: torch.Tensor | None,
    scale: float | None,
    qk_int8: bool = False,
    residual_u: torch.Tensor | None = None,
    residual_v: torch.Tensor | None = None,
) -> torch.Tensor:
    """``qsc::sparse_attention``: block-sparse (or dense) flash attention, residual and its low-rank
    term fused."""
    from qsc.kernels import sparse_attention as kernel

    if layout is not None:
        reference.check_block_layout(q, k, layout)
    reference.check_residual_factors(q, v, residual_u, residual_v)
    q, k, qk_scales = _int8_qk(q, k, qk_int8)
    return kernel.sparse_attention(
        q, k, v, layout, residual, scale,
        layout_block_m=reference.SPARSE_BLOCK_M, layout_block_n=reference.SPARSE_BLOCK_N, qk_scales=qk_scales,
        residual_factors=None if residual_u is None else (residual_u, residual_v),
    )


def refresh_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: torch.Tensor, scale: float | None, qk_int8: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``qsc::refresh_attention``: the dense output and its residual over the sparse one, one kernel."""
    from qsc.kernels import sparse_attention as kernel

    reference.check_block_layout(q, k, layout)
    q, k, qk_scales = _int8_qk(q, k, qk_int8)
    return kernel.refresh_attention(
        q, k, v, layout, scale,
        layout_block_m=reference.SPARSE_BLOCK_M, layout_block_n=reference.SPARSE_BLOCK_N, qk_scales=qk_scales,
    )


def _int8_qk(q: torch.Tensor, k: torch.Tensor, qk_int8: bool):
    """With ``qk_int8``, Q and K quantized per tile (the reference's ``quantize_qk``, one kernel
    each): (q codes, k codes, their scales); else (q, k, None)."""
    if not qk_int8:
        return q, k, None
    from qsc.kernels import qk_quant

    q, q_scales, k, k_scales = qk_quant.quantize_qk(q, k)
    return q, k, (q_scales, k_scales)


def enable() -> None:
    """Make the ``qsc::`` ops run their Triton kernels on CUDA tensors (idempotent)."""
    global _enabled
    if _enabled:
        return
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise ConfigError("the triton backend needs the 'triton' package: pip install 'qsc[triton]'") from e
    import qsc.ops  # noqa: F401  (defines the ops before kernels are registered for them)

    torch.library.register_kernel("qsc::quant_linear", "cuda", quant_linear)
    torch.library.register_kernel("qsc::quant_gemm", "cuda", quant_gemm)
    torch.library.register_kernel("qsc::sparse_attention", "cuda", sparse_attention)
    torch.library.register_kernel("qsc::refresh_attention", "cuda", refresh_attention)
    _enabled = True
