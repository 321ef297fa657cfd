"""TensorRT engines from the plugin graph: what a machine needs for them.

An engine is built from the plugin graph (``onnx_export``, ``use_plugins=True``) once qsc's plugins
are registered with ``tensorrt.plugin``; their implementations (the Triton kernels as PTX for
sm_90 / sm_80, ``qsc.kernels.aot``) are not written yet, so ``export_engine`` stops with one error
after checking for TensorRT and a GPU, each of which it names when missing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from qsc.errors import ConfigError


def default_output(artifact: str | Path) -> Path:
    return Path(artifact) / "tensorrt"


def require_tensorrt() -> None:
    """Raise the one error that says what this machine lacks for TensorRT engines."""
    if importlib.util.find_spec("tensorrt") is None:
        raise ConfigError("TensorRT engines need the 'tensorrt' package (pip install 'qsc[tensorrt]') "
                          "and an NVIDIA GPU; 'qsc export --format onnx' works without them")
    if not torch.cuda.is_available():
        raise ConfigError("TensorRT engines need an NVIDIA GPU (torch.cuda.is_available() is False here); "
                          "'qsc export --format onnx' works without one")


def export_engine(artifact: str | Path, output: str | Path, *, overwrite: bool = False) -> Path:
    """The plugin graph of ``artifact`` and its engines, in the directory ``output``."""
    require_tensorrt()
    raise ConfigError("qsc's TensorRT plugins have no implementations yet: export the plugin graph with "
                      "'qsc export --format onnx' and build with your own plugins")
