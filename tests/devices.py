"""Where the kernel tests run. By default on the CPU, through Triton's interpreter; with
``QSC_TEST_DEVICE=cuda`` on a GPU, as compiled kernels (the check to run on real hardware):

    QSC_TEST_DEVICE=cuda pytest tests/test_kernels_quant_gemm.py tests/test_kernels_sparse_attention.py

Inputs are drawn on the CPU from seeded generators and then moved, so both runs see the same data.
"""

from __future__ import annotations

import os

import torch

DEVICE = torch.device(os.environ.get("QSC_TEST_DEVICE", "cpu"))

# The interpreter has no bf16; the compiled kernels must handle it (it is what models run in).
HALF_DTYPES = [torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _generator(seed: int | torch.Generator) -> torch.Generator:
    return seed if isinstance(seed, torch.Generator) else gen(seed)


def randn(*shape: int, seed: int | torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=_generator(seed)).to(DEVICE)


def rand(*shape: int, seed: int | torch.Generator) -> torch.Tensor:
    return torch.rand(*shape, generator=_generator(seed)).to(DEVICE)
