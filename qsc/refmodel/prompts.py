"""The prompt vocabulary and its fixed text-embedding table.

A prompt names one shape, one color and one motion ("a red circle moving left"). A real text-to-video
DiT is conditioned on a text encoder's token embeddings; here every word has a fixed random vector
(drawn once from a seeded generator), and a prompt embeds to the vectors of its three words, so the
transformer sees a ``[1, TEXT_TOKENS, TEXT_DIM]`` tensor exactly like ``encoder_hidden_states``.
The empty prompt (used for classifier-free guidance) embeds to zeros.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow")
MOTIONS = ("left", "right", "up", "down", "bouncing")

TEXT_TOKENS = 3
TEXT_DIM = 32
_TABLE_SEED = 20250101


@dataclass(frozen=True)
class Prompt:
    shape: str
    color: str
    motion: str

    def __post_init__(self) -> None:
        for value, choices in ((self.shape, SHAPES), (self.color, COLORS), (self.motion, MOTIONS)):
            if value not in choices:
                raise ValueError(f"unknown word {value!r}: expected one of {choices}")

    @property
    def text(self) -> str:
        verb = "bouncing" if self.motion == "bouncing" else f"moving {self.motion}"
        return f"a {self.color} {self.shape} {verb}"

    @property
    def labels(self) -> tuple[int, int, int]:
        """Class indices (shape, color, motion), as the judge predicts them."""
        return SHAPES.index(self.shape), COLORS.index(self.color), MOTIONS.index(self.motion)

    @classmethod
    def parse(cls, text: str) -> "Prompt":
        """Read "a red circle moving left" (word order and filler words are free)."""
        words = text.lower().replace(",", " ").split()
        pick = lambda choices: [w for w in words if w in choices]  # noqa: E731
        found = pick(SHAPES), pick(COLORS), pick(MOTIONS)
        if any(len(f) != 1 for f in found):
            raise ValueError(
                f"prompt {text!r} must name exactly one shape {SHAPES}, one color {COLORS} "
                f"and one motion {MOTIONS}"
            )
        return cls(found[0][0], found[1][0], found[2][0])


ALL_PROMPTS = tuple(Prompt(s, c, m) for s, c, m in itertools.product(SHAPES, COLORS, MOTIONS))

# Evaluation and calibration use disjoint prompts and disjoint seeds. The evaluation prompts cover
# every shape, color and motion (one prompt per shape x color, motions in turn); training uses all
# prompts (it is the model's own data).
EVAL_PROMPTS = tuple(
    Prompt(shape, color, MOTIONS[k % len(MOTIONS)])
    for k, (shape, color) in enumerate(itertools.product(SHAPES, COLORS))
)
CALIBRATION_PROMPTS = tuple(p for p in ALL_PROMPTS if p not in EVAL_PROMPTS)
EVAL_SEED_BASE = 1_000_000
CALIBRATION_SEED_BASE = 2_000_000


def _word_table() -> dict[str, torch.Tensor]:
    words = SHAPES + COLORS + MOTIONS
    g = torch.Generator().manual_seed(_TABLE_SEED)
    vectors = torch.randn(len(words), TEXT_DIM, generator=g)
    return dict(zip(words, vectors))


_WORDS = _word_table()


def embed(prompt: Prompt | None) -> torch.Tensor:
    """``[1, TEXT_TOKENS, TEXT_DIM]`` text embedding; ``None`` is the empty (unconditional) prompt."""
    if prompt is None:
        return torch.zeros(1, TEXT_TOKENS, TEXT_DIM)
    return torch.stack([_WORDS[prompt.color], _WORDS[prompt.shape], _WORDS[prompt.motion]])[None].clone()
