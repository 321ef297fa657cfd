"""qsc: a compiler that compresses video diffusion transformers.

    result = qsc.compile(model, calibration, preset="w4a8")   # passes over a torch.export graph
    result.save("model.qsc")                                   # program + packed weights + manifest
    module = qsc.load("model.qsc")                             # runnable; Triton on CUDA if present
"""

__version__ = "0.1.0"

from . import ops  # noqa: F401  (registers the qsc:: custom ops)
from .artifact import load
from .calibration import CalibrationSet
from .compiler import CompileResult, compile
from .config import PRESETS, CompileConfig, resolve_config
from .errors import QscError
from .pipeline import Pass, PassContext, PassInstrument, PassManager, PassResult
from .recording import PipelineRecorder, record

__all__ = [
    "CalibrationSet",
    "CompileConfig",
    "CompileResult",
    "PRESETS",
    "Pass",
    "PassContext",
    "PassInstrument",
    "PassManager",
    "PassResult",
    "PipelineRecorder",
    "QscError",
    "compile",
    "load",
    "record",
    "resolve_config",
]
