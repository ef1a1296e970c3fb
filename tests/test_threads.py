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


def test_concurrent_calls_that_compile_new_dynamic_shapes(block):
    x0 = _inputs(block, 1)[0]
    compiled = fusec.compile(block, (x0,), dynamic={"x": {1}}, backend="reference")
    xs = [example_inputs(block.config, seq_len=n, seed=n)[0] for n in (5, 9, 5, 9, 16, 5)]
    call_concurrently(compiled, block, xs)
    assert sorted(s.graph.input_types[0].shape[1] for s in compiled.specializations) == [5, 9, 16]
