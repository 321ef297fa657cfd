"""``qsc export``."""

from __future__ import annotations

import click

from . import stderr, stdout


@click.command("export")
@click.argument("artifact", type=click.Path(exists=True, file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["onnx", "tensorrt"]), default="onnx", show_default=True,
              help="ONNX graphs, or the plugin graph with its kernels as PTX and, where TensorRT and a GPU "
                   "are there, its TensorRT engines")
@click.option("-o", "--output", type=click.Path(file_okay=False), default=None,
              help="output directory [default: ARTIFACT/onnx, ARTIFACT/onnx-standard with --no-plugins, "
                   "ARTIFACT/tensorrt]")
@click.option("--no-plugins", is_flag=True,
              help="standard ONNX operators only (any ONNX runtime; slower): no qsc plugin nodes")
@click.option("--max-size", "max_sizes", multiple=True, metavar="DIM=N",
              help="with --format tensorrt: the greatest size of an open dimension the engines take, e.g. "
                   "batch=4 or text=512 (repeatable) [default: its greatest size; for the batch and text, "
                   "the exported size]")
@click.option("-f", "--force", is_flag=True, help="replace the output directory if it exists")
def export_command(artifact, fmt, output, no_plugins, max_sizes, force):
    """Export ARTIFACT (a NAME.qsc directory) for deployment outside PyTorch.

    ONNX (opset 21): program.onnx, and refresh.onnx for an SSAR artifact, whose caches are graph
    inputs and outputs; onnx.json says what each file takes and returns. The plugin graph has a
    qsc plugin node per compressed layer, for TensorRT; --no-plugins writes the same function in
    standard operators only. --format tensorrt writes the plugin graph, its plugins' kernels
    compiled ahead of time (plugins/: PTX for sm_90 and sm_80) and, where TensorRT and a GPU are
    there, the engines (model.engine, an optimization profile over the open dimensions); elsewhere
    it says that the engine step was skipped and why, and exits 0 with the rest written.
    """
    from pathlib import Path

    from qsc.errors import ConfigError

    try:
        from qsc.backends.tensorrt import engine, onnx_export
    except ImportError as e:
        raise ConfigError(f"ONNX export needs the '{e.name}' package: pip install 'qsc[onnx]'") from None

    if fmt == "tensorrt" and no_plugins:
        raise ConfigError("--format tensorrt builds from the plugin graph: drop --no-plugins")
    if max_sizes and fmt != "tensorrt":
        raise click.UsageError("--max-size sizes TensorRT engines: use it with --format tensorrt")
    limits = dict(_max_size(item) for item in max_sizes)
    target = Path(output) if output else None
    if target is None:
        target = (engine.default_output(artifact) if fmt == "tensorrt"
                  else onnx_export.default_output(artifact, use_plugins=not no_plugins))
    if target.exists() and not force:
        raise click.UsageError(f"{target} exists; pass --force to replace it")
    with stderr.status(f"exporting {artifact} to {fmt}"):
        if fmt == "tensorrt":
            record = engine.export_engine(artifact, target, overwrite=force, max_sizes=limits)
        else:
            onnx_export.export_artifact(artifact, target, use_plugins=not no_plugins, overwrite=force)
    if fmt == "tensorrt" and record["skipped"]:
        stderr.print(f"engine step skipped: {record['skipped']}", markup=False)
    stdout.print(f"wrote [bold]{target}[/]")


def _max_size(item: str) -> tuple[str, int]:
    name, _, size = item.partition("=")
    if not name or not size.isdigit():
        raise click.BadParameter(f"{item!r} is not DIM=N (e.g. batch=4)", param_hint="--max-size")
    return name, int(size)
