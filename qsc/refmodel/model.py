"""The reference model: a small diffusers ``WanTransformer3DModel`` on 8 x 32 x 32 RGB pixels.

The same class and code path as Wan2.1, scaled down so it trains on a CPU: patches of 2 x 2 x 2
pixels give 4 x 16 x 16 = 1024 tokens per video, 4 blocks of width 128 (4 heads of 32). The model
predicts the rectified-flow velocity ``noise - clip`` for a clip scaled to [-1, 1].
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import WanTransformer3DModel

from ..errors import InputError
from .data import FRAMES, SIZE
from .prompts import TEXT_DIM, TEXT_TOKENS

CONFIG = dict(
    patch_size=(2, 2, 2),
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=3,
    out_channels=3,
    text_dim=TEXT_DIM,
    freq_dim=64,
    ffn_dim=512,
    num_layers=4,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=64,
)

LATENT_SHAPE = (3, FRAMES, SIZE, SIZE)  # per video, channels first like Wan's latents
TEXT_SHAPE = (TEXT_TOKENS, TEXT_DIM)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
WEIGHTS = ASSETS / "refmodel.safetensors"


def build_model(seed: int = 0) -> WanTransformer3DModel:
    """A freshly initialised reference model (deterministic for a seed)."""
    torch.manual_seed(seed)
    return WanTransformer3DModel(**CONFIG)


def load_reference_model(path: str | Path = WEIGHTS) -> WanTransformer3DModel:
    """The trained reference model, FP32, in eval mode, from its safetensors weights."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"reference model weights not found at {path}; train them with "
            "`python -m qsc.refmodel.train` (see docs/refmodel/)"
        )
    model = build_model()
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.float().eval()


def as_denoiser(model: torch.nn.Module):
    """Wrap a diffusers transformer as the sampler's denoiser: kwargs in, velocity tensor out."""
    return lambda **kw: model(**kw, return_dict=False)[0]
