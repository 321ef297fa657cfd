"""Storage ratio of qsc's schemes on a Wan2.1-1.3B-shaped transformer (bf16 baseline).

The model is built on the meta device (no memory, no weights: sizes do not depend on values) and
planned with the same scheme plan the compiler uses (``qsc.inspection.plan_layers``; a test checks
that the plan equals what ``qsc.compile`` produces). Writes ``benchmarks/results/storage-<date>.json``.

    python benchmarks/storage.py
"""

from __future__ import annotations

import datetime
import json
import platform
import sys
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from diffusers.utils import logging as diffusers_logging
from rich.console import Console
from rich.table import Table

import qsc
from qsc.compiler import module_bytes
from qsc.config import resolve_config
from qsc.fsutil import atomic_file
from qsc.inspection import plan_layers

# Wan2.1-T2V-1.3B: 30 blocks, dim 1536 (12 heads x 128), FFN 8960, umT5 text features of 4096.
WAN_1_3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
    out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
)

ROWS = [
    ("w8a8", {}),
    ("w4a8", {}),
    ("w4a8", {"group_size": 128}),
    ("w4a8", {"weight_only_bits": 0}),  # embedders kept in bf16, as in the papers
    ("w4a6", {}),
]


def main() -> None:
    diffusers_logging.set_verbosity_error()  # the meta-device cast warns about fp32 modules
    with torch.device("meta"):
        model = WanTransformer3DModel(**WAN_1_3B).to(torch.bfloat16)
    weights = {name: m.weight for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    total = module_bytes(model)
    rows = []
    for preset, overrides in ROWS:
        cfg = resolve_config(preset, overrides=overrides)
        layers, sizes = plan_layers(weights, total, cfg)
        rows.append({
            "preset": preset,
            "overrides": overrides,
            "quantized_layers": sum(1 for l in layers.values() if l["a_bits"] != 16),
            "weight_only_layers": sum(1 for l in layers.values() if l["a_bits"] == 16),
            "bf16_bytes": sizes["fp_bytes"],
            "compressed_bytes": sizes["compressed_bytes"],
            "storage_ratio": round(sizes["ratio"], 4),
        })
    date = datetime.date.today().isoformat()
    result = {
        "model": "Wan2.1-1.3B-shaped WanTransformer3DModel (meta device, bf16)",
        "params": sum(p.numel() for p in model.parameters()),
        "device": f"cpu ({platform.machine()}), no weights materialised",
        "versions": {"qsc": qsc.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "date": date,
        "command": " ".join(["python", *sys.argv]),
        "rows": rows,
    }
    out = Path(__file__).parent / "results" / f"storage-{date}.json"
    with atomic_file(out) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")

    table = Table(title=f"storage, {result['model']}")
    for column in ("preset", "overrides", "W+A layers", "weight-only", "bf16", "compressed", "ratio"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["preset"], json.dumps(r["overrides"]), str(r["quantized_layers"]), str(r["weight_only_layers"]),
                      f"{r['bf16_bytes'] / 2**30:.3f} GiB", f"{r['compressed_bytes'] / 2**30:.3f} GiB", f"{r['storage_ratio']:.2f}x")
    Console().print(table)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
