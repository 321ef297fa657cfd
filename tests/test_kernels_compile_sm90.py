"""Every autotune configuration of every kernel compiles to PTX and cubin at real tile sizes: the
Hopper list for sm_90, the fallback list for sm_80, without a GPU (``python -m qsc.kernels.aot``).
What the compiler reports is checked too: shared memory within the target's, Hopper's warpgroup
MMA in a main loop, no register spills in a main loop (none at all in kernels without one), and every
tile load of a main loop pipelined."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from qsc.kernels import aot, quant_gemm, sparse_attention  # noqa: E402

# The fallback configurations must also fit the smaller shared memory of sm_86/sm_89 GPUs.
_SHARED_LIMIT = {90: aot.MAX_SHARED_BYTES[90], 80: min(aot.MAX_SHARED_BYTES.values())}


@pytest.mark.slow
def test_every_configuration_compiles_for_its_target():
    # The interpreter replaces compiled kernels, so compile in a process without it.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-m", "qsc.kernels.aot"], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = [json.loads(line) for line in done.stdout.splitlines()]

    per_target = lambda gemm, attention: (  # noqa: E731
        len(gemm) * len(aot.GEMM_VARIANTS) + len(attention) * len(aot.ATTENTION_VARIANTS)
        + len(aot.ACT_QUANT_VARIANTS) + len(aot.QK_QUANT_VARIANTS) + 1  # int4_unpack
    )
    assert len(results) == per_target(quant_gemm.HOPPER_CONFIGS, sparse_attention.HOPPER_CONFIGS) + per_target(
        quant_gemm.FALLBACK_CONFIGS, sparse_attention.FALLBACK_CONFIGS
    )
    for r in results:
        assert r["cubin_bytes"] > 0, r
        assert r["shared_bytes"] <= _SHARED_LIMIT[r["arch"]], r
        assert not r["unpipelined_loads"], f"tile loads left synchronous in the main loop: {r}"
        if r["kernel"].startswith(("quant_gemm", "sparse_attention")):
            assert r["loop_instructions"], f"no main loop with a tensor-core MMA in the SASS: {r}"
            assert r["loop_spills"] == 0, f"spills registers to local memory in the main loop: {r}"
            if r["arch"] == 90:
                assert r["wgmma"], f"not lowered to Hopper's warpgroup MMA: {r}"
        else:
            assert r["spill_bytes"] == 0, f"spills registers to local memory: {r}"


def test_unpipelined_tile_loads_finds_a_synchronous_load_in_a_loop():
    ttgir = """
    %q = tt.load %qp, %m : tensor<128x128x!tt.ptr<bf16>, #blocked>
    %r:2 = scf.for %i = %c0 to %n step %c1 iter_args(%acc = %z) -> (tensor<128x256xi32, #mma>) {
      %a = ttg.async_copy_global_to_local %ap, %buf mask %m : tensor<128x128x!tt.ptr<i8>, #blocked> -> <128x128xi8>
      %s = tt.load %sp : tensor<256x!tt.ptr<f16>, #blocked1>
      %w = tt.load %wp, %wm : tensor<256x64x!tt.ptr<i8>, #blocked1> loc(#loc1)
      scf.yield %acc : tensor<128x256xi32, #mma>
    } loc(#loc2)
    %o = tt.load %op, %m : tensor<128x128x!tt.ptr<bf16>, #blocked>
    """
    (found,) = aot.unpipelined_tile_loads(ttgir)
    assert found.startswith("%w = tt.load")


def test_main_loops_are_the_innermost_loops_that_issue_an_mma():
    sass = """
        /*0010*/                   STL [R1], R2 ;
        /*0020*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0030*/                   LDL R3, [R1+0x4] ;
        /*0040*/               @P0 BRA 0x20 ;
        /*0050*/                   LDL.LU R2, [R1] ;
        /*0060*/                   FADD R5, R5, R6 ;
        /*0070*/               @P1 BRA 0x50 ;
        /*0080*/                   EXIT ;
    """
    assert aot.main_loops(sass) == [["HMMA.16816.F32.BF16", "LDL", "BRA"]]


def test_main_loops_one_after_the_other_are_both_found():
    sass = """
        /*0010*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0020*/               @P0 BRA 0x10 ;
        /*0030*/                   STL [R1], R2 ;
        /*0040*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0050*/               @P1 BRA 0x30 ;
        /*0060*/                   EXIT ;
    """
    assert aot.main_loops(sass) == [["HMMA.16816.F32.BF16", "BRA"], ["STL", "HMMA.16816.F32.BF16", "BRA"]]
