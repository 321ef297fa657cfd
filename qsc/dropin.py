"""A loaded artifact in the place of a diffusers transformer, called by the pipeline as it is::

    pipe.transformer = qsc.load("wan-w4a8.qsc", like=pipe.transformer)
    video = pipe(prompt="...").frames

A diffusers pipeline reads its transformer's ``config`` (patch size, channels, sample size),
``dtype`` (to cast the latents) and ``device``, enters ``cache_context(name)`` around every call,
and calls it with keyword tensors plus ``attention_kwargs`` and ``return_dict``, expecting a tuple
or a ``Transformer2DModelOutput``. ``DropInTransformer`` answers all of these from the FP model it
replaces and runs the artifact (``qsc.artifact.CompressedModule``, which checks every input and
serves batched calls) for the computation.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterator

import torch

from .artifact import CompressedModule
from .errors import InputError
from .frontend import model_dtype


class DropInTransformer(torch.nn.Module):
    """``compressed`` with the calling convention of ``like`` (the FP diffusers transformer)."""

    def __init__(self, compressed: CompressedModule, like: torch.nn.Module):
        super().__init__()
        self.compressed = compressed
        self.config = getattr(like, "config", None)
        self._dtype = model_dtype(like)
        self._signature = inspect.signature(like.forward)
        self._like_class = type(like).__name__

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the pipeline feeds: the FP model's (floating inputs are cast to the artifact's)."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self.compressed.device

    @contextlib.contextmanager
    def cache_context(self, name: str, **_: Any) -> Iterator[None]:
        """diffusers' hook for its own step caches (first-block cache, ...), which a compiled program
        does not have. Guidance's branches need no label: SSAR tells them apart by the timestep."""
        yield

    def reset(self) -> None:
        """Forget SSAR's caches (a new video starts over by itself when the timestep rises)."""
        self.compressed.reset()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        try:
            arguments = self._signature.bind(*args, **kwargs).arguments
        except TypeError as e:
            raise InputError(f"{self._like_class} call does not fit its forward(): {e}") from None
        return_dict = arguments.pop("return_dict", True)
        if arguments.pop("attention_kwargs", None):
            raise InputError(
                "attention_kwargs cannot change a compiled artifact (LoRA scales are compiled in): "
                "call it with attention_kwargs=None"
            )
        takes = {**self.compressed.inputs.specs, **self.compressed.inputs.constants}
        unused = [n for n, v in arguments.items() if v is not None and n not in takes]
        if unused:
            raise InputError(
                f"{self._like_class} was called with {unused}, which the artifact was not compiled with: "
                f"record calibration data from this pipeline (qsc record) and compile again"
            )
        inputs = {n: v for n, v in arguments.items() if n in takes}
        like = inputs.get("hidden_states")
        out = self.compressed(**{n: self._cast(n, v) for n, v in inputs.items()})
        if isinstance(like, torch.Tensor):
            out = out.to(like.dtype)
        if not return_dict:
            return (out,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=out)

    def _cast(self, name: str, value: Any) -> Any:
        """Floating tensors to the artifact's float dtype (a bf16 pipeline on an fp32 artifact);
        anything else is checked, not converted, by the artifact."""
        spec = self.compressed.inputs.specs.get(name)  # None: a constant, checked by the artifact
        if spec is None or not isinstance(value, torch.Tensor):
            return value
        return value.to(spec.dtype) if value.is_floating_point() and spec.dtype.is_floating_point else value
