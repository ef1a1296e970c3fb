"""A warm start: a program whose machine code all comes from the cache is loaded, not run on its example
(`Program.load_cached`, `fusec.build`), and a build keeps the collector off the objects that existed
before it (`fusec.build.young_gc`)."""
from __future__ import annotations

import gc
import sys

import numpy as np
import pytest
import torch

import fusec
import fusec.cache as cache
from fusec.api import lower
from fusec.backends.numba_cpu.runtime import Program
from fusec.backends.reference import run_graph
from fusec.models.causal_lm import DecodeStep, decode_example, random_model
from fusec.models.llama import LlamaConfig
from fusec.printer import parse_graph
from graphs import SOFTMAX_TANH

pytestmark = pytest.mark.filterwarnings("ignore::numba.NumbaPerformanceWarning")

TINY = LlamaConfig(dim=32, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=61, max_seq_len=16, n_layers=2)
GRAPH = lower(parse_graph(SOFTMAX_TANH))
X = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("FUSEC_CACHE_DIR", str(path))
    return path


def as_new_process():
    """Forget the generated modules (and the machine code they hold), as a new process starts."""
    for name in [n for n in sys.modules if n.startswith(cache.PREFIX)]:
        del sys.modules[name]


def misses(program: Program) -> int:
    return sum(sum(step.fn.stats.cache_misses.values()) for step in program.steps)


def test_new_program_compiles_as_it_is_made_warm_one_loads_and_runs_without_compiling(cache_dir):
    as_new_process()
    cold = Program(GRAPH)
    assert misses(cold) > 0  # nothing cached: its bodies compiled (and their checksums were recorded)
    assert cold.load_cached()  # so a build does not run it on its example
    as_new_process()
    warm = Program(GRAPH)
    assert warm.load_cached()
    loaded = {id(step.fn): len(step.fn.overloads) for step in warm.steps}
    got = warm.run([X])
    for g, w in zip(got, run_graph(parse_graph(SOFTMAX_TANH), [X])):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    assert misses(warm) == 0 and loaded == {id(step.fn): len(step.fn.overloads) for step in warm.steps}


def test_unrecorded_code_is_run_once_not_trusted(cache_dir):
    """Machine code whose checksums were never recorded (its first run did not finish) is compiled again,
    not loaded."""
    as_new_process()
    Program(GRAPH).run([X])
    for path in cache_dir.glob("*.manifest.json"):
        path.unlink()
    as_new_process()
    again = Program(GRAPH)
    assert misses(again) > 0 and again.load_cached()  # (compiled as it was made, the checksums recorded)
    for got, want in zip(again.run([X]), run_graph(parse_graph(SOFTMAX_TANH), [X])):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_warm_compile_runs_nothing_until_called(cache_dir, monkeypatch):
    m = random_model(TINY)
    example = decode_example(m, 1, TINY.max_seq_len)
    first = fusec.compile(DecodeStep(m), example)
    assert first.stats["example_run"] is False  # compiled as it was built: not run on the example either
    as_new_process()
    runs = []
    real = Program.run
    monkeypatch.setattr(Program, "run", lambda self, *a, **k: runs.append(1) or real(self, *a, **k))
    warm = fusec.compile(DecodeStep(m), example)
    assert warm.stats["trace_cache"] == "hit" and warm.stats["example_run"] is False and not runs
    example[2].normal_(generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = DecodeStep(m)(*example)
    for g, w in zip(warm(*example), want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert runs and misses(warm.program) == 0


def test_a_build_freezes_older_objects_and_thaws_them_after(cache_dir, monkeypatch):
    import fusec.trace_cache as trace_cache
    seen = []
    real = trace_cache.trace_and_lower
    monkeypatch.setattr(trace_cache, "trace_and_lower",
                        lambda *a, **k: seen.append((gc.isenabled(), gc.get_freeze_count())) or real(*a, **k))
    before = gc.get_freeze_count()
    fusec.compile(torch.nn.Linear(4, 3), (torch.zeros(2, 4),), backend="reference")
    assert seen and seen[0][0] and seen[0][1] > 1000  # torch's objects, at least
    assert gc.isenabled() and gc.get_freeze_count() == before


def test_objects_frozen_by_someone_else_stay_frozen(cache_dir):
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        fusec.compile(torch.nn.Linear(4, 3), (torch.zeros(2, 4),), backend="reference")
        assert gc.get_freeze_count() > frozen // 2  # (some were freed meanwhile: refcounts still work)
    finally:
        gc.unfreeze()
