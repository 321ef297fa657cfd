"""Which linear gets which quantization scheme under a configuration.

Three classes of ``linear``, decided by the layer's path:

* quantized: inside the transformer blocks (``include`` minus ``exclude``): ``w_bits`` weights,
  ``a_bits`` per-token activations; these are the layers that carry the FLOPs;
* weight-only: every other linear (time/text embedders, adaLN modulation, token refiners) gets
  ``weight_only_bits`` weights and keeps float activations: they are ~2% of a video DiT's weights,
  run on a handful of tokens, and int8 weights cost them nothing in accuracy while bringing the
  whole model's storage ratio from ~3.78x to ~3.9x at W4;
* float: ``keep_float`` (the final projection to the latent), and everything when
  ``weight_only_bits`` is 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from . import quant
from .config import CompileConfig
from .graph import LayerFilter, LinearSite, quantizable_linears

FLOAT_ACTIVATIONS = 16


@dataclass(frozen=True)
class LinearScheme:
    w_bits: int
    a_bits: int
    group_size: int  # 0 = per output channel
    a_clip: float = 1.0

    @property
    def label(self) -> str:
        return f"W{self.w_bits}A{self.a_bits}" + (f" g{self.group_size}" if self.group_size else "")


class SchemePlan:
    """``plan.scheme(layer, in_features)``: the scheme of a layer, or None to keep it float."""

    def __init__(self, cfg: CompileConfig):
        self.cfg = cfg
        self.quantized = LayerFilter(cfg.include, cfg.exclude)
        self.kept_float = LayerFilter(cfg.keep_float, ())

    def scheme(self, layer: str, in_features: int) -> LinearScheme | None:
        cfg = self.cfg
        if self.quantized(layer):
            return LinearScheme(cfg.w_bits, cfg.a_bits, quant.effective_group_size(in_features, cfg.group_size), cfg.a_clip)
        if cfg.weight_only_bits and not self.kept_float(layer):
            return LinearScheme(cfg.weight_only_bits, FLOAT_ACTIVATIONS, 0)
        return None

    def linears(self, gm: fx.GraphModule, *, quantized_input: bool = False) -> list[tuple[LinearSite, LinearScheme]]:
        """The linears ``include``/``exclude`` select, in graph order, each with its scheme; with
        ``quantized_input``, only those whose activations are quantized too (the passes that
        reshape an activation's range have nothing to do where it stays float)."""
        sites = quantizable_linears(gm, self.cfg.include, self.cfg.exclude)
        pairs = [(s, self.scheme(s.layer, gm.get_parameter(s.weight_target).shape[1])) for s in sites]
        return [(s, scheme) for s, scheme in pairs if not quantized_input or scheme.a_bits != FLOAT_ACTIVATIONS]


def layer_record(weight: torch.Tensor, scheme: LinearScheme, smoothed: bool) -> dict[str, Any]:
    """What the manifest and reports say of one quantized layer, bytes before and after included
    (after: packed codes, scales, and the SmoothQuant vector stored in the weight's dtype)."""
    n, k = weight.shape
    smoothing_bytes = k * weight.element_size() if smoothed else 0
    return {
        "shape": [n, k],
        "w_bits": scheme.w_bits,
        "a_bits": scheme.a_bits,
        "group_size": scheme.group_size,
        "smoothed": smoothed,
        "bytes_fp": weight.numel() * weight.element_size(),
        "bytes_packed": quant.packed_weight_nbytes(n, k, scheme.w_bits, scheme.group_size) + smoothing_bytes,
    }
