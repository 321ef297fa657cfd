"""Triton kernels of the ``qsc::`` ops (installed as ``qsc.kernels``; importing a module needs Triton).

* ``act_quant``: dynamic per-token activation quantization (one pass).
* ``quant_gemm``: int8-tensor-core GEMM for W4/W6/W8 x A4/A6/A8 and the weight-only path.
* ``int4_unpack``: packed int4 weights to int8 codes, the GEMM's first pass at large M.
* ``sparse_attention``: block-sparse flash attention with the SSAR residual fused.
* ``qk_quant``: per-tile INT8 Q and (mean-smoothed) K for its optional INT8 QK^T (one pass each).
* ``aot``: compilation of any of them for a named GPU target, without a GPU.

``backends/triton.py`` registers them as the ops' CUDA implementations.
"""
