"""The README's Python examples run as written."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run(tmp_path, monkeypatch):
    from tiny_pipelines import wan_pipeline

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    wan_pipeline().save_pretrained(tmp_path / "wan-pipeline")  # what the pipeline section loads
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["out"].shape == namespace["calib"].sample(0)["hidden_states"].shape
    rel_errors = dict((name, err) for name, err in [(r["pass"], r["rel_l2_vs_fp"]) for r in namespace["ctx"].pass_log])
    assert rel_errors["insert_observers"] == 0 and rel_errors["smooth_quant"] < 1e-5
    graph = namespace["graph"]
    ctx = namespace["ctx"]
    namespace["CountLinears"]().run(graph, ctx)
    assert ctx.analyses["linear_count"] == 1  # only proj_out is left a float linear
    # the pipeline section: two videos from the artifact in the pipeline, labelled recordings
    assert namespace["video"].shape[0] == 2 and torch.isfinite(namespace["video"]).all()
    assert namespace["taller"].shape == (1, 9, 3, 96, 64)  # another resolution, the same artifact
    assert type(namespace["pipe"].transformer).__name__ == "DropInTransformer"
    assert namespace["recorded"].records[1]["branch"] == "uncond"
