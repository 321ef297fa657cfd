"""``qsc.backends.inductor``: compressed programs with their activation quantization exposed, so
that ``torch.compile`` fuses it into the ops that produce the activations."""

import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import qsc
from qsc.backends import inductor
from qsc.graph import state_inputs
from qsc.models import synthetic_calibration

from tiny_models import CONFIGS, tiny_model


def _count(gm, target, a_bits=None):
    """Calls of ``target`` (of ``quant_linear`` with these ``a_bits``, if given)."""
    return sum(
        n.op == "call_function" and n.target == target and (a_bits is None or n.args[6] == a_bits)
        for n in gm.graph.nodes
    )


@pytest.fixture(scope="module")
def sparse_wan():
    model = tiny_model("wan")
    result = qsc.compile(model, synthetic_calibration(model, 2, seed=0), preset="w4a8-sparse",
                         config={"calib_samples": 2, "check_numerics": False, "scale_epochs": 1})
    return result.module.step_program, result.example_inputs


def test_activation_quantized_linears_become_quantization_and_gemm(sparse_wan):
    program, inputs = sparse_wan
    exposed = inductor.expose_activation_quant(program)
    a8 = _count(program, inductor.QUANT_LINEAR, a_bits=8)  # the blocks' linears
    weight_only = _count(program, inductor.QUANT_LINEAR, a_bits=16)  # the int8 weight-only embedders
    assert a8 and weight_only
    assert _count(exposed, inductor.QUANT_GEMM) == a8
    assert _count(exposed, inductor.QUANT_LINEAR) == _count(exposed, inductor.QUANT_LINEAR, a_bits=16) == weight_only
    # The program itself is untouched, and the two share their weights.
    assert _count(program, inductor.QUANT_LINEAR) == a8 + weight_only
    weights = {name: t.data_ptr() for name, t in program.state_dict().items()}
    assert weights == {name: t.data_ptr() for name, t in exposed.state_dict().items()}
    # On the CPU both halves are the reference's: the same function, bit for bit.
    caches = state_inputs(program, inputs)
    torch.testing.assert_close(exposed(**inputs, **caches), program(**inputs, **caches), rtol=0, atol=0)


def test_torch_compile_quantizes_the_activations_in_the_kernels_that_make_them(sparse_wan):
    """Inductor on the CPU: the norm before each attention and before the FFN, and the FFN's GELU,
    write int8 codes and scales from the kernel that computes them; no separate pass reads their
    float output back to quantize it."""
    program, inputs = sparse_wan
    caches = state_inputs(program, inputs)
    with torch.no_grad(), torch._inductor.config.patch({"cpp.descriptive_names": "original_aten"}):
        out, code = run_and_get_code(inductor.torch_compile(program), **inputs, **caches)
        eager = program(**inputs, **caches)
    calls = re.findall(r"\b(cpp_fused_\w+)\(", "\n".join(code))  # kernels named by the ATen ops they fuse
    quantizing = [name for name in calls if "amax" in name and "round" in name]
    blocks = CONFIGS["wan"][1]["num_layers"]
    assert sum("native_layer_norm" in name for name in quantizing) == 3 * blocks, calls
    assert sum("gelu" in name for name in quantizing) == blocks, calls
    # Inductor reorders float32 arithmetic: a code on a rounding boundary may move one step.
    assert ((out - eager).norm() / eager.norm()).item() < 1e-3
