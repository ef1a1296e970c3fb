"""Kernel looping (passes/loop.py): equal layers become one loop node; the reference backend defines it and
the Numba backend runs it as one call of a generated driver. Looped programs equal unlooped ones and eager."""
import dataclasses
import re

import numpy as np
import pytest
import torch
from torch import nn

import fusec
from fusec.backends.reference import run_graph
from fusec.errors import IRError
from fusec.verify import verify
from fusec.models.causal_lm import CausalLM, DecodeStep, Prefill, decode_example
from fusec.models.llama import LlamaConfig
from fusec.printer import format_graph, parse_graph
from fusec.tracing import trace
from fusec.passes.loop import loop_kernels
from fusec.passes.pipeline import run_pipeline

TINY4 = LlamaConfig(dim=64, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=97, max_seq_len=32, n_layers=4)


def model(config=TINY4, seed=0) -> CausalLM:
    torch.manual_seed(seed)
    m = CausalLM(config).eval()
    with torch.no_grad():  # non-trivial norms, so that a layer bound to the wrong weights shows
        for p in m.parameters():
            if p.ndim == 1:
                p.add_(torch.rand_like(p) * 0.5)
    return m


def decode_inputs(m: CausalLM, pos=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    token, p, k, v = decode_example(m, 1, m.config.max_seq_len, pos=pos)
    return (torch.tensor([[7]]), p, torch.randn(k.shape, generator=g), torch.randn(v.shape, generator=g))


def loops(graph):
    return [n for n in graph.nodes if n.op == "loop"]


def unlooped_graph(module, example):
    return run_pipeline(trace(module, example, {}).graph, target="cpu-unlooped")


def close(a, b, rtol=1e-4):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * max(1.0, np.abs(b).max()))


def test_decode_layers_become_one_loop_printed_parsed_and_idempotent():
    m = model()
    graph = unlooped_graph(DecodeStep(m), decode_example(m, 1, 32))
    looped = loop_kernels(graph)
    verify(looped)
    [loop] = loops(looped)
    # every layer: the embedding lookup and the stack of the new keys and values are kernels of their own
    assert loop.attr("trips") == 4 and len(loop.attr("weights")) == 4
    assert loop.attr("sliced"), "each iteration reads its own layer of the KV cache"
    # 4 layers of 5 kernels in the loop; the two stacks of the new K and V rows became views of its output
    assert sum(n.op == "kernel" for n in looped.nodes) == sum(n.op == "kernel" for n in graph.nodes) - 4 * 5 - 2
    text = format_graph(looped)
    parsed = parse_graph(text, looped.tensors)
    verify(parsed)
    assert format_graph(parsed) == text
    assert loop_kernels(looped) is looped and format_graph(loop_kernels(parsed)) == text
    ins = [x.numpy() for x in decode_inputs(m)]
    for a, b in zip(run_graph(looped, ins), run_graph(graph, ins)):
        np.testing.assert_array_equal(a, b)  # the same ops in the same order


class Residual(nn.Module):
    def __init__(self, widths, acts):
        super().__init__()
        self.ups = nn.ModuleList(nn.Linear(16, w) for w in widths)
        self.downs = nn.ModuleList(nn.Linear(w, 16) for w in widths)
        self.acts = acts

    def forward(self, x):
        for up, down, act in zip(self.ups, self.downs, self.acts):
            x = x + down(act(up(x)))
        return x


@pytest.mark.parametrize("widths, acts, formed", [
    ((32, 32, 32), (torch.tanh,) * 3, True),
    ((32, 48, 32), (torch.tanh,) * 3, False),                     # another width
    ((32, 32, 32), (torch.tanh, torch.sigmoid, torch.relu), False),  # other activations
])
def test_a_loop_is_formed_only_where_layers_are_equal(widths, acts, formed):
    torch.manual_seed(0)
    module, x = Residual(widths, acts), torch.randn(2, 16)
    graph = loop_kernels(unlooped_graph(module, (x,)))
    assert bool(loops(graph)) == formed
    if formed:
        assert loops(graph)[0].attr("trips") == 3
    with torch.no_grad():
        close(run_graph(graph, [x.numpy()])[0], module(x).numpy())
        compiled = fusec.compile(module, (x,))
        close(compiled(x).numpy(), module(x).numpy())
        assert bool(loops(compiled.graph)) == formed


def test_verify_names_what_is_wrong_with_a_loop():
    m = model()
    looped = loop_kernels(unlooped_graph(DecodeStep(m), decode_example(m, 1, 32)))
    i = next(k for k, n in enumerate(looped.nodes) if n.op == "loop")

    def broken(**attrs):
        n = looped.nodes[i]
        node = dataclasses.replace(n, attrs=tuple((k, attrs.get(k, v)) for k, v in n.attrs))
        return dataclasses.replace(looped, nodes=looped.nodes[:i] + (node,) + looped.nodes[i + 1:])

    weights = looped.nodes[i].attr("weights")
    with pytest.raises(IRError, match="trips"):
        verify(broken(trips=len(weights) + 1))
    with pytest.raises(IRError, match="body inputs"):
        verify(broken(sliced=()))
    other = list(weights[1])
    other[0], other[1] = other[1], other[0]  # a norm weight where a matrix was
    with pytest.raises(IRError, match="iteration 1"):
        verify(broken(weights=(weights[0], tuple(other)) + weights[2:]))


def compiled_pair(module, example, **options):
    return (fusec.compile(module, example, loop=True, **options), fusec.compile(module, example, loop=False, **options))


@pytest.fixture(scope="module")
def tiny4_decode():
    """TINY4's decode step (seed 0) and its inputs, compiled looped and unlooped once for the tests that
    only run it (compiling costs more than their checks)."""
    m = model()
    ins = decode_inputs(m)
    return m, ins, compiled_pair(DecodeStep(m), ins)


def test_looped_decode_and_prefill_equal_unlooped_and_eager(tiny4_decode):
    m, ins, (looped, unlooped) = tiny4_decode
    assert loops(looped.graph) and not loops(unlooped.graph)
    with torch.no_grad():
        eager = DecodeStep(m)(*ins)
    for a, b, e in zip(looped(*ins), unlooped(*ins), eager):
        close(a.numpy(), b.numpy())
        close(a.numpy(), e.numpy())
    tokens = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(2))
    looped, unlooped = compiled_pair(Prefill(m, 6), (tokens,))
    assert loops(looped.graph)
    with torch.no_grad():
        eager = Prefill(m, 6)(tokens)
    for a, b, e in zip(looped(tokens), unlooped(tokens), eager):
        close(a.numpy(), b.numpy())
        close(a.numpy(), e.numpy())


@pytest.mark.parametrize("backend", ["numba", "reference"])
def test_a_symbolic_prefill_loops_with_one_driver_for_every_length(backend):
    """The loop's driver takes the sizes at run time: its buffers are views at each call's length."""
    m = model()
    tokens = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(2))
    looped = fusec.compile(Prefill(m, None), (tokens,), dynamic={"tokens": {1: (1, 32)}}, backend=backend)
    [loop] = loops(looped.graph)
    assert loop.attr("trips") == 4 and looped.graph.sizes == {"s0": (1, 32)}
    for length in (1, 2, 7, 31, 32, 3):  # up and down again: buffers are resized both ways
        tokens = torch.randint(0, 97, (1, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            eager = Prefill(m, None)(tokens)
        for a, e in zip(looped(tokens), eager):
            close(a.numpy(), e.numpy())
    assert looped.stats["programs"] == 1
    if backend == "numba":
        assert looped.stats["python_calls"] < looped.stats["kernel_calls"]


def test_bf16_weights_looped_equal_unlooped():
    m = model()
    ins = decode_inputs(m)
    looped, unlooped = compiled_pair(DecodeStep(m), ins, weights="bf16")
    assert loops(looped.graph)
    for a, b in zip(looped(*ins), unlooped(*ins)):
        close(a.numpy(), b.numpy(), rtol=1e-5)


def test_bound_and_followed_weights_reach_every_iteration():
    first, second = model(seed=0), model(seed=3)
    ins = decode_inputs(first)
    compiled = fusec.compile(DecodeStep(first), ins)
    assert loops(compiled.graph)
    with torch.no_grad():  # follow: a layer inside the loop gets a new parameter
        first.layers[2].feed_forward.w2.weight = nn.Parameter(second.layers[2].feed_forward.w2.weight.clone())
        close(compiled(*ins)[0].numpy(), DecodeStep(first)(*ins)[0].numpy())
        compiled.bind_weights({k: v for k, v in DecodeStep(second).state_dict().items()})
        for a, e in zip(compiled(*ins), DecodeStep(second)(*ins)):
            close(a.numpy(), e.numpy())
        reference = fusec.compile(DecodeStep(first), ins, backend="reference")
        reference.bind_weights({k: v for k, v in DecodeStep(second).state_dict().items()})
        close(reference(*ins)[0].numpy(), DecodeStep(second)(*ins)[0].numpy())


def test_hf_llama_generates_as_eager_looped_or_not():
    # a model nobody here wrote: all 3 layers loop in the decode program and in the symbolic prefill
    # program (one for every prompt length)
    transformers = pytest.importorskip("transformers")
    from fusec.generate import compile_generator, eager_generate
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                      num_key_value_heads=2, num_hidden_layers=3, vocab_size=97,
                                      max_position_embeddings=32, rms_norm_eps=1e-5, bos_token_id=None,
                                      eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    tokens = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(4))
    ids, logits = eager_generate(hf, tokens, max_new_tokens=4)
    for loop in (True, False):
        generator = compile_generator(hf, loop=loop)
        got_ids, got_logits = generator.generate(tokens, max_new_tokens=4, return_logits=True)
        assert torch.equal(got_ids, ids)
        close(got_logits.numpy(), logits.numpy())
        assert [n.attr("trips") for n in loops(generator.decode_program(1).graph)] == ([3] if loop else [])
        prefill = [p.graph for p in generator._prefill.values()]
        assert prefill and all(g.sizes and [n.attr("trips") for n in loops(g)] == ([3] if loop else [])
                               for g in prefill)


def python_calls(compiled, ins) -> int:
    """Calls from Python into compiled code (kernels or loop drivers) during one run."""
    program = compiled.program
    count = [0]
    call = program._call

    def counted(*args):
        count[0] += 1
        return call(*args)
    program._call = counted
    try:
        compiled(*ins)
    finally:
        del program._call
    return count[0]


def test_a_decode_step_makes_as_many_python_calls_whatever_the_number_of_layers(tiny4_decode):
    counts = {}
    assert TINY4.n_layers == 4  # the shared pair is the 4-layer case
    for layers in (4, 8):
        if layers == 4:
            _, ins, (looped, unlooped) = tiny4_decode
        else:
            m = model(dataclasses.replace(TINY4, n_layers=layers))
            ins = decode_inputs(m)
            looped, unlooped = compiled_pair(DecodeStep(m), ins)
        counts[layers] = python_calls(looped, ins), python_calls(unlooped, ins)
        assert counts[layers][0] < counts[layers][1]
        assert len(looped.program.steps) == counts[layers][0] == looped.stats["python_calls"]
        # looped, the stacks of the new K and V rows are views of the loop's outputs: 2 kernels fewer
        assert looped.stats["kernel_calls"] + 2 == unlooped.stats["kernel_calls"] == counts[layers][1]
    assert counts[4][0] == counts[8][0] and counts[8][1] > counts[4][1]


def test_fusec_loop_environment_variable_turns_looping_off(monkeypatch):
    m = model()
    ins = decode_inputs(m)
    monkeypatch.setenv("FUSEC_LOOP", "0")
    assert not loops(fusec.compile(DecodeStep(m), ins, backend="reference").graph)
    monkeypatch.setenv("FUSEC_LOOP", "1")
    assert loops(fusec.compile(DecodeStep(m), ins, backend="reference").graph)


def shaped_like(preset: str) -> LlamaConfig:
    """The preset's layer count and attention heads at a tiny width (head_dim 8), for fast structural tests."""
    config = LlamaConfig.preset(preset)
    dim = 8 * config.n_heads
    return dataclasses.replace(config, dim=dim, hidden_dim=2 * dim, vocab_size=97, max_seq_len=16)


@pytest.mark.parametrize("preset", ["stories15M", "stories42M", "stories110M", "tinyllama_1b"])
def test_every_layer_of_a_preset_shaped_model_loops_decode_and_prefill(preset):
    m = model(shaped_like(preset))
    layers = m.config.n_layers
    tokens = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(2))
    example = decode_example(m, 1, 16)
    decode_ins = [x.numpy() for x in decode_inputs(m, pos=3)[:2]] + [x.numpy() for x in example[2:]]
    for module, ex, ins in ((DecodeStep(m), example, decode_ins), (Prefill(m, 5), (tokens,), [tokens.numpy()])):
        graph = unlooped_graph(module, ex)
        looped = loop_kernels(graph)
        [loop] = loops(looped)
        assert loop.attr("trips") == layers, f"{type(module).__name__}: {loop.attr('trips')} of {layers} looped"
        # nothing of a layer is left outside: the embedding lookup and the head only (the stacked K/V
        # are a view of the loop's per-iteration outputs)
        assert sum(n.op == "kernel" for n in looped.nodes) == 2
        for a, b in zip(run_graph(looped, ins), run_graph(graph, ins)):
            np.testing.assert_array_equal(a, b)


def test_every_layer_of_stories15M_loops():
    m = CausalLM.from_preset("stories15M").eval()
    example = decode_example(m, 1, 16)
    graph = unlooped_graph(DecodeStep(m), example)
    looped = loop_kernels(graph)
    [loop] = loops(looped)
    assert loop.attr("trips") == m.config.n_layers
    ins = [x.numpy() for x in decode_inputs(m, pos=3)[:2]] + [x.numpy() for x in example[2:]]
    for a, b in zip(run_graph(looped, ins), run_graph(graph, ins)):
        np.testing.assert_array_equal(a, b)


def test_the_driver_calls_its_kernels_by_address_and_compiles_none_of_them_again(tmp_path, monkeypatch):
    # a shape no other test compiles, in an empty cache: the driver is compiled here and its LLVM IR is at hand
    monkeypatch.setenv("FUSEC_CACHE_DIR", str(tmp_path))
    config = LlamaConfig(dim=24, n_heads=3, n_kv_heads=1, hidden_dim=40, vocab_size=31, max_seq_len=8, n_layers=2)
    m = model(config)
    ins = decode_inputs(m)
    compiled = fusec.compile(DecodeStep(m), ins)
    [driver] = compiled.program.drivers.values()
    [llvm] = driver.fn.inspect_llvm().values()
    kernel_modules = [module.__name__ for module in driver.modules if module is not driver.module]
    assert kernel_modules
    defined = re.findall(r"^define .*$", llvm, re.M)
    # linked in, each kernel would be optimized and emitted a second time (the driver cost as much as they)
    assert not [d for d in defined if any(name in d for name in kernel_modules)]
    assert "raise_with_shape_context" not in llvm  # NumPy's assignment error path: half the driver's time
    with torch.no_grad():
        for a, e in zip(compiled(*ins), DecodeStep(m)(*ins)):
            close(a.numpy(), e.numpy())


def test_time_outside_kernels_is_measured_with_the_kernels_put_back():
    from fusec.benchtools import seconds_outside_kernels
    m = model()
    ins = decode_inputs(m)
    compiled = fusec.compile(DecodeStep(m), ins)
    functions = [step.fn for step in compiled.program.steps]
    seconds = seconds_outside_kernels(compiled.program, [x.numpy() for x in ins], repeat=3)
    assert 0 < seconds < 1
    assert [step.fn for step in compiled.program.steps] == functions
    with torch.no_grad():
        close(compiled(*ins)[0].numpy(), DecodeStep(m)(*ins)[0].numpy())


def test_a_driver_reaches_each_iterations_weight_by_its_address():
    """`borrowed` (how a driver reads iteration l's weight, see backends/numba_cpu/borrowed.py): the array
    at another address with the given one's shape and strides, for C-contiguous and strided arrays."""
    from numba import njit

    from fusec.backends.numba_cpu.borrowed import borrowed

    @njit
    def total(like, addresses, l):
        return borrowed(like, addresses[l]).sum()

    layers = [np.arange(12, dtype=np.float32).reshape(3, 4) * (k + 1) for k in range(3)]
    addresses = np.array([a.ctypes.data for a in layers], np.int64)
    for k, a in enumerate(layers):
        assert total(layers[0], addresses, k) == a.sum()
    strided = [a[:, ::2] for a in layers]
    addresses = np.array([a.ctypes.data for a in strided], np.int64)
    assert total(strided[0], addresses, 2) == strided[2].sum()


def test_a_drivers_views_are_the_elements_they_name_and_check_the_range():
    """`view` (a driver's reshapes and contiguous slices): elements [offset, offset + size) of a C array in
    the given shape, sharing its data; a range past the array's end is a ValueError, not a read past it."""
    from numba import njit

    from fusec.backends.numba_cpu.borrowed import view

    @njit
    def part(a, offset, rows, cols):
        v = view(a, offset, (rows, cols))
        v[0, 0] = -1.0  # shares a's data
        return v.copy()

    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    expect = a.reshape(-1)[5:5 + 6].reshape(2, 3).copy()
    expect[0, 0] = -1.0
    np.testing.assert_array_equal(part(a, 5, 2, 3), expect)
    assert a.reshape(-1)[5] == -1.0
    np.testing.assert_array_equal(part(a, 0, 4, 6), a.reshape(4, 6))
    with pytest.raises(ValueError, match="outside the array"):
        part(a, 20, 2, 3)


def test_a_driver_calls_each_kernel_with_the_argument_types_it_was_compiled_for():
    """`call_at` (how a driver calls a kernel by its address): the call runs the compiled function, and a
    call whose arguments differ from the signature written beside it does not compile."""
    import numba
    from numba import njit

    from fusec.backends.numba_cpu.call_at import call_at, entry_address, signature_text

    @njit
    def kernel(a, out):
        for i in range(a.size):
            out[i] = 2 * a[i]

    a, out = np.arange(5, dtype=np.float32), np.zeros(5, np.float32)
    sig = (numba.typeof(a), numba.typeof(out))
    kernel.compile(sig)
    text = signature_text(sig)
    assert text == "float32[1C], float32[1C]"
    scope = {"njit": njit, "call_at": call_at}
    exec(f"@njit\ndef run(K, a, out):\n    call_at(K[0], {text!r}, a, out)\n"
         f"@njit\ndef strided(K, a, out):\n    call_at(K[0], {text!r}, a[::2], out)\n", scope)
    K = np.array([entry_address(kernel.overloads[sig])], np.int64)
    scope["run"](K, a, out)
    np.testing.assert_array_equal(out, 2 * a)
    with pytest.raises(numba.core.errors.TypingError, match="float32\\[1A\\]"):
        scope["strided"](K, a, out)


def test_each_loop_kernels_cost_is_measured_with_the_driver_put_back():
    from fusec.benchtools import loop_kernel_seconds
    m = model()
    ins = decode_inputs(m)
    compiled = fusec.compile(DecodeStep(m), ins)
    program = compiled.program
    functions = [step.fn for step in program.steps]
    (loop,) = program.drivers
    body = program.graph.nodes[loop].attr("body")
    calls = [i for i, n in enumerate(body.nodes) if n.op == "kernel"]
    costs = loop_kernel_seconds(program, [x.numpy() for x in ins], repeat=2)
    assert [label.split(" ")[:2] for label, _ in costs] == [[f"loop%{loop}", f"K[{k}]"] for k in range(len(calls))]
    assert all(label.split(" ")[2] in program.source for label, _ in costs)  # the kernel's module
    assert all(abs(seconds) < 1 for _, seconds in costs)
    assert [step.fn for step in program.steps] == functions
    with torch.no_grad():
        close(compiled(*ins)[0].numpy(), DecodeStep(m)(*ins)[0].numpy())
