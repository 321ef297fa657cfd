"""``qsc inspect``: the contents of an artifact, or the quantization plan for a model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import fx

from .artifact import PROGRAM, read_manifest
from .calibration import CalibrationSet
from .compiler import module_bytes
from .config import CompileConfig, resolve_config
from .frontend import DenoiserAdapter, cast_inputs, export_graph, load_model, model_dtype
from .graph import linear_sites
from .models import synthetic_calibration
from .schemes import FLOAT_ACTIVATIONS, SchemePlan, layer_record

Inspection = tuple[fx.GraphModule, dict[str, dict[str, Any]], dict[str, float]]


def inspect_artifact(path: Path) -> Inspection:
    manifest = read_manifest(path)
    program = torch.export.load(path / PROGRAM)  # weights are placeholders: only the graph is read
    return program.graph_module, manifest["layers"], manifest["sizes"]


def inspect_model(path: Path, *, preset: str | None = None, calib: str | None = None, **load_options: Any) -> Inspection:
    cfg = resolve_config(preset)
    source = load_model(path, **load_options)
    if source.program is not None:
        gm = source.program.module()
    else:
        adapter = DenoiserAdapter(source.module).eval()
        data = CalibrationSet.load(calib) if calib else synthetic_calibration(source.module, 1, cfg.seed)
        gm = export_graph(adapter, cast_inputs(data.sample(0), model_dtype(adapter)))
    weights = {site.layer: gm.get_parameter(site.weight_target) for site in linear_sites(gm)}
    return (gm, *plan_layers(weights, module_bytes(gm), cfg))


def plan_layers(
    weights: dict[str, torch.Tensor], total_bytes: int, cfg: CompileConfig
) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
    """The layer records and sizes a compile with ``cfg`` would produce, without compiling (all
    but the ``smooth_alpha`` a compile records, which a search may pick from the data).

    ``weights`` maps layer paths to linear weights (real or on the meta device), ``total_bytes``
    is the whole model's FP size.
    """
    plan = SchemePlan(cfg)
    layers = {}
    for layer, weight in weights.items():
        scheme = plan.scheme(layer, weight.shape[1])
        if scheme is not None:
            smoothed = cfg.smooth_quant and scheme.a_bits != FLOAT_ACTIVATIONS
            layers[layer] = layer_record(weight, scheme, smoothed=smoothed)
    compressed = total_bytes - sum(r["bytes_fp"] - r["bytes_packed"] for r in layers.values())
    return layers, {"fp_bytes": total_bytes, "compressed_bytes": compressed, "ratio": total_bytes / max(compressed, 1)}
