"""The plugin-free ONNX graph in onnxruntime against the PyTorch reference backend, on the CPU.

Compiles the bundled reference model (``w4a8``, and ``w4a8-sparse`` for an SSAR row), exports each
artifact with ``--no-plugins`` and times one forward both ways on the same inputs (median of
``--repeats``, after a warm-up) and their agreement (relative L2, max abs difference); PyTorch with
its thread count, onnxruntime with its default thread pool (both recorded). Writes
``benchmarks/results/onnx-<date>.json``.

    python benchmarks/onnx_runtime.py [--repeats 10]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime
import torch

import qsc
from qsc.backends.tensorrt import onnx_export, ort
from qsc.fsutil import atomic_file
from qsc.metrics import relative_l2

PRESETS = ("w4a8", "w4a8-sparse")


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up: first-run allocations, onnxruntime's lazy initialisation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e3, 3)


def row(preset: str, root: Path, repeats: int) -> dict:
    artifact = qsc.compile(None, preset=preset, config={"calib_samples": 4}).save(root / f"{preset}.qsc")
    exported = onnx_export.export_artifact(artifact, use_plugins=False)
    # One forward of the program that runs most steps (the sparse step, zero caches, for SSAR).
    program = qsc.load(artifact, backend="reference").program
    step = getattr(program, "step_program", program)
    onnx_step = ort.load(exported)
    onnx_step = getattr(onnx_step, "step_program", onnx_step)
    g = torch.Generator().manual_seed(0)
    inputs = {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else torch.full_like(v, 500)
              for k, v in onnx_export.example_inputs(step).items()}
    inputs = {k: torch.zeros_like(v) if k.startswith("ssar_") else v for k, v in inputs.items()}
    with torch.no_grad():
        reference = step(**inputs)
        got = onnx_step(**inputs)
        torch_ms = _median_ms(lambda: step(**inputs), repeats)
    onnx_ms = _median_ms(lambda: onnx_step(**inputs), repeats)
    return {
        "preset": preset,
        "program": "sparse step, zero caches" if hasattr(program, "step_program") else "program",
        "input_shapes": {k: list(v.shape) for k, v in inputs.items() if not k.startswith("ssar_")},
        "torch_reference_ms": torch_ms,
        "onnxruntime_ms": onnx_ms,
        "speedup_onnxruntime": round(torch_ms / onnx_ms, 3),
        "rel_l2": relative_l2(got, reference),
        "max_abs_diff": float((got - reference).abs().max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [row(preset, Path(tmp), args.repeats) for preset in PRESETS]
    date = datetime.date.today().isoformat()
    result = {
        "model": "bundled reference model (qsc.refmodel)",
        "device": f"cpu ({platform.machine()}), {torch.get_num_threads()} torch threads, "
                  f"onnxruntime default threads of {os.cpu_count()} cores",
        "versions": {"qsc": qsc.__version__, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                     "python": platform.python_version()},
        "date": date,
        "command": " ".join(["python", *sys.argv]),
        "rows": rows,
    }
    out = Path(__file__).parent / "results" / f"onnx-{date}.json"
    with atomic_file(out) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
