"""Pass ``select_calibration``: choose the calibration samples the later passes learn from.

S2Q-VDiT's Hessian-aware salient data selection. A candidate is the denoiser's work at one step of
one video (prompt, seed, step): the calls of both guidance branches together, as the paper's
batched guidance computes them (qsc's records keep the branches apart). Every sample is scored by
two saliencies:

* diffusion saliency ``C_diff = ||x_t - x_{t-1}||^2 / ||x_t||^2``: how much the sampler moves the
  latent at that step. ``x_{t-1}`` is the ``hidden_states`` of the next step of the same
  trajectory (same prompt, seed and branch); at a trajectory's last step, where no next step was
  recorded, one Euler step to noise level 0 with the recorded FP output, ``x_t - t * v``, where
  the record has the noise level ``t`` (the bundled sampler's records; else the step counts 0);
* quantization saliency ``C_quant``: the second-order Taylor view of a layer's output error puts
  its Hessian at ``2 X^T X`` for the layer's input ``X``; qsc takes ``||X^T X||_F`` of the input of
  every linear that gets quantized activations, divides it by that layer's largest value over the
  samples (so that no layer dominates by its scale), and sums over the layers.

A candidate's ``C_diff`` is its samples' mean (the branches share the latent) and its ``C_quant``
their sum (a batched call's ``X^T X`` is the sum of its branches'; the sum of the norms bounds its
norm and needs no ``K x K`` matrix kept per sample). Both are min-max normalised over the
candidates and multiplied (a candidate must be salient on both); candidates are taken in order of
score, each with all its samples, until ``calib_samples`` samples are taken (the last candidate
may contribute only its most salient samples; ties: the earlier candidate). Scored sample by
sample instead, the ranking on the reference model takes the conditional branch only, and the
unconditional errors that guidance multiplies by its scale go uncalibrated (benchmarks/README.md).
``salient-per-step`` (qsc's variant) takes the same number of candidates at every step, the most
salient of each: the paper's ranking takes only late steps (there ``||x_t||`` is smallest and the
activations largest), which draws the prompt as well as FP but drifts from the FP video, whose
layout the early steps decide. ``uniform`` (the set's even spread, no pass needed) and ``random``
(a seeded draw) remain for the ablation.

Produces ``calibration_selection`` (the sample indices, ascending) which
``PassContext.calibration_samples`` serves to every later pass, and ``calibration_records``
(their prompt, step and branch) for the log and the manifest.
"""

from __future__ import annotations

import itertools
import warnings
from collections import defaultdict
from typing import Any

import torch
from torch import fx

from qsc.calibration import CalibrationSet
from qsc.pipeline import Pass, PassContext, PassResult
from qsc.schemes import SchemePlan

LATENT = "hidden_states"  # the diffusers name of the latent a denoiser call takes
# What tells one recorded trajectory from another: the bundled sampler labels the guidance branch
# ``cfg``, ``qsc.record`` labels it ``branch`` and numbers the videos of one call by ``batch_index``.
TRAJECTORY_KEYS = ("prompt", "seed", "cfg", "branch", "batch_index")
RECORD_KEYS = ("prompt", "step", "cfg", "branch")  # what the log says of a chosen sample
CANDIDATE_KEYS = ("prompt", "seed", "step")  # one candidate: every branch of a video's step
SALIENT = ("salient", "salient-per-step")


def minmax(x: torch.Tensor) -> torch.Tensor:
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else torch.ones_like(x)


def diffusion_saliency(calib: CalibrationSet) -> torch.Tensor | None:
    """``C_diff`` of every sample, or None when the set lacks what it needs (a ``hidden_states``
    input and records with prompt and step)."""
    if LATENT not in calib.inputs or not all("prompt" in r and "step" in r for r in calib.records):
        return None
    latents = calib.inputs[LATENT].double()
    by_step = {(tuple(r.get(k) for k in TRAJECTORY_KEYS), r["step"]): i for i, r in enumerate(calib.records)}
    scores = torch.zeros(len(calib), dtype=torch.float64)
    for i, record in enumerate(calib.records):
        x = latents[i]
        following = by_step.get((tuple(record.get(k) for k in TRAJECTORY_KEYS), record["step"] + 1))
        if following is not None:
            change = x - latents[following]
        elif calib.outputs is not None and "t" in record:
            change = record["t"] * calib.outputs[i].double()  # x_t - (x_t - t v)
        else:
            continue  # nothing tells how far this step moves the latent: not salient
        scores[i] = change.square().sum() / x.square().sum().clamp_min(1e-30)
    return scores


class _GramNorms(fx.Interpreter):
    """Runs the graph on one sample and records ``||X^T X||_F`` of the input of chosen linears."""

    def __init__(self, gm: fx.GraphModule, layers: dict[fx.Node, str]):
        super().__init__(gm)
        self.layers = layers
        self.norms: dict[str, float] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n in self.layers:
            # float32: a ranking needs no more, and a float64 GEMM costs several times as much on a CPU
            x = self.env[n.args[0]].detach().float().reshape(-1, n.args[0].meta["val"].shape[-1])
            self.norms[self.layers[n]] = float(torch.linalg.matrix_norm(x.T @ x))
        return super().run_node(n)


def quantization_saliency(gm: fx.GraphModule, ctx: PassContext) -> torch.Tensor:
    """``C_quant`` of every sample of the set: per-layer Gram norms, each layer scaled to a maximum
    of 1 over the samples, summed."""
    layers = {site.node: site.layer for site, _ in SchemePlan(ctx.config).linears(gm, quantized_input=True)}
    placeholders = [n.target for n in gm.graph.find_nodes(op="placeholder")]
    rows = []
    with torch.no_grad():
        for sample in ctx.progress(ctx.calibration, "scoring calibration samples", total=len(ctx.calibration)):
            interpreter = _GramNorms(gm, layers)
            interpreter.run(*(sample[name] for name in placeholders))
            rows.append([interpreter.norms[layer] for layer in layers.values()])
    norms = torch.tensor(rows, dtype=torch.float64)  # [samples, layers]
    return (norms / norms.amax(dim=0).clamp_min(1e-30)).sum(dim=1)


def candidates(calib: CalibrationSet) -> list[list[int]]:
    """The samples of each candidate (prompt, seed, step), in order of first appearance."""
    groups: dict[tuple, list[int]] = {}
    for i, record in enumerate(calib.records):
        groups.setdefault(tuple(record.get(k) for k in CANDIDATE_KEYS), []).append(i)
    return list(groups.values())


def saliency(c_diff: torch.Tensor, c_quant: torch.Tensor, groups: list[list[int]]) -> torch.Tensor:
    """The score of every candidate of ``groups`` from its samples' saliencies."""
    diff = torch.stack([c_diff[g].mean() for g in groups])
    quant = torch.stack([c_quant[g].sum() for g in groups])
    return minmax(diff) * minmax(quant)


def _ranked(score: torch.Tensor) -> list[int]:
    return torch.argsort(score, descending=True, stable=True).tolist()


def _take(ranked_groups: list[list[int]], sample_score: torch.Tensor, count: int) -> list[int]:
    """The first ``count`` samples of the groups in turn (each group's most salient first), ascending."""
    taken = [i for g in ranked_groups for i in sorted(g, key=lambda i: -float(sample_score[i]))]
    return sorted(taken[:count])


def salient_indices(score: torch.Tensor, groups: list[list[int]], sample_score: torch.Tensor, count: int) -> list[int]:
    """``count`` samples of the highest-scoring candidates, ascending."""
    return _take([groups[g] for g in _ranked(score)], sample_score, count)


def salient_indices_per_step(
    score: torch.Tensor, groups: list[list[int]], sample_score: torch.Tensor, steps: list[int], count: int
) -> list[int]:
    """The most salient candidates of every step in turn: round r takes each step's r-th best (the
    steps whose candidate scores higher first), until ``count`` samples are taken; ascending."""
    by_step: dict[int, list[int]] = {}
    for g in _ranked(score):
        by_step.setdefault(steps[g], []).append(g)
    order: list[int] = []
    for round_ in itertools.zip_longest(*by_step.values()):
        order += sorted((g for g in round_ if g is not None), key=lambda g: -float(score[g]))
    return _take([groups[g] for g in order], sample_score, count)


class SelectCalibration(Pass):
    name = "select_calibration"
    produces = ("calibration_selection", "calibration_records")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        cfg, calib = ctx.config, ctx.calibration
        count = min(cfg.calib_samples, len(calib))
        method = cfg.calib_selection
        if method in SALIENT:
            c_diff = diffusion_saliency(calib)
            if c_diff is None:
                warnings.warn(
                    f"salient calibration needs the '{LATENT}' input and records with prompt and step "
                    "(qsc.refmodel / qsc.record write them); this calibration set has none: "
                    f"using {count} evenly spread samples",
                    stacklevel=2,
                )
                method, chosen = "uniform", calib.spread(count)
            else:
                c_quant = quantization_saliency(gm, ctx)
                groups = candidates(calib)
                score = saliency(c_diff, c_quant, groups)
                sample_score = minmax(c_diff) * minmax(c_quant)  # orders the samples within a candidate
                if method == "salient":
                    chosen = salient_indices(score, groups, sample_score, count)
                else:
                    steps = [calib.records[g[0]]["step"] for g in groups]
                    chosen = salient_indices_per_step(score, groups, sample_score, steps, count)
        elif method == "random":
            chosen = sorted(torch.randperm(len(calib), generator=ctx.rng)[:count].tolist())
        else:
            chosen = calib.spread(count)
        records = [{k: calib.records[i][k] for k in RECORD_KEYS if k in calib.records[i]} for i in chosen]
        ctx.analyses["calibration_selection"] = chosen
        ctx.analyses["calibration_records"] = {"method": method, "candidates": len(calib), "samples": records}
        return PassResult(gm, modified=False, details={"selection": method, "selected": _summary(records)})


def _summary(records: list[dict[str, Any]]) -> str:
    """``prompt: steps`` per prompt, the form a log line can show."""
    steps = defaultdict(list)
    for r in records:
        unconditional = "uncond" in (r.get("cfg"), r.get("branch"))
        steps[r.get("prompt", "?")].append(f"{r.get('step', '?')}{'u' if unconditional else ''}")
    return "; ".join(f"{prompt}: {' '.join(map(str, s))}" for prompt, s in steps.items())
