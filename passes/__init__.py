"""The compiler passes, one module each, in pipeline order.

    insert_observers -> calibrate -> smooth_quant -> quantize_linear
        -> sparsify_attention -> second_order_reparam

``REGISTRY`` maps pass names (as used in configs and ``--dump-ir`` file names) to their classes;
``pipeline_for(config)`` turns a configuration into the list of passes that implements it.
"""

from __future__ import annotations

from qsc.config import CompileConfig
from qsc.errors import PipelineError
from qsc.pipeline import Pass

from .calibrate import Calibrate
from .insert_observers import InsertObservers
from .quantize_linear import QuantizeLinear
from .second_order_reparam import SecondOrderReparam
from .smooth_quant import SmoothQuant
from .sparsify_attention import SparsifyAttention

REGISTRY: dict[str, type[Pass]] = {
    cls.name: cls
    for cls in (InsertObservers, Calibrate, SmoothQuant, QuantizeLinear, SparsifyAttention, SecondOrderReparam)
}


def default_pass_names(config: CompileConfig) -> list[str]:
    """The pipeline a configuration asks for when it does not list its passes explicitly."""
    names = ["insert_observers", "calibrate"]
    if config.smooth_quant:
        names.append("smooth_quant")
    names.append("quantize_linear")
    # Attention is sparsified on the quantized graph: the layouts fit the model as it will run.
    if config.density < 1.0:
        names.append("sparsify_attention")
        if config.ssar_tau:
            names.append("second_order_reparam")
    return names


def pipeline_for(config: CompileConfig) -> list[Pass]:
    names = list(config.passes) or default_pass_names(config)
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise PipelineError(f"unknown pass(es) {unknown}; available: {', '.join(REGISTRY)}")
    return [REGISTRY[n]() for n in names]
