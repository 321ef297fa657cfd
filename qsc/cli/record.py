"""``qsc record``: calibration data from a diffusers pipeline directory."""

from __future__ import annotations

from collections import Counter

import click

from . import stderr, stdout

DTYPES = ("float32", "bfloat16", "float16")


@click.command("record")
@click.argument("pipeline", type=click.Path(exists=True, file_okay=False))
@click.option("--prompt", "prompts", multiple=True, required=True, help="a prompt to run (repeat for more)")
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="calibration file (.safetensors)")
@click.option("--steps", type=int, default=None, help="num_inference_steps [default: the pipeline's]")
@click.option("--guidance", type=float, default=None, help="guidance_scale [default: the pipeline's]")
@click.option("--height", type=int, default=None, help="video height in pixels [default: the pipeline's]")
@click.option("--width", type=int, default=None, help="video width in pixels [default: the pipeline's]")
@click.option("--frames", type=int, default=None, help="num_frames [default: the pipeline's]")
@click.option("--seed", type=int, default=0, show_default=True, help="noise seed of the first prompt (+1 per prompt)")
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True, help="dtype to run the pipeline in")
def record_command(pipeline, prompts, output, steps, guidance, height, width, frames, seed, dtype):
    """Run the diffusers pipeline in directory PIPELINE once per --prompt and record every call
    of its transformer (inputs and outputs, labelled with prompt, step and guidance branch) as
    calibration data for `qsc compile PIPELINE --calib OUTPUT`. The shapes recorded are the
    shapes the artifact will take (the batch is free)."""
    import torch

    from qsc.recording import load_pipeline, record

    options = {"num_inference_steps": steps, "guidance_scale": guidance, "height": height, "width": width,
               "num_frames": frames}
    with stderr.status(f"recording {pipeline}"):
        pipe = load_pipeline(pipeline, getattr(torch, dtype))
        calib = record(pipe, list(prompts), seed=seed, **{k: v for k, v in options.items() if v is not None})
        calib.save(output)
    branches = Counter(r.get("branch", "-") for r in calib.records)
    shapes = ", ".join(f"{n} {list(t.shape[1:])}" for n, t in calib.inputs.items())
    stdout.print(f"recorded {len(calib)} calls of {type(pipe.transformer).__name__} "
                 f"({', '.join(f'{n} {b}' for b, n in sorted(branches.items()))}): {shapes}", highlight=False)
    stdout.print(f"wrote [bold]{output}[/]")
