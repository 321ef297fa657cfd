"""Tiny random configurations of the diffusers video transformers qsc supports.

Small enough to export and compile in seconds on a CPU, with every structural feature of the real
models (self/cross attention, adaLN modulation, token refiner, single-stream blocks).
"""

from __future__ import annotations

import torch
from diffusers import CogVideoXTransformer3DModel, HunyuanVideoTransformer3DModel, WanTransformer3DModel

CONFIGS = {
    "wan": (WanTransformer3DModel, dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4,
        out_channels=4, text_dim=32, freq_dim=32, ffn_dim=128, num_layers=2, rope_max_seq_len=32)),
    "cogvideox": (CogVideoXTransformer3DModel, dict(
        num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4, time_embed_dim=32,
        text_embed_dim=32, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=8)),
    "hunyuan": (HunyuanVideoTransformer3DModel, dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=32,
        pooled_projection_dim=16, rope_axes_dim=(8, 12, 12))),
}


def tiny_model(name: str, seed: int = 0) -> torch.nn.Module:
    cls, config = CONFIGS[name]
    torch.manual_seed(seed)
    return cls(**config).eval()
