"""Figures for docs/refmodel: the training loss curve and a GIF of generated vs real clips.

    python -m qsc.refmodel.report --run runs/refmodel [--run runs/stage2 ...] --out docs/refmodel [--sampler-study]

Runs given in order are the stages of one training (a stage after the first starts from the
previous one's weights with ``train --init``): their logs are joined into one, steps counted on.

``--sampler-study`` also measures the FP model's prompt adherence over a grid of guidance scales and
time shifts on calibration prompts and seeds (never the evaluation ones, so the sampler defaults are
not tuned on the numbers the quality table reports) and writes ``sampler_study.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ..fsutil import atomic_file
from .data import render
from .judge import adherence, load_judge
from .model import as_denoiser, load_reference_model
from .prompts import CALIBRATION_PROMPTS, CALIBRATION_SEED_BASE, EVAL_PROMPTS, EVAL_SEED_BASE
from .sampler import sample
from .video import side_by_side, write_video


def training_log(runs: list[Path]) -> list[dict]:
    """The records of successive stages as one log, each stage's steps counted on from where the
    previous stage stopped. Within a stage a step logged twice (a run resumed from a checkpoint
    older than its last record) keeps its later record: the one on the path that was finished."""
    records, offset = [], 0
    for stage, run in enumerate(runs, start=1):
        lines = (run / "train_log.jsonl").read_text().splitlines()
        by_step = {r["step"]: r for r in map(json.loads, filter(str.strip, lines))}
        records += [{**by_step[k], "step": k + offset, "stage": stage} for k in sorted(by_step)]
        offset = records[-1]["step"] if records else offset
    return records


def loss_curve(records: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records])
    ax.set_xlabel("step (batch 8)")
    ax.set_ylabel("velocity MSE (logged mean)")
    ax.set_yscale("log")
    ax.set_title("reference model: rectified-flow training loss")
    ax.grid(alpha=0.3)
    lr = ax.twinx()
    lr.plot([r["step"] for r in records], [r["lr"] for r in records], color="tab:orange", alpha=0.5, lw=1)
    lr.set_ylabel("learning rate", color="tab:orange")
    for prev, r in zip(records, records[1:]):
        if r["stage"] != prev["stage"]:
            ax.axvline(prev["step"], color="gray", ls="--", lw=1)
            ax.annotate(f"stage {r['stage']}", (prev["step"], 1), xycoords=("data", "axes fraction"),
                        xytext=(3, -12), textcoords="offset points", fontsize=8, color="gray")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def samples_gif(out: Path, prompts=EVAL_PROMPTS[::2], seed: int = EVAL_SEED_BASE) -> None:
    """One row per prompt: a real clip, then the FP model's generation (evaluation seeds)."""
    denoiser = as_denoiser(load_reference_model())
    rows = []
    for i, p in enumerate(prompts):
        label = p.text.removeprefix("a ").replace("moving ", "")
        rows.append(side_by_side([render(p, seed + i), sample(denoiser, p, seed + i)], ["real: " + label, "generated"]))
    write_video(out, [np.concatenate(frames, axis=0) for frames in zip(*rows)])


def sampler_study(out: Path, guidances=(3.0, 4.0, 5.0, 7.0), shifts=(1.0, 3.0, 5.0), videos: int = 16) -> None:
    """FP adherence for each (guidance, shift) on calibration prompts, seeds past the recorded ones."""
    denoiser, judge = as_denoiser(load_reference_model()), load_judge()
    prompts = CALIBRATION_PROMPTS[:: max(1, len(CALIBRATION_PROMPTS) // videos)][:videos]
    seeds = [CALIBRATION_SEED_BASE + 500_000 + i for i in range(len(prompts))]
    rows = []
    for guidance in guidances:
        for shift in shifts:
            clips = torch.stack([sample(denoiser, p, s, guidance=guidance, shift=shift) for p, s in zip(prompts, seeds)])
            rows.append({"guidance": guidance, "shift": shift, **adherence(judge, clips, list(prompts))})
            print(json.dumps(rows[-1]), flush=True)
    with atomic_file(out) as tmp:
        tmp.write_text(json.dumps({"prompts": [p.text for p in prompts], "seeds": seeds, "rows": rows}, indent=1))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", type=Path, help="a training run directory; repeat for stages")
    p.add_argument("--out", default="docs/refmodel")
    p.add_argument("--sampler-study", action="store_true", help="also write sampler_study.json (a few minutes)")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    runs, out = args.run or [Path("runs/refmodel")], Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = training_log(runs)
    with atomic_file(out / "train_log.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    loss_curve(records, out / "loss.png")
    samples_gif(out / "samples.gif")
    print(f"wrote {out}/loss.png, {out}/samples.gif, {out}/train_log.jsonl")
    if args.sampler_study:
        sampler_study(out / "sampler_study.json")
        print(f"wrote {out}/sampler_study.json")


if __name__ == "__main__":
    main()
