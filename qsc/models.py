"""The model architectures qsc knows by name, and example inputs for them.

Any ``nn.Module`` compiles when calibration data is given; for the architectures below qsc can
also make synthetic calibration inputs from the model's config (shapes and dtypes right, values
random), which is what ``qsc compile`` uses when no ``--calib`` file is given.

The synthetic inputs are shaped and typed like the calls of the architecture's diffusers pipeline
at its defaults, batch 1 per call: Wan's and HunyuanVideo's flow-matching float timesteps,
CogVideoX's integer DDIM timesteps, the pipelines' text lengths (Wan 512 tokens, CogVideoX the
config's ``max_text_seq_length``). The latent is small (2 latent frames of 16 x 16, CogVideoX its
configured sample size); the artifact's manifest and ``qsc inspect`` show what was assumed.
"""

from __future__ import annotations

from typing import Callable

import torch

from .calibration import CalibrationSet
from .errors import InputError

InputBuilder = Callable[[torch.nn.Module, torch.Generator], dict[str, torch.Tensor]]


WAN_TEXT_TOKENS = 512  # WanPipeline's max_sequence_length: prompts are padded to it
HUNYUAN_TEXT_TOKENS = 16  # HunyuanVideoPipeline passes the prompt's length (masked): any length works


def _timestep(g: torch.Generator) -> torch.Tensor:
    """An integer timestep, as DDIM-style schedulers (CogVideoX) give them."""
    return torch.randint(1, 1000, (1,), generator=g)


def _float_timestep(g: torch.Generator) -> torch.Tensor:
    """A float timestep in [1, 1000), as flow-matching schedulers (Wan, HunyuanVideo) give them."""
    return 1 + 999 * torch.rand(1, generator=g)


def _wan_inputs(model: torch.nn.Module, g: torch.Generator) -> dict[str, torch.Tensor]:
    c = model.config
    pt, ph, pw = c.patch_size
    return {
        "hidden_states": torch.randn(1, c.in_channels, 2 * pt, 8 * ph, 8 * pw, generator=g),
        "timestep": _float_timestep(g),
        "encoder_hidden_states": torch.randn(1, WAN_TEXT_TOKENS, c.text_dim, generator=g),
    }


def _cogvideox_inputs(model: torch.nn.Module, g: torch.Generator) -> dict[str, torch.Tensor]:
    c = model.config
    # Without learned positional embeddings the sin-cos table is built for the configured sample
    # size, so the latent must have exactly that size.
    frames = (c.sample_frames - 1) // c.temporal_compression_ratio + 1
    return {
        "hidden_states": torch.randn(1, frames, c.in_channels, c.sample_height, c.sample_width, generator=g),
        "encoder_hidden_states": torch.randn(1, c.max_text_seq_length, c.text_embed_dim, generator=g),
        "timestep": _timestep(g),
    }


def _hunyuan_inputs(model: torch.nn.Module, g: torch.Generator) -> dict[str, torch.Tensor]:
    c = model.config
    p, pt = c.patch_size, c.patch_size_t
    return {
        "hidden_states": torch.randn(1, c.in_channels, 2 * pt, 8 * p, 8 * p, generator=g),
        "timestep": _float_timestep(g),
        "encoder_hidden_states": torch.randn(1, HUNYUAN_TEXT_TOKENS, c.text_embed_dim, generator=g),
        "encoder_attention_mask": torch.ones(1, HUNYUAN_TEXT_TOKENS),
        "pooled_projections": torch.randn(1, c.pooled_projection_dim, generator=g),
        "guidance": torch.full((1,), 6000.0),
    }


INPUT_BUILDERS: dict[str, InputBuilder] = {
    "WanTransformer3DModel": _wan_inputs,
    "CogVideoXTransformer3DModel": _cogvideox_inputs,
    "HunyuanVideoTransformer3DModel": _hunyuan_inputs,
}


def architecture_class(name: str) -> type[torch.nn.Module]:
    """A diffusers model class by name, only among the ones qsc supports."""
    if name not in INPUT_BUILDERS:
        raise InputError(f"unknown architecture {name!r}: choose one of {', '.join(INPUT_BUILDERS)}")
    import diffusers

    return getattr(diffusers, name)


def synthetic_calibration(model: torch.nn.Module, num_samples: int, seed: int) -> CalibrationSet:
    """Random inputs of the right shapes for a known architecture, with the model's FP outputs."""
    name = type(model).__name__
    if name not in INPUT_BUILDERS:
        raise InputError(
            f"qsc cannot make example inputs for a {name}: pass calibration data with --calib "
            f"(known architectures: {', '.join(INPUT_BUILDERS)})"
        )
    g = torch.Generator().manual_seed(seed)
    samples = [INPUT_BUILDERS[name](model, g) for _ in range(num_samples)]
    records = [{"source": "synthetic", "seed": seed, "index": i} for i in range(num_samples)]
    return CalibrationSet.from_samples(samples, records=records)

