"""One compiled program called from several Python threads at once gives every caller its own correct
result (the numba program serializes calls: its intermediate buffers belong to the program)."""
from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import fusec
from fusec.models import LlamaBlock, LlamaConfig, example_inputs

THREADS = 6
CALLS = 4


@pytest.fixture(autouse=True)
def frequent_thread_switches():
    """Switch threads every microsecond, so an unprotected buffer shared by two calls would show (with
    the default 5 ms, a small program's call usually finishes before another thread runs)."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


@pytest.fixture(scope="module")
def block():
    return LlamaBlock(LlamaConfig.tiny()).eval()


def _inputs(block, n: int, seq_len: int = 16):
    return [example_inputs(block.config, seq_len=seq_len, seed=100 + k)[0] for k in range(n)]


def call_concurrently(compiled, block, xs) -> None:
    """Every input from a pool of threads at once; each result must be that input's eager result."""
    with torch.no_grad():
        wants = [block(x) for x in xs]
    with ThreadPoolExecutor(THREADS) as pool:
        gots = list(pool.map(compiled, xs))
    for got, want in zip(gots, wants):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["numba", "reference"])
def test_concurrent_calls_of_one_program(block, backend):
    xs = _inputs(block, THREADS * CALLS)
    compiled = fusec.compile(block, (xs[0],), backend=backend)
    call_concurrently(compiled, block, xs)


def test_concurrent_calls_over_dynamic_shapes_share_one_symbolic_program(block):
    x0 = _inputs(block, 1)[0]
    compiled = fusec.compile(block, (x0,), dynamic={"x": {1}}, backend="reference")
    xs = [example_inputs(block.config, seq_len=n, seed=n)[0] for n in (5, 9, 5, 9, 16, 5)]
    call_concurrently(compiled, block, xs)
    assert compiled.stats["programs"] == 1 and compiled.graph.sizes  # every size in its range


def test_one_generator_from_many_threads_gives_each_call_its_own_tokens():
    """A generator's KV cache and input buffers are its own: concurrent generate calls are serialized, so
    every result equals the same call made alone."""
    from fusec.generate import compile_generator
    from fusec.models.causal_lm import random_model
    config = LlamaConfig(dim=32, n_heads=2, n_kv_heads=1, hidden_dim=64, vocab_size=61, max_seq_len=32, n_layers=1)
    gen = compile_generator(random_model(config, seed=0), backend="numba")
    prompts = [torch.randint(0, config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(k)) for k in range(8)]
    def run(p):  # the logits show a mixed-up cache even where the greedy tokens happen to agree
        return gen.generate(p, max_new_tokens=12, return_logits=True)
    alone = [run(p) for p in prompts]
    for _ in range(2):
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(run, prompts))
        for (ids, logits), (want_ids, want_logits) in zip(together, alone):
            assert torch.equal(ids, want_ids) and torch.equal(logits, want_logits)


def test_generate_called_from_its_own_on_token_callback_is_an_error():
    from fusec.generate import eager_generator
    from fusec.models.causal_lm import random_model
    config = LlamaConfig(dim=32, n_heads=2, n_kv_heads=1, hidden_dim=64, vocab_size=61, max_seq_len=32, n_layers=1)
    gen = eager_generator(random_model(config, seed=0))
    with pytest.raises(RuntimeError, match="on_token"):
        gen.generate(torch.tensor([[1, 2]]), max_new_tokens=3,
                     on_token=lambda n, t: gen.generate(torch.tensor([[3]]), max_new_tokens=1))
    assert gen.generate(torch.tensor([[1, 2]]), max_new_tokens=2).shape == (1, 4)  # not left locked


def test_eager_calls_from_another_thread_while_compiling(block):
    """torch.export swaps a module's parameters for fake tensors while it traces: fusec traces a copy of
    the module tree (sharing the parameters), so the user's module keeps working in eager meanwhile."""
    import threading
    x = _inputs(block, 1, seq_len=8)[0]
    with torch.no_grad():
        want = block(x)
    stop, errors, calls = threading.Event(), [], [0]

    def eager_loop():
        while not stop.is_set():
            try:
                with torch.no_grad():
                    got = block(x)
                assert torch.equal(got, want), "eager result changed while compiling"
                calls[0] += 1
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(repr(e)[:300])
                return

    thread = threading.Thread(target=eager_loop)
    thread.start()
    try:
        compiled = [fusec.compile(block, (x,), backend="reference") for _ in range(2)]
    finally:
        stop.set()
        thread.join()
    assert not errors and calls[0] > 0, errors
    for c in compiled:
        torch.testing.assert_close(c(x), want, rtol=1e-4, atol=1e-5)
    assert all(isinstance(p, torch.nn.Parameter) for p in block.parameters())


def test_a_numba_compile_in_another_thread_while_tracing_waits_and_succeeds():
    """While torch.export traces, the builtins min and max are tensor-aware stand-ins: a Numba function
    typed meanwhile in another thread found those and failed to compile.
    The export holds Numba's compiler lock, so that compile waits for the trace and then succeeds."""
    import threading

    import numba

    results = {}

    def compile_with_min():
        @numba.njit(cache=False)
        def smaller(a, b):
            return min(a, b) + max(a, b) * 0
        try:
            results["value"] = smaller(3, 5)
        except Exception as e:  # noqa: BLE001 - the assertion below shows it
            results["error"] = repr(e)[:300]

    class StartsACompileWhileTraced(torch.nn.Module):
        def forward(self, x):
            if "thread" not in results:  # the first call is torch.export's trace
                results["thread"] = threading.Thread(target=compile_with_min)
                results["thread"].start()
                results["thread"].join(timeout=1.0)  # it cannot finish inside the trace: it waits for it
                results["finished_inside_trace"] = not results["thread"].is_alive()
            return x * 2

    x = torch.randn(2, 3)
    compiled = fusec.compile(StartsACompileWhileTraced(), (x,), backend="reference")
    results["thread"].join(timeout=120)
    assert results.get("value") == 3, results.get("error")
    assert not results["finished_inside_trace"]
    torch.testing.assert_close(compiled(x), x * 2)
