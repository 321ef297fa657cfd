"""Flow-matching Euler sampling with classifier-free guidance.

The denoiser is any callable ``denoiser(hidden_states=, timestep=, encoder_hidden_states=) -> Tensor``
returning the velocity: the FP diffusers model (wrapped by ``model.as_denoiser``) or a module compiled
by qsc. Every call has batch 1 (conditional and unconditional are separate calls), which is the
static shape the compiler exports, so the same loop serves FP, compressed and calibration recording.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from .model import LATENT_SHAPE
from .prompts import Prompt, embed

Denoiser = Callable[..., torch.Tensor]

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 5.0  # docs/refmodel/sampler_study.json: best adherence on calibration prompts
DEFAULT_SHIFT = 1.0


def sigmas(steps: int, shift: float = DEFAULT_SHIFT) -> torch.Tensor:
    """Noise levels from 1 to 0 (``steps + 1`` values), time-shifted like Wan's scheduler."""
    s = torch.linspace(1.0, 0.0, steps + 1)
    return shift * s / (1 + (shift - 1) * s)


def initial_noise(seed: int) -> torch.Tensor:
    return torch.randn((1, *LATENT_SHAPE), generator=torch.Generator().manual_seed(seed))


def denoiser_calls(
    denoiser: Denoiser,
    prompt: Prompt,
    seed: int,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    shift: float = DEFAULT_SHIFT,
) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor, dict]]:
    """Run the sampler, yielding ``(kwargs, output, record)`` for every denoiser call; the final
    clip is the generator's return value (see ``sample``)."""
    cond, uncond = embed(prompt), embed(None)
    x = initial_noise(seed)
    levels = sigmas(steps, shift)
    for i in range(steps):
        timestep = (levels[i] * 1000).reshape(1)
        velocities = {}
        for branch, text in (("cond", cond), ("uncond", uncond)):
            kwargs = {"hidden_states": x, "timestep": timestep, "encoder_hidden_states": text}
            velocities[branch] = denoiser(**kwargs)
            record = {"prompt": prompt.text, "step": i, "t": float(levels[i]), "seed": seed, "cfg": branch}
            yield kwargs, velocities[branch], record
        v = velocities["uncond"] + guidance * (velocities["cond"] - velocities["uncond"])
        x = x + (levels[i + 1] - levels[i]) * v
    return ((x[0] + 1) / 2).clamp(0, 1)


@torch.no_grad()
def sample(denoiser: Denoiser, prompt: Prompt, seed: int, **options) -> torch.Tensor:
    """The clip ``[3, FRAMES, SIZE, SIZE]`` in [0, 1] generated for ``prompt`` from ``seed``'s noise."""
    calls = denoiser_calls(denoiser, prompt, seed, **options)
    while True:
        try:
            next(calls)
        except StopIteration as done:
            return done.value
