"""Deployment outside PyTorch: an artifact as ONNX, with qsc's plugin nodes (for TensorRT) or
standard operators only.

* ``onnx_export``: ``export_artifact`` writes ``program.onnx`` (and ``refresh.onnx`` for SSAR) with
  ``onnx.json``; the ``qsc::`` ops become plugin nodes (``plugins``) or standard operators
  (``standard``).
* ``ort``: runs an export in onnxruntime, as a module called like the artifact (SSAR's caches
  threaded by ``qsc.runtime.SSARRuntime``); plugin nodes bound to the reference ops in Python.
* ``aot_kernels``, ``aot_plugins``: the plugins' Triton kernels in TensorRT's argument order,
  compiled ahead of time to PTX for sm_90 / sm_80 per tactic, packaged with their launches;
* ``trt_plugins``: their ``tensorrt.plugin`` registrations (shape/type, tactics, AOT kernels);
* ``engine``: ``qsc export --format tensorrt`` (ONNX, PTX, engines where TensorRT and a GPU
  exist), the engine build and runner, and the one error that says what is missing.
"""
