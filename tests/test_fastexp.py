"""`exp32`, the float32 exp generated kernels call (`fastexp.py`): about 1 ulp from the exact value over
the whole float32 range, the same special values and subnormal results as libm, and what `exp` and
`sigmoid` of float32 compile to (float64 keeps np.exp)."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from numba import njit

import fusec
from fusec.backends.numba_cpu.fastexp import exp32


@njit(error_model="numpy")
def _exp_all(x, out):
    for i in range(x.size):
        out[i] = exp32(x[i])


def _exp(x: np.ndarray) -> np.ndarray:
    out = np.empty_like(x)
    _exp_all(x, out)
    return out


def test_exp32_is_within_about_one_ulp_everywhere():
    x = np.linspace(-110, 90, 1 << 20, dtype=np.float32)
    x = np.concatenate([x, np.linspace(-1, 1, 1 << 16, dtype=np.float32)])
    exact = np.exp(x.astype(np.float64))
    normal = (exact > np.finfo(np.float32).tiny) & (exact < np.finfo(np.float32).max)
    with np.errstate(over="ignore"):
        spacing = np.spacing(exact.astype(np.float32))
    ulps = np.abs(_exp(x).astype(np.float64) - exact)[normal] / spacing[normal]
    assert ulps.max() <= 1.5, ulps.max()


def test_exp32_special_values_match_libm():
    x = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, 88.72283, 88.7229, 89.0, -87.5, -100.0, -103.9, -104.0,
                  -200.0, 1e-30, -1e-30], np.float32)
    with np.errstate(over="ignore"):
        want = np.exp(x)
    got = _exp(x)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    np.testing.assert_array_equal(got == 0, want == 0)  # subnormal results are kept, down to 2^-149
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=3e-7, atol=0)


class _Gates(torch.nn.Module):
    def forward(self, x, y):
        return torch.sigmoid(x) * torch.exp(x), torch.exp(y)


def test_float32_exp_and_sigmoid_compile_to_exp32(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSEC_CACHE_DIR", str(tmp_path))
    x = torch.linspace(-120, 100, 4096).reshape(4, 1024)
    x[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    y = torch.linspace(-5, 5, 64, dtype=torch.float64)
    compiled = fusec.compile(_Gates(), (x, y))
    body = compiled.source.split("FASTMATH = ", 1)[1]
    assert "exp32(" in body and "np.exp(" in body  # float64 keeps libm's exp
    got, want = compiled(x, y), _Gates()(x, y)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=0, equal_nan=True)


def test_exp32_is_inlined_by_llvm_not_copied_by_numba():
    # Numba's inline="always" copied exp32's IR into every call site, where each kernel's parallel-loop
    # passes analysed it again (a fifth of an attention kernel's compile time); LLVM inlines it anyway
    assert exp32.targetoptions.get("inline", "never") == "never"

    @njit(fastmath={"contract", "afn"}, error_model="numpy")
    def loop(x, y):
        for i in range(x.shape[0]):
            y[i] = exp32(x[i])

    x = np.linspace(-5, 5, 64).astype(np.float32)
    y = np.empty_like(x)
    loop(x, y)
    np.testing.assert_allclose(y, np.exp(x), rtol=3e-7)
    ir = loop.inspect_llvm(loop.signatures[0])
    # exp32's code sits in the loop, vectorized, not behind a call per element
    assert re.search(r"<\d+ x float>", ir) and "exp32" not in "".join(
        line for line in loop.inspect_asm(loop.signatures[0]).splitlines() if "call" in line)
