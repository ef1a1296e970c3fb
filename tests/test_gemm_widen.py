"""Prefill GEMMs over int8 and bf16 weights (`backends/numba_cpu/gemm_widen.py`): each thread widens its own
weight tiles and multiplies them with MKL's sgemm; without MKL, the OpenBLAS kernels as before."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import fusec
from fusec.backends.numba_cpu import gemm_widen, mkl
from fusec.backends.numba_cpu.lowp import gemm_int8
from fusec.passes.weights import quantize_int8
from fusec.semantics import quantize_activations
from test_gemm_blas import ROWS, block, numba_threads  # noqa: F401 (block: a fixture)

INT8_TOLERANCE = 0.05  # as tests/test_weights_int8.py: of the fp32 output's largest magnitude


def _int8(rng, n, k):
    w = torch.from_numpy(rng.standard_normal((n, k), dtype=np.float32))
    q, s = (x.numpy() for x in quantize_int8(w))
    return q, s, (q.astype(np.float32) * s).reshape(n, k)


def _bf16(rng, n, k):
    bits = (rng.standard_normal((n, k), dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return bits, (bits.astype(np.uint32) << 16).view(np.float32)


def _windows(m, widths):
    """Outputs that are column windows of wider NaN-filled arrays (so a write outside shows)."""
    wide = [np.full((m, n + 9), np.nan, np.float32) for n in widths]
    return wide, [x[:, 4:4 + n] for x, n in zip(wide, widths)]


def _check(wide, outs, wants):
    for x, c, want in zip(wide, outs, wants):
        np.testing.assert_allclose(c, want, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(want).max()))
        assert np.isnan(x[:, :4]).all() and np.isnan(x[:, 4 + c.shape[1]:]).all()


# widths: one product narrower than a thread's block, a block straddling products, N no multiple of the
# 16-column alignment nor of the tile; the tile holds few rows at the largest K (several tiles a thread)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("m,k,widths", [(100, 64, (300, 7, 45)), (65, 96, (33, 100)), (130, 32, (1,)),
                                        (70, 16384, (70, 3, 2))])
def test_int8_gemms_equal_quantized_activations_times_dequantized_weights(threads, m, k, widths):
    rng = np.random.default_rng(k)
    a = rng.standard_normal((m, k), dtype=np.float32)
    weights = [_int8(rng, n, k) for n in widths]
    wants = [quantize_activations(a) @ dense.T for _, _, dense in weights]
    fn = {1: gemm_widen.gemm_int8_mkl, 2: gemm_widen.gemm2_int8_mkl, 3: gemm_widen.gemm3_int8_mkl}[len(widths)]
    with numba_threads(threads):
        wide, outs = _windows(m, widths)
        fn(a, *[x for (q, s, _), c in zip(weights, outs) for x in (q, s, c)])
    _check(wide, outs, wants)
    if k == 16384:
        assert gemm_widen.tile_rows(k) < max(widths)  # several tiles a thread


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("m,k,widths", [(100, 64, (300, 7, 45)), (65, 33, (33, 100)), (130, 5, (1,)),
                                        (70, 16387, (70, 3, 2))])
def test_bf16_widened_gemms_equal_float32_activations_times_widened_weights(threads, m, k, widths):
    rng = np.random.default_rng(k)
    a = rng.standard_normal((m, k), dtype=np.float32)
    weights = [_bf16(rng, n, k) for n in widths]
    wants = [a.astype(np.float64) @ dense.T.astype(np.float64) for _, dense in weights]
    fn = {1: gemm_widen.gemm_bf16w_mkl, 2: gemm_widen.gemm2_bf16w_mkl, 3: gemm_widen.gemm3_bf16w_mkl}[len(widths)]
    with numba_threads(threads):
        wide, outs = _windows(m, widths)
        fn(a, *[x for (bits, _), c in zip(weights, outs) for x in (bits, c)])
    _check(wide, outs, wants)


def test_int8_gemm_refuses_k_that_is_not_whole_blocks():
    rng = np.random.default_rng(0)
    q, s, _ = _int8(rng, 20, 64)
    c = np.empty((70, 20), np.float32)
    with pytest.raises(ValueError, match=r"weights must be \[N, K/32, 32\] for activations \[M, K\]"):
        gemm_widen.gemm_int8_mkl(rng.standard_normal((70, 60), dtype=np.float32), q, s, c)
    q2, s2, _ = _int8(rng, 20, 96)
    with pytest.raises(ValueError, match=r"weights must be \[N, K/32, 32\]"):
        gemm_widen.gemm2_int8_mkl(rng.standard_normal((70, 64), dtype=np.float32), q, s, c, q2, s2, c)


def test_int8_gemm_non_contiguous_activations_and_non_finite_blocks():
    """A column window of a wider activation array; a block holding inf makes its row NaN (as reference)."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((80, 128 + 8), dtype=np.float32)[:, 4:132]
    a[3, 40] = np.inf
    q, s, dense = _int8(rng, 50, 128)
    c = np.empty((80, 50), np.float32)
    gemm_widen.gemm_int8_mkl(a, q, s, c)
    want = quantize_activations(np.ascontiguousarray(a)) @ dense.T
    assert np.isnan(c[3]).all()
    keep = np.arange(80) != 3
    np.testing.assert_allclose(c[keep], want[keep], rtol=1e-4, atol=1e-4 * np.abs(want[keep]).max())


def _gemm_calls(compiled):
    return [re.findall(r"\b(gemm\w*?)\(", c.source) for c in compiled.program.codes if c.loop == "gemm"]


def test_int8_prefill_runs_the_per_thread_mkl_gemms_and_matches_eager(block):
    """Q, K and V in one call, W1 and W3 in one, the activations quantized once per call; the same numbers
    as the OpenBLAS kernel (`gemm_int8`), within the int8 tolerance of fp32 eager."""
    module, args, want = block
    compiled = fusec.compile(module, args, weights="int8")
    assert compiled.stats["blas"] in ("onednn", "mkl")  # (widened tiles: MKL's sgemm either way)
    calls = _gemm_calls(compiled)
    assert ["gemm3_int8_mkl"] in calls and ["gemm2_int8_mkl"] in calls and ["gemm_int8_mkl"] in calls, calls
    assert "gemm_int8(" not in compiled.source
    got = compiled(*args)
    err = (got - want).abs().max().item()
    assert 0 < err <= INT8_TOLERANCE * want.abs().max().item()


def test_bf16_prefill_without_bf16_products_widens_the_weights(block, monkeypatch):
    """On a CPU without bf16 products (MKL would emulate its bf16 GEMM, slower than this), bf16 weights are
    widened per thread for sgemm, the activations kept float32: Q, K, V in one call, W1 and W3 in one."""
    monkeypatch.setattr(mkl, "_target_features", lambda: {"avx512f", "avx512vnni"})
    module, args, want = block
    compiled = fusec.compile(module, args, weights="bf16")
    assert compiled.stats["blas"] in ("onednn", "mkl")  # (widened tiles: MKL's sgemm either way)
    calls = _gemm_calls(compiled)
    assert ["gemm3_bf16w_mkl"] in calls and ["gemm2_bf16w_mkl"] in calls and ["gemm_bf16w_mkl"] in calls, calls
    assert "gemm_bf16_mkl(" not in compiled.source and "bf16_bits(" not in compiled.source
    err = (compiled(*args) - want).abs().max().item()
    assert 0 < err <= 1e-2 * want.abs().max().item()


def test_without_mkl_int8_and_bf16_prefill_take_the_openblas_kernels(block, monkeypatch):
    """MKL missing (or FUSEC_BLAS=openblas): the tile-by-tile OpenBLAS kernels, reported as such (the
    compile stats said "none" for an int8 program before), with the MKL path's numbers."""
    module, args, _ = block
    monkeypatch.setattr(mkl, "_target_features", lambda: {"avx512f"})
    with_mkl = {weights: fusec.compile(module, args, weights=weights)(*args) for weights in ("int8", "bf16")}
    monkeypatch.setattr(mkl, "UNAVAILABLE", "torch's CPU library exports no sgemm_")
    for weights, kernel in (("int8", "gemm_int8("), ("bf16", "gemm_bf16(")):
        compiled = fusec.compile(module, args, weights=weights)
        assert compiled.stats["blas"] == "openblas", compiled.stats
        assert compiled.stats["blas_note"].startswith("MKL unavailable")
        assert kernel in compiled.source and "_mkl(" not in compiled.source
        torch.testing.assert_close(compiled(*args), with_mkl[weights], rtol=1e-4, atol=1e-4)


def test_gemm_int8_kernels_agree():
    """The OpenBLAS kernel and the MKL one compute the same product."""
    rng = np.random.default_rng(2)
    a = rng.standard_normal((90, 96), dtype=np.float32)
    q, s, _ = _int8(rng, 41, 96)
    c0, c1 = np.empty((90, 41), np.float32), np.empty((90, 41), np.float32)
    gemm_int8(a, q, s, c0)
    gemm_widen.gemm_int8_mkl(a, q, s, c1)
    np.testing.assert_allclose(c0, c1, rtol=1e-5, atol=1e-5 * np.abs(c0).max())
