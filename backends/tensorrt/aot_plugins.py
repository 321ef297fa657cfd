"""The plugins' kernels compiled ahead of time: PTX and launch parameters for TensorRT.

A plugin node of the plugin graph is specialized the way Triton's JIT would specialize its call:
by the dtypes of its tensors, the constants its kernel is compiled for (weight bits, group size,
padded head dimension, ...) and which integer arguments are multiples of 16 (the JIT's
divisibility hint, given only where the dimension is static). Each specialization is compiled for
sm_90 and sm_80 once per tile configuration the autotuner would try there: these are the
plugin's tactics, among which TensorRT times and chooses at engine build.

``write_package`` puts them in ``plugins/``: a ``.ptx`` per kernel and ``plugins.json``, which
says for each specialization the scalar arguments and the grid as expressions of the input shapes
(``cdiv(q[2], BLOCK_M)``; names are the plugin's inputs, subscripts their dimensions, capitals
the tactic's constants) and for each tactic the kernel's name, PTX file, threads and shared memory.
``evaluate`` computes an expression over integers (here) or TensorRT's shape expressions
(``trt_plugins``), so the launch TensorRT records is the one written here.

The PTX is made to take exactly TensorRT's arguments: Triton appends two scratch pointers to every
kernel (global and profiling scratch), unused by these kernels, which TensorRT does not pass.
``tensorrt_ptx`` checks that they are unused and drops them from the entry's parameters.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import operator
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from qsc.backends.reference import SPARSE_BLOCK_M
from qsc.errors import ExportError

from . import plugins

FORMAT = "qsc-trt-plugins/1"
INDEX = "plugins.json"
ARCHS = (90, 80)  # sm_90 (Hopper: wgmma, the Hopper tile lists); sm_80 PTX, which later GPUs JIT too
_TRITON_TYPES = {"float": "fp32", "float16": "fp16", "bfloat16": "bf16", "int8": "i8", "int32": "i32"}


@dataclass(frozen=True)
class Specialization:
    """What one compiled form of a plugin's kernel depends on, and how it is launched."""

    plugin: str
    pointers: tuple[str, ...]  # Triton pointer types: the inputs', then the outputs'
    scalars: tuple[str, ...]  # the int32 arguments between them, as expressions
    hints: tuple[bool, ...]  # per scalar: known to be a multiple of 16
    constexprs: tuple[tuple[str, int], ...]
    grid: tuple[str, str, str]

    @property
    def key(self) -> str:
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()
        return f"{self.plugin}-{digest[:12]}"


def specialize(plugin: str, dtypes: Sequence[str], shapes: Sequence[Sequence[int | None]],
               attrs: Mapping[str, Any]) -> Specialization:
    """The specialization of plugin ``plugin`` for inputs of ``dtypes`` (ONNX names: ``float``,
    ``bfloat16``, ...) and ``shapes`` (None for a dynamic dimension) and node attributes ``attrs``."""
    names = plugins.SIGNATURES[plugin].inputs
    shape = dict(zip(names, shapes, strict=True))
    outputs = [dtypes[kind] if isinstance(kind, int) else {"float32": "float"}.get(kind, kind)
               for kind, _ in plugins.output_specs(plugin, list(shapes))]
    try:
        pointers = tuple(f"*{_TRITON_TYPES[t]}" for t in (*dtypes, *outputs))
    except KeyError as e:
        raise ExportError(f"plugin {plugin}: no kernel for tensors of type {e.args[0]}") from None
    scalars, constexprs, grid = _LAUNCH[plugin](shape, attrs)
    values = [_static_value(expr, shape) for expr in scalars]
    return Specialization(plugin, pointers, tuple(scalars), tuple(v is not None and v % 16 == 0 for v in values),
                          tuple(sorted(constexprs.items())), (*grid, "1", "1")[:3])


def _rows(name: str, shape: Sequence) -> str:
    return " * ".join(f"{name}[{i}]" for i in range(len(shape) - 1))


def _quantize_launch(shape, attrs):
    from qsc.kernels import act_quant

    k = _static(shape["x"][-1], "the features of x")
    block = act_quant.block_size(k)
    constexprs = dict(QMAX=2 ** (attrs["bits"] - 1) - 1, BLOCK=block, ONE_CHUNK=int(k <= block))
    return [f"x[{len(shape['x']) - 1}]", str(_float_bits(attrs["clip"]))], constexprs, [_rows("x", shape["x"])]


def _gemm_launch(activations: str):
    def launch(shape, attrs):
        a, w_scale = shape[activations], shape["w_scale"]
        per_group = len(w_scale) == 2 and w_scale[1] != 1
        group_size = attrs["group_size"] if per_group else 0
        from qsc.kernels import quant_gemm

        if group_size % quant_gemm.MIN_GROUP_SIZE:
            raise ExportError(f"weight groups of {group_size} input channels have no GEMM kernel "
                              f"(a multiple of {quant_gemm.MIN_GROUP_SIZE} is needed)")
        rows = _rows(activations, a)
        scalars = [rows, "weight[0]", f"{activations}[{len(a) - 1}]", "weight[1]", "w_scale[1]" if per_group else "1"]
        constexprs = dict(INT4_PACKED=int(attrs["w_bits"] == 4), GROUP_SIZE=group_size)
        return scalars, constexprs, [f"cdiv({rows}, BLOCK_M) * cdiv(weight[0], BLOCK_N)"]

    return launch


def _attention_launch(plugin: str):
    def launch(shape, attrs):
        from qsc.kernels.sparse_attention import BLOCK_N, block_d

        head_dim = _static(shape["q"][3], "the head dimension")
        scalars = ["q[1]", "q[2]", "k[2]", "q[3]"]
        constexprs = dict(TILES_BATCHED=int(len(shape["tiles"]) == 4), LAYOUT_M=SPARSE_BLOCK_M,
                          BLOCK_D=block_d(head_dim), BLOCK_N=BLOCK_N)
        if plugin == "ssar_attention":
            rank = _static(shape["u"][3], "the rank of the residual's factors")
            scalars.append("u[3]")
            constexprs["BLOCK_R"] = block_d(rank) if rank else 0
        # The exp2 softmax takes the scale times log2(e), rounded to float32 as the Triton backend does.
        tiles_rank = len(shape["tiles"])
        scalars += [f"tiles[{tiles_rank - 2}]", f"tiles[{tiles_rank - 1}]", str(_float_bits(attrs["scale"] * math.log2(math.e)))]
        return scalars, constexprs, ["cdiv(q[2], BLOCK_M)", "q[0] * q[1]"]

    return launch


_LAUNCH = {
    "quantize_per_token": _quantize_launch,
    "quant_gemm": _gemm_launch("codes"),
    "weight_only_linear": _gemm_launch("x"),
    **{name: _attention_launch(name) for name in ("sparse_attention", "ssar_attention", "refresh_attention")},
}


def _float_bits(value: float) -> int:
    from .aot_kernels import float_bits

    return float_bits(value)


def _static(dim: int | None, what: str) -> int:
    if dim is None:
        raise ExportError(f"the plugins' kernels are compiled for a static {what}; it is dynamic here")
    return dim


def _static_value(expr: str, shapes: Mapping[str, Sequence[int | None]]) -> int | None:
    try:
        return evaluate(expr, shapes)
    except TypeError:  # a dynamic dimension (None) took part
        return None


# --- expressions ----------------------------------------------------------------------------------

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


def _cdiv(a, b):
    return -(-a // b)


def evaluate(expr: str, shapes: Mapping[str, Sequence], constants: Mapping[str, int] | None = None,
             cdiv: Callable = _cdiv):
    """``expr`` (integers, ``+ - * //``, ``cdiv``, ``name[i]`` a dimension of input ``name``, and
    capitalized constants) over ``shapes``' dimensions: ints, or TensorRT's shape expressions with
    its ``cdiv``."""
    constants = constants or {}

    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return _BINARY[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "cdiv" and len(node.args) == 2:
            return cdiv(walk(node.args[0]), walk(node.args[1]))
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
            return shapes[node.value.id][walk(node.slice)]
        if isinstance(node, ast.Name):
            return constants[node.id]
        raise ExportError(f"unsupported launch expression {expr!r}")

    return walk(ast.parse(expr, mode="eval"))


# --- compiling ------------------------------------------------------------------------------------


def tactics(spec: Specialization, arch: int) -> list:
    """The tile configurations (``triton.Config``) the autotuner would try for ``spec`` on
    ``arch``; a tactic is its 1-based position (TensorRT's tactics are positive)."""
    import triton

    from qsc.kernels import act_quant, quant_gemm, sparse_attention

    constexprs = dict(spec.constexprs)
    if spec.plugin == "quantize_per_token":
        return [triton.Config({}, num_warps=act_quant.num_warps(constexprs["BLOCK"]), num_stages=1)]
    if spec.plugin in ("quant_gemm", "weight_only_linear"):
        configs = quant_gemm.HOPPER_CONFIGS if arch == 90 else quant_gemm.FALLBACK_CONFIGS
        w_bits = 4 if constexprs["INT4_PACKED"] else 8
        return quant_gemm.fitted_configs(configs, w_bits, constexprs["GROUP_SIZE"], spec.plugin == "quant_gemm")
    return sparse_attention.HOPPER_CONFIGS if arch == 90 else sparse_attention.FALLBACK_CONFIGS


def compile_kernel(spec: Specialization, config, arch: int):
    """``triton.compile`` of the plugin's AOT kernel for one tile configuration and target."""
    import triton
    from triton.backends.compiler import GPUTarget

    from .aot_kernels import KERNELS

    fn = KERNELS[spec.plugin]
    n_in = len(plugins.SIGNATURES[spec.plugin].inputs)
    kinds = [*spec.pointers[:n_in], *["i32"] * len(spec.scalars), *spec.pointers[n_in:]]
    constexprs = {**dict(spec.constexprs), **config.kwargs}
    names = fn.arg_names
    assert len(names) == len(kinds) + len(constexprs), f"{spec.plugin}: arguments {names}"
    signature = {**dict(zip(names, kinds)), **{name: "constexpr" for name in constexprs}}
    # As the JIT specializes a call: pointers 16-byte aligned, hinted integers multiples of 16.
    hinted = [kind.startswith("*") for kind in spec.pointers[:n_in]] + list(spec.hints)
    hinted += [True] * (len(spec.pointers) - n_in)
    attrs = {(i,): [["tt.divisibility", 16]] for i, hint in enumerate(hinted) if hint}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})


_ENTRY = re.compile(r"\.entry\s+(\w+)\s*\(([^)]*)\)")


def tensorrt_ptx(compiled, n_params: int) -> str:
    """The kernel's PTX with the parameters TensorRT passes only: Triton's two trailing scratch
    pointers removed, after checking that the kernel needs no scratch memory and never reads them."""
    meta, ptx = compiled.metadata, compiled.asm["ptx"]
    entry = _ENTRY.search(ptx)
    params = [p.strip() for p in entry.group(2).split(",")]
    if meta.global_scratch_size or meta.profile_scratch_size or len(params) != n_params + 2:
        raise ExportError(f"{meta.name}: {len(params)} parameters, scratch {meta.global_scratch_size} + "
                          f"{meta.profile_scratch_size} bytes; TensorRT passes {n_params} and no scratch")
    for dropped in params[n_params:]:
        name = dropped.split()[-1]
        if ptx.count(name) != 1:
            raise ExportError(f"{meta.name}: the scratch parameter {name} is used")
    kept = ",\n\t".join(params[:n_params])
    return ptx[:entry.start(2)] + "\n\t" + kept + "\n" + ptx[entry.end(2):]


_PTX_VERSION = re.compile(r"^\.version\s+(\S+)", re.MULTILINE)


def package_entry(tactic: int, config, compiled, ptx_file: str) -> dict:
    """A tactic's launch: ``threads`` per block, dynamic ``shared_bytes``; ``ptx_isa`` is the PTX
    version the driver must accept to JIT-compile it."""
    meta = compiled.metadata
    return {"tactic": tactic, "kernel": meta.name, "ptx": ptx_file, "threads": meta.num_warps * 32,
            "shared_bytes": meta.shared, "num_stages": config.num_stages, "constants": dict(config.kwargs),
            "ptx_isa": _PTX_VERSION.search(compiled.asm["ptx"]).group(1)}


def node_specialization(node) -> Specialization:
    """The specialization of a plugin node of an ONNX graph (``onnx_ir``)."""
    attrs = {name: attr.value for name, attr in node.attributes.items()}
    dtypes = [value.dtype.name.lower() for value in node.inputs]
    shapes = [[d if isinstance(d, int) else None for d in value.shape] for value in node.inputs]
    return specialize(node.op_type, dtypes, shapes, attrs)


def write_package(directory: str | Path, models: Iterable, archs: Sequence[int] = ARCHS) -> dict:
    """Compile every plugin node's specialization of ``models`` (``onnx_ir`` models) for every
    tactic on ``archs`` into ``directory`` (created): ``.ptx`` files and ``plugins.json``."""
    directory = Path(directory)
    directory.mkdir()
    specs = {}
    for model in models:
        for node in model.graph:
            if node.domain == plugins.DOMAIN:
                spec = node_specialization(node)
                specs[spec.key] = spec
    index = {"format": FORMAT, "specializations": {}}
    for key in sorted(specs):
        spec = specs[key]
        n_params = len(spec.pointers) + len(spec.scalars)
        kernels = {}
        for arch in archs:
            kernels[str(arch)] = []
            for tactic, config in enumerate(tactics(spec, arch), start=1):
                compiled = compile_kernel(spec, config, arch)
                ptx_file = f"{key}.sm{arch}.t{tactic}.ptx"
                (directory / ptx_file).write_text(tensorrt_ptx(compiled, n_params))
                kernels[str(arch)].append(package_entry(tactic, config, compiled, ptx_file))
        index["specializations"][key] = {**asdict(spec), "kernels": kernels}
    (directory / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return index


def read_package(directory: str | Path) -> dict:
    index = json.loads((Path(directory) / INDEX).read_text())
    if index.get("format") != FORMAT:
        raise ExportError(f"{directory}: unsupported plugin package {index.get('format')!r} (expected {FORMAT})")
    return index


def launch(entry: dict, spec: dict, shapes: Mapping[str, Sequence], cdiv: Callable = _cdiv):
    """(grid, scalar arguments) of a packaged kernel for inputs of ``shapes`` (by input name)."""
    grid = [evaluate(e, shapes, entry["constants"], cdiv) for e in spec["grid"]]
    return grid, [evaluate(e, shapes, cdiv=cdiv) for e in spec["scalars"]]
