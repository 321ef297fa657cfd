"""Calibration recording: transformer inputs and FP outputs, one sample per forward call of batch 1.

Two sources produce the same ``CalibrationSet``:

* ``record_sampler`` runs the bundled sampler and keeps every denoiser call (prompt x step x
  cond/uncond); ``reference_calibration`` is that on the reference model with calibration prompts.
* ``PipelineRecorder`` hooks ``pipe.transformer`` of a user's diffusers pipeline while it runs, so a
  user calibrates on their own prompts. Batched calls (pipelines that stack cond and uncond) are split
  into batch-1 samples, the static shape qsc exports.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch

from ..calibration import CalibrationSet
from ..errors import CalibrationError
from .prompts import CALIBRATION_PROMPTS, CALIBRATION_SEED_BASE, Prompt
from .sampler import DEFAULT_STEPS, Denoiser, denoiser_calls


@torch.no_grad()
def record_sampler(
    denoiser: Denoiser, prompts: Sequence[Prompt], seeds: Sequence[int], **options
) -> CalibrationSet:
    """Sample every (prompt, seed) pair and record every denoiser call with its output."""
    samples, outputs, records = [], [], []
    for prompt, seed in zip(prompts, seeds, strict=True):
        for kwargs, output, record in denoiser_calls(denoiser, prompt, seed, **options):
            samples.append({name: t.clone() for name, t in kwargs.items()})
            outputs.append(output.clone())
            records.append(record)
    return CalibrationSet.from_samples(samples, outputs, records)


def calibration_prompts(num_prompts: int, seed: int = 0) -> tuple[list[Prompt], list[int]]:
    """``num_prompts`` calibration prompts (a seeded draw) and their noise seeds; both are disjoint
    from the evaluation prompts and seeds."""
    if not 1 <= num_prompts <= len(CALIBRATION_PROMPTS):
        raise CalibrationError(f"num_prompts must be in 1..{len(CALIBRATION_PROMPTS)}, got {num_prompts}")
    order = torch.randperm(len(CALIBRATION_PROMPTS), generator=torch.Generator().manual_seed(seed))
    prompts = [CALIBRATION_PROMPTS[i] for i in order[:num_prompts].tolist()]
    return prompts, [CALIBRATION_SEED_BASE + 1000 * seed + i for i in range(num_prompts)]


def reference_calibration(num_prompts: int = 8, steps: int = DEFAULT_STEPS, seed: int = 0) -> CalibrationSet:
    """Calibration data of the bundled reference model: its sampler's trajectories on calibration
    prompts, every step, conditional and unconditional calls."""
    from .model import as_denoiser, load_reference_model

    prompts, seeds = calibration_prompts(num_prompts, seed)
    return record_sampler(as_denoiser(load_reference_model()), prompts, seeds, steps=steps)


class PipelineRecorder:
    """Record every forward of ``module`` (e.g. ``pipe.transformer``) inside a ``with`` block::

        with PipelineRecorder(pipe.transformer) as rec:
            pipe(prompt="...", num_inference_steps=20)
        rec.calibration().save("calib.safetensors")
    """

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self._signature = inspect.signature(module.forward)
        self._samples: list[dict[str, torch.Tensor]] = []
        self._outputs: list[torch.Tensor] = []
        self._records: list[dict[str, Any]] = []
        self._pending: list[dict[str, torch.Tensor]] = []
        self._handles: list[Any] = []

    def __enter__(self) -> "PipelineRecorder":
        self._handles = [
            self.module.register_forward_pre_hook(self._before, with_kwargs=True),
            self.module.register_forward_hook(self._after, with_kwargs=True),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _before(self, module, args, kwargs) -> None:
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        tensors = {n: v for n, v in bound.items() if isinstance(v, torch.Tensor)}
        if "hidden_states" not in tensors:
            raise CalibrationError(f"{type(module).__name__} was called without a hidden_states tensor")
        batch = tensors["hidden_states"].shape[0]
        self._pending = [_batch_item(tensors, batch, b) for b in range(batch)]

    def _after(self, module, args, kwargs, output) -> None:
        output = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
        call = len({r["call"] for r in self._records})
        for b, sample in enumerate(self._pending):
            self._samples.append(sample)
            self._outputs.append(output[b : b + 1].detach().float().cpu())
            timestep = sample.get("timestep")
            record = {"call": call, "batch_index": b}
            if timestep is not None and timestep.numel() == 1:
                record["timestep"] = float(timestep)
            self._records.append(record)
        self._pending = []

    def calibration(self) -> CalibrationSet:
        if not self._samples:
            raise CalibrationError("the recorder saw no forward call of the hooked module")
        return CalibrationSet.from_samples(self._samples, self._outputs, self._records).validate()


def _batch_item(tensors: dict[str, torch.Tensor], batch: int, b: int) -> dict[str, torch.Tensor]:
    """Sample ``b`` of a batched call, keeping a batch dimension of 1; a timestep shared by the
    batch (0-d or one value) is given to every sample."""
    item = {}
    for name, t in tensors.items():
        t = t.detach().float().cpu() if t.is_floating_point() else t.detach().cpu()
        if t.ndim == 0 or (name == "timestep" and t.shape[0] != batch):
            item[name] = t.reshape(1)
        elif t.shape[0] == batch:
            item[name] = t[b : b + 1].clone()
    return item
