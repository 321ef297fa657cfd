"""The bundled reference video model and its quality harness.

A small diffusers ``WanTransformer3DModel`` trained by the project on procedural clips (a colored
shape moving over a textured background), so compression can be judged on a model with learned
structure: ``prompts`` (vocabulary, text-embedding table), ``data`` (clip generator), ``model``
(config, weights), ``train`` (rectified flow), ``sampler`` (flow-matching Euler + CFG), ``judge``
(adherence classifier), ``recording`` (calibration data), ``video`` (GIF/MP4 writing).
"""

from .model import as_denoiser, load_reference_model
from .recording import reference_calibration

__all__ = ["load_reference_model", "reference_calibration", "as_denoiser"]
