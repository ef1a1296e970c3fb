"""Generated kernels call the matrix-vector loops through C symbols (`matvec_call`, `entries`): the same bits
as the njit functions they stand for, for every format and number of matrices, with copies where operands'
rows are not contiguous; the symbols a kernel declares are bound by its module before it compiles or loads."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from numba import njit

from fusec.backends.numba_cpu import entries, gemm_call, int8, matvec, matvec_call
from fusec.passes.weights import quantize_int8

pytestmark = pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning")  # tiny kernels
NJIT = {"": matvec, "_bf16": matvec, "_int8": int8}


def _stored(fmt: str, w: np.ndarray) -> list[np.ndarray]:
    if fmt == "_int8":
        return [x.numpy() for x in quantize_int8(torch.from_numpy(w))]
    if fmt == "_bf16":
        return [(w.view(np.uint32) >> 16).astype(np.uint16)]
    return [w]


def _caller(fn, nargs: int, group: int):
    """An njit function calling `fn(x0, ..., group)` as generated code does (the group a constant)."""
    names = ", ".join(f"x{i}" for i in range(nargs))
    scope = {"fn": fn}
    exec(f"def caller({names}):\n    fn({names}, {group})\n", scope)
    return njit(scope["caller"])


@pytest.mark.parametrize("fmt", ["", "_bf16", "_int8"])
@pytest.mark.parametrize("ns", [(37,), (8, 5), (16, 3, 21)])
@pytest.mark.parametrize("group", [8, 16])
def test_symbol_call_gives_the_bits_of_the_njit_function(fmt, ns, group):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((2, 96)).astype(np.float32)
    weights = [x for n in ns for x in _stored(fmt, rng.standard_normal((n, 96)).astype(np.float32))]
    name = f"matvec{len(ns) if len(ns) > 1 else ''}{'_int8' if fmt == '_int8' else ''}"
    want = [np.full((2, n), np.nan, np.float32) for n in ns]
    getattr(NJIT[fmt], name)(a, *weights, *want, group)
    got = [np.full((2, n), np.nan, np.float32) for n in ns]
    call_name = f"matvec{len(ns) if len(ns) > 1 else ''}{fmt}"
    _caller(getattr(matvec_call, call_name), 1 + len(weights) + len(ns), group)(a, *weights, *got)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_operands_whose_rows_are_not_contiguous_are_copied():
    """A strided activation and weight are read through copies; a strided output written through one."""
    rng = np.random.default_rng(2)
    a = rng.standard_normal((2, 128)).astype(np.float32)[:, ::2]
    w = rng.standard_normal((24, 128)).astype(np.float32)[:, ::2]
    out = np.zeros((2, 48), np.float32)[:, ::2]
    _caller(matvec_call.matvec, 3, 8)(a, w, out)
    np.testing.assert_allclose(out, a @ w.T, rtol=1e-5, atol=1e-5)


def test_a_weight_of_another_k_is_refused():
    a = np.ones((1, 64), np.float32)
    w = np.ones((8, 32), np.float32)
    with pytest.raises(ValueError, match=r"matvec: weights \[N, K\] and outputs \[M, N\] expected"):
        _caller(matvec_call.matvec, 3, 8)(a, w, np.zeros((1, 8), np.float32))


def test_binding_lines_bind_each_recorded_entry_once():
    recorded = [matvec_call.key("_int8", 3, 16), matvec_call.key("", 1, 8), matvec_call.key("_bf16", 2, 8),
                matvec_call.key("", 1, 8), gemm_call.key("gemm3_mkl")]
    source = ("    matvec3_int8(abuf, w0, w1, w2, w3, w4, w5, acc0, acc1, acc2, 16)\n    matvec(abuf, w6, acc3, 8)\n"
              "    matvec2_bf16(abuf, w7, w8, acc4, acc5, 8)\n    matvec(a0.reshape((1, -1)), w9, acc6, 8)\n"
              "    gemm3_mkl(abuf, w0, acc0, w1, acc1, w2, acc2)\n")
    assert entries.binding_lines(recorded, source) == (
        "bind_entry('matvec', '_int8', 3, 16)\nbind_entry('matvec', '', 1, 8)\n"
        "bind_entry('matvec', '_bf16', 2, 8)\nbind_entry('gemm', 'gemm3_mkl')\n")


def test_a_call_without_a_recorded_entry_fails_at_code_generation():
    # without its binding line, the kernel loaded from the cache would call an undefined symbol (a crash),
    # so code generation refuses a call of an entry the emitter did not record
    source = "    matvec(abuf, w6,\n           acc3, 8)\n    gemm2_mkl(abuf, w0, acc0, w1, acc1)\n"
    with pytest.raises(AssertionError, match=r"gemm2_mkl.*recorded no entry"):
        entries.binding_lines([matvec_call.key("", 1, 8)], source)


def test_a_cached_kernel_loads_in_a_fresh_process(tmp_path):
    """A kernel loaded from the cache names its entry's symbol (a matrix-vector product at one row, an MKL
    GEMM at 200): its module binds the entry first (else the process would fail to resolve the symbol)."""
    script = ("import numpy as np, torch, fusec\n"
              "m = torch.nn.Linear(64, 40, bias=False)\n"
              "for n in (1, 200):\n"
              "    x = torch.randn(n, 64)\n"
              "    f = fusec.compile(m, (x,))\n"
              "    print(float((f(x) - m(x)).abs().max()))\n")
    env = dict(os.environ, FUSEC_CACHE_DIR=str(tmp_path), FUSEC_COMPILE_WORKERS="0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    for _ in range(2):  # compiles, then loads from the cache
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        assert all(float(line) < 1e-4 for line in done.stdout.strip().splitlines()[-2:]), done.stdout
