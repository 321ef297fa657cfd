"""Pass ``learn_scales``: block-wise scale learning against the FP teacher (S2Q-VDiT, QuantSparse).

The graph is cut into its transformer blocks (``qsc.partition``) and the blocks are learned in
order. For each block, every calibration sample gives the block's inputs twice: from the FP graph
(the teacher's stream) and from the already learned, fake-quantized blocks before it (the
student's stream). The FP block on its FP inputs is the target; a copy of the block whose
quantizable linears are ``qsc.fake_quant.LearnedLinear`` runs on the student's inputs, and AdamW
with a cosine schedule adjusts, per layer, a smoothing on top of ``smooth_quant``'s (lr
``lr_smooth``; where ``smooth_quant`` did not run or left a layer unsmoothed, the layer learns no
smoothing), weight clipping ratios per output channel or group and an activation clipping ratio
(lr ``lr_clip``), for ``scale_epochs`` passes over the samples in a seeded order.

The loss is the block-output reconstruction, plain (``recon_loss = "mse"``) or weighted per token
by the FP attention it receives (``"token"``, S2Q-VDiT's sparse token distillation), plus
QuantSparse's MSAD terms weighted by ``msad_global`` and ``msad_local`` (``qsc.distill``); each
term is divided by its value at the first step, so the weights compare like with like. The
global term pools with stride ``min(msad_stride, L // MIN_POOLED_TOKENS)``: at Wan2.1's 32760
tokens that is the paper's 128, on a 1024-token model it keeps a 64 x 64 map instead of 8 x 8.

A block keeps what it learned only if its loss over all samples ends below where it started
(SmoothQuant's state, or round-to-nearest's without it); the choice is in the pass log. Then the
learned values are folded: the smoothed weight and the op's ``in_scale`` in the graph, the clipping
ratios as the analyses ``weight_clip`` and ``activation_clip`` that ``quantize_linear`` bakes into
the packed weights and the op's ``a_clip``. Nothing learnable survives, and the lowered program
computes what the fake-quantized block computed. The student's stream then advances through the
learned block.

After each block the learned values of all finished blocks are written atomically to
``ctx.checkpoint_dir``; with ``ctx.resume`` a compile continues from the last finished block and
produces the same artifact as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import fx

from qsc import distill
from qsc.errors import InputError
from qsc.fake_quant import Folded, LearnedLinear
from qsc.fsutil import atomic_file
from qsc.graph import LinearSite, attention_sites, finalize, substitute_linears
from qsc.partition import Partition, Stream, needed_after, partition_blocks
from qsc.pipeline import Pass, PassContext, PassResult
from qsc.schemes import LinearScheme, SchemePlan

MIN_POOLED_TOKENS = 64
CHECKPOINT = "learn_scales.safetensors"


@dataclass
class Attention:
    """A self-attention of the block: its q and k nodes and softmax scale."""

    q: fx.Node
    k: fx.Node
    scale: float


@dataclass
class Targets:
    """What the student must match on one sample, from the FP block on the FP stream."""

    outputs: tuple[torch.Tensor, ...]
    qk: list[tuple[torch.Tensor, torch.Tensor]]  # per attention
    token_weights: torch.Tensor | None = None  # [B, L]
    salient: list[torch.Tensor] = field(default_factory=list)  # per attention: [B, k] query indices


class Objective:
    """The configured loss terms of one block, each normalised by its first value."""

    def __init__(self, cfg, attentions: Sequence[Attention], outputs: int):
        self.cfg, self.attentions, self.outputs = cfg, attentions, outputs
        self.weights = {"recon": 1.0}
        if attentions:
            self.weights |= {name: w for name, w in (("global", cfg.msad_global), ("local", cfg.msad_local)) if w}
        self.first: dict[str, float] | None = None

    def targets(self, fp_outputs: tuple[torch.Tensor, ...]) -> Targets:
        outputs, qk = fp_outputs[: self.outputs], fp_outputs[self.outputs :]
        pairs = [(qk[2 * i], qk[2 * i + 1]) for i in range(len(self.attentions))]
        targets = Targets(outputs, pairs)
        if self.cfg.recon_loss == "token" or "local" in self.weights:
            saliency = [distill.token_saliency(q, k, a.scale) for (q, k), a in zip(pairs, self.attentions)]
            if self.cfg.recon_loss == "token" and saliency:
                targets.token_weights = distill.token_weights(sum(saliency), self.cfg.token_weight_min)
            targets.salient = [distill.salient_queries(s, self.cfg.msad_topk) for s in saliency]
        return targets

    def terms(self, student_outputs: tuple[torch.Tensor, ...], t: Targets) -> dict[str, torch.Tensor]:
        outputs, qk = student_outputs[: self.outputs], student_outputs[self.outputs :]
        terms = {"recon": sum(distill.weighted_mse(o, r, t.token_weights) for o, r in zip(outputs, t.outputs))}
        for i, (a, (q_ref, k_ref)) in enumerate(zip(self.attentions, t.qk)):
            q, k = qk[2 * i], qk[2 * i + 1]
            if "global" in self.weights:
                stride = max(1, min(self.cfg.msad_stride, q.shape[2] // MIN_POOLED_TOKENS))
                terms["global"] = terms.get("global", 0) + distill.msad_global(q, k, q_ref, k_ref, a.scale, stride)
            if "local" in self.weights:
                terms["local"] = terms.get("local", 0) + distill.msad_local(q, k, q_ref, k_ref, a.scale, t.salient[i])
        return terms

    def __call__(self, student_outputs: tuple[torch.Tensor, ...], t: Targets) -> torch.Tensor:
        terms = self.terms(student_outputs, t)
        if self.first is None:
            self.first = {name: max(float(v.detach()), 1e-30) for name, v in terms.items()}
        return sum(self.weights[name] * v / self.first[name] for name, v in terms.items())


def _student(
    gm: fx.GraphModule, partition: Partition, sites: dict[str, LinearScheme], extra: Sequence[fx.Node]
) -> tuple[fx.GraphModule, dict[str, LearnedLinear]]:
    """The partition's program with each linear of ``sites`` (layer -> scheme) a ``LearnedLinear``."""
    student = partition.module(gm, extra)
    learned = substitute_linears(
        student, lambda layer, w, b, in_scale: LearnedLinear(w, b, in_scale, sites[layer]) if layer in sites else None
    )
    return student, learned


def _fold(gm: fx.GraphModule, site: LinearSite, folded: Folded) -> None:
    """Put the learned weight and ``in_scale`` into the graph (new tensors: the teacher's stay)."""
    owner = gm.get_submodule(site.owner_target)
    setattr(owner, site.weight_target.rpartition(".")[2], torch.nn.Parameter(folded.weight, requires_grad=False))
    x = site.node.args[0]
    if folded.in_scale is not None:
        inv_owner, _, inv_name = x.args[1].target.rpartition(".")
        gm.get_submodule(inv_owner).register_buffer(inv_name, folded.in_scale)


class Checkpoint:
    """The learned values of the finished blocks, one safetensors file rewritten after each block.
    Its fingerprint (configuration, samples, the layers and their weights' sums) keeps a resume
    from continuing another compile's work."""

    def __init__(self, directory: Path | None, fingerprint: str, resume: bool):
        self.path = None if directory is None else Path(directory) / CHECKPOINT
        self.fingerprint = fingerprint
        self.tensors: dict[str, torch.Tensor] = {}
        self.blocks: list[str] = []
        if resume and self.path is not None and self.path.is_file():
            self._load()

    def _load(self) -> None:
        with safe_open(str(self.path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("fingerprint") != self.fingerprint:
                raise InputError(
                    f"{self.path} is the checkpoint of another compile (other model, data or settings): "
                    "remove it or compile without --resume"
                )
            self.tensors = {k: f.get_tensor(k) for k in f.keys()}
        self.blocks = json.loads(meta["blocks"])

    def restore(self, block: str, learned: dict[str, LearnedLinear]) -> bool:
        if block not in self.blocks:
            return False
        with torch.no_grad():
            for layer, module in learned.items():
                for name, p in module.named_parameters():
                    p.copy_(self.tensors[f"{layer}.{name}"])
        return True

    def save(self, block: str, learned: dict[str, LearnedLinear]) -> None:
        self.tensors |= {f"{layer}.{name}": p.detach().clone().contiguous()
                         for layer, module in learned.items() for name, p in module.named_parameters()}
        self.blocks.append(block)
        if self.path is None:
            return
        with atomic_file(self.path) as tmp:
            save_file(self.tensors, str(tmp), metadata={"fingerprint": self.fingerprint, "blocks": json.dumps(self.blocks)})


def _fingerprint(ctx: PassContext, sites: Sequence[LinearSite], gm: fx.GraphModule) -> str:
    layers = [[s.layer, list(w.shape), float(w.detach().double().sum())] for s in sites
              for w in [gm.get_parameter(s.weight_target)]]
    data = {"config": ctx.config.to_dict(), "samples": ctx.calibration_indices(), "layers": layers}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


class LearnScales(Pass):
    name = "learn_scales"
    requires = ("calibration",)
    produces = ("weight_clip", "activation_clip", "learned_blocks")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        cfg = ctx.config
        planned = SchemePlan(cfg).linears(gm, quantized_input=True)
        schemes = {s.layer: scheme for s, scheme in planned}
        sites = [s for s, _ in planned]
        checkpoint = Checkpoint(ctx.checkpoint_dir, _fingerprint(ctx, sites, gm), ctx.resume)
        partitions = partition_blocks(gm, cfg.include)
        keep = needed_after(gm, partitions)
        samples = ctx.calibration_samples()
        fp = [Stream(gm, s) for s in samples]
        student_streams = [Stream(gm, s) for s in samples]
        attentions = attention_sites(gm)
        weight_clip, activation_clip, report = {}, {}, {}
        for index, (partition, still_needed) in enumerate(zip(partitions, keep)):
            members = set(partition.nodes)
            block_sites = {s.layer: s for s in sites if s.node in members}
            if not (partition.is_block and block_sites):
                with torch.no_grad():
                    module = partition.module(gm)
                    for stream in (*fp, *student_streams):
                        stream.advance(partition, module(*stream.inputs(partition)), still_needed)
                continue
            block_attention = [Attention(a.node.args[0], a.node.args[1], a.scale or a.node.args[0].meta["val"].shape[-1] ** -0.5)
                               for a in attentions if a.node in members]
            extra = [n for a in block_attention for n in (a.q, a.k)]
            objective = Objective(cfg, block_attention, len(partition.outputs))
            with torch.no_grad():
                teacher = partition.module(gm, extra)
                fp_outputs = [teacher(*stream.inputs(partition)) for stream in fp]
                targets = [objective.targets(tuple(out)) for out in fp_outputs]
            student, learned = _student(gm, partition, {layer: schemes[layer] for layer in block_sites}, extra)
            inputs = [stream.inputs(partition) for stream in student_streams]
            if checkpoint.restore(partition.name, learned):
                report[partition.name] = "resumed"
            else:
                report[partition.name] = _learn(student, learned, objective, inputs, targets, ctx, index, partition.name)
                checkpoint.save(partition.name, learned)
            with torch.no_grad():
                for layer, module in learned.items():
                    folded = module.folded()
                    _fold(gm, block_sites[layer], folded)
                    weight_clip[layer], activation_clip[layer] = folded.w_clip, folded.a_clip
                for stream, out in zip(fp, fp_outputs):
                    stream.advance(partition, out[: len(partition.outputs)], still_needed)
                for stream, args in zip(student_streams, inputs):
                    stream.advance(partition, student(*args)[: len(partition.outputs)], still_needed)
        ctx.analyses["weight_clip"] = weight_clip
        ctx.analyses["activation_clip"] = activation_clip
        ctx.analyses["learned_blocks"] = report
        return PassResult(finalize(gm), modified=bool(weight_clip), details={"blocks": report})


def _learn(
    student: fx.GraphModule, learned: dict[str, LearnedLinear], objective: Objective,
    inputs: list[list[Any]], targets: list[Targets], ctx: PassContext, index: int, block: str,
) -> dict[str, Any]:
    """Train one block; returns its loss before and after (over all samples) and whether it kept
    the learned values (it keeps the initial ones where learning did not lower the loss)."""
    cfg = ctx.config
    smooth = [m.log_smooth for m in learned.values() if m.log_smooth.requires_grad]
    clips = [p for m in learned.values() for p in m.clip_parameters()]
    groups = [g for g in ({"params": smooth, "lr": cfg.lr_smooth}, {"params": clips, "lr": cfg.lr_clip}) if g["params"]]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    steps = cfg.scale_epochs * len(inputs)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    # The sample order of each block depends on the seed and the block only, so that a resumed
    # compile learns exactly what an uninterrupted one learns.
    order = torch.Generator().manual_seed(cfg.seed * 1_000_003 + index)
    initial = {layer: {n: p.detach().clone() for n, p in m.named_parameters()} for layer, m in learned.items()}
    before = _total_loss(student, objective, inputs, targets)
    running = math.nan

    def status() -> str:
        return f"loss {running:.4f}"

    schedule_of_samples = [i for _ in range(cfg.scale_epochs) for i in torch.randperm(len(inputs), generator=order).tolist()]
    for i in ctx.progress(schedule_of_samples, f"learning {block}", total=steps, status=status):
        with torch.enable_grad():  # a compile called under no_grad still trains its scales
            loss = objective(student(*inputs[i]), targets[i])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()
        schedule.step()
        value = float(loss.detach())
        running = value if math.isnan(running) else 0.9 * running + 0.1 * value
    after = _total_loss(student, objective, inputs, targets)
    kept = after < before
    if not kept:
        with torch.no_grad():
            for layer, module in learned.items():
                for n, p in module.named_parameters():
                    p.copy_(initial[layer][n])
    return {"loss_before": round(before, 6), "loss_after": round(after, 6), "kept": kept}


@torch.no_grad()
def _total_loss(student: fx.GraphModule, objective: Objective, inputs: list[list[Any]], targets: list[Targets]) -> float:
    return sum(float(objective(student(*args), t)) for args, t in zip(inputs, targets)) / len(inputs)
