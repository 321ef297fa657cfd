"""Backends: where the ``qsc::`` ops of a lowered graph get their implementations.

* ``reference``: plain PyTorch on any device; the numerical truth and the default off-GPU.
* ``triton``: Triton kernels registered as the CUDA implementations of the ops.
* ``tensorrt``: ONNX with QDQ + plugin nodes, and the engine build.
"""
