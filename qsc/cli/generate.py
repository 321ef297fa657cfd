"""``qsc generate``: videos of one prompt from the FP reference model and a compressed artifact."""

from __future__ import annotations

import click

from . import no_traceback


@click.command("generate")
@click.option("--prompt", required=True, help='e.g. "a red circle moving left" (see qsc.refmodel.prompts)')
@click.option("--artifact", type=click.Path(exists=True), default=None,
              help="a compiled .qsc artifact of the reference model, shown beside the FP video")
@click.option("--seed", type=int, default=0, show_default=True, help="noise seed (same noise for both)")
@click.option("--steps", type=int, default=None, help="sampling steps [default: the sampler's]")
@click.option("--guidance", type=float, default=None, help="classifier-free guidance scale")
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="out.gif or out.mp4")
def generate(prompt, artifact, seed, steps, guidance, output):
    """Write a GIF/MP4 of PROMPT: FP on the left, the compressed artifact (if given) on the right."""
    from ..metrics import psnr, ssim
    from ..refmodel import as_denoiser, load_reference_model
    from ..refmodel.prompts import Prompt
    from ..refmodel.sampler import sample
    from ..refmodel.video import side_by_side, write_video

    with no_traceback("generate"):
        try:
            parsed = Prompt.parse(prompt)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--prompt") from None
        options = {k: v for k, v in {"steps": steps, "guidance": guidance}.items() if v is not None}
        clips, labels = [sample(as_denoiser(load_reference_model()), parsed, seed, **options)], ["FP"]
        if artifact is not None:
            import qsc

            clips.append(sample(qsc.load(artifact), parsed, seed, **options))
            labels.append("compressed")
            click.echo(f"compressed vs FP: PSNR {psnr(clips[1], clips[0], peak=1.0):.2f} dB, "
                       f"SSIM {ssim(clips[1], clips[0]):.4f}")
        path = write_video(output, side_by_side(clips, labels))
        click.echo(f"wrote {path} ({parsed.text}, seed {seed})")
