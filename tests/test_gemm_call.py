"""Generated kernels call the MKL GEMM helpers through C symbols (`gemm_call`, `entries`): the same bits as
the njit helpers they stand for, for every helper, with copies where operands' rows are not contiguous;
calls of the wrong shapes or types are refused."""
import numpy as np
import pytest
import torch
from numba import njit
from numba.core.errors import TypingError

from fusec.backends.numba_cpu import gemm_call, gemm_widen, mkl
from fusec.passes.weights import quantize_int8
from test_gemm_blas import numba_threads

pytestmark = pytest.mark.skipif(bool(mkl.UNAVAILABLE), reason=f"MKL unavailable: {mkl.UNAVAILABLE}")


def _caller(fn, nargs: int):
    """An njit function calling `fn(x0, ...)` as generated code does."""
    names = ", ".join(f"x{i}" for i in range(nargs))
    scope = {"fn": fn}
    exec(f"def caller({names}):\n    fn({names})\n", scope)
    return njit(scope["caller"])


def _weight(fmt: str, rng, n: int, k: int) -> list[np.ndarray]:
    w = rng.standard_normal((n, k)).astype(np.float32)
    if fmt == "int8":
        return [x.numpy() for x in quantize_int8(torch.from_numpy(w))]
    if fmt in ("bf16w", "bf16"):
        return [(w.view(np.uint32) >> 16).astype(np.uint16)]
    return [w]


def _arguments(name: str, rng, m: int, k: int, widths: tuple, strided: bool) -> list[np.ndarray]:
    """The helper's arguments in its order; `strided`: the outputs are column windows of wider arrays."""
    fmt = gemm_call.WIDENED.get(name, "bf16" if name == "gemm_bf16_mkl" else "")
    a = rng.standard_normal((m, k)).astype(np.float32)
    if fmt == "bf16":
        a = (a.view(np.uint32) >> 16).astype(np.uint16)
    args = [a]
    for n in widths:
        out = np.full((m, n + 5), np.nan, np.float32)
        args += _weight(fmt, rng, n, k) + [out[:, 2:2 + n] if strided else np.ascontiguousarray(out[:, :n])]
    if name == "gemm_add_mkl":
        args.append(rng.standard_normal((m, widths[0])).astype(np.float32))
    return args


WIDTHS = {"": (40,), "2": (40, 7), "3": (40, 7, 19)}


@pytest.mark.parametrize("name", gemm_call.NAMES)
@pytest.mark.parametrize("strided", [False, True])
def test_symbol_call_gives_the_bits_of_the_njit_helper(name, strided):
    rng = np.random.default_rng(3)
    widths = WIDTHS[name[4] if name[4].isdigit() else ""]
    args = _arguments(name, rng, 70, 64, widths, strided)
    extra = [True] if name == "gemm_mkl" else []  # b is [N, K]
    helper = getattr(gemm_widen if name in gemm_call.WIDENED else mkl, name)
    want = [x.copy() for x in args]
    got = [x.copy() for x in args]
    if strided:  # the same windows of copies of the wide arrays
        want = [x if x.flags.c_contiguous else np.array(x.base)[:, 2:-3] for x in args]
        got = [x if x.flags.c_contiguous else np.array(x.base)[:, 2:-3] for x in args]
    with numba_threads(2):
        helper(*[np.ascontiguousarray(x) if not x.flags.c_contiguous else x for x in want[:1]], *want[1:], *extra)
        _caller(getattr(gemm_call, name), len(got) + len(extra))(*got, *extra)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    if strided:  # nothing written outside the windows
        assert all(np.isnan(x.base[:, :2]).all() and np.isnan(x.base[:, -3:]).all()
                   for x in got if not x.flags.c_contiguous)


def test_gemm_mkl_reads_b_as_it_is_or_transposed():
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((70, 32)).astype(np.float32), rng.standard_normal((32, 48)).astype(np.float32)
    for b_transposed, weight in ((False, b), (True, np.ascontiguousarray(b.T))):
        c = np.zeros((70, 48), np.float32)
        _caller(gemm_call.gemm_mkl, 4)(a, weight, c, b_transposed)
        np.testing.assert_allclose(c, a @ b, rtol=1e-5, atol=1e-4)


def test_gemm_add_mkl_may_add_to_its_output():
    rng = np.random.default_rng(5)
    a, w = rng.standard_normal((70, 32)).astype(np.float32), rng.standard_normal((24, 32)).astype(np.float32)
    r = rng.standard_normal((70, 24)).astype(np.float32)
    c = r.copy()
    _caller(gemm_call.gemm_add_mkl, 4)(a, w, c, c)
    np.testing.assert_allclose(c, r + a @ w.T, rtol=1e-5, atol=1e-4)


def test_a_weight_of_another_k_is_refused():
    a, w = np.ones((70, 64), np.float32), np.ones((8, 32), np.float32)
    with pytest.raises(ValueError, match=r"gemm2_mkl: weights \[N, K\] and outputs \[M, N\] expected"):
        _caller(gemm_call.gemm2_mkl, 5)(a, w, np.zeros((70, 8), np.float32), w, np.zeros((70, 8), np.float32))


def test_an_operand_of_another_type_is_refused():
    a, w = np.ones((70, 64), np.float64), np.ones((8, 64), np.float32)
    with pytest.raises(TypingError, match="gemm_add_mkl: a must be a 2-d float32 array"):
        _caller(gemm_call.gemm_add_mkl, 4)(a, w, np.zeros((70, 8), np.float32), np.zeros((70, 8), np.float32))
