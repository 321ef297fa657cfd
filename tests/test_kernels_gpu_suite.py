"""``benchmarks/gpu_suite.py --dry-run``: the suite's kernel sections run on the CPU interpreter at
tiny shapes and produce rows in the schema the results JSON promises (the figures mean nothing)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

import qsc
from devices import require_kernels

require_kernels()

_SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.py"


def _load_suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", _SUITE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_writes_the_result_schema(tmp_path, capsys):
    report = _load_suite().main(["--dry-run", "--sections", "gemm,attention", "--out", str(tmp_path)])
    (written,) = tmp_path.glob("gpu-*.json")
    assert json.loads(written.read_text()) == json.loads(json.dumps(report, default=str))
    assert {"device", "torch", "triton", "date", "command"} <= report.keys()
    assert {r["scheme"] for r in report["gemm"]} == {"w4a8", "w8a8"}
    for r in report["gemm"]:
        assert {"K", "N", "ms", "bf16_ms", "speedup_vs_bf16", "rel_err"} <= r.keys()
        assert {"act_quant_ms", "linear_ms", "speedup_with_act_quant", "int_mm_ms"} <= r.keys()
        assert r["rel_err"] < 1e-3  # the kernel computes the reference's function
        if r["scheme"] == "w4a8":
            assert r["ms"] == r[f"ms_{r['strategy']}"] and r["strategy"] == "in_loop"  # M = 70
    assert [r["M"] for r in report["w4_strategy"]] == [16, 70]
    for r in report["w4_strategy"]:
        assert {"ms_in_loop", "ms_unpack_first", "bf16_ms"} <= r.keys()
    modes = [(r["mode"], r["density"]) for r in report["attention"] if not r["qk_int8"]]
    assert modes == [("dense", 1.0), ("sparse", 0.4), ("sparse", 0.25), ("sparse", 0.15), ("refresh", 0.15)]
    for r in report["attention"]:
        assert {"density", "ms", "sdpa_ms", "speedup_vs_sdpa", "rel_err"} <= r.keys()
        assert r["rel_err"] < 1e-2
    (refresh,) = (r for r in report["attention"] if r["mode"] == "refresh")
    assert refresh["separate_ms"] > 0 and refresh["residual_rel_err"] < 1e-2
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("refresh")  # the table comes last


def test_a_run_stopped_in_a_section_keeps_the_sections_before_it(tmp_path, monkeypatch):
    suite = _load_suite()

    def stopped(*args):
        raise KeyboardInterrupt  # stands for a time limit, which kills the process mid-section

    monkeypatch.setattr(suite, "attention_rows", stopped)
    with pytest.raises(KeyboardInterrupt):
        suite.main(["--dry-run", "--sections", "gemm,attention", "--out", str(tmp_path)])
    (written,) = tmp_path.glob("gpu-*.json")
    report = json.loads(written.read_text())
    assert report["gemm"] and report["w4_strategy"] and "attention" not in report
    assert not list(tmp_path.glob(".*"))  # no temporary file left beside it


@pytest.mark.slow
def test_dry_run_end_to_end_times_an_ssar_cycle(tmp_path):
    pytest.importorskip("diffusers")
    row = _load_suite().main(["--dry-run", "--sections", "end_to_end", "--out", str(tmp_path)])["end_to_end"]
    assert "error" not in row, row
    assert {"speedup_vs_bf16_eager", "speedup_vs_bf16_compile", "peak_mem_ratio", "storage_ratio", "tau",
            "density"} <= row.keys()
    assert min(row[k] for k in ("ms", "qsc_eager_ms", "step_ms", "refresh_ms", "low_rank_ms")) > 0
    preset = qsc.resolve_config("w4a8-sparse")
    assert (row["tau"], row["density"], row["tile_density"]) == (preset.ssar_tau, preset.density, 0.25)  # 1 of 4 key tiles
    assert row["compile_rel_err"] < 1e-3  # torch.compile of the programs computes what they compute eagerly
    # The SSAR-corrected sparse step follows the bf16 model more closely than sparse attention alone.
    assert row["rel_err"] < row["output_metrics"]["rel_l2"]
