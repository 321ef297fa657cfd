"""Pass ``sparsify_attention``: self-attention becomes block-sparse attention at ``config.density``.

The tiles are those of the kernel: 128 queries x 64 keys. For every attention layer and head, the
calibration samples measure how much softmax probability each tile carries (``TileMass``: the
attention of up to ``ROWS_PER_TILE`` evenly spaced query rows of each query tile, summed per key
tile, averaged over rows and samples). Each head then spends a budget of ``round(density * tiles)``
tiles (``kept_tiles``): every query tile first keeps its heaviest key tile (a row with no tile would
output zero), the rest of the budget goes to the heaviest tiles left anywhere in the head. A query
tile's masses sum to one, so this keeps the most attention probability a head can keep at that
density: a query tile whose attention is spread gets more key tiles than one whose attention is
peaked. Budgeting per head rather than per query tile also meets the density asked where a row has
few key tiles (0.15 of a 8 x 16 grid keeps 19 tiles, 0.148; the same number per row would keep 2 of
16, 0.125); where the one-tile-per-row floor exceeds the budget, the compile warns with the figure
achieved.

A video DiT's heads are local in space (a band around the diagonal in frame-major token order) or
in time (the same position across frames: bands one frame apart); the measured mass finds either
shape, and mixtures. A temporal head's bands cross every frame's tiles, so in frame-major order it
needs many tiles for its attention; in position-major order (each position's frames adjacent) the
same attention lies in its queries' own tiles. Where the graph shows the frame count (the
``[B, C, F, H, W]`` output of a patch embedding), each head's mass is also measured in
position-major order, and a head that keeps more of its attention there runs in it (``HeadOrders``,
Sparse VideoGen's layout transformation, chosen from measurement instead of online): its q, k and v
are reordered before the op and its output after (``reorder_tokens = false`` keeps the traced
order). The layout is static: a bool buffer of the program, the same at every step (SSAR's residual
makes up for what it drops), and holds for the calibrated token count only, so ``fixed_sizes`` has
the compile export the sizes the token count depends on as calibrated.

Each rewritten ``aten.scaled_dot_product_attention`` becomes ``qsc::sparse_attention(q, k, v,
layout)``. Layers matching ``config.dense_attention`` stay dense. Produces ``attention_layouts``:
per layer, the layout's shape, its density, the fraction of the measured attention probability
its tiles keep (``kept_mass``: how much the layer's sparse attention leaves for SSAR to restore)
and each head's order (``frames``: 1 as traced, ``F`` position-major for ``F`` frames).
"""

from __future__ import annotations

import math
import warnings

import sympy
import torch
from torch import fx

from qsc.backends.reference import SPARSE_BLOCK_M, SPARSE_BLOCK_N
from qsc.config import CompileConfig
from qsc.errors import CalibrationError, ConfigError
from qsc.graph import (
    ADAPTER_PREFIX, AttentionSite, LayerFilter, at_node, attention_sites, fake_call, finalize, register_buffer,
)
from qsc.pipeline import Pass, PassContext, PassResult

ROWS_PER_TILE = 32  # query rows of a tile whose attention is measured: enough to rank key tiles
aten = torch.ops.aten
SPARSE_ATTENTION = torch.ops.qsc.sparse_attention.default
LAYER_META = "qsc_attention_layer"  # node meta of each block-sparse attention: its layer path
TILES_PER_CHUNK = 16  # query tiles measured at once: bounds the probabilities held to 512 rows x L
# The attention a head must keep in addition to move to another token order: reordering costs
# a copy of q, k, v and the output, not worth it for a rounding difference.
ORDER_GAIN = 0.01
DENSITY_TOLERANCE = 0.1  # relative: an achieved density this close to the request goes unremarked


def kept_tiles(density: float, query_tiles: int, key_tiles: int) -> int:
    """Tiles a head keeps at ``density``: a whole number, at least one per query tile."""
    return max(query_tiles, round(density * query_tiles * key_tiles))


class TileMass:
    """Softmax probability per (head, query tile, key tile), averaged over the calls it has seen."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.calls = 0

    def add(self, q: torch.Tensor, k: torch.Tensor, scale: float | None) -> None:
        b, h, length, d = q.shape
        scale = d**-0.5 if scale is None else scale
        tiles_m, tiles_n = math.ceil(length / SPARSE_BLOCK_M), math.ceil(length / SPARSE_BLOCK_N)
        rows = _measured_rows(length)  # [tiles_m, ROWS]
        kf = k.float()
        mass = torch.zeros(h, tiles_m, tiles_n, dtype=torch.float64, device=q.device)
        for chunk in rows.split(TILES_PER_CHUNK):
            qs = q[:, :, chunk.flatten().to(q.device)].float()  # [B, H, n * ROWS, D]
            p = torch.softmax(qs @ kf.transpose(-1, -2) * scale, dim=-1)
            p = torch.nn.functional.pad(p, (0, tiles_n * SPARSE_BLOCK_N - length))
            p = p.reshape(b, h, chunk.shape[0], chunk.shape[1], tiles_n, SPARSE_BLOCK_N).sum(-1)
            start = int(chunk[0, 0]) // SPARSE_BLOCK_M
            mass[:, start : start + chunk.shape[0]] += p.mean(dim=(0, 3)).double()
        self.total = mass if self.total is None else self.total + mass
        self.calls += 1

    @property
    def mean(self) -> torch.Tensor:
        """``[H, tiles_m, tiles_n]``: the mass per tile, averaged over the calls."""
        return self.total / self.calls

    def layout(self, density: float) -> torch.Tensor:
        """Bool ``[H, tiles_m, tiles_n]``: each head's ``kept_tiles`` heaviest tiles, at least one
        per query tile."""
        mass = self.mean
        heads, tiles_m, tiles_n = mass.shape
        # Ties (equal mass) break by tile index, so the layout is the same on every run.
        heaviest = torch.argsort(mass, dim=-1, descending=True, stable=True)[..., :1]
        layout = torch.zeros_like(mass, dtype=torch.bool).scatter_(-1, heaviest, True)  # on the model's device
        rest = kept_tiles(density, tiles_m, tiles_n) - tiles_m
        if rest:
            others = mass.masked_fill(layout, -1.0).reshape(heads, -1)  # masses are >= 0: kept ones sort last
            chosen = torch.argsort(others, dim=-1, descending=True, stable=True)[:, :rest]
            layout.view(heads, -1).scatter_(-1, chosen, True)
        return layout

    def kept(self, layout: torch.Tensor) -> torch.Tensor:
        """``[H]``: the fraction of each head's measured softmax probability that ``layout``'s tiles
        hold (1 = the sparse attention drops nothing; ``density`` = attention spread evenly)."""
        mass = self.mean
        return (mass * layout).sum((-2, -1)) / mass.sum((-2, -1))


def position_major(length: int, frames: int) -> torch.Tensor:
    """The permutation that puts ``frames`` x ``length / frames`` frame-major tokens in
    position-major order: the reordered sequence holds token ``order[j]`` at ``j``."""
    return torch.arange(length).reshape(frames, length // frames).T.reshape(-1)


class HeadOrders:
    """The tile masses of one attention layer in each token order it may run in: frame-major as
    traced (``frames`` 1) and position-major for each candidate frame count. A head that attends
    the same position across frames (a temporal head) has its keys spread over every frame's tiles
    in frame-major order and in its queries' own tiles in position-major order (Sparse VideoGen's
    layout transformation); each head runs in the order whose layout keeps the most of its
    attention."""

    def __init__(self, length: int, frame_counts: list[int]):
        self.orders = {1: None} | {f: position_major(length, f) for f in frame_counts}
        self.masses = {f: TileMass() for f in self.orders}

    @property
    def calls(self) -> int:
        return self.masses[1].calls

    def add(self, q: torch.Tensor, k: torch.Tensor, scale: float | None) -> None:
        for frames, order in self.orders.items():
            if order is None:
                self.masses[frames].add(q, k, scale)
            else:
                order = order.to(q.device)
                self.masses[frames].add(q[:, :, order], k[:, :, order], scale)

    def choose(self, density: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per head, the order (its frame count, 1 = as traced) whose layout keeps the most
        attention, that layout and the attention it keeps: ``[H]``, ``[H, Mb, Nb]``, ``[H]``.
        Ties keep the traced order."""
        layouts = {f: mass.layout(density) for f, mass in self.masses.items()}
        kept = torch.stack([self.masses[f].kept(layouts[f]) for f in self.orders])  # [orders, H]
        best = torch.cat([kept[:1] + ORDER_GAIN, kept[1:]]).argmax(0)  # the traced order wins near-ties
        frames = torch.tensor(list(self.orders), device=best.device)[best]
        layout = torch.stack([layouts[int(f)][h] for h, f in enumerate(frames)])
        return frames, layout, kept.gather(0, best[None])[0]


def _measured_rows(length: int) -> torch.Tensor:
    """``[tiles_m, ROWS_PER_TILE]`` query indices: evenly spaced rows of each 128-query tile."""
    tiles = []
    for start in range(0, length, SPARSE_BLOCK_M):
        size = min(SPARSE_BLOCK_M, length - start)
        tiles.append(start + torch.linspace(0, size - 1, ROWS_PER_TILE).round().long())
    return torch.stack(tiles)


class _Profiler(fx.Interpreter):
    """Runs the graph and feeds the q and k of the chosen attention nodes to their ``HeadOrders``."""

    def __init__(self, gm: fx.GraphModule, sites: dict[fx.Node, HeadOrders]):
        super().__init__(gm)
        self.sites = sites

    def run_node(self, n: fx.Node):
        if n in self.sites:
            q, k, _ = (self.env[a] for a in n.args[:3])
            self.sites[n].add(q, k, n.kwargs.get("scale"))
        return super().run_node(n)


class SparsifyAttention(Pass):
    name = "sparsify_attention"
    requires = ("calibration",)
    produces = ("attention_layouts",)

    def fixed_sizes(self, gm: fx.GraphModule, config: CompileConfig) -> set[sympy.Symbol]:
        """The symbols the token counts of the layers to sparsify depend on (frames, height and
        width; not the batch, nor the text of cross-attention, which stays dense): a layout is
        measured for one tile grid."""
        return set().union(*(_length_symbols(site) for site in _sparsified(gm, config)))

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        sites = _sparsified(gm, ctx.config)
        for site in sites:
            _check_fixed_length(site)
        masses = {s.node: HeadOrders(_length(s), frame_counts(gm, _length(s)) if ctx.config.reorder_tokens else [])
                  for s in sites}
        samples = ctx.calibration_samples()
        with torch.no_grad():
            for sample in ctx.progress(samples, "measuring attention", total=len(samples)):
                _Profiler(gm, masses).run(*(sample[n.target] for n in gm.graph.find_nodes(op="placeholder")))
        layouts = {}
        for site in sites:
            with at_node(site.node):
                mass = masses[site.node]
                if mass.calls == 0:
                    raise CalibrationError(f"attention layer '{site.layer}' was never executed by the calibration samples")
                frames, layout, kept = mass.choose(ctx.config.density)
                _replace(gm, site, layout, frames)
                layouts[site.layer] = {"tiles": list(layout.shape), "density": layout.float().mean().item(),
                                       "kept_mass": round(kept.mean().item(), 4), "frames": frames.tolist()}
        _warn_if_rounded(ctx.config.density, {tuple(layout["tiles"][1:]) for layout in layouts.values()})
        ctx.analyses["attention_layouts"] = layouts
        return PassResult(finalize(gm), modified=bool(layouts))


def _sparsified(gm: fx.GraphModule, config: CompileConfig) -> list[AttentionSite]:
    keep_dense = LayerFilter(config.dense_attention, ())
    return [s for s in attention_sites(gm) if not keep_dense(s.layer)]


def _length(site: AttentionSite) -> int:
    return int(site.node.args[0].meta["val"].shape[-2])


def frame_counts(gm: fx.GraphModule, length: int) -> list[int]:
    """The frame counts ``F > 1`` that split ``length`` tokens as the video does: those of the
    graph's 5-D values ``[B, C, F, H, W]`` with ``F * H * W == length`` (a video DiT's patch
    embedding, whose output is flattened frame-major into the tokens)."""
    counts = set()
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() == 5 and all(_is_static(s) for s in val.shape[2:]):
            f, h, w = map(int, val.shape[2:])
            if f > 1 and f * h * w == length:
                counts.add(f)
    return sorted(counts)


def _is_static(size: int | torch.SymInt) -> bool:
    return not isinstance(size, torch.SymInt) or size.node.expr.is_number


def _length_symbols(site: AttentionSite) -> set[sympy.Symbol]:
    """The symbols the token count of ``site`` depends on; none where it is a number (a size the
    export specialized may still be a ``SymInt`` of a constant)."""
    length = site.node.args[0].meta["val"].shape[-2]
    return set(length.node.expr.free_symbols) if isinstance(length, torch.SymInt) else set()


def _check_fixed_length(site: AttentionSite) -> None:
    """A layout is measured for one sequence length; Mochi's joint attention, which keeps each
    sample's unmasked text tokens (``nonzero``), has a length only the inputs' values decide."""
    if _length_symbols(site):  # fixed_sizes fixed those of the inputs' sizes: what is left is data's
        length = site.node.args[0].meta["val"].shape[-2]
        raise ConfigError(
            f"sparsify_attention: attention layer '{site.layer}' attends over {length} tokens, a number the "
            f"inputs' values decide (tokens selected by a mask): a block-sparse layout needs a fixed length; "
            f"list the layer in dense_attention or use a preset without sparse attention (w4a8)"
        )


def _warn_if_rounded(density: float, grids: set[tuple[int, int]]) -> None:
    """One warning per compile for the tile grids (query x key tiles) whose whole number of kept
    tiles misses ``density``."""
    achieved = {(m, n): kept_tiles(density, m, n) / (m * n) for m, n in sorted(grids)}
    missed = {grid: d for grid, d in achieved.items() if abs(d - density) > DENSITY_TOLERANCE * density}
    if missed:
        figures = ", ".join(f"{d:.3g} achieved on {m} x {n} tiles" for (m, n), d in missed.items())
        warnings.warn(f"density {density:g} asked, {figures} (each query tile keeps at least one "
                      f"{SPARSE_BLOCK_N}-key tile)", stacklevel=2)


def _replace(gm: fx.GraphModule, site: AttentionSite, layout: torch.Tensor, frames: torch.Tensor) -> None:
    """``site`` becomes ``qsc::sparse_attention`` with ``layout``; the heads with ``frames > 1``
    attend in position-major order: their q, k and v are reordered before and the output after."""
    graph = gm.graph
    q, k, v = site.node.args[:3]
    with graph.inserting_before(site.node):
        orders = _head_orders(gm, site, frames, fake_mode=q.meta["val"].fake_mode)
        q, k, v = (_reorder(graph, x, orders, inverse=False) for x in (q, k, v))
        sparse = graph.call_function(
            SPARSE_ATTENTION,
            (q, k, v, graph.get_attr(_buffer(gm, site, "attn_layout", layout))),
            {"scale": site.scale} if site.scale is not None else {},
        )
        sparse.meta = {**site.node.meta, LAYER_META: site.layer}
        out = _reorder(graph, sparse, orders, inverse=True)
    site.node.replace_all_uses_with(out)
    graph.erase_node(site.node)


def _head_orders(gm: fx.GraphModule, site: AttentionSite, frames: torch.Tensor, fake_mode) -> dict[int, fx.Node | None]:
    """Per frame count ``F > 1`` of ``frames``: the bool ``[1, H, 1, 1]`` buffer of the heads that
    run in position-major order for ``F`` frames, or None where all heads do."""
    orders = {}
    for f in sorted(set(frames.tolist()) - {1}):
        heads = (frames == f).reshape(1, -1, 1, 1)
        if heads.all():
            orders[f] = None
            continue
        mask = gm.graph.get_attr(_buffer(gm, site, f"position_major_{f}", heads))
        mask.meta["val"] = fake_mode.from_tensor(heads)
        orders[f] = mask
    return orders


def _buffer(gm: fx.GraphModule, site: AttentionSite, name: str, value: torch.Tensor) -> str:
    """``value`` as a buffer of the layer's module; the get_attr target."""
    try:
        return register_buffer(gm, ADAPTER_PREFIX + site.layer, name, value)
    except AttributeError:  # the layer has no module of its own in the graph: keep it on the root
        target = f"{site.node.name}_{name}"
        gm.register_buffer(target, value)
        return target


def _reorder(graph: fx.Graph, x: fx.Node, orders: dict[int, fx.Node | None], inverse: bool) -> fx.Node:
    """``x`` (``[B, H, L, D]``) with the tokens of the heads in ``orders[F]`` in position-major order
    for ``F`` frames (``inverse``: back to frame-major); the other heads' as they are. Reshapes,
    a transpose and a select, which every backend and the ONNX export run as they are."""
    for f, heads in orders.items():
        length = x.meta["val"].shape[2]
        split = [length // f, f] if inverse else [f, length // f]
        moved = fake_call(graph, aten.unflatten.int, x, 2, split)
        moved = fake_call(graph, aten.flatten.using_ints, fake_call(graph, aten.transpose.int, moved, 2, 3), 2, 3)
        x = moved if heads is None else fake_call(graph, aten.where.self, heads, moved, x)
    return x


def sparse_attention_nodes(graph: fx.Graph) -> list[fx.Node]:
    """The block-sparse attentions this pass made, in graph order."""
    return [n for n in graph.find_nodes(op="call_function", target=SPARSE_ATTENTION) if LAYER_META in n.meta]
