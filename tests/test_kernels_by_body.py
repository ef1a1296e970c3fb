"""Kernels by body: a contiguous constant slice of a kernel input moves out of the body (passes.hoist_slices),
and the Numba backend compiles each distinct kernel body once, shared by every call site and program
(backends/numba_cpu/kernels.py)."""
from __future__ import annotations

from textwrap import dedent

import numpy as np
import pytest
import torch
from torch import nn

import fusec
from fusec.backends.numba_cpu.runtime import Program
from fusec.backends.reference import run_graph
from fusec.generate import Generator, eager_generate, fusec_compiler
from fusec.verify import verify
from fusec.models.causal_lm import DecodeStep, decode_example, random_model
from fusec.models.llama import FeedForward, LlamaConfig
from fusec.printer import format_graph, parse_graph
from fusec.passes.hoist_slices import hoist_product_rows, hoist_slices

pytestmark = pytest.mark.filterwarnings("ignore::numba.NumbaPerformanceWarning")

# --- the pass -------------------------------------------------------------------------------------------

BEFORE = """
%0 = input {index=0, name="cache"} : f32[2,3,4]
%1 = input {index=1, name="x"} : f32[3,4]
%2 = kernel %0, %1 {kind="pointwise"} : f32[3,4]
  body {
    %0 = input {index=0, name="a0"} : f32[2,3,4]
    %1 = slice %0 {axis=0, start=0, step=1, stop=1} : f32[1,3,4]
    %2 = reshape %1 {shape=[3,4]} : f32[3,4]
    %3 = input {index=1, name="a1"} : f32[3,4]
    %4 = add %2, %3 : f32[3,4]
    return %4
  }
%3 = kernel %0, %2 {kind="pointwise"} : f32[3,4]
  body {
    %0 = input {index=0, name="a0"} : f32[2,3,4]
    %1 = slice %0 {axis=0, start=1, step=1, stop=2} : f32[1,3,4]
    %2 = reshape %1 {shape=[3,4]} : f32[3,4]
    %3 = input {index=1, name="a1"} : f32[3,4]
    %4 = add %2, %3 : f32[3,4]
    return %4
  }
%4 = kernel %0, %3 {kind="pointwise"} : f32[2,4]
  body {
    %0 = input {index=0, name="a0"} : f32[2,3,4]
    %1 = slice %0 {axis=1, start=2, step=1, stop=3} : f32[2,1,4]
    %2 = reshape %1 {shape=[2,4]} : f32[2,4]
    %3 = input {index=1, name="a1"} : f32[3,4]
    %4 = slice %3 {axis=0, start=0, step=2, stop=3} : f32[2,4]
    %5 = mul %2, %4 : f32[2,4]
    return %5
  }
%5 = kernel %1 {kind="op"} : f32[1,4]
  body {
    %0 = input {index=0, name="a0"} : f32[3,4]
    %1 = slice %0 {axis=0, start=1, step=1, stop=2} : f32[1,4]
    return %1
  }
return %4, %5
"""

# Layers 0 and 1 now have one body; a slice across a non-unit leading axis or with a step stays inside
# (it is no contiguous piece); a kernel that only slices its input becomes the view itself.
AFTER = """
%0 = input {index=0, name="cache"} : f32[2,3,4]
%1 = input {index=1, name="x"} : f32[3,4]
%2 = slice %0 {axis=0, start=0, step=1, stop=1} : f32[1,3,4]
%3 = reshape %2 {shape=[3,4]} : f32[3,4]
%4 = kernel %3, %1 {kind="pointwise"} : f32[3,4]
  body {
    %0 = input {index=0, name="a0"} : f32[3,4]
    %1 = input {index=1, name="a1"} : f32[3,4]
    %2 = add %0, %1 : f32[3,4]
    return %2
  }
%5 = slice %0 {axis=0, start=1, step=1, stop=2} : f32[1,3,4]
%6 = reshape %5 {shape=[3,4]} : f32[3,4]
%7 = kernel %6, %4 {kind="pointwise"} : f32[3,4]
  body {
    %0 = input {index=0, name="a0"} : f32[3,4]
    %1 = input {index=1, name="a1"} : f32[3,4]
    %2 = add %0, %1 : f32[3,4]
    return %2
  }
%8 = kernel %0, %7 {kind="pointwise"} : f32[2,4]
  body {
    %0 = input {index=0, name="a0"} : f32[2,3,4]
    %1 = slice %0 {axis=1, start=2, step=1, stop=3} : f32[2,1,4]
    %2 = reshape %1 {shape=[2,4]} : f32[2,4]
    %3 = input {index=1, name="a1"} : f32[3,4]
    %4 = slice %3 {axis=0, start=0, step=2, stop=3} : f32[2,4]
    %5 = mul %2, %4 : f32[2,4]
    return %5
  }
%9 = slice %1 {axis=0, start=1, step=1, stop=2} : f32[1,4]
return %8, %9
"""


def test_hoist_moves_contiguous_slices_out_and_makes_layer_bodies_equal():
    graph = parse_graph(BEFORE)
    verify(graph)
    hoisted = hoist_slices(graph)
    verify(hoisted)
    assert format_graph(hoisted) == dedent(AFTER).strip()
    assert hoisted.nodes[4].attr("body") == hoisted.nodes[7].attr("body")
    assert hoist_slices(hoisted) is hoisted  # a second run changes nothing
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal(t.shape).astype(np.float32) for t in graph.input_types]
    for got, want in zip(run_graph(hoisted, inputs), run_graph(graph, inputs)):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(Program(hoisted).run(inputs), run_graph(graph, inputs)):  # outer views in numba
        np.testing.assert_allclose(got, want, rtol=1e-6)


# The rows of a product: the attention output's heads (and the MLP's token axis) reshaped to a matrix
# inside the kernel. Outside it the reshape is a view, and the two projections then differ only in K.
PRODUCT_ROWS = """
%0 = input {index=0, name="h"} : f32[1,3,2,4]
%1 = input {index=1, name="w"} : f32[5,8]
%2 = input {index=2, name="x"} : f32[1,3,6]
%3 = input {index=3, name="v"} : f32[5,6]
%4 = kernel %0, %1 {anchors=[4], kind="matmul", tiles=[]} : f32[3,5]
  body {
    %0 = input {index=0, name="a0"} : f32[1,3,2,4]
    %1 = reshape %0 {shape=[3,8]} : f32[3,8]
    %2 = input {index=1, name="a1"} : f32[5,8]
    %3 = permute %2 {perm=[1,0]} : f32[8,5]
    %4 = matmul %1, %3 : f32[3,5]
    return %4
  }
%5 = kernel %2, %3 {anchors=[4], kind="matmul", tiles=[]} : f32[3,5]
  body {
    %0 = input {index=0, name="a0"} : f32[1,3,6]
    %1 = reshape %0 {shape=[3,6]} : f32[3,6]
    %2 = input {index=1, name="a1"} : f32[5,6]
    %3 = permute %2 {perm=[1,0]} : f32[6,5]
    %4 = matmul %1, %3 : f32[3,5]
    return %4
  }
return %4, %5
"""


def test_hoist_moves_the_rows_of_a_product_out_and_products_differing_in_k_share_a_function():
    graph = parse_graph(PRODUCT_ROWS)
    assert hoist_slices(graph) is graph  # (hoist_product_rows runs after the loop pass)
    hoisted = hoist_product_rows(graph)
    verify(hoisted)
    kernels = [n for n in hoisted.nodes if n.op == "kernel"]
    assert [str(k.attr("body").input_types[0]) for k in kernels] == ["f32[3,8]", "f32[3,6]"]
    assert all(hoisted.nodes[k.args[0]].op == "reshape" for k in kernels)
    assert [k.attr("anchors") for k in kernels] == [(3,), (3,)] and hoist_product_rows(hoisted) is hoisted
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal(t.shape).astype(np.float32) for t in graph.input_types]
    program = Program(hoisted)
    assert len(program.modules) == 1  # one compiled function for both products
    for got, want in zip(program.run(inputs), run_graph(graph, inputs)):
        np.testing.assert_allclose(got, want, rtol=1e-5)


SEVERAL_OUTPUTS = """
%0 = input {index=0, name="x"} : f32[2,4]
%1 = kernel %0 {kind="pointwise"} : f32[1,4]
  body {
    %0 = input {index=0, name="a0"} : f32[2,4]
    %1 = slice %0 {axis=0, start=1, step=1, stop=2} : f32[1,4]
    %2 = sum %0 {axes=[0], keepdim=true} : f32[1,4]
    %3 = add %1, %2 : f32[1,4]
    return %3, OUT
  }
%2 = result %1 {index=0} : f32[1,4]
%3 = result %1 {index=1} : f32[1,4]
return %2, %3
"""


def test_hoist_keeps_an_output_of_several_and_an_input_still_read_whole():
    graph = parse_graph(SEVERAL_OUTPUTS.replace("OUT", "%1"))
    assert hoist_slices(graph) is graph  # the slice is one of several outputs: a computed value, it stays
    graph = parse_graph(SEVERAL_OUTPUTS.replace("OUT", "%2"))
    hoisted = hoist_slices(graph)
    verify(hoisted)
    kernel = next(n for n in hoisted.nodes if n.op == "kernel")
    assert [str(t) for t in kernel.attr("body").input_types] == ["f32[2,4]", "f32[1,4]"]  # x whole, and x[1:2]
    assert hoisted.nodes[kernel.args[1]].op == "slice" and hoist_slices(hoisted) is hoisted
    x = [np.arange(8, dtype=np.float32).reshape(2, 4)]
    for got, want in zip(run_graph(hoisted, x), run_graph(graph, x)):
        np.testing.assert_array_equal(got, want)


# --- kernels by body in the Numba backend -----------------------------------------------------------------

CONFIG = LlamaConfig(dim=32, n_heads=2, n_kv_heads=2, hidden_dim=64, vocab_size=61, max_seq_len=16, n_layers=4)


def decode_inputs(model, pos: int = 5):
    token, pos, k, v = decode_example(model, 1, CONFIG.max_seq_len, pos)
    generator = torch.Generator().manual_seed(1)
    return (torch.tensor([[7]]), pos, torch.randn(k.shape, generator=generator),
            torch.randn(v.shape, generator=generator))


def compiled_functions(program) -> list:
    """The distinct Numba dispatchers the program calls."""
    return list({id(step.fn): step.fn for step in program.steps}.values())


@pytest.fixture(scope="module")
def decode():
    model = random_model(CONFIG, 0, tie_embeddings=True)
    inputs = decode_inputs(model)
    return model, inputs, fusec.compile(DecodeStep(model), inputs, loop=False)  # one call per kernel


def test_decode_program_compiles_each_distinct_body_once(decode):
    model, inputs, compiled = decode
    program = compiled.program
    functions = compiled_functions(program)
    calls = len(program.steps)
    assert calls == 5 * CONFIG.n_layers + 4 == compiled.stats["kernel_calls"]
    # the embedding lookup, the 5 kernels every layer shares, the head and the stack of the new K (and of
    # the new V, alike): 8 functions for 24 calls; every layer's attention is one function
    assert len(functions) == len(program.modules) == compiled.stats["distinct_kernels"] == 8
    assert sum(len(fn.overloads) for fn in functions) == 8  # one machine-code specialization each
    attention = {id(program.steps[s].fn) for s, code in enumerate(program.codes)
                 if compiled.graph.nodes[program.steps[s].kernel].attr("kind") == "attention"}
    assert len(attention) == 1
    assert program.source.count("\ndef k") == 8 and "24 kernel calls, 8 distinct kernels" in program.source
    with torch.no_grad():
        want = DecodeStep(model)(*inputs)
    reference = fusec.compile(DecodeStep(model), inputs, backend="reference")(*inputs)
    for got, eager, ref in zip(compiled(*inputs), want, reference):
        torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def weights_of(compiled, model) -> dict:
    state = model.state_dict()  # the tied head is there under both names
    return {name: state[name.removeprefix("model.")] for name in compiled.weight_types()}


def test_bound_weights_reach_every_call_of_a_shared_kernel(decode):
    model, inputs, compiled = decode
    other = random_model(CONFIG, 3, tie_embeddings=True)
    with torch.no_grad():
        want = DecodeStep(other)(*inputs)
    compiled.bind_weights(weights_of(compiled, other))
    try:
        for got, eager in zip(compiled(*inputs), want):
            torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-5)
        assert sum(len(fn.overloads) for fn in compiled_functions(compiled.program)) == 8  # nothing recompiled
    finally:
        compiled.bind_weights(weights_of(compiled, model))
    for got, again in zip(compiled(*inputs), compiled.program.run([x.numpy() for x in inputs])):
        np.testing.assert_array_equal(got.numpy(), again)


class Stack(nn.Module):
    """Residual MLP layers; `differ` gives one layer another width and one another activation."""

    def __init__(self, differ: bool):
        super().__init__()
        torch.manual_seed(0)
        widths = [48, 48, 48] if not differ else [48, 40, 48]
        self.layers = nn.ModuleList(FeedForward(16, w) for w in widths)
        self.act = [torch.tanh if differ and i == 2 else torch.relu for i in range(3)]

    def forward(self, x):
        for layer, act in zip(self.layers, self.act):
            x = x + act(layer(x))
        return x


def test_layers_that_differ_keep_their_own_kernels():
    x = torch.randn(2, 16)
    same, differ = (fusec.compile(Stack(d).eval(), (x,), loop=False) for d in (False, True))
    assert same.stats["kernel_calls"] == differ.stats["kernel_calls"] == 6
    assert same.stats["distinct_kernels"] < differ.stats["distinct_kernels"]
    fns = [step.fn for step in differ.program.steps]
    assert fns[2] is not fns[0]  # another width: the first product's N and its epilogue's loops
    # the second product differs only in K, which its code reads from the array: one compiled function
    assert fns[3] is fns[1] and differ.stats["distinct_kernels"] == 4
    assert fns[4] is fns[0] and fns[5] is not fns[1]  # tanh, not relu, in the second kernel's epilogue
    for compiled, d in ((same, False), (differ, True)):
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), Stack(d).eval()(x), rtol=1e-5, atol=1e-6)


def test_programs_of_two_prompt_lengths_share_the_head():
    model = random_model(CONFIG, 0, tie_embeddings=True)
    fused = fusec_compiler()
    # a compiler without `dynamic`: one static prefill program per prompt length (a generator's own
    # compiler makes one symbolic program for every length, see test_symbolic_generate.py)
    gen = Generator(model, CONFIG.max_seq_len, lambda module, example: fused(module, example))
    prompts = [torch.tensor([[3, 1, 4]]), torch.tensor([[2, 7, 1, 8, 2]])]
    for prompt in prompts:
        gen.generate(prompt, max_new_tokens=2)
    programs = [gen.prefill_program(1, 3).program, gen.prefill_program(1, 5).program,
                gen.decode_program(1).program]
    names = [{m.__name__ for m in p.modules} for p in programs]
    shared = names[0] & names[1]
    # every kernel's loops have the prompt length in them but the head's, which reads the last position:
    # the slice of that position is a view outside it since hoist_slices. (A loop driver's text may have
    # no shapes in it: then one driver module serves both lengths, with a specialization for each.)
    drivers = {d.module.__name__ for p in programs for d in p.drivers.values()}
    assert shared - drivers == {programs[0].steps[-1].module.__name__}
    stats = gen.stats
    # the embedding lookup, 4 layers of 5 kernels (one loop), the head; the stacked K/V are views
    assert stats["kernel_calls"] == {"prefill b1 t3": 22, "prefill b1 t5": 22, "decode b1": 22}
    assert stats["distinct_kernels"] == len(names[0] | names[1] | names[2]) < sum(map(len, names))
    for prompt in prompts:
        ids, logits = gen.generate(prompt, max_new_tokens=3, return_logits=True)
        eager_ids, eager_logits = eager_generate(model, prompt, 3, CONFIG.max_seq_len)
        assert torch.equal(ids, eager_ids)
        torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-4)
