"""Ahead-of-time compilation of the kernels for a GPU target, on any machine (no GPU needed).

``triton.compile`` lowers a kernel to PTX and cubin for a named target (e.g. sm_90) on the CPU. The
tests use it to compile every autotune configuration at real tile sizes, so a configuration that
does not compile, needs more shared memory than the target has, spills registers in its main
loop, or leaves a tile load out of the software pipeline, fails here rather than (slowly) on the
GPU. The same path yields the PTX that ahead-of-time consumers (TensorRT plugins) embed.

Kernels are specialized the way the JIT specializes them at run time: pointers are assumed 16-byte
aligned and integer arguments divisible by 16 get the divisibility hint. This module must be used
without ``TRITON_INTERPRET`` (the interpreter replaces the kernels' compiled form).
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget

from . import act_quant, int4_unpack, qk_quant, quant_gemm, sparse_attention

HOPPER = GPUTarget("cuda", 90, 32)
AMPERE = GPUTarget("cuda", 80, 32)

# Shared memory an SM offers one block (opt-in maximum), by compute capability.
MAX_SHARED_BYTES = {90: 232448, 80: 166912, 86: 101376, 89: 101376}

_DIVISIBILITY = [["tt.divisibility", 16]]


def _compile(kernel, target: GPUTarget, params: dict, constexprs: dict, num_warps: int, num_stages: int):
    """``params``: every runtime argument in order, as a Triton pointer type (``"*fp16"``), an
    example ``int`` (typed i32, hinted when divisible by 16) or ``float`` (fp32). Constant
    arguments (flags, tile sizes, and pointers passed as None) go in ``constexprs``."""
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = params[name]
        if isinstance(value, str):
            signature[name], hinted = value, True
        elif isinstance(value, int):
            signature[name], hinted = "i32", value % 16 == 0
        else:
            signature[name], hinted = "fp32", False
        if hinted:
            attrs[(i,)] = _DIVISIBILITY
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=target, options={"num_warps": num_warps, "num_stages": num_stages})


def compile_quant_gemm(
    config: triton.Config, target: GPUTarget, *, w_bits: int, group_size: int, a_dtype: str,
    out_dtype: str, in_scale: bool, bias: bool, m: int = 32760, n: int = 8960, k: int = 1536,
):
    """The GEMM for one configuration; ``a_dtype`` ``"i8"`` is the quantized path, a float type
    the weight-only path."""
    a_int8 = a_dtype == "i8"
    config = quant_gemm.adapt_config(config, w_bits, group_size, a_int8)
    k_cols = (k + 1) // 2 if w_bits == 4 else k
    params = dict(
        a_ptr=f"*{a_dtype}", a_scale_ptr="*fp32", in_scale_ptr="*fp32", w_ptr="*i8", w_scale_ptr="*fp16",
        bias_ptr=f"*{out_dtype}", out_ptr=f"*{out_dtype}", M=m, N=n, K=k, K_BYTES=k_cols,
        stride_am=k, stride_wn=k_cols, stride_wsn=k // group_size if group_size else 1, stride_om=n,
    )
    constexprs = dict(
        INT4_PACKED=w_bits == 4, GROUP_SIZE=group_size, A_INT8=a_int8,
        HAS_IN_SCALE=in_scale and not a_int8, HAS_BIAS=bias, **config.kwargs,
    )
    for name, present in (("a_scale_ptr", a_int8), ("in_scale_ptr", constexprs["HAS_IN_SCALE"]), ("bias_ptr", bias)):
        if not present:
            constexprs[name] = None
    return _compile(quant_gemm._quant_gemm_kernel, target, params, constexprs, config.num_warps, config.num_stages)


def compile_act_quant(target: GPUTarget, *, x_dtype: str, in_scale: bool, bits: int, k: int = 8960):
    blk = act_quant.block_size(k)
    params = dict(x_ptr=f"*{x_dtype}", in_scale_ptr="*fp32", q_ptr="*i8", scale_ptr="*fp32",
                  K=k, stride_xm=k, stride_qm=k, clip=1.0)
    constexprs = dict(QMAX=2 ** (bits - 1) - 1, HAS_IN_SCALE=in_scale, BLOCK=blk, ONE_CHUNK=k <= blk)
    if not in_scale:
        constexprs["in_scale_ptr"] = None
    return _compile(act_quant._quantize_rows_kernel, target, params, constexprs,
                    act_quant.num_warps(blk), num_stages=1)


def compile_int4_unpack(target: GPUTarget, *, n: int = 8960, k: int = 1536):
    params = dict(packed_ptr="*i8", out_ptr="*i8", N=n, K=k, K_BYTES=(k + 1) // 2, stride_pn=(k + 1) // 2, stride_on=k)
    constexprs = dict(BLOCK_N=int4_unpack.BLOCK_N, BLOCK_BYTES=int4_unpack.BLOCK_BYTES)
    return _compile(int4_unpack._unpack_int4_kernel, target, params, constexprs, num_warps=4, num_stages=1)


def compile_qk_quant(target: GPUTarget, *, rows: int, mean: bool, x_dtype: str = "bf16", heads: int = 12,
                     length: int = 32760, head_dim: int = 128):
    """One of Q (``rows`` 128, no mean) or K (64, smoothed) read in place from ``[B, L, H, D]``."""
    block_d = triton.next_power_of_2(head_dim)
    params = dict(x_ptr=f"*{x_dtype}", mean_ptr="*fp32", q_ptr="*i8", scale_ptr="*fp32", H=heads, L=length,
                  D=head_dim, stride_xb=length * heads * head_dim, stride_xh=head_dim, stride_xl=heads * head_dim)
    constexprs = dict(HAS_MEAN=mean, ROWS=rows, BLOCK_D=block_d)
    if not mean:
        constexprs["mean_ptr"] = None
    return _compile(qk_quant._quantize_tiles_kernel, target, params, constexprs,
                    qk_quant.num_warps(rows, block_d), num_stages=1)


def compile_sparse_attention(
    config: triton.Config, target: GPUTarget, *, dtype: str, head_dim: int, dense: bool, residual: bool,
    qk_int8: bool, refresh: bool = False, rank: int = 0, heads: int = 12, lq: int = 32760, lk: int = 32760,
    layout_block_m: int = 128,
):
    """Strides are those of contiguous ``[B, H, L, D]`` tensors and a per-head layout; ``qk_int8``
    makes q and k int8 codes with per-tile scales; ``rank`` > 0 adds the residual's low-rank term;
    ``refresh`` also writes the residual over the sparse output."""
    mb, nb = -(-lq // layout_block_m), -(-lk // sparse_attention.BLOCK_N)
    q_strides = dict(b=heads * lq * head_dim, h=lq * head_dim, m=head_dim)
    k_strides = dict(b=heads * lk * head_dim, h=lk * head_dim, n=head_dim)
    params = dict(
        q_ptr="*i8" if qk_int8 else f"*{dtype}", k_ptr="*i8" if qk_int8 else f"*{dtype}", v_ptr=f"*{dtype}",
        r_ptr=f"*{dtype}", u_ptr=f"*{dtype}", w_ptr=f"*{dtype}", o_ptr=f"*{dtype}", d_ptr=f"*{dtype}",
        idx_ptr="*i32", cnt_ptr="*i32",
        q_scale_ptr="*fp32", k_scale_ptr="*fp32",
        stride_qb=q_strides["b"], stride_qh=q_strides["h"], stride_qm=q_strides["m"],
        stride_kb=k_strides["b"], stride_kh=k_strides["h"], stride_kn=k_strides["n"],
        stride_vb=k_strides["b"], stride_vh=k_strides["h"], stride_vn=k_strides["n"],
        stride_rb=q_strides["b"], stride_rh=q_strides["h"], stride_rm=q_strides["m"],
        stride_ub=heads * lq * rank, stride_uh=lq * rank, stride_um=rank,
        stride_wb=heads * rank * head_dim, stride_wh=rank * head_dim, stride_wr=head_dim,
        stride_ob=q_strides["b"], stride_oh=q_strides["h"], stride_om=q_strides["m"],
        stride_ib=0, stride_ih=mb * nb, stride_im=nb, stride_cb=0, stride_ch=mb,
        H=heads, Lq=lq, Lk=lk, D=head_dim, R=rank, qk_scale=0.1,
    )
    constexprs = dict(
        DENSE=dense, REFRESH=refresh, HAS_RESIDUAL=residual, QK_INT8=qk_int8, LAYOUT_M=layout_block_m,
        BLOCK_D=sparse_attention.block_d(head_dim), BLOCK_R=sparse_attention.block_d(rank) if rank else 0,
        BLOCK_N=sparse_attention.BLOCK_N, **config.kwargs,
    )
    for name, present in (("r_ptr", residual), ("u_ptr", rank), ("w_ptr", rank), ("d_ptr", refresh),
                          ("q_scale_ptr", qk_int8), ("k_scale_ptr", qk_int8)):
        if not present:
            constexprs[name] = None
    return _compile(sparse_attention._sparse_attention_kernel, target, params, constexprs,
                    config.num_warps, config.num_stages)


# The specializations every tile configuration is compiled for: per-channel W4A8 with the int4
# unpacking in the loop (up to quant_gemm.UNPACK_MIN_ROWS rows) and on int8 weights (W8A8, and W4A8
# from there on), per-group W8A8 (flush per group in the main loop) and per-group weight-only W4A16
# (float A tiles, the largest shared-memory footprint).
GEMM_VARIANTS = (
    dict(w_bits=4, group_size=0, a_dtype="i8", out_dtype="bf16", in_scale=False, bias=True),
    dict(w_bits=8, group_size=0, a_dtype="i8", out_dtype="bf16", in_scale=False, bias=True),
    dict(w_bits=8, group_size=128, a_dtype="i8", out_dtype="bf16", in_scale=False, bias=True),
    dict(w_bits=4, group_size=128, a_dtype="bf16", out_dtype="bf16", in_scale=True, bias=False),
)
# Rows of one chunk (kept in registers) and of several (read twice).
ACT_QUANT_VARIANTS = (
    dict(x_dtype="bf16", in_scale=True, bits=8, k=1536), dict(x_dtype="fp16", in_scale=False, bits=8, k=8960),
)
QK_QUANT_VARIANTS = (dict(rows=128, mean=False), dict(rows=64, mean=True))
# The SSAR step (sparse, residual and its rank-16 term), its refresh (dense output and residual
# over the layout), dense attention (no layout), and the step on INT8 QK^T.
ATTENTION_VARIANTS = (
    dict(dtype="bf16", head_dim=128, dense=False, residual=True, rank=16, qk_int8=False),
    dict(dtype="bf16", head_dim=128, dense=False, refresh=True, residual=False, qk_int8=False),
    dict(dtype="bf16", head_dim=128, dense=True, residual=False, qk_int8=False),
    dict(dtype="bf16", head_dim=128, dense=False, residual=True, rank=16, qk_int8=True),
)


def every_configuration():
    """(description, target, build) for each autotune configuration x specialization x its target."""
    for target, gemm_configs, attention_configs in (
        (HOPPER, quant_gemm.HOPPER_CONFIGS, sparse_attention.HOPPER_CONFIGS),
        (AMPERE, quant_gemm.FALLBACK_CONFIGS, sparse_attention.FALLBACK_CONFIGS),
    ):
        for config in gemm_configs:
            for variant in GEMM_VARIANTS:
                # Described as it compiles: fitted to the specialization, as the autotuner fits it.
                tile = quant_gemm.adapt_config(
                    config, variant["w_bits"], variant["group_size"], a_int8=variant["a_dtype"] == "i8"
                )
                yield f"quant_gemm {variant} {tile.kwargs} w{tile.num_warps}s{tile.num_stages}", target, (
                    lambda c=config, v=variant, t=target: compile_quant_gemm(c, t, **v)
                )
        for config in attention_configs:
            for variant in ATTENTION_VARIANTS:
                yield f"sparse_attention {variant} {config.kwargs} w{config.num_warps}s{config.num_stages}", target, (
                    lambda c=config, v=variant, t=target: compile_sparse_attention(c, t, **v)
                )
        for variant in ACT_QUANT_VARIANTS:
            yield f"act_quant {variant}", target, lambda v=variant, t=target: compile_act_quant(t, **v)
        for variant in QK_QUANT_VARIANTS:
            yield f"qk_quant {variant}", target, lambda v=variant, t=target: compile_qk_quant(t, **v)
        yield "int4_unpack", target, lambda t=target: compile_int4_unpack(t)


def _cuobjdump(compiled, option: str) -> str:
    """``cuobjdump`` (shipped with Triton) run on the kernel's cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        return subprocess.run(
            [triton.knobs.nvidia.cuobjdump.path, option, cubin.name], capture_output=True, text=True, check=True
        ).stdout


def resource_usage(compiled) -> dict[str, int]:
    """Registers per thread and spill stack bytes of a compiled kernel."""
    registers, stack = re.search(r"REG:(\d+) STACK:(\d+)", _cuobjdump(compiled, "--dump-resource-usage")).groups()
    return {"registers": int(registers), "spill_bytes": int(stack)}


# One SASS instruction: address, optional predicate, opcode, operands.
_SASS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def main_loops(sass: str) -> list[list[str]]:
    """The opcodes of one iteration of each of a kernel's main loops, read from its SASS: the
    innermost backward branches whose bodies issue the tensor-core MMA (none for kernels without
    one; attention's refresh mode has two, one after the other).

    A loop's length against the MMA work of an iteration says whether it is bound by the tensor
    cores or by the integer and shared-memory instructions around them (unpacking, address
    arithmetic, layout shuffles). Local-memory accesses in it (``LDL``/``STL``) are spills paid on
    every iteration; a value spilled around the loop (stored before, loaded after) costs once per
    program and is harmless."""
    code = [(int(addr, 16), op, rest) for addr, op, rest in _SASS.findall(sass)]
    loops = []
    for addr, op, rest in code:
        target = re.search(r"0x([0-9a-f]+)", rest) if op == "BRA" else None
        if target and int(target.group(1), 16) < addr:
            start = int(target.group(1), 16)
            body = [o for a, o, _ in code if start <= a <= addr]
            if any("MMA" in o for o in body):
                loops.append((start, addr, body))
    return [body for start, end, body in loops
            if not any(start <= s and e <= end and (s, e) != (start, end) for s, e, _ in loops)]


def loop_report(compiled) -> dict:
    """``loop_instructions`` (of the longest main loop) and ``loop_spills`` (local-memory accesses
    in all of them)."""
    bodies = main_loops(_cuobjdump(compiled, "-sass"))
    if not bodies:
        return {"loop_instructions": None, "loop_spills": None}
    return {"loop_instructions": max(map(len, bodies)),
            "loop_spills": sum(op.startswith(("LDL", "STL")) for body in bodies for op in body)}


_TILE_LOAD = re.compile(r"= tt\.load .*: tensor<\d+x\d+x")


def unpipelined_tile_loads(ttgir: str) -> list[str]:
    """The 2-D loads left synchronous inside a loop of the TritonGPU IR.

    The software pipeliner turns a loop's tile loads into asynchronous copies to shared memory,
    issued stages ahead of their use. A load it cannot turn (typically: a mask or offset whose
    alignment it cannot prove, so no 4-16 byte vector copy) stays a plain ``tt.load``, and every
    iteration then waits out the full global-memory latency. Scalar and 1-D loads (indices,
    per-group scales) are cheap and not counted."""
    found, loops = [], [False]
    for line in ttgir.splitlines():
        text = line.strip()
        if text.startswith("}"):
            loops.pop()
        if any(loops) and _TILE_LOAD.search(text):
            found.append(text)
        if text.endswith("{"):
            loops.append(" scf.for " in text)
    return found


def main() -> None:
    """Compile every configuration; print one JSON line per kernel (what the tests check)."""
    for description, target, build in every_configuration():
        compiled = build()
        print(json.dumps({
            "kernel": description, "arch": target.arch, "shared_bytes": compiled.metadata.shared,
            "wgmma": "wgmma.mma_async" in compiled.asm["ptx"], "cubin_bytes": len(compiled.asm["cubin"]),
            "unpipelined_loads": unpipelined_tile_loads(compiled.asm["ttgir"]),
            **loop_report(compiled), **resource_usage(compiled),
        }), flush=True)


if __name__ == "__main__":
    main()
