"""``qsc inspect``."""

from __future__ import annotations

from pathlib import Path

import click

from . import stdout


@click.command("inspect")
@click.argument("target", type=click.Path(exists=True))
@click.option("-p", "--preset", default=None, help="for a model: the preset whose quantization plan to show")
@click.option("--calib", type=click.Path(), default=None, help="for a model: example inputs to trace with")
@click.option("--arch", default=None, help="architecture of a bare state dict")
@click.option("--model-config", type=click.Path(dir_okay=False), default=None, help="config.json for --arch")
@click.option("--trust-pickle", is_flag=True, help="allow loading a pickled nn.Module")
def inspect_command(target, preset, calib, arch, model_config, trust_pickle):
    """Show what TARGET contains: inputs (shapes and dtypes), operators, quantized layers and how,
    sparse attention layers, bytes before/after.

    TARGET is an artifact directory (NAME.qsc) or any model `qsc compile` accepts; for a model,
    the layers the preset would quantize are listed with their expected packed size.
    """
    from qsc.inspection import inspect_artifact, inspect_model
    from qsc.artifact import read_manifest
    from qsc.report import attention_table, human_bytes, inputs_table, layer_table, operator_table

    path = Path(target)
    attention, inputs, dims = {}, {}, {}
    if (path / "manifest.json").is_file():
        graph, layers, sizes = inspect_artifact(path)
        manifest = read_manifest(path)
        attention, inputs, dims = manifest.get("attention", {}), manifest.get("inputs", {}), manifest.get("dims", {})
        title = "quantized layers"
    else:
        graph, layers, sizes = inspect_model(path, preset=preset, calib=calib, arch=arch,
                                             model_config=model_config, trust_pickle=trust_pickle)
        title = "layers the preset would quantize"
    if inputs:
        stdout.print(inputs_table(inputs, dims))
    stdout.print(operator_table(graph))
    stdout.print(layer_table(layers, title=title))
    if attention:
        stdout.print(attention_table(attention))
    stdout.print(
        f"bytes: {human_bytes(sizes['fp_bytes'])} -> {human_bytes(sizes['compressed_bytes'])} "
        f"({sizes['ratio']:.2f}x)"
    )
