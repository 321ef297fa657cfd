"""``qsc compile``."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import click

from qsc.config import BACKENDS, FAST, PRESETS, parse_overrides, resolve_config

from . import progress_bar, stderr, stdout


def _default_output(model: str | None) -> Path:
    return Path(f"{Path(model).stem if model else 'reference'}.qsc")


def checkpoint_dir(output: Path) -> Path:
    """Where a compile into ``output`` keeps the checkpoints that ``--resume`` continues from."""
    return output.with_name(output.name + ".ckpt")


@click.command("compile")
@click.argument("model", required=False, type=click.Path())
@click.option("-p", "--preset", type=click.Choice(list(PRESETS)), default=None,
              help="quantization preset [default: w8a8, or the config file's]")
@click.option("-c", "--config", "config_file", type=click.Path(dir_okay=False),
              help="TOML or YAML file of settings (any CompileConfig field)")
@click.option("-s", "--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="override one setting, e.g. --set smooth_quant=false --set group_size=128")
@click.option("-b", "--backend", type=click.Choice(BACKENDS), default=None,
              help="what runs the program: reference ops, Triton kernels on CUDA, or tensorrt (also writes "
                   "OUT/tensorrt: the plugin graph, its PTX and, where TensorRT and a GPU are, the engine) "
                   "[default: reference]")
@click.option("-o", "--output", type=click.Path(), default=None,
              help="artifact directory [default: MODEL_NAME.qsc, reference.qsc without MODEL]")
@click.option("--calib", type=click.Path(), default=None,
              help="calibration file (safetensors, qsc format) [default: synthetic inputs for known architectures]")
@click.option("--dump-ir", type=click.Path(file_okay=False), default=None,
              help="write the graph after every pass into this directory")
@click.option("--seed", type=int, default=None, help="seed for everything random [default: 0]")
@click.option("--arch", default=None, help="architecture of a bare state dict, e.g. WanTransformer3DModel")
@click.option("--model-config", type=click.Path(dir_okay=False), default=None,
              help="config.json for --arch")
@click.option("--trust-pickle", is_flag=True,
              help="allow loading a pickled nn.Module (runs code from the file: only for files you trust)")
@click.option("--fast", is_flag=True,
              help=f"a quick compile with the same passes ({', '.join(f'{k}={v}' for k, v in FAST.items())}; -s overrides it)")
@click.option("--resume", is_flag=True,
              help="continue an interrupted compile from its last checkpoint (OUT.ckpt/): the same artifact "
                   "as an uninterrupted run")
@click.option("-f", "--force", is_flag=True, help="replace the output directory if it exists")
@click.option("-v", "--verbose", is_flag=True, help="also list every quantized layer")
def compile_command(model, preset, config_file, overrides, backend, output, calib, dump_ir, seed,
                    arch, model_config, trust_pickle, fast, resume, force, verbose):
    """Compress MODEL into an artifact directory.

    MODEL is a torch.export program (.pt2), a diffusers model or pipeline directory, a
    .safetensors state dict (with --arch and --model-config), or a pickled module (.pt, with
    --trust-pickle). Without MODEL, the bundled reference model is compiled.

    Scale learning (presets w4a6-s2q, w4a8-s2q, w4a8-sparse) checkpoints after every block into
    OUT.ckpt/; after Ctrl-C or a crash, the same command with --resume continues from there.
    """
    import qsc
    from qsc.report import attention_table, layer_table, pass_table, summary_table

    settings = {**(FAST if fast else {}), **parse_overrides(list(overrides))}
    if backend is not None:
        settings["backend"] = backend
    if seed is not None:
        settings["seed"] = seed
    config = resolve_config(preset, config_file, settings)
    output = Path(output) if output else _default_output(model)
    if output.exists() and not force:
        raise click.UsageError(f"{output} exists; pass --force to replace it")

    checkpoints = checkpoint_dir(output)
    if resume and not checkpoints.is_dir():
        stderr.print(f"nothing to resume in {checkpoints}: compiling from the start")
    try:
        with stderr.status(f"compiling {model or 'the bundled reference model'} ({config.preset})"):
            result = qsc.compile(
                model, calib, config=config, dump_ir=dump_ir, progress=progress_bar,
                checkpoint_dir=checkpoints, resume=resume,
                arch=arch, model_config=model_config, trust_pickle=trust_pickle,
            )
            result.save(output, overwrite=force)
    except KeyboardInterrupt:
        kept = f"the finished blocks are checkpointed in {checkpoints}; " if checkpoints.is_dir() else ""
        stderr.print(f"interrupted: {kept}the same command with --resume continues", highlight=False)
        sys.exit(130)
    shutil.rmtree(checkpoints, ignore_errors=True)
    stdout.print(pass_table(result.pass_log))
    if verbose:
        stdout.print(layer_table(result.layers))
        if result.attention:
            stdout.print(attention_table(result.attention))
    stdout.print(summary_table(result.sizes, result.metrics, result.seconds, len(result.layers)))
    if config.backend == "tensorrt":
        from qsc.backends.tensorrt import engine

        record = engine.read_record(engine.default_output(output))
        if record["skipped"]:
            stderr.print(f"engine step skipped: {record['skipped']}", markup=False)
    stdout.print(f"wrote [bold]{output}[/]")
