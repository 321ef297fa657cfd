"""Where the kernel tests run. By default on the CPU, through Triton's interpreter; with
``QSC_TEST_DEVICE=cuda`` on a GPU, as compiled kernels (the check to run on real hardware):

    QSC_TEST_DEVICE=cuda pytest -n 8 tests/test_kernels_quant_gemm.py tests/test_kernels_sparse_attention.py

On a GPU the autotuner compiles every configuration of the device's list for each kernel
specialization the tests reach (hundreds on Hopper), one after another in a process: ``-n 8``
(pytest-xdist) spreads them over eight processes, which share Triton's on-disk cache.

Inputs are drawn on the CPU from seeded generators and then moved, so both runs see the same data.
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = torch.device(os.environ.get("QSC_TEST_DEVICE", "cpu"))

# The interpreter has no bf16; the compiled kernels must handle it (it is what models run in).
HALF_DTYPES = [torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])


# Before 3.8 the interpreter cannot run an autotuned kernel: the autotuner asks for a GPU driver.
INTERPRETER_MIN_TRITON = (3, 8)


def require_kernels() -> None:
    """Skip the calling test module unless its kernels can run on ``DEVICE``."""
    triton = pytest.importorskip("triton")
    version = tuple(int(part) for part in triton.__version__.split(".")[:2])
    if DEVICE.type == "cpu" and version < INTERPRETER_MIN_TRITON:
        pytest.skip(
            f"Triton {triton.__version__}'s interpreter cannot run autotuned kernels on the CPU: install "
            f"triton>={'.'.join(map(str, INTERPRETER_MIN_TRITON))} or set QSC_TEST_DEVICE=cuda on a GPU",
            allow_module_level=True,
        )


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _generator(seed: int | torch.Generator) -> torch.Generator:
    return seed if isinstance(seed, torch.Generator) else gen(seed)


def randn(*shape: int, seed: int | torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=_generator(seed)).to(DEVICE)


def rand(*shape: int, seed: int | torch.Generator) -> torch.Tensor:
    return torch.rand(*shape, generator=_generator(seed)).to(DEVICE)
