"""Pass ``rotate_inputs``: quantized linears see their input in a Hadamard basis (QuaRot).

For an orthogonal ``R``, ``y = x W^T = (x R)(W R)^T``. A few input channels of a transformer's
linears carry most of the magnitude; per-token activation quantization then spends its range on
them and rounds the rest to a handful of levels. Rotated by a (randomised) Hadamard matrix, every
channel of ``x R`` is a signed mix of all channels of a block, so the outliers spread over the
block and the per-token range shrinks towards the typical value; ``W R`` is spread the same way.

``R`` is block-diagonal: blocks of ``b`` channels, ``b`` the largest power of two dividing the
input width, at most ``MAX_BLOCK``, every block ``diag(signs) H_b / sqrt(b)`` with Sylvester's
Hadamard matrix ``H_b`` and random signs drawn from the compile's seed, one draw per block size
for the whole model (QuaRot too rotates every layer alike). The program holds the +-1 entries of
``diag(signs) H_b`` as int8 (16 KiB at b = 128), multiplies in the model's dtype and scales by
``1 / sqrt(b)`` after. It costs ``b`` multiply-adds per input channel and token (a full
``K x K`` rotation of a 8960-wide FFN input would cost six times the layer's own low-bit GEMM);
an online fast Walsh-Hadamard transform would cost ``log2 b``.

The pass rewrites the float graph before anything is measured, so every later pass (observers,
SmoothQuant, scale learning, GPTQ) works on the rotated layer as if the model were trained so:
the weight becomes the parameter ``W R`` and ``x R`` is a matmul of the program (the input split
into its blocks, times the ``b x b`` matrix: standard operators in every backend and the ONNX
export). Linears of one module that read the same input (q, k and v) share one rotation. Layers
whose activations stay float are left alone: the rotation is only paid for where an activation
quantizer gains from it.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import fx

from qsc.graph import LinearSite, at_node, fake_call, finalize
from qsc.pipeline import Pass, PassContext, PassResult
from qsc.schemes import SchemePlan

aten = torch.ops.aten
# 128: every width of the supported models divides into such blocks (1536, 3072, 8960 = 70 x 128),
# an outlier channel is spread 11-fold, and the rotation costs a tenth of a 1536-wide layer's GEMM.
MAX_BLOCK = 128


def hadamard(n: int) -> torch.Tensor:
    """Sylvester's ``n x n`` Hadamard matrix (``n`` a power of two), entries +-1."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def block_size(width: int) -> int:
    """The largest power of two dividing ``width``, at most ``MAX_BLOCK``."""
    return min(width & -width, MAX_BLOCK)


def signed_hadamard(b: int, generator: torch.Generator) -> torch.Tensor:
    """``diag(signs) H_b`` in int8: ``R``'s block times ``sqrt(b)``, entries +-1."""
    signs = torch.randint(0, 2, (b, 1), generator=generator) * 2 - 1
    return (signs * hadamard(b)).to(torch.int8)


def rotate(x: torch.Tensor, signed: torch.Tensor) -> torch.Tensor:
    """``x R`` for the block-diagonal ``R`` of blocks ``signed / sqrt(b)`` (``[..., K]`` ->
    ``[..., K]``), with the ops of the rewritten graph."""
    b = signed.shape[0]
    return (torch.matmul(x.unflatten(-1, (-1, b)), signed.to(x.dtype)) * b ** -0.5).flatten(-2)


class RotateInputs(Pass):
    name = "rotate_inputs"
    produces = ("rotations",)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        groups: dict[tuple[fx.Node, str], list[LinearSite]] = defaultdict(list)
        for site, _ in SchemePlan(ctx.config).linears(gm, quantized_input=True):
            if len(site.node.args[1].users) > 1:
                continue  # a weight shared by several linears would be rotated twice
            # One rotation per input and module: q, k and v share theirs, while the text that the
            # cross-attentions of all blocks read is rotated in each block (its own partition).
            groups[site.node.args[0], site.layer.rpartition(".")[0]].append(site)
        matrices: dict[int, str] = {}  # block size -> buffer
        rotations = {}
        for (x, _), sites in groups.items():
            with at_node(sites[0].node):
                b = block_size(gm.get_parameter(sites[0].weight_target).shape[1])
                if b not in matrices:
                    matrices[b] = f"input_rotation_{b}"
                    gm.register_buffer(matrices[b], signed_hadamard(b, ctx.rng))
                rotation = gm.get_buffer(matrices[b])
                rotated = _insert_rotation(gm, x, sites[0], matrices[b])
                for site in sites:
                    _rotate_weight(gm, site, rotation)
                    site.node.replace_input_with(x, rotated)
                    rotations[site.layer] = b
        ctx.analyses["rotations"] = rotations
        return PassResult(finalize(gm), modified=bool(rotations), details={"rotated": len(rotations)})


def _rotate_weight(gm: fx.GraphModule, site: LinearSite, rotation: torch.Tensor) -> None:
    """The weight ``W`` becomes ``W R``: a new parameter (the graph's may alias the user's model)."""
    weight = gm.get_parameter(site.weight_target).detach()
    owner = gm.get_submodule(site.owner_target)
    setattr(owner, site.weight_target.rpartition(".")[2],
            torch.nn.Parameter(rotate(weight.float(), rotation).to(weight.dtype), requires_grad=False))


def _insert_rotation(gm: fx.GraphModule, x: fx.Node, first: LinearSite, target: str) -> fx.Node:
    """``x R`` (``rotate``) as graph nodes in front of ``first``, ``R``'s block from buffer ``target``."""
    value = x.meta["val"]
    b = gm.get_buffer(target).shape[0]
    graph = gm.graph
    with graph.inserting_before(first.node):
        signed = graph.get_attr(target)
        signed.meta["val"] = value.new_empty(b, b, dtype=torch.int8)
        matrix = fake_call(graph, aten._to_copy.default, signed, dtype=value.dtype)
        blocks = fake_call(graph, aten.unflatten.int, x, -1, [value.shape[-1] // b, b])
        product = fake_call(graph, aten.matmul.default, blocks, matrix)
        scaled = fake_call(graph, aten.mul.Tensor, product, b ** -0.5)
        rotated = fake_call(graph, aten.flatten.using_ints, scaled, -2, -1)
    # The rotation belongs to the layer, whatever produced x (the block partition of learn_scales
    # reads the module provenance).
    stack = first.node.meta.get("nn_module_stack", {})
    for node in (signed, matrix, blocks, product, scaled, rotated):
        node.meta = {**x.meta, "nn_module_stack": stack, "val": node.meta["val"]}
    return rotated
