"""The GPU suite: qsc's kernels and a compressed forward against bf16 PyTorch, at Wan2.1-1.3B shapes.

    python benchmarks/gpu_suite.py                       # on a CUDA GPU: all sections, < 9 minutes
    python benchmarks/gpu_suite.py --sections gemm,attention
    python benchmarks/gpu_suite.py --dry-run             # on the CPU, Triton interpreter, tiny shapes

Wan2.1-1.3B at 480x832, 81 frames is 32760 tokens, dim 1536, 12 heads x 128, FFN 8960 (see
../shared/BENCHMARKS.md). Timings are medians of ``triton.testing.do_bench`` (CUDA events, warm-up,
L2 flushed between repeats) on fresh random data. Each row also reports the relative error of the
kernel against the reference backend (the function it must compute), so a fast wrong kernel shows.

A GPU run writes ``benchmarks/results/gpu-<device>-<date>.json`` (``--out`` to change), again after
each section, so a run stopped at a time limit keeps the sections it finished; a dry run writes
nothing unless ``--out`` is given: its figures are the interpreter's and mean nothing. The table is
printed last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from qsc.fsutil import atomic_file

WAN_1_3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6,
)
# 81 frames at 480x832 -> VAE latent 21 x 60 x 104 -> 2x2 patches: 21 * 30 * 52 = 32760 tokens.
WAN_LATENT = (16, 21, 60, 104)
WAN_TEXT_TOKENS = 512


def shapes(dry_run: bool) -> dict:
    if dry_run:  # tiny, ragged: the interpreter runs every program in Python
        return dict(tokens=70, gemm=[(96, 80), (64, 136)], strategy_rows=(16, 70), heads=2, head_dim=32, seq=300,
                    dtype=torch.float16)
    return dict(tokens=32760, gemm=[(1536, 1536), (1536, 8960), (8960, 1536)], strategy_rows=(512, 2048, 8192),
                heads=12, head_dim=128, seq=32760, dtype=torch.bfloat16)


def bench_ms(fn, device: torch.device) -> float:
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()  # CPU (dry run): a plain median of a few calls
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def gemm_rows(device: torch.device, s: dict) -> list[dict]:
    """Low-bit GEMM vs ``torch.matmul`` in the model dtype, the two kernels of ``qsc::quant_linear``
    timed apart: ``ms`` is the GEMM on int8 activation codes (what it costs once the quantization is
    fused into the op before it), ``act_quant_ms`` the per-token quantization pass on its own, and
    ``linear_ms`` / ``speedup_with_act_quant`` the op as it runs today, both kernels in sequence;
    ``int_mm_ms`` is ``torch._int_mm`` on the same int8 codes, for scale.
    W4 rows time both strategies of the GEMM (``ms_in_loop``, ``ms_unpack_first``); ``ms`` is the
    one ``quant_gemm`` picks at this M (``strategy``)."""
    from qsc import quant
    from qsc.backends import reference
    from qsc.backends import triton as triton_backend
    from qsc.kernels import act_quant, quant_gemm

    rows = []
    m, a_bits = s["tokens"], 8
    for k, n in s["gemm"]:
        x = torch.randn(m, k, device=device, dtype=s["dtype"])
        w = torch.randn(n, k, device=device) / k**0.5
        w_t = w.to(s["dtype"]).t()
        bf16_ms = bench_ms(lambda: torch.matmul(x, w_t), device)
        dense = torch.matmul(x, w_t)
        act_quant_ms = bench_ms(lambda: act_quant.quantize_per_token(x, None, a_bits, 1.0), device)
        codes, code_scales = act_quant.quantize_per_token(x, None, a_bits, 1.0)
        # PyTorch's int8 GEMM (cuBLASLt on a GPU), int32 out, no epilogue: far below ``ms``, it says
        # what an asynchronous int8 MMA, which Triton never emits, would be worth.
        w_codes = quant.quantize_weight(w, quant.weight_scale(w, 8), 8)
        int_mm_ms = bench_ms(lambda: torch._int_mm(codes, w_codes.t()), device)
        for w_bits in (4, 8):
            scale = quant.weight_scale(w, w_bits)
            qweight = quant.pack_weight(quant.quantize_weight(w, scale, w_bits), w_bits)
            gemm_args = (codes, code_scales, None, qweight, scale, None, w_bits, 0, k, s["dtype"])
            row = dict(scheme=f"w{w_bits}a{a_bits}", M=m, K=k, N=n)
            if w_bits == 4:
                row.update(_w4_strategies(gemm_args, device))
                ms = row[f"ms_{row['strategy']}"]
            else:
                ms = bench_ms(lambda: quant_gemm.quant_gemm(*gemm_args), device)
            args = (x, qweight, scale, None, None, w_bits, a_bits, 0, k, 1.0)
            linear_ms = bench_ms(lambda: triton_backend.quant_linear(*args), device)
            out = triton_backend.quant_linear(*args)
            rows.append(dict(
                row, ms=ms, bf16_ms=bf16_ms, speedup_vs_bf16=bf16_ms / ms, int_mm_ms=int_mm_ms,
                act_quant_ms=act_quant_ms, linear_ms=linear_ms, speedup_with_act_quant=bf16_ms / linear_ms,
                rel_err=rel_err(out, reference.quant_linear(*args)),
                quant_err_vs_bf16=rel_err(out, dense),  # the quantization's own error, for scale
            ))
    return rows


def _w4_strategies(gemm_args: tuple, device: torch.device) -> dict:
    """Both W4 strategies of one GEMM timed, and the one ``quant_gemm`` picks at its M."""
    from qsc.kernels import quant_gemm

    timed = {
        f"ms_{name}": bench_ms(lambda: quant_gemm.quant_gemm(*gemm_args, unpack_first=first), device)
        for name, first in (("in_loop", False), ("unpack_first", True))
    }
    return dict(timed, strategy="unpack_first" if quant_gemm.unpacks_first(gemm_args[0].shape[0]) else "in_loop")


def w4_strategy_rows(device: torch.device, s: dict) -> list[dict]:
    """W4A8 GEMM over a range of M with both strategies: where unpacking first starts to pay, the
    figure ``quant_gemm.UNPACK_MIN_ROWS`` is set from."""
    from qsc import quant
    from qsc.kernels import act_quant

    k, n = s["gemm"][1]  # the FFN-up shape (1536 x 8960): the largest weight to unpack
    w = torch.randn(n, k, device=device) / k**0.5
    w_t = w.to(s["dtype"]).t()
    scale = quant.weight_scale(w, 4)
    qweight = quant.pack_weight(quant.quantize_weight(w, scale, 4), 4)
    rows = []
    for m in s["strategy_rows"]:
        x = torch.randn(m, k, device=device, dtype=s["dtype"])
        bf16_ms = bench_ms(lambda: torch.matmul(x, w_t), device)
        codes, code_scales = act_quant.quantize_per_token(x, None, 8, 1.0)
        timed = _w4_strategies((codes, code_scales, None, qweight, scale, None, 4, 0, k, s["dtype"]), device)
        rows.append(dict(M=m, K=k, N=n, bf16_ms=bf16_ms, **timed))
    return rows


def random_layout(heads: int, tiles_m: int, tiles_n: int, density: float, device) -> torch.Tensor:
    """Every query tile keeps the same number of random key tiles: the given density, balanced."""
    keep = max(1, round(density * tiles_n))
    order = torch.rand(heads, tiles_m, tiles_n, device=device).argsort(dim=-1)
    return order < keep


def attention_rows(device: torch.device, s: dict) -> list[dict]:
    """Block-sparse attention at several densities vs SDPA (flash backend on CUDA), and SSAR's
    refresh (``mode`` "refresh": dense output and residual in one kernel) vs the dense kernel, the
    sparse kernel and a subtraction it replaces (``separate_ms``)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from qsc.backends import reference
    from qsc.backends import triton as triton_backend

    h, length, d = s["heads"], s["seq"], s["head_dim"]
    q, k, v = (torch.randn(1, h, length, d, device=device, dtype=s["dtype"]) for _ in range(3))
    backend = SDPBackend.FLASH_ATTENTION if device.type == "cuda" else SDPBackend.MATH
    with sdpa_kernel(backend):
        sdpa_ms = bench_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), device)
    tiles = reference.block_layout_shape(length, length)
    rows = []
    # Density 1.0 is the dense mode of the kernel: no layout at all. The INT8 QK^T rows include the
    # quantization of Q and K (K's mean, then one qk_quant pass each).
    for density, qk_int8 in ((1.0, False), (0.4, False), (0.25, False), (0.15, False), (1.0, True), (0.15, True)):
        layout = None if density == 1.0 else random_layout(h, *tiles, density, device)
        args = (q, k, v, layout, None, None, qk_int8)
        ms = bench_ms(lambda: triton_backend.sparse_attention(*args), device)
        out = triton_backend.sparse_attention(*args)
        rows.append(dict(
            mode="dense" if layout is None else "sparse", density=density, qk_int8=qk_int8,
            tile_density=1.0 if layout is None else layout.float().mean().item(),
            L=length, heads=h, head_dim=d, ms=ms, sdpa_ms=sdpa_ms, speedup_vs_sdpa=sdpa_ms / ms,
            rel_err=rel_err(out, reference.sparse_attention(*args)),
        ))
    rows.append(_refresh_row(q, k, v, 0.15, sdpa_ms, device))
    return rows


def _refresh_row(q, k, v, density: float, sdpa_ms: float, device: torch.device) -> dict:
    """SSAR's refresh at ``density``: the one-pass kernel against the dense and the sparse kernel
    and a subtraction."""
    from qsc.backends import reference
    from qsc.backends import triton as triton_backend

    _, heads, length, head_dim = q.shape
    layout = random_layout(heads, *reference.block_layout_shape(length, length), density, device)
    args = (q, k, v, layout, None, False)

    def separate():
        dense = triton_backend.sparse_attention(q, k, v, None, None, None)
        return dense, dense - triton_backend.sparse_attention(q, k, v, layout, None, None)

    ms, separate_ms = bench_ms(lambda: triton_backend.refresh_attention(*args), device), bench_ms(separate, device)
    out, residual = triton_backend.refresh_attention(*args)
    want, want_residual = reference.refresh_attention(*args)
    return dict(
        mode="refresh", density=density, qk_int8=False, tile_density=layout.float().mean().item(),
        L=length, heads=heads, head_dim=head_dim, ms=ms, sdpa_ms=sdpa_ms, speedup_vs_sdpa=sdpa_ms / ms,
        separate_ms=separate_ms, speedup_vs_separate=separate_ms / ms,
        rel_err=rel_err(out, want), residual_rel_err=rel_err(residual, want_residual),
    )


def end_to_end(device: torch.device, dry_run: bool) -> dict:
    """A Wan2.1-1.3B-shaped model (random weights) compressed with ``w4a8-sparse`` against the bf16
    diffusers model: the average time of a denoising step over one steady-state SSAR cycle (``tau``
    steps: a dense refresh with the second-order term, then ``tau - 1`` corrected sparse steps),
    qsc's programs under ``torch.compile`` (``ms``, through ``qsc.backends.inductor``; ``qsc_eager_ms``
    without), with the step and refresh programs and the refresh's low-rank factorization also
    timed alone."""
    try:
        import diffusers
    except ImportError:
        return {"skipped": "diffusers is not installed"}
    import qsc
    from qsc import lowrank
    from qsc.backends import inductor

    config = dict(WAN_1_3B)
    latent, text_tokens = WAN_LATENT, WAN_TEXT_TOKENS
    if dry_run:  # 2 x 8 x 16 patches: 256 tokens, 4 key tiles, so attention really is sparse
        # Head dim 32 > SSAR's rank 16: the low-rank term is truncated, as at full size.
        config.update(num_attention_heads=2, attention_head_dim=32, ffn_dim=64, num_layers=1, text_dim=32, freq_dim=32)
        latent, text_tokens = (16, 2, 16, 32), 8
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with device:
        model = diffusers.WanTransformer3DModel(**config).to(dtype).eval()
        inputs = dict(
            hidden_states=torch.randn(1, *latent, dtype=dtype),
            timestep=torch.tensor([500], dtype=torch.long),
            encoder_hidden_states=torch.randn(1, text_tokens, config["text_dim"], dtype=dtype),
        )
    preset = "w4a8-sparse"
    with torch.no_grad():
        eager_ms, eager_peak = _timed_forward(lambda: model(**inputs, return_dict=False)[0], device)
        _progress(f"bf16 eager {eager_ms:.1f} ms")
        compiled = torch.compile(model)
        compile_ms, _ = _timed_forward(lambda: compiled(**inputs, return_dict=False)[0], device)
        _progress(f"bf16 torch.compile {compile_ms:.1f} ms")
        fp_out = model(**inputs, return_dict=False)[0]
        result = qsc.compile(
            model, qsc.CalibrationSet.from_samples([inputs], outputs=[fp_out]), preset=preset,
            # Random weights: the time does not depend on learned scales, so the PTQ version compiles.
            config={"backend": "triton", "calib_samples": 1, "check_numerics": False, "learn_scales": False},
        )
        runtime, tau = result.module, result.config.ssar_tau
        tile_density = statistics.mean(a["density"] for a in result.attention.values())
        _progress(f"compiled {preset} in {result.seconds:.0f} s; attention density {tile_density:.3f}")
        cycle = SSARCycles(runtime, result.example_inputs, tau)
        cycle()  # the first refresh has no earlier one to take a second order from
        qsc_eager_ms = bench_ms(cycle, device) / tau
        _progress(f"qsc {preset} eager {qsc_eager_ms:.1f} ms per step")
        eager_step = runtime.step_program
        # The programs under torch.compile: the GEMMs and attentions stay calls into qsc's kernels,
        # Inductor fuses the glue between them (norms, modulation, RoPE) as it does for bf16, and
        # the activation quantization into the norms and GELUs that produce the activations.
        runtime.step_program = inductor.torch_compile(runtime.step_program)
        runtime.refresh_program = inductor.torch_compile(runtime.refresh_program)
        cycle_ms, qsc_peak = _timed_forward(cycle, device)
        qsc_ms = cycle_ms / tau
        _progress(f"qsc {preset} torch.compile {qsc_ms:.1f} ms per step")
        last = cycle()  # its last step is a corrected sparse one
        caches, residuals = runtime.caches(), list(runtime.residuals().values())
        step_ms = bench_ms(lambda: runtime.step_program(**result.example_inputs, **caches), device)
        refresh_ms = bench_ms(lambda: runtime.refresh_program(**result.example_inputs), device)
        others = residuals[1:] + residuals[:1]  # a previous refresh's stand-in: same shapes, real values
        low_rank_ms = bench_ms(lambda: lowrank.change_factors(residuals, others, runtime.schedule.rank), device)
        _progress(f"sparse step {step_ms:.1f} ms, dense refresh {refresh_ms:.1f} ms, its low rank {low_rank_ms:.1f} ms")
    return dict(
        preset=preset, timed=(f"mean step of a steady-state SSAR cycle ({tau} steps: 1 dense refresh with the "
                              f"second-order term + {tau - 1} corrected sparse)"),
        tau=tau, density=result.config.density,
        tile_density=tile_density,
        ms=qsc_ms, qsc_eager_ms=qsc_eager_ms, step_ms=step_ms, refresh_ms=refresh_ms, low_rank_ms=low_rank_ms,
        bf16_eager_ms=eager_ms, bf16_compile_ms=compile_ms,
        speedup_vs_bf16_eager=eager_ms / qsc_ms, speedup_vs_bf16_compile=compile_ms / qsc_ms,
        peak_mem_ratio=(qsc_peak / eager_peak) if eager_peak else None,
        storage_ratio=result.sizes["ratio"],
        # The last step of the cycle (sparse, SSAR-corrected) against the bf16 model on its input.
        rel_err=rel_err(last, model(**cycle.last_inputs, return_dict=False)[0]),
        compile_rel_err=rel_err(runtime.step_program(**cycle.last_inputs, **caches),
                                eager_step(**cycle.last_inputs, **caches)),
        output_metrics=result.metrics,  # sparse without correction, on the calibration input
    )


class SSARCycles:
    """One endless trajectory, ``tau`` steps per call: from the second call on, each call is a
    steady-state SSAR cycle (a refresh that takes the second order from the one before, then
    ``tau - 1`` corrected sparse steps). The timestep falls by one per step; the latent's values do
    not change the time."""

    def __init__(self, runtime, inputs: dict, tau: int):
        self.runtime, self.inputs, self.tau = runtime, inputs, tau
        self.step = 0
        runtime.reset()

    def __call__(self) -> torch.Tensor:
        for _ in range(self.tau):
            timestep = self.inputs["timestep"] - self.step
            if (timestep < 0).any():
                raise RuntimeError(f"the benchmark trajectory ran out of timesteps after {self.step} steps")
            self.last_inputs = dict(self.inputs, timestep=timestep)
            out = self.runtime(**self.last_inputs)
            self.step += 1
        return out


def _progress(message: str) -> None:
    """A figure as soon as it is measured: a run stopped later (time limit) still shows it."""
    print(f"[end_to_end] {message}", file=sys.stderr, flush=True)


def _timed_forward(fn, device: torch.device) -> tuple[float, int | None]:
    """(median ms, peak bytes allocated during one call; None off CUDA)."""
    ms = bench_ms(fn, device)
    if device.type != "cuda":
        return ms, None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return ms, torch.cuda.max_memory_allocated()


def environment(device: torch.device) -> dict:
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-interpreter-{platform.machine()}"
    return dict(device=name, torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
                cuda=torch.version.cuda, date=datetime.datetime.now().isoformat(timespec="seconds"),
                command=" ".join([Path(sys.executable).name, *sys.argv]))


def print_table(report: dict) -> None:
    print(f"\n== qsc GPU suite: {report['device']} ({report['date']}) ==")
    if report.get("gemm"):
        print(f"{'GEMM':<8}{'K':>6}{'N':>6}{'W4 unpack':>14}{'ms':>10}{'bf16 ms':>10}{'speedup':>9}{'+quant':>9}"
              f"{'rel err':>10}{'int_mm ms':>11}")
        for r in report["gemm"]:
            print(f"{r['scheme']:<8}{r['K']:>6}{r['N']:>6}{r.get('strategy', '-'):>14}{r['ms']:>10.3f}"
                  f"{r['bf16_ms']:>10.3f}{r['speedup_vs_bf16']:>8.2f}x{r['speedup_with_act_quant']:>8.2f}x"
                  f"{r['rel_err']:>10.1e}{r['int_mm_ms']:>11.3f}")
    if report.get("w4_strategy"):
        print(f"{'W4A8 M':<8}{'K':>6}{'N':>6}{'in loop':>10}{'unpack 1st':>11}{'bf16 ms':>10}")
        for r in report["w4_strategy"]:
            print(f"{r['M']:<8}{r['K']:>6}{r['N']:>6}{r['ms_in_loop']:>10.3f}{r['ms_unpack_first']:>11.3f}"
                  f"{r['bf16_ms']:>10.3f}")
    if report.get("attention"):
        print(f"{'mode':<9}{'density':>8}{'QK':>6}{'ms':>10}{'sdpa ms':>10}{'speedup':>9}{'rel err':>10}"
              f"{'2-kernel ms':>13}")
        for r in report["attention"]:
            separate = f"{r['separate_ms']:>13.3f}" if "separate_ms" in r else ""
            print(f"{r['mode']:<9}{r['density']:>8}{'int8' if r['qk_int8'] else 'fp':>6}{r['ms']:>10.3f}"
                  f"{r['sdpa_ms']:>10.3f}{r['speedup_vs_sdpa']:>8.2f}x{r['rel_err']:>10.1e}{separate}")
    if "end_to_end" in report:
        print("end to end:", json.dumps(report["end_to_end"], default=str))


def _end_to_end_or_error(device: torch.device, dry_run: bool) -> dict:
    try:
        return end_to_end(device, dry_run)
    except Exception as e:  # the kernel figures of the same run must survive a pipeline failure
        return {"error": f"{type(e).__name__}: {e}"}


SECTIONS = ("gemm", "attention", "end_to_end")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated, run in this order")
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results on a GPU)")
    args = parser.parse_args(argv)
    sections = args.sections.split(",")
    if unknown := set(sections) - set(SECTIONS):
        parser.error(f"unknown section(s) {', '.join(sorted(unknown))}: choose from {', '.join(SECTIONS)}")

    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are first imported, just below
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        parser.error("no CUDA device: use --dry-run to exercise the suite on the CPU")
    torch.manual_seed(0)
    s = shapes(args.dry_run)

    report = environment(device)
    out_dir = args.out if args.out is not None or args.dry_run else Path(__file__).parent / "results"
    slug = report["device"].lower().replace(" ", "-")
    path = out_dir / f"gpu-{slug}-{report['date'].replace(':', '')}.json" if out_dir is not None else None
    measures = {
        "gemm": lambda: dict(gemm=gemm_rows(device, s), w4_strategy=w4_strategy_rows(device, s)),
        "attention": lambda: dict(attention=attention_rows(device, s)),
        "end_to_end": lambda: dict(end_to_end=_end_to_end_or_error(device, args.dry_run)),
    }
    for section in sections:
        started = time.perf_counter()
        report.update(measures[section]())
        print(f"[{section}] done in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        if path is not None:  # after every section: a run stopped at a time limit keeps what it measured
            with atomic_file(path) as tmp:
                tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    if path is not None:
        print(f"wrote {path}")
    print_table(report)
    return report


if __name__ == "__main__":
    main()
