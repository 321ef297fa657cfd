"""``qsc eval``."""

from __future__ import annotations

import json
import statistics

import click

from . import no_traceback, stdout


@click.command("eval")
@click.argument("artifact", type=click.Path(exists=True, file_okay=False))
@click.option("--model", type=click.Path(exists=True), default=None,
              help="the FP model to compare with [default: the one in the artifact's manifest]")
@click.option("--data", type=click.Path(), default=None,
              help="held-out inputs (calibration-format file, recorded calls in sampling order) "
                   "[default: the bundled model's sampler on an evaluation prompt, else synthetic with seed = "
                   "compile seed + 1]")
@click.option("-n", "--samples", type=int, default=4, show_default=True,
              help="number of held-out calls measured, evenly spread")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="also write the rows as JSON")
@click.option("--trust-pickle", is_flag=True, help="allow loading a pickled FP nn.Module")
def eval_command(artifact, model, data, samples, json_out, trust_pickle):
    """Compare ARTIFACT's outputs with the FP model's on held-out inputs (relative L2, cosine, PSNR).

    An SSAR artifact (sparse attention with residual caches) runs its refresh schedule along the
    held-out trajectory; on synthetic inputs, which are no trajectory, its sparse step is measured
    without correction."""
    from qsc.evaluate import evaluate
    from qsc.fsutil import atomic_file
    from qsc.report import metrics_table

    with no_traceback("eval"):
        rows = evaluate(artifact, model=model, data=data, samples=samples, trust_pickle=trust_pickle)
        mean = {k: statistics.fmean(r[k] for r in rows) for k in ("rel_l2", "cosine", "psnr")}
        stdout.print(metrics_table([*rows, {"sample": "mean", **mean}], title=f"{artifact} vs FP"))
        if json_out:
            with atomic_file(json_out) as tmp:
                tmp.write_text(json.dumps({"artifact": artifact, "rows": rows, "mean": mean}, indent=2) + "\n")
