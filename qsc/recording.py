"""Calibration data from a user's own diffusers pipeline: every call of ``pipe.transformer``.

    calib = qsc.record(pipe, ["a red fox running", "waves at night"], num_inference_steps=20)
    calib.save("calib.safetensors")          # then: qsc compile MODEL --calib calib.safetensors

or, around any code that runs the pipeline::

    with qsc.PipelineRecorder(pipe.transformer) as rec:
        pipe(prompt="...", num_inference_steps=20)
    rec.calibration().save("calib.safetensors")

Each batched call is split into samples of batch 1 (the shape qsc exports; the loaded artifact
serves batched calls again). Every sample is labelled in its record: ``prompt`` and ``seed`` (when
``record`` ran the pipeline), ``step`` (the denoising step: calls with the timestep of the call
before belong to the same step), ``branch`` (``cond`` / ``uncond`` of classifier-free guidance,
from the pipeline's ``cache_context``: ``cond_uncond`` calls stack the unconditional half first,
as diffusers' pipelines do, when the pipeline says it guides), ``batch_index``, ``timestep`` and ``call``.

Non-tensor arguments (LTX-Video's ``num_frames``, ``height``, ``width``) become the set's
``constants``: they must be the same in every call, since the program is compiled for them.
"""

from __future__ import annotations

import contextlib
import inspect
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from .calibration import CalibrationSet
from .errors import CalibrationError, InputError
from .frontend import is_option

STACKED_BRANCHES = "cond_uncond"  # the cache_context of calls that stack both branches of guidance


class PipelineRecorder:
    """Records every forward of ``module`` (e.g. ``pipe.transformer``) inside a ``with`` block.
    ``pipeline``, when given, tells whether its stacked calls carry both branches of guidance."""

    def __init__(self, module: torch.nn.Module, *, pipeline: Any = None):
        self.module = module
        self.pipeline = pipeline
        self._signature = inspect.signature(module.forward)
        self._samples: list[dict[str, torch.Tensor]] = []
        self._outputs: list[torch.Tensor] = []
        self._records: list[dict[str, Any]] = []
        self._constants: dict[str, Any] = {}
        self._pending: list[dict[str, torch.Tensor]] = []
        self._handles: list[Any] = []
        self._labels: dict[str, Any] = {}  # set by ``begin``: what the current pipeline run is
        self._context: str | None = None  # the pipeline's cache_context name around this call
        self._step, self._last_timestep, self._calls = -1, None, 0

    def begin(self, **labels: Any) -> None:
        """A new pipeline run starts: its samples get ``labels`` (prompt, seed) and steps count from 0."""
        self._labels = labels
        self._step, self._last_timestep = -1, None

    def __enter__(self) -> "PipelineRecorder":
        self._handles = [
            self.module.register_forward_pre_hook(self._before, with_kwargs=True),
            self.module.register_forward_hook(self._after, with_kwargs=True),
        ]
        if hasattr(self.module, "cache_context"):
            self.module.cache_context = self._labelled_context(self.module.cache_context)
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.module.__dict__.pop("cache_context", None)  # the class's method again

    def _labelled_context(self, original: Any) -> Any:
        @contextlib.contextmanager
        def cache_context(name: str, *args: Any, **kwargs: Any) -> Iterator[None]:
            self._context = name
            try:
                with original(name, *args, **kwargs):
                    yield
            finally:
                self._context = None

        return cache_context

    def _before(self, module, args, kwargs) -> None:
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        tensors = {n: v for n, v in bound.items() if isinstance(v, torch.Tensor)}
        if "hidden_states" not in tensors:
            raise CalibrationError(f"{type(module).__name__} was called without a hidden_states tensor")
        batch = tensors["hidden_states"].shape[0]
        self._pending = [_batch_item(tensors, batch, b) for b in range(batch)]
        for name, value in bound.items():
            if not isinstance(value, torch.Tensor) and value is not None and not is_option(name):
                self._record_constant(type(module).__name__, name, value)

    def _record_constant(self, model: str, name: str, value: Any) -> None:
        if not _is_constant(value):
            raise CalibrationError(
                f"{model} was called with argument '{name}' of type {type(value).__name__}: qsc compiles "
                f"tensor arguments and numbers, strings or tuples of them"
            )
        if self._constants.setdefault(name, value) != value:
            raise CalibrationError(
                f"{model}'s argument '{name}' changed between calls ({self._constants[name]!r}, then {value!r}): "
                f"an artifact is compiled for one value; record calls of one resolution"
            )

    def _after(self, module, args, kwargs, output) -> None:
        output = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
        timestep = self._pending[0].get("timestep") if self._pending else None
        t = float(timestep.flatten()[0]) if timestep is not None else None
        if t is None or t != self._last_timestep:
            self._step += 1
        self._last_timestep = t
        for b, sample in enumerate(self._pending):
            self._samples.append(sample)
            self._outputs.append(output[b : b + 1].detach().float().cpu())
            record = {**self._labels, "call": self._calls, "step": self._step, "batch_index": b}
            branch = _branch(self._context, b, len(self._pending), self._guided())
            if branch is not None:
                record["branch"] = branch
            if timestep is not None:
                record["timestep"] = float(sample["timestep"].flatten()[0])
            self._records.append(record)
        self._pending = []
        self._calls += 1

    def _guided(self) -> bool:
        """Whether the pipeline runs classifier-free guidance now (diffusers' property; assumed
        when no pipeline was given)."""
        return bool(getattr(self.pipeline, "do_classifier_free_guidance", True))

    def calibration(self) -> CalibrationSet:
        if not self._samples:
            raise CalibrationError("the recorder saw no forward call of the hooked module")
        return CalibrationSet.from_samples(self._samples, self._outputs, self._records, self._constants).validate()


def _is_constant(value: Any) -> bool:
    """A value a calibration file keeps (JSON): a number, a string, or a tuple/list of them."""
    if isinstance(value, (tuple, list)):
        return all(_is_constant(v) for v in value)
    return isinstance(value, (bool, int, float, str))


def _branch(context: str | None, index: int, batch: int, guided: bool) -> str | None:
    """The guidance branch of batch item ``index`` of a call made inside ``cache_context(context)``."""
    if context == STACKED_BRANCHES:
        return "uncond" if guided and index < batch // 2 else "cond"
    return context


def _batch_item(tensors: dict[str, torch.Tensor], batch: int, b: int) -> dict[str, torch.Tensor]:
    """Sample ``b`` of a batched call, keeping a batch dimension of 1; a timestep shared by the
    batch (0-d or one value) is given to every sample."""
    item = {}
    for name, t in tensors.items():
        t = t.detach().float().cpu() if t.is_floating_point() else t.detach().cpu()
        if t.ndim == 0 or (name == "timestep" and t.shape[0] != batch):
            item[name] = t.reshape(1)
        elif t.shape[0] == batch:
            item[name] = t[b : b + 1].clone()
    return item


@torch.no_grad()
def record(pipe: Any, prompts: Sequence[str], *, seed: int = 0, **pipeline_options: Any) -> CalibrationSet:
    """Run the diffusers pipeline ``pipe`` once per prompt (noise seed ``seed + i`` for the i-th)
    and return every call of ``pipe.transformer`` as calibration data. ``pipeline_options`` go to
    each call (``num_inference_steps``, ``guidance_scale``, ``height``, ...); the videos are not
    decoded."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise CalibrationError("qsc.record needs at least one prompt")
    recorder = PipelineRecorder(pipe.transformer, pipeline=pipe)
    with recorder:
        for i, prompt in enumerate(prompts):
            recorder.begin(prompt=prompt, seed=seed + i)
            generator = torch.Generator().manual_seed(seed + i)
            pipe(prompt=prompt, generator=generator, output_type="latent", **pipeline_options)
    return recorder.calibration()


def load_pipeline(path: str | Path, dtype: torch.dtype = torch.float32) -> Any:
    """A diffusers pipeline directory (``model_index.json``), loaded offline, progress bars off."""
    from diffusers import DiffusionPipeline

    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise InputError(f"{path} is not a diffusers pipeline directory (no model_index.json)")
    try:
        # dtype by .to(): from_pretrained's own argument changed its name across diffusers versions
        pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True).to(dtype)
    except Exception as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise InputError(f"{path}: could not load the pipeline: {type(e).__name__}: {message}") from None
    if not isinstance(getattr(pipe, "transformer", None), torch.nn.Module):
        raise InputError(f"{path}: the pipeline has no transformer to record")
    pipe.set_progress_bar_config(disable=True)
    return pipe
