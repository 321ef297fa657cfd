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


OUTLIER_LAYER, OUTLIER_CHANNEL = "blocks.0.ffn.net.2", 5


def with_outlier_channel(model: torch.nn.Module) -> torch.nn.Module:
    """One hidden FFN channel 40x larger than the rest: the input of ``OUTLIER_LAYER`` of a tiny
    Wan gets an activation outlier channel, as real video DiTs have."""
    proj = model.blocks[0].ffn.net[0].proj
    with torch.no_grad():
        proj.weight[OUTLIER_CHANNEL] *= 40
        proj.bias[OUTLIER_CHANNEL] = proj.bias[OUTLIER_CHANNEL].abs() * 40
    return model


class VideoAttention(torch.nn.Module):
    """Self-attention of 2 heads over the frame-major tokens of a ``[B, 32, F, H, W]`` video, as a
    video DiT flattens its patch embedding: the model of a temporal and a spatial head."""

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        tokens = video.flatten(2).transpose(1, 2)  # [B, F*H*W, 32]
        q = tokens.unflatten(-1, (2, 16)).transpose(1, 2)
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        return out.transpose(1, 2).flatten(-2)


def temporal_and_spatial_video(frames: int = 4, height: int = 8, width: int = 8, seed: int = 0) -> torch.Tensor:
    """A ``VideoAttention`` input whose head 0 attends the same position in every frame (its
    channels repeat across frames, with a little noise so that the frames' values differ) and head
    1 each token itself (random channels): tokens of one norm, large for a sharp softmax."""
    g = torch.Generator().manual_seed(seed)
    temporal = torch.randn(1, 16, 1, height, width, generator=g) + 0.05 * torch.randn(1, 16, frames, height, width, generator=g)
    spatial = torch.randn(1, 16, frames, height, width, generator=g)
    heads = [torch.nn.functional.normalize(h, dim=1) for h in (temporal, spatial)]
    return 16 * torch.cat(heads, dim=1)
