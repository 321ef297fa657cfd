"""The compiler passes, one module each, in pipeline order.

    rotate_inputs -> select_calibration -> insert_observers -> calibrate -> smooth_quant -> learn_scales
        -> compensate_weights -> quantize_linear -> sparsify_attention -> second_order_reparam

``REGISTRY`` maps pass names (as used in configs and ``--dump-ir`` file names) to their classes;
``pipeline_for(config)`` turns a configuration into the list of passes that implements it.
"""

from __future__ import annotations

from qsc.config import CompileConfig
from qsc.errors import PipelineError
from qsc.pipeline import Pass

from .calibrate import Calibrate
from .compensate_weights import CompensateWeights
from .insert_observers import InsertObservers
from .learn_scales import LearnScales
from .quantize_linear import QuantizeLinear
from .rotate_inputs import RotateInputs
from .second_order_reparam import SecondOrderReparam
from .select_calibration import SelectCalibration
from .smooth_quant import SmoothQuant
from .sparsify_attention import SparsifyAttention

REGISTRY: dict[str, type[Pass]] = {
    cls.name: cls
    for cls in (
        RotateInputs, SelectCalibration, InsertObservers, Calibrate, SmoothQuant, LearnScales, CompensateWeights, QuantizeLinear,
        SparsifyAttention, SecondOrderReparam,
    )
}


def default_pass_names(config: CompileConfig) -> list[str]:
    """The pipeline a configuration asks for when it does not list its passes explicitly."""
    # Uniform selection is the calibration set's even spread, which every pass gets by default.
    # The rotation first: every later pass measures and fits the layers as they will run.
    names = ["rotate_inputs"] if config.rotate_inputs else []
    if config.calib_selection != "uniform":
        names.append("select_calibration")
    names += ["insert_observers", "calibrate"]
    if config.smooth_quant:
        names.append("smooth_quant")
    if config.learn_scales:
        names.append("learn_scales")  # starts from smooth_quant's state where it ran
    if config.compensate_weights:
        names.append("compensate_weights")  # under the scales learn_scales' clipping gives
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
