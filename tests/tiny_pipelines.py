"""Tiny diffusers pipelines built offline: random weights, a word-level tokenizer, tiny VAEs.

Every component has the class the real pipeline uses (UMT5 / T5 text encoders, the Wan and
CogVideoX VAEs, their schedulers), so the pipelines call their transformer exactly as the real
ones do: the same keyword arguments, dtypes, batch stacking for guidance and text lengths.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKLCogVideoX,
    AutoencoderKLWan,
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    FlowMatchEulerDiscreteScheduler,
    WanPipeline,
)
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

from tiny_models import CONFIGS

WORDS = "a an the red blue green circle square triangle moving left right up down slowly".split()
TEXT = dict(vocab_size=len(WORDS) + 3, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
COGVIDEOX_TEXT_TOKENS = 16  # the tiny transformer's max_text_seq_length: pipelines pad prompts to it


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def wan_pipeline(seed: int = 0) -> WanPipeline:
    """8x spatial, 4x temporal VAE (as Wan's), a 2-layer transformer of patch (1, 2, 2)."""
    cls, config = CONFIGS["wan"]
    torch.manual_seed(seed)
    pipe = WanPipeline(
        tokenizer=tokenizer(),
        text_encoder=UMT5EncoderModel(UMT5Config(**TEXT)).eval(),
        vae=AutoencoderKLWan(base_dim=8, z_dim=config["in_channels"], dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                             temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                             latents_std=[1.0] * 4).eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=cls(**config).eval(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def cogvideox_pipeline(seed: int = 0) -> CogVideoXPipeline:
    """2x spatial VAE; the transformer of tests/tiny_models.py with a 16-token text."""
    cls, config = CONFIGS["cogvideox"]
    torch.manual_seed(seed)
    pipe = CogVideoXPipeline(
        tokenizer=tokenizer(),
        text_encoder=T5EncoderModel(T5Config(**TEXT)).eval(),
        vae=AutoencoderKLCogVideoX(block_out_channels=(8, 8), down_block_types=("CogVideoXDownBlock3D",) * 2,
                                   up_block_types=("CogVideoXUpBlock3D",) * 2, latent_channels=config["in_channels"],
                                   layers_per_block=1, norm_num_groups=2).eval(),
        scheduler=CogVideoXDDIMScheduler(),
        transformer=cls(**{**config, "max_text_seq_length": COGVIDEOX_TEXT_TOKENS}).eval(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
