"""The prefill GEMMs over MKL as generated kernels call them: through a C symbol, not as njit functions.

`mkl.gemm3_mkl`, `gemm_widen.gemm2_int8_mkl`, ... are parallel loops over blocks of output columns, each
block one single-threaded MKL sgemm (the int8 and bf16 ones widen weight tiles first). Called as njit
functions, each kernel that calls one links its parallel loop into its own module for LLVM to optimize
again. Each is a library entry instead (`entries.py`): compiled once per machine, bound to the symbol
`fusec_<name>`, called once per product (or group of products) with the parallel loop inside.

Generated code calls them by their own names and arguments (`gemm3_mkl(a, w0, c0, w1, c1, w2, c2)`,
`gemm_mkl(a, b, c, transposed)`, ...); the emitter records the entry of each call (`key`, family "gemm").
"""
from __future__ import annotations

from fusec.backends.numba_cpu import gemm_widen, mkl  # noqa: F401 - the modules of the entries' bodies
from fusec.backends.numba_cpu.entries import Array, Entry, caller, register

FAMILY = "gemm"
_FP32 = ("gemm_mkl", "gemm2_mkl", "gemm3_mkl")
WIDENED = {f"gemm{n}_{fmt}_mkl": fmt for fmt in ("int8", "bf16w") for n in ("", "2", "3")}
NAMES = _FP32 + ("gemm_add_mkl", "gemm_bf16_mkl") + tuple(WIDENED)


def _weights(fmt: str, i: int) -> list[Array]:
    if fmt == "int8":  # blocks of 32 and their scales (`int8.py`)
        return [Array(f"q{i}", "int8", 3), Array(f"s{i}", "float32", 3)]
    return [Array(f"w{i}", "uint16" if fmt == "bf16w" else "float32")]


def _product_check(name: str, w: Array, c: str) -> tuple[str, str]:
    """c = a @ w^T: w [N, K] (int8: [N, K/32, 32] and its scales [N, K/32, 1]), c [M, N]."""
    k = f"{w.name}.shape[1] * {w.name}.shape[2]" if w.ndim == 3 else f"{w.name}.shape[1]"
    bad = f"{k} != a.shape[1] or {c}.shape[0] != a.shape[0] or {c}.shape[1] != {w.name}.shape[0]"
    if w.ndim == 3:
        s = f"s{w.name[1:]}"
        bad += f" or {s}.shape[0] != {w.name}.shape[0] or {s}.shape[1] != {w.name}.shape[1]"
    return bad, f"{name}: weights [N, K] and outputs [M, N] expected for activations [M, K]"


def entry(name: str) -> Entry:
    """The entry of the helper `name` (one of NAMES), its arrays in the helper's argument order."""
    if name not in NAMES:
        raise ValueError(f"GEMM entry: one of {NAMES} expected, got {name!r}")
    symbol = f"fusec_{name}"
    if name == "gemm_mkl":  # b [K, N], or [N, K] when transposed
        message = f"{name}: b [K, N] (or [N, K] transposed) and c [M, N] expected for a [M, K]"
        bad = ("(b.shape[1] if b_transposed else b.shape[0]) != a.shape[1] or c.shape[0] != a.shape[0] or "
               "c.shape[1] != (b.shape[0] if b_transposed else b.shape[1])")
        return Entry(symbol, __name__, (Array("a"), Array("b"), Array("c", output=True)),
                     "mkl.gemm_mkl(a, b, c, b_transposed != 0)", ("b_transposed",), ((bad, message),))
    if name == "gemm_add_mkl":  # c = r + a @ w^T (r may be c)
        arrays = (Array("a"), Array("w0"), Array("c0", output=True), Array("r"))
        bad = "r.shape[0] != c0.shape[0] or r.shape[1] != c0.shape[1]"
        return Entry(symbol, __name__, arrays, "mkl.gemm_add_mkl(a, w0, c0, r)",
                     checks=(_product_check(name, arrays[1], "c0"), (bad, f"{name}: r of c's shape expected")))
    fmt = WIDENED.get(name, "bf16w" if name == "gemm_bf16_mkl" else "")
    count = int(name[4]) if name[4].isdigit() else 1
    arrays, checks = [Array("a", "uint16" if name == "gemm_bf16_mkl" else "float32")], []
    for i in range(count):
        weights = _weights(fmt, i)
        arrays += weights + [Array(f"c{i}", output=True)]
        checks.append(_product_check(name, weights[0], f"c{i}"))
    module = "gemm_widen" if name in WIDENED else "mkl"
    return Entry(symbol, __name__, tuple(arrays), f"{module}.{name}({', '.join(a.name for a in arrays)})",
                 checks=tuple(checks))


def key(name: str) -> tuple:
    """What the emitter records for a call of `name` (`entries.binding_lines`)."""
    return (name, FAMILY, (name,))


register(FAMILY, entry)


def _caller(name: str):
    e = entry(name)
    return caller(name, [a.name for a in e.arrays] + list(e.ints), FAMILY, lambda args: (name,))


(gemm_mkl, gemm2_mkl, gemm3_mkl, gemm_add_mkl, gemm_bf16_mkl, gemm_int8_mkl, gemm2_int8_mkl, gemm3_int8_mkl,
 gemm_bf16w_mkl, gemm2_bf16w_mkl, gemm3_bf16w_mkl) = (_caller(n) for n in NAMES)
