"""The deployable artifact: a directory ``NAME.qsc/``.

    program.pt2           the compressed program (torch.export.save), weights left out
    refresh.pt2           with SSAR only: the dense refresh program over the same weights
    weights.safetensors   every weight of the program: packed codes, scales, float leftovers
    manifest.json         versions, source, config, per-layer quantization and sparsity, sizes,
                          hashes, metrics

Weights live only in the safetensors file (mmap-able, no pickle): the program is saved with
one-element placeholders in their place, and ``load`` puts the real ones back after checking the hashes.
The directory is written atomically and is byte-identical for the same inputs and seed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from . import backends
from .config import CompileConfig
from .errors import InputError
from .fsutil import atomic_directory
from .runtime import SSARRuntime
from .signature import ProgramInputs

FORMAT = "qsc-artifact/1"
PROGRAM = "program.pt2"
REFRESH = "refresh.pt2"
WEIGHTS = "weights.safetensors"
MANIFEST = "manifest.json"
TENSORRT = "tensorrt"  # the backend that runs the artifact's engines (backends/tensorrt/engine.py)
_CONSTANT = "constant::"  # prefix of program constants (non-persistent buffers) in WEIGHTS


def save_artifact(result: Any, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write a ``CompileResult`` to ``path`` (conventionally ``NAME.qsc``)."""
    import qsc

    path = Path(path)
    programs = {PROGRAM: result.program}
    if result.refresh_program is not None:
        programs[REFRESH] = result.refresh_program
    weights = _program_weights(result.program)
    with atomic_directory(path, overwrite=overwrite) as tmp:
        save_file(weights, str(tmp / WEIGHTS))
        with warnings.catch_warnings():
            # The placeholders share no storage, which the archive writer notes for every one.
            warnings.filterwarnings("ignore", message="No complete tensor found in the group")
            for name, program in programs.items():
                torch.export.save(_without_weights(program), tmp / name)
        manifest = {
            "format": FORMAT,
            "versions": {"qsc": qsc.__version__, "torch": torch.__version__.split("+")[0]},
            "source": result.source,
            "config": result.config.to_dict(),
            "inputs": ProgramInputs.from_example(result.example_inputs, result.dynamic_dims).to_manifest(),
            "dims": {name: list(bounds) for name, bounds in result.dim_ranges.items()},
            "layers": result.layers,
            "attention": result.attention,
            "sizes": result.sizes,
            "metrics": result.metrics,
            "calibration": result.calibration,
            "constants": result.constants,
            "files": {name: _sha256(tmp / name) for name in (*programs, WEIGHTS)},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if result.config.backend == TENSORRT:  # inside the atomic write: all of it or nothing
            from .backends.tensorrt import engine

            engine.export_engine(tmp, engine.default_output(tmp))
    return path


class CompressedModule(torch.nn.Module):
    """A loaded artifact: call it with the model's keyword inputs; ``.manifest`` says what it is.
    With SSAR, ``program`` is a ``qsc.runtime.SSARRuntime``: call ``reset()`` between videos.

    Every call is checked against the inputs the program was compiled for (``qsc.signature``); a
    batched call on a program of batch 1 runs as one call per sample."""

    def __init__(self, program_module: torch.nn.Module, manifest: dict[str, Any], backend: str):
        super().__init__()
        self.program = program_module
        self.manifest = manifest
        self.backend = backend
        self.inputs = ProgramInputs.from_manifest(manifest)

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        outputs = [self.program(**call) for call in self.inputs.split(inputs)]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    @property
    def device(self) -> torch.device:
        """Where the program runs: its weights' device; the GPU for TensorRT engines."""
        return torch.device("cuda") if self.backend == TENSORRT else next(iter(self.state_dict().values())).device

    def reset(self) -> None:
        """Forget state carried across denoising steps (SSAR's caches); a no-op without it."""
        if isinstance(self.program, SSARRuntime):
            self.program.reset()


def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise InputError(f"{path} is not a qsc artifact (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_file.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{manifest_file}: not valid JSON: {e}") from None
    if manifest.get("format") != FORMAT:
        raise InputError(f"{path}: unsupported artifact format {manifest.get('format')!r} (expected {FORMAT})")
    return manifest


def load(path: str | Path, *, backend: str = "auto", like: torch.nn.Module | None = None) -> torch.nn.Module:
    """Load an artifact as a runnable module, with the best backend here unless one is named;
    ``backend="tensorrt"`` runs the artifact's TensorRT engines (``qsc export --format tensorrt``)
    instead of its programs, where TensorRT and a GPU are.

    ``like``: the FP diffusers transformer the artifact replaces (``pipe.transformer``); the
    result is then a ``qsc.dropin.DropInTransformer`` that the pipeline calls as it calls the
    original (``pipe.transformer = qsc.load(path, like=pipe.transformer)``)."""
    path = Path(path)
    manifest = read_manifest(path)
    if backend == TENSORRT:
        from .backends.tensorrt import engine

        module = engine.load_artifact(path, manifest)
    else:
        backend = backends.best_available() if backend == "auto" else backend
        module = _load_programs(path, manifest, backend)
    compressed = CompressedModule(module, manifest, backend).requires_grad_(False)
    if like is None:
        return compressed
    from .dropin import DropInTransformer

    return DropInTransformer(compressed, like)


def _load_programs(path: Path, manifest: dict[str, Any], backend: str) -> torch.nn.Module:
    """The artifact's programs with their weights (hashes checked), run by ``backend``."""
    for name, digest in manifest["files"].items():
        if not (path / name).is_file():
            raise InputError(f"{path}: {name} is missing")
        if _sha256(path / name) != digest:
            raise InputError(f"{path}: {name} does not match the hash in {MANIFEST} (corrupt or modified)")
    # Copies into fresh (64-byte aligned) allocations: safetensors' buffers sit at arbitrary file
    # offsets, and CPU GEMM kernels round differently on unaligned data, which would break the
    # bit-for-bit equality of the loaded artifact with the compiled program. The step and refresh
    # programs share these tensors.
    weights = {k: v.clone() for k, v in load_file(str(path / WEIGHTS)).items()}
    programs = {}
    for name in (PROGRAM, REFRESH):
        if name in manifest["files"]:
            programs[name] = torch.export.load(path / name)
            _restore_weights(programs[name], weights, path / name)
    backends.enable(backend)
    if REFRESH in programs:
        return SSARRuntime.of(programs[PROGRAM], programs[REFRESH], CompileConfig(**_config_fields(manifest)))
    return programs[PROGRAM].module()


def _config_fields(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest's config as ``CompileConfig`` arguments (lists back to tuples)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in manifest["config"].items()}


def _program_weights(program: torch.export.ExportedProgram) -> dict[str, torch.Tensor]:
    weights = {k: v.detach().contiguous() for k, v in program.state_dict.items()}
    weights.update(
        {_CONSTANT + k: v.detach().contiguous() for k, v in program.constants.items() if isinstance(v, torch.Tensor)}
    )
    return weights


def _placeholder(t: torch.Tensor) -> torch.Tensor:
    """Same shape and dtype, one element of storage (stride 0): costs a few bytes in the archive."""
    p = torch.zeros(1, dtype=t.dtype).expand(t.shape) if t.dim() else torch.zeros((), dtype=t.dtype)
    return torch.nn.Parameter(p, requires_grad=False) if isinstance(t, torch.nn.Parameter) else p


def _without_weights(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """A shallow copy that ``torch.export.save`` writes without weight bytes or example inputs.

    Node provenance is dropped too: ``from_node`` records Python object ids and ``stack_trace``
    the paths of the installed packages, either of which would make two compiles of the same model
    differ byte for byte.
    """
    for node in program.graph.nodes:
        node.meta.pop("from_node", None)
        node.meta.pop("stack_trace", None)
    stripped = copy.copy(program)
    stripped._example_inputs = None
    stripped._state_dict = {k: _placeholder(v) for k, v in program.state_dict.items()}
    stripped._constants = {
        k: _placeholder(v) if isinstance(v, torch.Tensor) else v for k, v in program.constants.items()
    }
    return stripped


def _restore_weights(program: torch.export.ExportedProgram, weights: dict[str, torch.Tensor], path: Path) -> None:
    expected = set(program.state_dict) | {
        _CONSTANT + k for k, v in program.constants.items() if isinstance(v, torch.Tensor)
    }
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise InputError(f"{WEIGHTS} does not fit {path}: missing {missing[:5]}, unexpected {extra[:5]}")
    for k, old in program.state_dict.items():
        w = weights[k]
        program.state_dict[k] = torch.nn.Parameter(w, requires_grad=False) if isinstance(old, torch.nn.Parameter) else w
    for k in list(program.constants):
        if _CONSTANT + k in weights:
            program.constants[k] = weights[_CONSTANT + k]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
