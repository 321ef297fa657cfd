"""Memory of scale learning at real sizes, on the CPU.

    python benchmarks/scale_memory.py                  # both measurements (~15 min on 2 cores)
    python benchmarks/scale_memory.py --parts attention

* ``attention``: the attention statistics of one Wan2.1-1.3B attention layer at 480p x 81 frames
  (32760 tokens, 12 heads, d = 128): the FP token saliency (column sums of the attention map),
  MSAD's local term (256 salient queries against all keys) and global term (stride 128), forward
  and backward. A full attention map would take 12 x 32760^2 float32 = 51.5 GB.
* ``block``: ``learn_scales`` on one Wan2.1-1.3B-shaped transformer block (width 1536, 12 heads,
  FFN 8960, text 512 x 4096) at ``--tokens`` tokens, W4A8 with sparse-token distillation and
  MSAD, ``--samples`` calibration samples, one epoch.

Each measurement runs in a process of its own and reports the growth of its peak resident set
over the resident set once its inputs exist. Writes ``benchmarks/results/scale-memory-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

GIB = 2**30


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def attention(tokens: int = 32760, heads: int = 12, d: int = 128) -> dict:
    from qsc import distill

    g = torch.Generator().manual_seed(0)
    q_ref, k_ref = (torch.randn(1, heads, tokens, d, generator=g) for _ in range(2))
    q = (q_ref + 0.05 * torch.randn(q_ref.shape, generator=g)).requires_grad_(True)
    k = (k_ref + 0.05 * torch.randn(k_ref.shape, generator=g)).requires_grad_(True)
    base, start = _rss(), time.perf_counter()
    saliency = distill.token_saliency(q_ref, k_ref, d**-0.5)
    saliency_s = time.perf_counter() - start
    index = distill.salient_queries(saliency, 256)
    loss = distill.msad_local(q, k, q_ref, k_ref, d**-0.5, index) + distill.msad_global(q, k, q_ref, k_ref, d**-0.5, 128)
    loss.backward()
    return {"tokens": tokens, "heads": heads, "head_dim": d, "inputs_gib": 4 * q.numel() * 4 / GIB,
            "peak_over_inputs_gib": (_peak_rss() - base) / GIB, "full_map_gib": heads * tokens**2 * 4 / GIB,
            "saliency_seconds": round(saliency_s, 1), "seconds": round(time.perf_counter() - start, 1)}


def block(tokens: int, samples: int) -> dict:
    from diffusers import WanTransformer3DModel

    import qsc
    from qsc.calibration import CalibrationSet
    from qsc.frontend import DenoiserAdapter

    frames, side = tokens // 256, 32  # patches of 1 x 2 x 2: 16 x 16 per latent frame
    torch.manual_seed(0)
    model = WanTransformer3DModel(num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                                  text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=1).eval()
    g = torch.Generator().manual_seed(0)
    calib = CalibrationSet.from_samples([
        {"hidden_states": torch.randn(1, 16, frames, side, side, generator=g), "timestep": torch.tensor([900.0 - 200 * i]),
         "encoder_hidden_states": torch.randn(1, 512, 4096, generator=g)} for i in range(samples)])
    with torch.no_grad():
        calib.outputs = torch.stack([DenoiserAdapter(model)(**s) for s in calib])
    base = _rss()
    result = qsc.compile(model, calib, preset="w4a8",
                         config={"learn_scales": True, "recon_loss": "token", "msad_global": 1.0, "msad_local": 1.0,
                                 "scale_epochs": 1, "calib_samples": samples, "check_numerics": False})
    (row,) = [r for r in result.pass_log if r["pass"] == "learn_scales"]
    return {"tokens": frames * 256, "width": 1536, "ffn": 8960, "samples": samples,
            "weights_gib": sum(p.numel() * 4 for p in model.parameters()) / GIB,
            "peak_over_inputs_gib": (row["peak_memory_bytes"] - base) / GIB, "seconds": round(row["seconds"], 1)}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="attention,block")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--part", help=argparse.SUPPRESS)  # one measurement, in this process
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    if args.part:
        print(json.dumps(attention() if args.part == "attention" else block(args.tokens, args.samples)))
        return
    results = {}
    for part in args.parts.split(","):
        run = subprocess.run([sys.executable, __file__, "--part", part, "--tokens", str(args.tokens),
                              "--samples", str(args.samples)], capture_output=True, text=True, check=True)
        results[part] = json.loads(run.stdout.strip().splitlines()[-1])
        print(part, results[part], flush=True)
    from qsc.fsutil import atomic_file

    date = datetime.date.today().isoformat()
    report = {"results": results, "date": date, "command": " ".join(["python benchmarks/scale_memory.py", *argv]),
              "device": f"CPU {platform.machine()}, 2 threads, torch {torch.__version__}"}
    with atomic_file(Path(args.out) / f"scale-memory-{date}.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
