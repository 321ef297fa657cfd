"""Calibration data: recorded transformer inputs (and FP outputs) per prompt x sampling step.

On disk a calibration set is one safetensors file:

* ``input.<name>``: the keyword argument ``<name>`` of the transformer's forward for every sample,
  stacked along a new leading sample dimension (``[S, *shape]``);
* ``output`` (optional): the FP transformer's output for every sample, ``[S, *shape]``;
* metadata ``qsc_format = "calibration/1"``, ``inputs``: the input names in forward order (JSON), and
  ``records``: a JSON list with one object per sample
  (prompt, step index, timestep, seed: whatever the recorder knows), used by data selection passes;
  ``constants`` (optional): the non-tensor arguments every call passes, JSON (LTX-Video's
  ``num_frames``, ``height``, ``width``): the program is compiled for these values.

All samples share one shape per input, so one sample is exactly one forward call of the model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from .errors import CalibrationError, InputError
from .fsutil import atomic_file

FORMAT = "calibration/1"


@dataclass
class CalibrationSet:
    """``inputs[name][i]`` is input ``name`` of sample ``i``; ``outputs[i]`` its FP output;
    ``constants[name]`` a non-tensor argument, the same in every call."""

    inputs: dict[str, torch.Tensor]
    outputs: torch.Tensor | None = None
    records: list[dict[str, Any]] = field(default_factory=list)
    constants: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.inputs:
            raise CalibrationError("calibration set has no inputs")
        sizes = {name: t.shape[0] for name, t in self.inputs.items()}
        if self.outputs is not None:
            sizes["output"] = self.outputs.shape[0]
        if len(set(sizes.values())) != 1:
            raise CalibrationError(f"calibration tensors disagree on the number of samples: {sizes}")
        if not self.records:
            self.records = [{} for _ in range(len(self))]
        if len(self.records) != len(self):
            raise CalibrationError(f"{len(self.records)} records for {len(self)} samples")

    @classmethod
    def from_samples(
        cls,
        samples: Sequence[Mapping[str, torch.Tensor]],
        outputs: Sequence[torch.Tensor] | None = None,
        records: Sequence[dict[str, Any]] | None = None,
        constants: Mapping[str, Any] | None = None,
    ) -> "CalibrationSet":
        """Stack per-sample dicts (one forward's kwargs each) into a set."""
        if not samples:
            raise CalibrationError("calibration set has no samples")
        names = list(samples[0])
        for i, s in enumerate(samples):
            if list(s) != names:
                raise CalibrationError(f"sample {i} has inputs {list(s)}, sample 0 has {names}")
        try:
            inputs = {n: torch.stack([s[n] for s in samples]) for n in names}
            out = torch.stack(list(outputs)) if outputs is not None else None
        except RuntimeError as e:
            raise CalibrationError(f"calibration samples differ in shape: {e}") from None
        return cls(inputs, out, list(records) if records else [], dict(constants or {}))

    def __len__(self) -> int:
        return next(iter(self.inputs.values())).shape[0]

    @property
    def input_names(self) -> list[str]:
        return list(self.inputs)

    def sample(self, i: int) -> dict[str, torch.Tensor]:
        """The keyword arguments of one forward call."""
        return {name: t[i] for name, t in self.inputs.items()}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return (self.sample(i) for i in range(len(self)))

    def spread(self, count: int) -> list[int]:
        """Indices of ``count`` samples evenly spaced over the set, first and last included (all if
        it holds fewer). Recorded sets are ordered prompt by prompt, step by step: an even spread
        covers every prompt and the whole trajectory where the first ``count`` would cover one
        prompt's start."""
        return torch.linspace(0, len(self) - 1, min(count, len(self))).round().long().unique().tolist()

    def subset(self, indices: Sequence[int]) -> "CalibrationSet":
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return CalibrationSet(
            {n: t[idx] for n, t in self.inputs.items()},
            self.outputs[idx] if self.outputs is not None else None,
            [self.records[i] for i in idx.tolist()],
            self.constants,
        )

    def validate(self, source: str = "calibration data") -> "CalibrationSet":
        """Reject NaN/Inf anywhere, naming the tensor and the first bad sample."""
        tensors = dict(self.inputs)
        if self.outputs is not None:
            tensors["output"] = self.outputs
        for name, t in tensors.items():
            if t.is_floating_point():
                bad = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)
                if bad.any():
                    i = int(bad.nonzero()[0])
                    raise CalibrationError(
                        f"{source}: '{name}' of sample {i} contains NaN or Inf "
                        f"({int(bad.sum())} of {len(self)} samples affected)"
                    )
        return self

    def save(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        tensors = {f"input.{n}": t.contiguous() for n, t in self.inputs.items()}
        if self.outputs is not None:
            tensors["output"] = self.outputs.contiguous()
        meta = {
            "qsc_format": FORMAT,
            "inputs": json.dumps(self.input_names),  # safetensors sorts keys; forward order matters
            "records": json.dumps(self.records, sort_keys=True),
            "constants": json.dumps(self.constants, sort_keys=True),
        }
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CalibrationSet":
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise InputError(f"calibration file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise InputError(f"{path} is not a readable safetensors file: {e}") from None
        if meta.get("qsc_format") != FORMAT:
            raise InputError(
                f"{path} is not a qsc calibration file (metadata qsc_format="
                f"{meta.get('qsc_format')!r}, expected {FORMAT!r})"
            )
        inputs = {k.removeprefix("input."): v for k, v in tensors.items() if k.startswith("input.")}
        order = json.loads(meta.get("inputs", "[]"))
        if sorted(order) == sorted(inputs):
            inputs = {name: inputs[name] for name in order}
        constants = constants_from_json(json.loads(meta.get("constants", "{}")))
        return cls(inputs, tensors.get("output"), json.loads(meta.get("records", "[]")), constants).validate(
            str(path)
        )


def constants_from_json(constants: Mapping[str, Any]) -> dict[str, Any]:
    """Constants as the model is called with them: JSON has no tuples (LTX-Video's
    ``rope_interpolation_scale`` is one), so its lists become tuples again."""
    def value(v: Any) -> Any:
        return tuple(value(x) for x in v) if isinstance(v, list) else v

    return {name: value(v) for name, v in constants.items()}
