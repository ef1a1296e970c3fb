"""The attention library (`attention_block.py`): the flash recurrence generated kernels call, against a
float64 NumPy reference (rows of 1 to 64 keys, primes, every row masked, a scale that multiplies, heads
not a multiple of 16, rows that are not one after the other), both products (vector rows and MKL GEMMs);
and through a compiled program against eager: one symbolic causal block with grouped-query heads at
several lengths up to its bound (decode steps: tests/test_attention_decode.py)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import fusec
from fusec.backends.numba_cpu import attention_block, mkl
from fusec.models.llama import LlamaBlock, LlamaConfig

pytestmark = pytest.mark.filterwarnings("ignore::numba.NumbaPerformanceWarning")
CALLS = [attention_block.flash_block_rows] + ([] if mkl.UNAVAILABLE else [attention_block.flash_block_gemm])


def reference(q, k, v, limits, scale, divide):
    """softmax(q.k^T / scale (or * scale)) . v over each row's keys below its limit, in float64; eager's
    nan for a row that sees no key and in the columns where a key it does not see holds an inf or nan."""
    out = np.empty((q.shape[0], v.shape[1]))
    for r, lim in enumerate(limits):
        s = q[r].astype(np.float64) @ k[:lim].T.astype(np.float64)
        s = s / scale if divide else s * scale
        p = np.exp(s - s.max()) if lim else s
        out[r] = p @ v[:lim] / p.sum() if lim else np.nan
        masked = ~np.isfinite(v[lim:]).all(axis=0)
        out[r, masked] = np.nan
    return out


def _case(rows: int, keys: int, depth: int, seed: int = 0):
    g = np.random.default_rng(seed)
    q, k, v = (g.standard_normal(shape, dtype=np.float32) for shape in ((rows, depth), (keys, depth), (keys, depth)))
    return q, k, v


@pytest.mark.parametrize("call", CALLS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("keys", [1, 2, 13, 17, 31, 64])
def test_causal_rows_match_the_reference(call, keys):
    """The last `rows` queries of a causal prefill (row r sees keys 0..keys - rows + r), key blocks of 16."""
    rows = min(keys, 7)
    q, k, v = _case(rows, keys, 48)
    limits = np.arange(keys - rows + 1, keys + 1, dtype=np.int64)
    out = np.empty((rows, 48), np.float32)
    call(q, k, v, limits, 6.9, True, 16, out)
    np.testing.assert_allclose(out, reference(q, k, v, limits, 6.9, True), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("call", CALLS, ids=lambda f: f.__name__)
def test_masked_rows_multiplying_scale_and_odd_depth(call):
    """A row that sees no key is nan, the others right; X = S * c; rows of 20 (no whole 16 lanes)."""
    q, k, v = _case(4, 29, 20, seed=1)
    limits = np.array([0, 5, 29, 17], np.int64)
    out = np.empty((4, 20), np.float32)
    call(q, k, v, limits, 0.25, False, 8, out)
    want = reference(q, k, v, limits, 0.25, False)
    assert np.isnan(out[0]).all()
    np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("call", CALLS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("value", [np.inf, np.nan])
def test_a_masked_nonfinite_value_makes_only_its_column_nan_in_the_rows_that_mask_it(call, value):
    q, k, v = _case(3, 24, 32, seed=2)
    v[20, 3] = value  # masked for rows with limits 10 and 20, seen by the row with 24
    v[4, 7] = value   # seen by every row: its column is inf or nan in each, as in the reference
    limits = np.array([10, 20, 24], np.int64)
    out = np.empty((3, 32), np.float32)
    call(q, k, v, limits, 4.0, True, 16, out)
    want = reference(q, k, v, limits, 4.0, True)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(want))
    assert np.isnan(out[:2, 3]).all()
    np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("call", CALLS, ids=lambda f: f.__name__)
def test_rows_that_are_not_one_after_the_other_are_copied(call):
    """Strided K (every other row of an array) and Q (a column slice): the same answers."""
    q, k, v = _case(5, 40, 64, seed=3)
    wide, strided = np.concatenate([q, q], axis=1), np.repeat(k, 2, axis=0)
    limits = np.array([36, 37, 38, 39, 40], np.int64)
    out, want = np.empty((5, 64), np.float32), np.empty((5, 64), np.float32)
    call(wide[:, :64], strided[::2], v, limits, 8.0, True, 16, out)
    call(q, k, v, limits, 8.0, True, 16, want)
    np.testing.assert_array_equal(out, want)


def test_one_symbolic_grouped_block_calls_the_library_and_matches_eager_at_every_length(tmp_path, monkeypatch):
    """A Llama block with 4 query heads over 2 K/V heads, one program for lengths 1..64 (its causal mask
    built from the length at run time)."""
    monkeypatch.setenv("FUSEC_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    block = LlamaBlock(dataclasses.replace(LlamaConfig.tiny(), n_kv_heads=2)).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    compiled = fusec.compile(block, (torch.randn(1, 8, block.config.dim),), dynamic={"x": {1: (1, 64)}})
    assert "flash_block_" in compiled.source, compiled.source
    for t in (1, 2, 17, 31, 64):
        x = torch.randn(1, t, block.config.dim)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), block(x), rtol=1e-5, atol=1e-5)


def test_extra_keys_stand_at_the_limit_in_place_of_the_stale_rows():
    """`flash_block_new`: a decode step's new key and value at the position (the row's limit), the cache's
    rows before it read in place; the cache's stale row at the position neither read nor checked, a masked
    value after it still makes its column nan; a row with every key masked but the new one."""
    q, k, v = _case(1, 40, 48, seed=3)
    kx, vx = _case(1, 1, 48, seed=4)[1:]
    for pos in (0, 17, 39):
        stale_k, stale_v = k.copy(), v.copy()
        stale_k[pos], stale_v[pos] = np.nan, np.inf
        full_k, full_v = k.copy(), v.copy()
        full_k[pos], full_v[pos] = kx[0], vx[0]
        out = np.empty((1, 48), np.float32)
        attention_block.flash_block_new(q, stale_k[:pos], stale_v, kx, vx, np.array([pos]), 6.9, True, 16, out)
        want = reference(q, full_k, full_v, [pos + 1], 6.9, True)
        np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-6)
        if pos < 39:
            stale_v[39, 5] = np.inf
            attention_block.flash_block_new(q, stale_k[:pos], stale_v, kx, vx, np.array([pos]), 6.9, True, 16, out)
            assert np.isnan(out[0, 5]) and not np.isnan(np.delete(out[0], 5)).any()
