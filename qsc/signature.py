"""The inputs a compiled program takes, and the check every call of a loaded artifact passes.

The manifest records each input's shape and dtype as compiled; a dimension the program leaves
open is written as its name (``"batch"``, ``"height"``, ``"text"``, see ``qsc.shapes``) instead of
a size, and ``dims`` holds each name's range (a rotary table's length bounds Wan's frames, height
and width). A call is checked against that record before the program sees it, so a mismatch names
the input, the expected and the given shape and what to do, instead of a guard failure deep inside
``torch.export``'s module.

A program whose batch is fixed at 1 still serves batched calls (classifier-free guidance stacks
two, ``num_videos_per_prompt`` more): ``split`` cuts such a call into batch-1 calls, whose outputs
the caller concatenates.

Non-tensor arguments a program was compiled for (``constants``: LTX-Video's ``num_frames``,
``height``, ``width``) may be passed again with the same value, and are then left out of the call.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from .errors import InputError

BATCH = "batch"  # the name of a symbolic batch dimension in the manifest
Dim = int | str  # a size, or the name of a symbolic dimension
SPARSE_FIXED = " (sparse attention layouts are measured for the compiled token count)"
RECOMPILE = ("record calibration data at this size and compile for it "
             "(qsc record PIPELINE --height H --width W --frames F)")


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[Dim, ...]
    dtype: torch.dtype

    @property
    def batched(self) -> bool:
        """Dimension 0 is the batch: symbolic, or 1 (a program compiled for one sample per call)."""
        return bool(self.shape) and self.shape[0] in (1, BATCH)

    @property
    def static_batch(self) -> bool:
        return bool(self.shape) and self.shape[0] == 1

    def describe(self) -> str:
        return f"{_shape(self.shape)} {str(self.dtype).removeprefix('torch.')}"

    def check(self, value: Any, batch_split: bool, why_fixed: str = "") -> None:
        """Raise a one-line ``InputError`` unless ``value`` fits (dimension 0 is free when the call
        is split into batch-1 calls); ``why_fixed`` says why the sizes of the others are fixed."""
        if not isinstance(value, torch.Tensor):
            raise InputError(f"input '{self.name}': the artifact takes a tensor {self.describe()}, got {type(value).__name__}")
        if value.is_floating_point() != self.dtype.is_floating_point or value.is_complex() != self.dtype.is_complex:
            raise InputError(
                f"input '{self.name}': the artifact takes {self.describe()}, got {str(value.dtype).removeprefix('torch.')}; "
                f"compile it from calibration data recorded from this pipeline (qsc record)"
            )
        given = tuple(value.shape)
        fits = len(given) == len(self.shape) and all(
            isinstance(want, str) or got == want or (batch_split and i == 0)
            for i, (got, want) in enumerate(zip(given, self.shape))
        )
        if not fits:
            raise InputError(
                f"input '{self.name}': the artifact takes shape {_shape(self.shape)}, got {_shape(given)}; "
                f"only the named dimensions may change{why_fixed}: {RECOMPILE}"
            )


class ProgramInputs:
    """The keyword inputs of a compiled program, and the constants compiled into it (JSON values),
    from an artifact's manifest."""

    def __init__(self, specs: Mapping[str, InputSpec], constants: Mapping[str, Any] | None = None,
                 ranges: Mapping[str, tuple[int, int | None]] | None = None, why_fixed: str = ""):
        self.specs = dict(specs)
        self.constants = dict(constants or {})
        self.ranges = dict(ranges or {})  # open dimension -> (least, greatest or None) size
        self.why_fixed = why_fixed

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> "ProgramInputs":
        return cls({
            name: InputSpec(name, tuple(entry["shape"]), getattr(torch, entry["dtype"]))
            for name, entry in manifest["inputs"].items()
        }, manifest.get("constants"), {name: tuple(bounds) for name, bounds in manifest.get("dims", {}).items()},
            SPARSE_FIXED if manifest.get("attention") else "")

    @classmethod
    def from_example(cls, example: Mapping[str, torch.Tensor], dynamic: Mapping[str, Mapping[int, str]]) -> "ProgramInputs":
        """The specs of ``example`` with the dimensions of ``dynamic`` (input -> {dim: name}) named."""
        return cls({
            name: InputSpec(name, tuple(dynamic.get(name, {}).get(i, size) for i, size in enumerate(t.shape)), t.dtype)
            for name, t in example.items()
        })

    def to_manifest(self) -> dict[str, dict[str, Any]]:
        return {
            s.name: {"shape": list(s.shape), "dtype": str(s.dtype).removeprefix("torch.")}
            for s in self.specs.values()
        }

    def split(self, inputs: Mapping[str, Any]) -> list[dict[str, torch.Tensor]]:
        """Check ``inputs`` and return the calls to make: ``inputs`` itself, or, for a batch of B
        on a program of batch 1, B calls of one sample each."""
        inputs = self._without_constants(inputs)
        missing = [n for n in self.specs if n not in inputs]
        extra = [n for n in inputs if n not in self.specs]
        if missing or extra:
            problem = f"missing {missing}" if missing else f"unexpected {extra}"
            raise InputError(f"the artifact takes inputs {list(self.specs)}: {problem}")
        split = self._batch(inputs) > 1 and any(s.static_batch for s in self.specs.values())
        for spec in self.specs.values():
            spec.check(inputs[spec.name], split, self.why_fixed)
        self._check_open(inputs)
        if not split:
            return [dict(inputs)]
        return [
            {n: t[b : b + 1] if self.specs[n].static_batch else t for n, t in inputs.items()}
            for b in range(self._batch(inputs))
        ]

    def _without_constants(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        for name, want in self.constants.items():
            if name in inputs and _as_json(inputs[name]) != want:
                raise InputError(
                    f"argument '{name}': the artifact was compiled for {want!r}, got {inputs[name]!r}; "
                    f"compile from calibration data recorded with this value (qsc record)"
                )
        return {n: v for n, v in inputs.items() if n not in self.constants}

    def _check_open(self, inputs: Mapping[str, torch.Tensor]) -> None:
        """Each open dimension within its range and of one size in every input it appears in (a
        derived size, ``2*height``, is left to the program)."""
        seen: dict[str, dict[str, int]] = {}
        for spec in self.specs.values():
            for i, want in enumerate(spec.shape):
                if want not in self.ranges:
                    continue
                got, (least, most) = inputs[spec.name].shape[i], self.ranges[want]
                if got < least or (most is not None and got > most):
                    span = f"{least} or more" if most is None else f"{least} to {most}"
                    raise InputError(
                        f"input '{spec.name}': dimension {i} ({want}) takes {span}, got {got} "
                        f"(shape {_shape(tuple(inputs[spec.name].shape))}); {RECOMPILE}"
                    )
                seen.setdefault(want, {})[spec.name] = got
        for want, sizes in seen.items():
            if len(set(sizes.values())) > 1:
                raise InputError(f"the inputs disagree on the size of {want}: {sizes}")

    def _batch(self, inputs: Mapping[str, Any]) -> int:
        """The batch of a call, the same in every batched input (1 when none is batched)."""
        sizes = {
            n: inputs[n].shape[0] for n, s in self.specs.items()
            if s.batched and isinstance(inputs[n], torch.Tensor) and inputs[n].dim()
        }
        if len(set(sizes.values())) > 1:
            raise InputError(f"the inputs disagree on the batch size: {sizes}")
        return next(iter(sizes.values()), 1)


def _as_json(value: Any) -> Any:
    """``value`` as the manifest holds it (tuples are lists); a value JSON cannot hold never matches."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        return value


def _shape(shape: tuple[Dim, ...]) -> str:
    """``[batch, 4, 2, 8, 8]``: sizes and the names of symbolic dimensions, unquoted."""
    return f"[{', '.join(str(d) for d in shape)}]"
