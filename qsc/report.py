"""Human-readable tables: what a compile did, what an artifact or a model contains."""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Mapping

from rich.table import Table
from rich.text import Text
from torch import fx

from .schemes import LinearScheme


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "inf" if value == float("inf") else f"{value:.4g}"
    return str(value)


def summary_table(sizes: Mapping[str, float], metrics: Mapping[str, float], seconds: float, layers: int) -> Table:
    table = Table(title="qsc compile", show_header=False)
    table.add_row("quantized layers", str(layers))
    table.add_row("size", f"{human_bytes(sizes['fp_bytes'])} -> {human_bytes(sizes['compressed_bytes'])}")
    table.add_row("ratio", f"{sizes['ratio']:.2f}x")
    table.add_row("error vs FP", f"rel L2 {_fmt(metrics['rel_l2'])}, cosine {metrics['cosine']:.6f}, PSNR {_fmt(metrics['psnr'])} dB")
    table.add_row("time", f"{seconds:.1f} s")
    return table


def pass_table(pass_log: Iterable[Mapping[str, Any]]) -> Table:
    table = Table(title="passes")
    for column in ("pass", "modified", "seconds", "peak memory", "rel L2 vs FP"):
        table.add_column(column)
    for row in pass_log:
        table.add_row(
            row["pass"],
            "yes" if row["modified"] else "no",
            f"{row.get('seconds', float('nan')):.2f}",
            human_bytes(row["peak_memory_bytes"]) if "peak_memory_bytes" in row else "-",
            _fmt(row["rel_l2_vs_fp"]) if "rel_l2_vs_fp" in row else "-",
        )
    return table


def layer_table(layers: Mapping[str, Mapping[str, Any]], title: str = "quantized layers") -> Table:
    """One row per layer. Scheme ``W4A8 g128 +sq a=0.5``: int4 weights in groups of 128 input
    channels, int8 per-token activations, SmoothQuant factors of migration strength 0.5 folded in
    (``A16``: activations stay float); ``+rot128``: the input rotated in blocks of 128 channels."""
    table = Table(title=title)
    for column in ("layer", "shape", "scheme", "bytes"):
        table.add_column(column, overflow="fold")
    for name, info in layers.items():
        scheme = LinearScheme(info["w_bits"], info["a_bits"], info["group_size"]).label
        scheme += _smoothing_label(info) if info.get("smoothed") else ""
        scheme += f" +rot{info['rotation_block']}" if "rotation_block" in info else ""
        table.add_row(
            name,
            "x".join(map(str, info["shape"])),
            scheme,
            f"{human_bytes(info['bytes_fp'])} -> {human_bytes(info['bytes_packed'])}",
        )
    return table


def attention_table(attention: Mapping[str, Mapping[str, Any]]) -> Table:
    """One row per block-sparse attention layer: its tile grid (heads x query tiles x key tiles),
    the fraction of tiles it computes, the fraction of the calibration samples' attention
    probability those tiles hold and the heads that run in position-major token order."""
    table = Table(title="sparse attention layers")
    for column in ("layer", "tiles (H x Q x K)", "density", "attention kept", "position-major heads"):
        table.add_column(column)
    for name, info in attention.items():
        # Artifacts of older compiles lack the last two.
        kept = f"{info['kept_mass']:.3f}" if "kept_mass" in info else "-"
        reordered = [str(h) for h, f in enumerate(info.get("frames", ())) if f > 1]
        table.add_row(name, "x".join(map(str, info["tiles"])), f"{info['density']:.3f}", kept, ", ".join(reordered) or "-")
    return table


def inputs_table(inputs: Mapping[str, Mapping[str, Any]], dims: Mapping[str, list[int | None]]) -> Table:
    """The artifact's inputs as its manifest records them: shape (named dimensions are open, e.g.
    ``batch``, ``height``) and dtype; the caption gives each open dimension's range."""
    ranges = (f"{name} {least}..{'' if most is None else most}" for name, (least, most) in dims.items())
    table = Table(title="inputs", caption=f"open: {', '.join(ranges)}" if dims else None)
    for column in ("input", "shape", "dtype"):
        table.add_column(column)
    for name, info in inputs.items():
        table.add_row(name, Text(f"[{', '.join(map(str, info['shape']))}]"), info["dtype"])  # not markup
    return table


def _smoothing_label(info: Mapping[str, Any]) -> str:
    """``+sq`` (planned), ``+sq a=0.35`` (compiled), ``+sq off`` (the search kept s = 1)."""
    if "smooth_alpha" not in info:
        return " +sq"
    alpha = info["smooth_alpha"]
    return " +sq off" if alpha is None else f" +sq a={alpha:g}"


def operator_table(gm: fx.GraphModule) -> Table:
    counts = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
    table = Table(title="operators")
    table.add_column("operator")
    table.add_column("count", justify="right")
    for op, count in counts.most_common():
        table.add_row(op, str(count))
    return table


def metrics_table(rows: Iterable[Mapping[str, float]], title: str) -> Table:
    table = Table(title=title)
    for column in ("sample", "rel L2", "cosine", "PSNR (dB)"):
        table.add_column(column)
    for i, row in enumerate(rows):
        table.add_row(str(row.get("sample", i)), _fmt(row["rel_l2"]), f"{row['cosine']:.6f}", _fmt(row["psnr"]))
    return table
