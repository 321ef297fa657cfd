"""The quality table on the bundled reference model: what compression does to its videos.

    python benchmarks/quality.py            # the 12 evaluation prompts, 20 sampling steps
    python benchmarks/quality.py --quick    # 6 of them, 10 steps: under 5 minutes on 2 CPU cores
    python benchmarks/quality.py --fp-only --seeds 4   # the FP model alone, on 4 seeds per prompt

For FP and every compressed model, the same evaluation prompts and noise seeds (disjoint from the
calibration ones) are sampled. Columns: PSNR / SSIM of each video against the FP video of the same
prompt and noise (PSNR capped at ``qsc.metrics.PSNR_CAP``), prompt adherence (the judge recognises
shape, color and motion of the prompt), Frechet distance in the judge's feature space to real clips
of the same prompts, storage ratio (FP bytes / compressed bytes of the transformer). The JSON rows
also hold adherence per attribute, the videos the judge rejects, those FP draws and the row does
not (``lost``) and the reverse (``gained``) with McNemar's exact p-value of that split
(``p_vs_fp``: how likely it is if the row and FP draw prompts alike), and for sparse rows the
share of the calibration's attention probability the layouts keep (``attention_kept``).
Writes ``benchmarks/results/quality-<date>[-quick][-fp].json`` and prints the markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import qsc
from qsc.config import S2Q as S2Q_RECIPE
from qsc.fsutil import atomic_file
from qsc.metrics import PSNR_CAP, frechet_distance, psnr, ssim
from qsc.refmodel import as_denoiser, load_reference_model, reference_calibration
from qsc.refmodel.data import render
from qsc.refmodel.judge import adherence_of, load_judge, verdicts
from qsc.refmodel.prompts import EVAL_PROMPTS, EVAL_SEED_BASE
from qsc.refmodel.sampler import sample

# The ablation ladder at each bit width: each row adds one technique to the row before it.
LEARNED = {"learn_scales": True, "calib_samples": 40}
TOKEN = {**LEARNED, "recon_loss": "token"}
S2Q = {**TOKEN, "calib_selection": "salient"}
QSC = {**TOKEN, "calib_selection": "salient-per-step", "compensate_weights": True}
LADDER = {
    "naive PTQ (RTN)": {"smooth_quant": False},
    "SmoothQuant PTQ": {},
    "block reconstruction (MSE)": LEARNED,
    "+ sparse-token distillation": TOKEN,
    "+ salient selection (= S2Q-VDiT)": S2Q,
    "+ MSAD": {**S2Q, "msad_global": 1.0, "msad_local": 1.0},
    # qsc's variant of the salient selection: the most salient samples of every step alike.
    "salient per step (qsc) + sparse-token": {**TOKEN, "calib_selection": "salient-per-step"},
    # GPTQ's error compensation (pass compensate_weights) alone, on top of the learned rows, and
    # with qsc's per-step salient data: the ``w4a8-s2q`` / ``w4a6-s2q`` presets as qsc ships them.
    "RTN + error compensation (GPTQ)": {"smooth_quant": False, "compensate_weights": True},
    "sparse-token distillation + error compensation": {**TOKEN, "compensate_weights": True},
    "S2Q-VDiT + error compensation": {**S2Q, "compensate_weights": True},
    "salient per step + sparse-token + error compensation (qsc preset)": QSC,
    # Two variations of the preset: QuantSparse's MSAD added, and learning clipping alone, from
    # round-to-nearest instead of SmoothQuant's migration.
    "salient per step + sparse-token + MSAD + error compensation": {**QSC, "msad_global": 1.0, "msad_local": 1.0},
    # MSAD's terms weighted 3 to the reconstruction's 1 (each term normalised by its first value).
    "salient per step + sparse-token + MSAD x3 + error compensation": {**QSC, "msad_global": 3.0, "msad_local": 3.0},
    "salient per step + sparse-token + error compensation from RTN": {**QSC, "smooth_quant": False},
    # The preset with the clipping ratios left at 1 (only the smoothing learned).
    "salient per step + sparse-token + error compensation with clipping not learned": {**QSC, "lr_clip": 0.0},
    # The preset (clipping not learned) with QuantSparse's MSAD, and on rotated layers.
    "salient per step + sparse-token + MSAD + error compensation with clipping not learned": {
        **QSC, "lr_clip": 0.0, "msad_global": 1.0, "msad_local": 1.0},
    "salient per step + sparse-token + error compensation with clipping not learned + Hadamard rotation": {
        **QSC, "lr_clip": 0.0, "rotate_inputs": True},
    # QuaRot's randomised Hadamard rotation of the quantized linears' inputs: with round-to-nearest,
    # with GPTQ (QuaRot's own pipeline) and under the preset.
    "RTN + Hadamard rotation": {"smooth_quant": False, "rotate_inputs": True},
    "RTN + Hadamard rotation + error compensation (GPTQ)": {"smooth_quant": False, "rotate_inputs": True,
                                                           "compensate_weights": True},
    "salient per step + sparse-token + error compensation + Hadamard rotation (qsc preset)": {**QSC, "rotate_inputs": True},
    "salient per step + sparse-token + error compensation + Hadamard rotation from RTN": {
        **QSC, "rotate_inputs": True, "smooth_quant": False},
}
# QuantSparse's setting (W4A8, 15% of the attention tiles, SSAR): PTQ against the full pipeline.
# The rows that vary the pipeline refresh every 5 steps, the paper's interval and the preset's until
# the refresh-interval rows showed what it costs (the preset now refreshes every 3).
EVERY_5 = {"ssar_tau": 5}
SPARSE_ALONE = {"w_bits": 8, "a_bits": 16, "smooth_quant": False, "learn_scales": False, "compensate_weights": False}
SPARSE_LADDER = {
    "PTQ + sparse (no correction)": {"learn_scales": False, "ssar_tau": 0, "compensate_weights": False},
    "PTQ + sparse + SSAR": {"learn_scales": False, "compensate_weights": False, **EVERY_5},
    "QuantSparse (MSAD + sparse + SSAR)": {"compensate_weights": False, **EVERY_5},
    "QuantSparse + error compensation": EVERY_5,
    # SSAR's dense refresh program for the first, layout-setting steps of the trajectory.
    "QuantSparse + error compensation + 2 dense steps": {"dense_steps": 2, **EVERY_5},
    # The same with the cache held between refreshes: after the dense steps, "linear" would stretch
    # the residual's one-step change of steps 1 -> 2 over the four steps to the next refresh.
    "QuantSparse + error compensation + 2 dense steps (residual held)": {
        "dense_steps": 2, "ssar_extrapolation": "hold", **EVERY_5},
    # SSAR's two knobs: the refresh interval (3 = the preset), a rank-32 residual instead of 16.
    "QuantSparse + error compensation + refresh every 4 steps": {"ssar_tau": 4},
    "QuantSparse + error compensation + refresh every 3 steps (qsc preset)": {},
    "QuantSparse + error compensation + refresh every 2 steps": {"ssar_tau": 2},
    "QuantSparse + error compensation + SSAR rank 32": {"ssar_rank": 32, **EVERY_5},
    "QuantSparse + error compensation + per-head token order": {"reorder_tokens": True, **EVERY_5},
    "QuantSparse + error compensation + per-head token order + refresh every 3 steps": {"reorder_tokens": True},
    "QuantSparse + error compensation + Hadamard rotation": {"rotate_inputs": True, **EVERY_5},
    "QuantSparse + error compensation with clipping not learned": {"lr_clip": 0.0, **EVERY_5},
    # More of the tiles at the paper's interval: what density buys against what refreshes buy.
    "QuantSparse + error compensation at 25% density": {"density": 0.25, **EVERY_5},
    "QuantSparse + error compensation at 25% density refreshing every 3 steps": {"density": 0.25},
    # What the quantization alone costs (dense attention), and the sparse setting on ``w4a8-s2q``'s
    # quantization (S2Q's data and distillation, clipping at 1, no MSAD) instead of QuantSparse's.
    "QuantSparse's quantization with dense attention": {"density": 1.0, "ssar_tau": 0},
    "w4a8-s2q's quantization + sparse + SSAR": {**S2Q_RECIPE, "msad_global": 0.0, "msad_local": 0.0},
    # Both: S2Q's data, distillation and frozen clipping with QuantSparse's MSAD terms.
    "w4a8-s2q's quantization + MSAD + sparse + SSAR": S2Q_RECIPE,
    # What sparsity and SSAR cost on their own: 8-bit weights, float activations, no learning.
    "sparse + SSAR alone (W8A16)": SPARSE_ALONE,
    "sparse + SSAR alone (W8A16) refreshing every 2 steps": {**SPARSE_ALONE, "ssar_tau": 2},
}
PRESETS = ("w4a8", "w4a6", "w4a4", "w4a8-sparse")
REAL_PER_PROMPT = 8  # real clips per prompt for the Frechet distance's reference statistics
REAL_SEED_BASE = EVAL_SEED_BASE + 200_000


def evaluation_cases(num_prompts: int, seeds: int) -> list[tuple]:
    """(prompt, seed) pairs; a spread of the evaluation prompts so all shapes, colors and motions occur."""
    stride = max(1, len(EVAL_PROMPTS) // num_prompts)
    prompts = EVAL_PROMPTS[::stride][:num_prompts]
    return [(p, EVAL_SEED_BASE + 1000 * k + i) for k in range(seeds) for i, p in enumerate(prompts)]


def generate(denoiser, cases, steps: int) -> torch.Tensor:
    return torch.stack([sample(denoiser, p, seed, steps=steps) for p, seed in cases])


class Scorer:
    """Adherence and Frechet distance of generated clips, and fidelity to the FP clips."""

    def __init__(self, cases):
        self.judge = load_judge()
        self.prompts = [p for p, _ in cases]
        real = torch.stack([render(p, REAL_SEED_BASE + 100 * j + i)
                            for i, p in enumerate(dict.fromkeys(self.prompts)) for j in range(REAL_PER_PROMPT)])
        with torch.no_grad():
            self.real_features = self.judge.features(real)

    def judge_scores(self, clips: torch.Tensor) -> dict[str, Any]:
        """Adherence (all attributes right), per attribute, the videos the judge rejects (indices
        into the cases, so that rows can be compared video by video) and the Frechet distance."""
        with torch.no_grad():
            features = self.judge.features(clips)
        right = verdicts(self.judge, clips, self.prompts)
        by_attribute = adherence_of(right)
        return {"adherence": by_attribute.pop("all"), "adherence_by_attribute": by_attribute,
                "rejected": torch.nonzero(~right.all(-1)).flatten().tolist(),
                "fd": frechet_distance(features, self.real_features)}

    @staticmethod
    def fidelity(clips: torch.Tensor, fp_clips: torch.Tensor) -> dict[str, float]:
        pairs = list(zip(clips, fp_clips))
        return {"psnr": sum(min(psnr(c, r, peak=1.0), PSNR_CAP) for c, r in pairs) / len(pairs),
                "ssim": sum(ssim(c, r) for c, r in pairs) / len(pairs)}


def against_fp(scores: dict[str, Any], fp: dict[str, Any]) -> dict[str, Any]:
    """``scores`` with the videos FP draws and the row does not (``lost``) and the other way round
    (``gained``): adherence compared video by video, as the same prompts and noise allow; and how
    likely so many differences in the one direction are if the row and FP were alike (``p_vs_fp``)."""
    rejected, fp_rejected = set(scores["rejected"]), set(fp["rejected"])
    lost, gained = sorted(rejected - fp_rejected), sorted(fp_rejected - rejected)
    return {**scores, "lost": lost, "gained": gained, "p_vs_fp": mcnemar_exact(len(lost), len(gained))}


def mcnemar_exact(lost: int, gained: int) -> float:
    """McNemar's exact test of paired verdicts, two-sided: under "no difference" each of the
    ``lost + gained`` discordant videos goes either way with probability 1/2, so the p-value is the
    binomial tail of the smaller count, doubled. A 48-video table needs a one-sided count of about
    6 to 0 before p drops under 0.05: one or two videos of adherence are not a difference."""
    n = lost + gained
    tail = sum(math.comb(n, i) for i in range(min(lost, gained) + 1)) / 2**n
    return min(1.0, 2 * tail)


def markdown(report: dict) -> str:
    lines = ["| method | bits | density | PSNR (dB) | SSIM | adherence | lost / gained (p) | FD | storage ratio "
             "| compile (s) |",
             "|---|---|---|---|---|---|---|---|---|---|",
             f"| FP | fp32 | 1.0 | - | - | {report['fp']['adherence']:.3f} | - | {report['fp']['fd']:.2f} | 1.00 | - |"]
    for row, seconds in zip(report["rows"], report["settings"]["compile_seconds"]):
        lines.append(f"| {row['method']} | {row['bits']} | {row['density']} | {row['psnr']:.2f} | {row['ssim']:.4f} "
                     f"| {row['adherence']:.3f} | {len(row['lost'])} / {len(row['gained'])} ({row['p_vs_fp']:.2f}) "
                     f"| {row['fd']:.2f} | {row['storage_ratio']:.2f} | {seconds:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="6 prompts, 10 steps, 4 calibration prompts")
    p.add_argument("--presets", default=",".join(PRESETS))
    p.add_argument("--methods", default="", help="comma-separated row names of the ladders to run [default: all]")
    p.add_argument("--tag", default="", help="suffix of the results file name")
    p.add_argument("--fp-only", action="store_true", help="only the FP row (no compilation)")
    p.add_argument("--seeds", type=int, default=1, help="noise seeds per evaluation prompt")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    chosen = set(filter(None, args.methods.split(",")))
    if unknown := chosen - LADDER.keys() - SPARSE_LADDER.keys():
        p.error(f"--methods: no ladder row named {', '.join(map(repr, sorted(unknown)))}")
    prompts, steps, calib_prompts = (6, 10, 4) if args.quick else (12, 20, 8)
    torch.set_num_threads(args.threads)

    started = time.time()
    model = load_reference_model()
    cases = evaluation_cases(prompts, args.seeds)
    scorer = Scorer(cases)
    fp_clips = generate(as_denoiser(model), cases, steps)
    fp = scorer.judge_scores(fp_clips)
    print(f"FP: {json.dumps(fp)} ({time.time() - started:.0f} s)", flush=True)

    date = datetime.date.today().isoformat()
    suffix = f"{'-quick' if args.quick else ''}{'-fp' if args.fp_only else ''}{'-' + args.tag if args.tag else ''}"
    out = Path(args.out) / f"quality-{date}{suffix}.json"
    rows, compile_seconds = [], []
    report = {
        "fp": fp,
        "rows": rows,
        "device": f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                  f"torch {torch.__version__}",
        "date": date,
        "command": " ".join(["python benchmarks/quality.py", *argv]),
        "settings": {"videos": len(cases), "prompts": prompts, "seeds_per_prompt": args.seeds, "steps": steps,
                     "calibration_prompts": calib_prompts, "real_clips_for_fd": len(scorer.real_features),
                     "judge_held_out_accuracy": json.loads(_judge_accuracy()),
                     "compile_seconds": compile_seconds},
    }

    def save() -> None:  # after every row: a run stopped early keeps the rows it finished
        report["settings"]["total_seconds"] = round(time.time() - started, 1)
        with atomic_file(out) as tmp:
            tmp.write_text(json.dumps(report, indent=1) + "\n")

    if not args.fp_only:
        calib = reference_calibration(num_prompts=calib_prompts, steps=steps)
        for preset in args.presets.split(","):
            ladder = SPARSE_LADDER if "sparse" in preset else LADDER
            for method, overrides in ladder.items():
                if chosen and method not in chosen:
                    continue
                config = dict(overrides)
                resolved = qsc.resolve_config(preset, overrides=config)
                if not resolved.learn_scales:
                    config.setdefault("calib_samples", len(calib))  # PTQ: every recorded call
                result = qsc.compile(model, calibration=calib, preset=preset, config=config)
                clips = generate(result.module, cases, steps)  # SSAR's state resets with each new video
                layers = result.attention.values()
                density = statistics.mean(a["density"] for a in layers) if layers else 1.0
                kept = {"attention_kept": round(statistics.mean(a["kept_mass"] for a in layers), 3)} if layers else {}
                rows.append({"method": method, "bits": f"W{resolved.w_bits}A{resolved.a_bits}",
                             "density": round(density, 3),
                             **kept, "config": config, **scorer.fidelity(clips, fp_clips),
                             **against_fp(scorer.judge_scores(clips), fp), "storage_ratio": result.sizes["ratio"]})
                compile_seconds.append(result.seconds)
                save()
                print(json.dumps(rows[-1]), f"({time.time() - started:.0f} s)", flush=True)
    save()
    print(markdown(report))
    print(f"wrote {out} in {time.time() - started:.0f} s")
    return report


def _judge_accuracy() -> str:
    from safetensors import safe_open

    from qsc.refmodel.judge import WEIGHTS

    with safe_open(str(WEIGHTS), framework="pt") as f:
        return f.metadata()["held_out_accuracy"]


if __name__ == "__main__":
    main()
