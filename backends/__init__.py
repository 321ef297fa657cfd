"""Backends: where the ``qsc::`` ops of a lowered graph get their implementations.

* ``reference``: plain PyTorch on any device; the numerical truth and the default off-GPU.
* ``triton``: Triton kernels registered as the CUDA implementations of the ops.
* ``tensorrt``: engines built from the artifact's ONNX export (``backends/tensorrt``); inside
  PyTorch its programs run the reference ops.

``inductor`` is no backend of its own: it prepares a program for ``torch.compile`` with either.
"""

import importlib
import importlib.util

import torch


def enable(name: str) -> None:
    """Make backend ``name`` provide the ``qsc::`` op kernels on the devices it serves."""
    if name in ("reference", "tensorrt"):
        return  # the ops' default implementation
    from qsc.errors import ConfigError

    try:
        module = importlib.import_module(f"qsc.backends.{name}")
    except ImportError as e:
        raise ConfigError(f"backend {name!r} is not available here: {e}") from None
    module.enable()


def best_available() -> str:
    """Triton on a CUDA machine with Triton installed, the reference backend elsewhere."""
    if torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
        return "triton"
    return "reference"
