"""Procedural video clips: a colored shape moving over a textured background.

A clip is a float tensor ``[3, FRAMES, SIZE, SIZE]`` in [0, 1] (channels, frames, height, width),
a pure function of its prompt and seed. Shapes are drawn from signed distance functions with a
one-pixel soft edge, so small sub-pixel motions stay visible and the data has no aliasing the model
would have to learn.
"""

from __future__ import annotations

import math

import torch

from .prompts import ALL_PROMPTS, Prompt

FRAMES = 8
SIZE = 32

RGB = {
    "red": (0.92, 0.12, 0.12),
    "green": (0.12, 0.80, 0.18),
    "blue": (0.18, 0.32, 0.96),
    "yellow": (0.95, 0.86, 0.12),
}


def _grid() -> tuple[torch.Tensor, torch.Tensor]:
    coords = torch.arange(SIZE, dtype=torch.float32) + 0.5
    return torch.meshgrid(coords, coords, indexing="ij")  # (y, x), pixel centres


def _background(g: torch.Generator) -> torch.Tensor:
    """A dim, low-contrast texture ``[3, SIZE, SIZE]``: stripes, checkers or smooth blobs."""
    y, x = _grid()
    kind = int(torch.randint(3, (1,), generator=g))
    if kind == 0:
        angle = float(torch.rand(1, generator=g)) * math.pi
        period = 4.0 + 8.0 * float(torch.rand(1, generator=g))
        pattern = 0.5 + 0.5 * torch.sin(2 * math.pi * (x * math.cos(angle) + y * math.sin(angle)) / period)
    elif kind == 1:
        cell = int(torch.randint(3, 9, (1,), generator=g))
        pattern = ((x // cell + y // cell) % 2).float()
    else:
        coarse = torch.rand(1, 1, 5, 5, generator=g)
        pattern = torch.nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bicubic", align_corners=True)
        pattern = pattern[0, 0].clamp(0, 1)
    low = 0.08 + 0.25 * torch.rand(3, generator=g)  # per-channel tint, dark enough for any shape color
    contrast = 0.05 + 0.15 * torch.rand(1, generator=g)
    return low[:, None, None] + contrast * pattern[None]


def _signed_distance(shape: str, dy: torch.Tensor, dx: torch.Tensor, r: float) -> torch.Tensor:
    """Distance (pixels, negative inside) to a shape of half-size ``r`` centred at the origin."""
    if shape == "circle":
        return torch.sqrt(dx * dx + dy * dy) - r
    if shape == "square":
        return torch.maximum(dx.abs(), dy.abs()) - 0.85 * r
    # Upward-pointing equilateral triangle: the max of the distances to its three edge lines.
    edges = [dy - 0.6 * r]  # base; inradius 0.6 r gives about the area of the square
    for sign in (-1.0, 1.0):
        nx, ny = sign * math.sqrt(3) / 2, -0.5
        edges.append(dx * nx + dy * ny - 0.6 * r)
    return torch.stack(edges).amax(0)


def _trajectory(motion: str, r: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre (y, x) per frame; the whole path stays inside the frame."""
    t = torch.arange(FRAMES, dtype=torch.float32)
    uniform = lambda lo, hi: lo + (hi - lo) * float(torch.rand(1, generator=g))  # noqa: E731
    if motion == "bouncing":
        height = uniform(8.0, 12.0)
        floor = uniform(r + height, SIZE - r)
        y = floor - height * torch.sin(math.pi * t / (FRAMES - 1))
        x = torch.full_like(t, uniform(r, SIZE - r))
        return y, x
    speed = uniform(1.4, 2.0)
    travel = speed * (FRAMES - 1)
    start = uniform(r, SIZE - r - travel)
    along = start + speed * t  # increasing coordinate
    across = torch.full_like(t, uniform(r, SIZE - r))
    if motion == "right":
        return across, along
    if motion == "left":
        return across, along.flip(0)
    if motion == "down":
        return along, across
    return along.flip(0), across  # up


def render(prompt: Prompt, seed: int) -> torch.Tensor:
    """The clip of ``prompt`` for ``seed``: ``[3, FRAMES, SIZE, SIZE]`` in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    background = _background(g)
    r = 5.0 + 2.0 * float(torch.rand(1, generator=g))
    color = torch.tensor(RGB[prompt.color]) + 0.04 * (torch.rand(3, generator=g) - 0.5)
    ys, xs = _trajectory(prompt.motion, r, g)
    gy, gx = _grid()
    frames = []
    for cy, cx in zip(ys.tolist(), xs.tolist()):
        coverage = (0.5 - _signed_distance(prompt.shape, gy - cy, gx - cx, r)).clamp(0, 1)
        frames.append(background * (1 - coverage) + color[:, None, None] * coverage)
    return torch.stack(frames, dim=1).clamp(0, 1)


def random_batch(batch_size: int, seed: int) -> tuple[list[Prompt], torch.Tensor]:
    """``batch_size`` clips of uniformly drawn prompts; clip ``i`` uses seed ``seed * batch_size + i``."""
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(ALL_PROMPTS), (batch_size,), generator=g).tolist()
    prompts = [ALL_PROMPTS[i] for i in picks]
    clips = torch.stack([render(p, seed * batch_size + i) for i, p in enumerate(prompts)])
    return prompts, clips
