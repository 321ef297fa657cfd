"""``qsc inspect``: the contents of an artifact, or the quantization plan for a model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import fx

from .artifact import PROGRAM, read_manifest
from .calibration import CalibrationSet
from .compiler import state_bytes
from .config import resolve_config
from .frontend import DenoiserAdapter, cast_inputs, export_graph, load_model, model_dtype
from .graph import quantizable_linears
from .models import synthetic_calibration

Inspection = tuple[fx.GraphModule, dict[str, dict[str, Any]], dict[str, float]]


def inspect_artifact(path: Path) -> Inspection:
    manifest = read_manifest(path)
    program = torch.export.load(path / PROGRAM)  # weights are placeholders: only the graph is read
    return program.graph_module, manifest["layers"], manifest["sizes"]


def inspect_model(path: Path, *, preset: str | None = None, calib: str | None = None, **load_options: Any) -> Inspection:
    from qsc.passes.quantize_linear import layer_plan

    cfg = resolve_config(preset)
    source = load_model(path, **load_options)
    if source.program is not None:
        gm = source.program.module()
    else:
        adapter = DenoiserAdapter(source.module).eval()
        data = CalibrationSet.load(calib) if calib else synthetic_calibration(source.module, 1, cfg.seed)
        gm = export_graph(adapter, cast_inputs(data.sample(0), model_dtype(adapter)))
    layers = {
        site.layer: layer_plan(gm.get_parameter(site.weight_target), cfg, smoothed=cfg.smooth_quant)
        for site in quantizable_linears(gm, cfg.include, cfg.exclude)
    }
    fp = state_bytes(dict(gm.named_parameters())) + state_bytes(dict(gm.named_buffers()))
    compressed = fp - sum(l["bytes_fp"] for l in layers.values()) + sum(l["bytes_packed"] for l in layers.values())
    return gm, layers, {"fp_bytes": fp, "compressed_bytes": compressed, "ratio": fp / max(compressed, 1)}
