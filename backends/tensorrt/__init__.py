"""Deployment outside PyTorch: an artifact as ONNX, with qsc's plugin nodes (for TensorRT) or
standard operators only.

* ``onnx_export``: ``export_artifact`` writes ``program.onnx`` (and ``refresh.onnx`` for SSAR) with
  ``onnx.json``; the ``qsc::`` ops become plugin nodes (``plugins``) or standard operators
  (``standard``).
* ``ort``: runs an export in onnxruntime, as a module called like the artifact (SSAR's caches
  threaded by ``qsc.runtime.SSARRuntime``); plugin nodes bound to the reference ops in Python.
* ``engine``: what a TensorRT engine needs, and the one error that says what is missing.
"""
