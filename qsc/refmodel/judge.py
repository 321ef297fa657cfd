"""The judge: a small 3D-conv video classifier of shape, color and motion.

Prompt adherence is the judge's accuracy at recognising, in a generated clip, all three attributes
of the prompt it was generated for; the Frechet distance is measured in its pooled feature space.
Trained on the procedural clips with mild noise and brightness augmentation, so generated clips
(a little noisy, a little off in tone) are not out of its distribution.

    python -m qsc.refmodel.judge --steps 800          # trains and writes qsc/assets/judge.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError
from .data import random_batch, render
from .model import ASSETS
from .prompts import COLORS, EVAL_PROMPTS, EVAL_SEED_BASE, MOTIONS, SHAPES, Prompt

WEIGHTS = ASSETS / "judge.safetensors"
FEATURES = 64
HEADS = {"shape": len(SHAPES), "color": len(COLORS), "motion": len(MOTIONS)}
# Held-out real clips for the judge's reported accuracy: evaluation prompts, seeds past the
# evaluation seeds used for generation.
HELD_OUT_SEED_BASE = EVAL_SEED_BASE + 500_000


def _conv(cin: int, cout: int, stride: tuple[int, int, int]) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(8, cout), nn.SiLU())


class Judge(nn.Module):
    """Clips ``[B, 3, F, H, W]`` in [0, 1] -> logits per attribute; ``features`` for Frechet distance."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            _conv(3, 16, (1, 2, 2)),
            _conv(16, 32, (1, 2, 2)),
            _conv(32, 64, (2, 2, 2)),
            _conv(64, FEATURES, (1, 1, 1)),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(FEATURES, n) for name, n in HEADS.items()})

    def features(self, clips: torch.Tensor) -> torch.Tensor:
        return self.trunk(clips * 2 - 1).mean(dim=(2, 3, 4))

    def forward(self, clips: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(clips)
        return {name: head(f) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, clips: torch.Tensor) -> torch.Tensor:
        """``[B, 3]`` predicted (shape, color, motion) indices."""
        logits = self(clips)
        return torch.stack([logits[name].argmax(-1) for name in HEADS], dim=-1)


def labels(prompts: list[Prompt]) -> torch.Tensor:
    return torch.tensor([p.labels for p in prompts])


@torch.no_grad()
def verdicts(judge: Judge, clips: torch.Tensor, prompts: list[Prompt]) -> torch.Tensor:
    """Bool ``[clips, attributes]`` (attributes in ``HEADS`` order): whether the judge reads each
    attribute of each clip as its prompt says."""
    return judge.predict(clips) == labels(prompts)


def adherence(judge: Judge, clips: torch.Tensor, prompts: list[Prompt]) -> dict[str, float]:
    """Fraction of clips whose shape, color and motion all match their prompt, and per attribute."""
    return adherence_of(verdicts(judge, clips, prompts))


def adherence_of(correct: torch.Tensor) -> dict[str, float]:
    """``adherence`` from the ``verdicts``."""
    result = {"all": float(correct.all(-1).float().mean())}
    result.update({name: float(correct[:, i].float().mean()) for i, name in enumerate(HEADS)})
    return result


def held_out_clips(per_prompt: int) -> tuple[torch.Tensor, list[Prompt]]:
    prompts = [p for p in EVAL_PROMPTS for _ in range(per_prompt)]
    clips = torch.stack([render(p, HELD_OUT_SEED_BASE + i) for i, p in enumerate(prompts)])
    return clips, prompts


def _augment(clips: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    b = clips.shape[0]
    gain = 1 + 0.15 * (torch.rand(b, 1, 1, 1, 1, generator=g) - 0.5)
    noise = 0.08 * torch.rand(b, 1, 1, 1, 1, generator=g) * torch.randn(clips.shape, generator=g)
    return (clips * gain + noise).clamp(0, 1)


def train(steps: int, batch_size: int, seed: int, threads: int) -> tuple[Judge, list[dict]]:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    judge = Judge()
    optimizer = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    history, started = [], time.time()
    for step in range(steps):
        # Training seeds are far from the evaluation and calibration seed ranges.
        prompts, clips = random_batch(batch_size, seed=10_000_000 + seed * 100_000 + step)
        logits = judge(_augment(clips, g))
        y = labels(prompts)
        loss = sum(nn.functional.cross_entropy(logits[n], y[:, i]) for i, n in enumerate(HEADS))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % 50 == 0:
            history.append({"step": step + 1, "loss": loss.item(), "elapsed_s": round(time.time() - started, 1)})
            print(json.dumps(history[-1]), flush=True)
    return judge.eval(), history


def load_judge(path: str | Path = WEIGHTS) -> Judge:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise InputError(f"judge weights not found at {path}; train them with `python -m qsc.refmodel.judge`")
    judge = Judge()
    judge.load_state_dict(load_file(str(path)), strict=True)
    return judge.eval()


def main(argv: list[str] | None = None) -> None:
    from safetensors.torch import save_file

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log", default="docs/refmodel/judge_log.json")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    judge, history = train(args.steps, args.batch, args.seed, args.threads)
    clips, prompts = held_out_clips(per_prompt=20)
    accuracy = adherence(judge, clips, prompts)
    print("held-out accuracy on real clips:", json.dumps(accuracy), flush=True)
    WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
    save_file(judge.state_dict(), str(WEIGHTS), metadata={"held_out_accuracy": json.dumps(accuracy)})
    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    Path(args.log).write_text(json.dumps({"command": " ".join(["python -m qsc.refmodel.judge", *argv]),
                                          "args": vars(args), "history": history,
                                          "held_out_accuracy": accuracy}, indent=1))


if __name__ == "__main__":
    main()
