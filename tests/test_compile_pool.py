"""Compiling a program's distinct kernel bodies in worker processes (backends/numba_cpu/compile_pool.py):
the program then loads them from the cache and computes the same; a failing worker, or none, changes
nothing but where the kernels compile."""
from __future__ import annotations

import sys
import threading
import types
import warnings

import numpy as np
import pytest
import torch

import fusec.cache as cache
from fusec.api import lower
from fusec.backends.numba_cpu import compile_batch, compile_pool
from fusec.backends.numba_cpu.runtime import Program
from fusec.backends.reference import run_graph
from fusec.printer import parse_graph
from graphs import SOFTMAX_TANH_MATMUL

pytestmark = pytest.mark.filterwarnings("ignore::numba.NumbaPerformanceWarning")

TEXT = SOFTMAX_TANH_MATMUL
X = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
W = np.random.default_rng(2).standard_normal((8, 4)).astype(np.float32)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("FUSEC_CACHE_DIR", str(path))
    monkeypatch.setenv("FUSEC_COMPILE_WORKERS", "1")
    yield path
    compile_pool._POOL.close()


def forget_generated_modules() -> None:
    """As in a new process: no generated module in this process's module table (its kernels compiled)."""
    for name in [n for n in sys.modules if n.startswith(cache.PREFIX)]:
        del sys.modules[name]


def fresh_program() -> Program:
    """A Program built as a new process would: not from this process's module table."""
    forget_generated_modules()
    program = Program(lower(parse_graph(TEXT)))
    for got, want in zip(program.run([X, W]), run_graph(parse_graph(TEXT), [X, W])):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    return program


def compiled_here(program: Program) -> set[str]:
    """The modules whose kernel this process compiled (rather than loaded from the cache)."""
    return {s.module.__name__ for s in program.steps if sum(s.fn.stats.cache_misses.values())}


def test_a_worker_compiles_bodies_the_program_then_loads_from_the_cache(cache_dir):
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fusec")
        program = fresh_program()
    counts = program.compile_counts
    assert len(program.modules) >= 3
    assert counts["in_workers"] >= 1 and counts["worker_failures"] == 0
    assert counts["in_workers"] + counts["in_process"] == len(program.modules)
    assert len(compiled_here(program)) == counts["in_process"]  # the rest were loaded
    again = fresh_program()  # a warm start: everything from the cache, nothing for the workers
    assert again.compile_counts == {"in_process": 0, "in_workers": 0, "worker_failures": 0}
    assert not compiled_here(again)


def test_a_worker_started_for_another_cache_directory_is_replaced(cache_dir, tmp_path, monkeypatch):
    fresh_program()  # a worker now runs with FUSEC_CACHE_DIR = cache_dir
    monkeypatch.setenv("FUSEC_CACHE_DIR", str(tmp_path / "another"))
    counts = fresh_program().compile_counts  # cold again, in the other directory
    assert counts["in_workers"] >= 1 and counts["worker_failures"] == 0


def test_a_worker_that_fails_leaves_the_kernels_to_compile_here(cache_dir, monkeypatch):
    compile_pool._POOL.close()
    monkeypatch.setattr(compile_pool, "BOOT", "import sys; sys.exit(3)")  # every worker dies at once
    program = fresh_program()
    assert program.compile_counts["in_workers"] == 0 and program.compile_counts["worker_failures"] >= 1
    assert compiled_here(program) == {m.__name__ for m in program.modules}


def test_no_workers_without_a_cache_directory_or_for_one_body(cache_dir, monkeypatch):
    monkeypatch.setattr(cache, "writable_dir", lambda: None)  # compile in memory
    started = []
    monkeypatch.setattr(compile_pool._POOL, "run", lambda *a: started.append(a) or (True, ""))
    program = fresh_program()
    assert program.modules[0].__file__.startswith("<fusec") and not started
    assert program.compile_counts == {"in_process": 0, "in_workers": 0, "worker_failures": 0}
    assert compile_pool.worker_count(1) == 0
    monkeypatch.setenv("FUSEC_COMPILE_WORKERS", "0")
    assert compile_pool.worker_count(8) == 0
    monkeypatch.setenv("FUSEC_COMPILE_WORKERS", "3")
    assert compile_pool.worker_count(8) == 3 and compile_pool.worker_count(2) == 1


def test_a_worker_that_hangs_is_killed_and_the_kernels_compile_here(cache_dir, monkeypatch):
    compile_pool._POOL.close()
    monkeypatch.setattr(compile_pool, "BOOT", "import time; time.sleep(120)")  # never answers
    monkeypatch.setattr(compile_pool, "JOB_SECONDS", 1.0)
    program = fresh_program()
    assert program.compile_counts["in_workers"] == 0 and program.compile_counts["worker_failures"] >= 1
    assert compiled_here(program) == {m.__name__ for m in program.modules}
    assert all(w.poll() is not None for w in compile_pool._POOL.workers.values())  # none left behind


def test_default_worker_count_follows_the_cpus_up_to_a_cap(monkeypatch):
    monkeypatch.delenv("FUSEC_COMPILE_WORKERS", raising=False)
    monkeypatch.setattr(compile_pool, "_cpus", lambda: 64)
    assert compile_pool.worker_count(1 << 20) == compile_pool.MAX_WORKERS  # (each worker imports torch)
    monkeypatch.setattr(compile_pool, "_cpus", lambda: 2)
    assert compile_pool.worker_count(8) == 1
    monkeypatch.setattr(compile_pool, "_cpus", lambda: 1)
    assert compile_pool.worker_count(8) == 0


class _Two(torch.nn.Module):
    """The program of TEXT, as a module: a few distinct kernel bodies."""

    def forward(self, x, w):
        y = torch.tanh(torch.softmax(x, dim=1))
        return y.amax(0), torch.sigmoid(y @ w)


def test_fusec_compile_starts_workers_while_tracing_and_reports_what_they_compiled(cache_dir, monkeypatch):
    """A user's first compile, end to end (the rest of the suite runs with the workers off when it runs in
    several processes): fusec.compile starts the workers before tracing, they compile some of the kernels,
    its stats count them, and the results are eager's."""
    import fusec
    compile_pool._POOL.close()
    forget_generated_modules()  # (the tests above compiled these kernel bodies in this process)
    prestarted = []  # the workers running once prestart has returned
    prestart = compile_pool.prestart
    monkeypatch.setattr(compile_pool, "prestart",
                        lambda: prestart() or prestarted.append(dict(compile_pool._POOL.workers)))
    x, w = torch.from_numpy(X), torch.from_numpy(W)
    compiled = fusec.compile(_Two(), (x, w))
    assert len(prestarted) == 1 and len(prestarted[0]) == 1
    assert prestarted[0] == compile_pool._POOL.workers  # the same process served the compile
    assert compiled.stats["compiled_in_workers"] >= 1
    for got, want in zip(compiled(x, w), _Two()(x, w)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


class _Function:
    """A stand-in for a generated kernel: records where it was compiled."""

    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def compile(self, sig) -> None:
        self.log.append(("here", self.name))


def _one_slow_worker(monkeypatch):
    """One compile worker that waits for `release` before it compiles; four modules of one kernel each.
    Returns (the log of where each body compiled, release, taken, the modules): `taken` is set once the worker
    holds a body (a test waits for it rather than assume the worker's thread ran before this one)."""
    log, release, taken = [], threading.Event(), threading.Event()

    def run(number, job):
        taken.set()
        release.wait(10)
        log.append(("worker", job[0].__name__))
        return True, ""
    monkeypatch.setattr(compile_pool._POOL, "run", run)
    monkeypatch.setattr(compile_pool, "_after_worker", lambda module: None)
    monkeypatch.setattr(compile_pool, "worker_count", lambda jobs: 1 if jobs >= 2 else 0)
    modules = [types.SimpleNamespace(__name__=f"m{k}", kernel=_Function(f"m{k}", log)) for k in range(4)]
    return log, release, taken, modules


def test_a_body_two_programs_started_compiles_once(monkeypatch):
    """Two programs started one after the other (`start`, as the generator does for its decode and prefill
    programs) that share a kernel body compile it once, in a worker or here, not once each."""
    log, release, taken, modules = _one_slow_worker(monkeypatch)
    first = compile_batch.start([(m, "kernel", ["sig"]) for m in modules[:2]])
    second = compile_batch.start([(m, "kernel", ["sig"]) for m in modules])  # m0 and m1 are the first's
    release.set()
    first.finish()
    second.finish()
    assert sorted(name for _, name in log) == ["m0", "m1", "m2", "m3"]
    assert not compile_batch._IN_FLIGHT  # nothing left in flight once both finished


def test_workers_serve_the_oldest_batch_first(monkeypatch):
    """The worker takes the first program's bodies before a later program's (the decode program, which the
    first token waits for, before the prefill's), whichever batch was started last."""
    log, release, taken, modules = _one_slow_worker(monkeypatch)
    first = compile_batch.start([(m, "kernel", ["sig"]) for m in modules[:2]])   # the worker takes m0
    assert taken.wait(10)
    second = compile_batch.start([(m, "kernel", ["sig"]) for m in modules[2:]])  # m2, m3 queued behind m1
    release.set()
    for thread in list(compile_batch._FEEDERS.values()):
        thread.join()
    assert log == [("worker", "m0"), ("worker", "m1"), ("worker", "m2"), ("worker", "m3")]
    assert first.finish()["in_workers"] == 2 and second.finish()["in_workers"] == 2


def test_a_batch_waiting_for_a_worker_compiles_only_its_own_bodies(monkeypatch):
    """A batch waiting for its last body in a worker does not compile another batch's meanwhile: that body
    could take longer than the wait and hold back the program the caller waits for."""
    log, release, taken, modules = _one_slow_worker(monkeypatch)
    first = compile_batch.start([(m, "kernel", ["sig"]) for m in modules[:2]])   # the worker takes m0
    assert taken.wait(10)
    second = compile_batch.start([(m, "kernel", ["sig"]) for m in modules[2:]])  # m2, m3 queued
    modules[1].kernel.compile = lambda sig: (log.append(("here", "m1")), release.set())  # the worker goes on
    assert first.finish() == {"in_process": 1, "in_workers": 1, "worker_failures": 0}  # m1 here, m0 waited for
    assert ("here", "m2") not in log and ("here", "m3") not in log
    second.finish()
    assert sorted(name for _, name in log) == ["m0", "m1", "m2", "m3"]


def test_a_batch_says_whether_only_its_workers_have_work_left(monkeypatch):
    """`compiling_elsewhere`: true while a worker holds or will take the jobs (the generator then runs
    prompts through its decode program instead of waiting), false once they are done, and false at once
    without workers (nothing would ever finish the jobs but `finish`)."""
    log, release, taken, modules = _one_slow_worker(monkeypatch)
    first = compile_batch.start([(m, "kernel", ["sig"]) for m in modules[:2]])  # a worker holds m0, m1 queued
    assert taken.wait(10)
    second = compile_batch.start([(m, "kernel", ["sig"]) for m in modules[:2]])  # borrows both
    assert first.compiling_elsewhere() and second.compiling_elsewhere()
    release.set()
    for thread in list(compile_batch._FEEDERS.values()):
        thread.join()
    assert not first.compiling_elsewhere() and not second.compiling_elsewhere()
    assert first.finish()["in_workers"] == 2 and second.finish()["in_process"] == 0
    assert sorted(log) == [("worker", "m0"), ("worker", "m1")]
    monkeypatch.setattr(compile_pool, "worker_count", lambda jobs: 0)
    alone = compile_batch.start([(m, "kernel", ["sig"]) for m in modules[2:]])
    assert not alone.compiling_elsewhere()
