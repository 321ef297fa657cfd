"""Which autotune configurations a kernel tries, on the device at hand.

Every kernel keeps two lists: one tuned for Hopper (H100/H200: 228 KB of shared memory per SM,
wgmma, deep pipelines) and a conservative fallback that fits the shared memory of older and smaller
GPUs (sm_80/sm_86/sm_89). Both lists go to ``triton.autotune``; its ``early_config_prune`` hook
keeps the list that matches the device, so one kernel object serves every GPU.

Under ``TRITON_INTERPRET=1`` (the CPU test mode) only the first fallback configuration runs: the
interpreter has no timings worth tuning, and benchmarking every config there would only be slow.
"""

from __future__ import annotations

import torch
import triton


def interpreting() -> bool:
    return bool(triton.knobs.runtime.interpret)


def device_configs(hopper: list[triton.Config], fallback: list[triton.Config]) -> list[triton.Config]:
    if interpreting():
        return fallback[:1]
    major, _ = torch.cuda.get_device_capability()
    return hopper if major == 9 else fallback


def with_meta(config: triton.Config, **meta: int) -> triton.Config:
    """A copy of ``config`` with some meta-parameters replaced (launch settings kept)."""
    return triton.Config(
        {**config.kwargs, **meta},
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        num_ctas=config.num_ctas,
        maxnreg=config.maxnreg,
    )
