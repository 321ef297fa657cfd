"""Writing clips as GIF or MP4 a person can look at: clips side by side, enlarged, each labelled."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..errors import InputError

SCALE = 4  # 32 px clips are too small to judge by eye
LABEL_HEIGHT = 12
GAP = 4


def _frames(clip: torch.Tensor) -> np.ndarray:
    """``[3, F, H, W]`` in [0, 1] -> ``[F, H * SCALE, W * SCALE, 3]`` uint8 (nearest-neighbour)."""
    frames = (clip.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    return frames.repeat(SCALE, axis=1).repeat(SCALE, axis=2)


def side_by_side(clips: Sequence[torch.Tensor], labels: Sequence[str]) -> list[np.ndarray]:
    """One frame sequence showing every clip in a row, its label above it."""
    panels = [_frames(c) for c in clips]
    n_frames, h, w, _ = panels[0].shape
    width = len(panels) * w + (len(panels) - 1) * GAP
    out = []
    for f in range(n_frames):
        canvas = Image.new("RGB", (width, h + LABEL_HEIGHT), "white")
        draw = ImageDraw.Draw(canvas)
        for i, (panel, label) in enumerate(zip(panels, labels, strict=True)):
            x = i * (w + GAP)
            canvas.paste(Image.fromarray(panel[f]), (x, LABEL_HEIGHT))
            draw.text((x + 2, 0), label, fill="black")
        out.append(np.asarray(canvas))
    return out


def write_video(path: str | Path, frames: Sequence[np.ndarray], fps: float = 4.0) -> Path:
    """Write ``frames`` as a looping GIF (``.gif``) or an MP4 (``.mp4``, needs ``imageio-ffmpeg``)."""
    import imageio.v3 as iio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".gif":
        iio.imwrite(path, np.stack(frames), duration=1000 / fps, loop=0)
    elif suffix == ".mp4":
        try:
            iio.imwrite(path, np.stack(frames), fps=fps, codec="libx264", plugin="pyav")
        except (ImportError, OSError, ValueError) as e:
            raise InputError(f"cannot write MP4 {path} ({e}); install `av`, or write a .gif") from None
    else:
        raise InputError(f"unsupported video format {path.suffix!r}: use .gif or .mp4")
    return path
