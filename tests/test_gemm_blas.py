"""GEMM kernels at prefill sizes (more than 64 rows, a row count no tile divides) against PyTorch: MKL's
sgemm and bf16 GEMM from torch's CPU library, the OpenBLAS fallback, and prologues/epilogues over the
parallel row blocks the tiling pass chooses."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from contextlib import contextmanager

import numba
import numpy as np
import pytest
import torch

import fusec
from fusec.backends.numba_cpu import mkl
from fusec.errors import FusecError
from fusec.models import load_model


@contextmanager
def numba_threads(threads: int):
    """Numba's thread count set to `threads` (at most its pool) inside, restored after."""
    before = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        yield
    finally:
        numba.set_num_threads(before)

ROWS = 100  # prefill rows: over the matrix-vector limit (64) and no multiple of 8, 16 or 64


@pytest.fixture(scope="module")
def block():
    module, args = load_model("llama-block:stories15M", seq_len=ROWS)
    with torch.no_grad():
        want = module(*args)
    return module, args, want


def _close(got, want, rel):
    """Max error within `rel` of the output's scale (a block's outputs are O(1) with outliers)."""
    err = (got - want).abs().max().item()
    assert err <= rel * want.abs().max().item(), f"max error {err} over {rel} x {want.abs().max().item()}"
    return err


def _matmul_kernels(compiled):
    return [n for n in compiled.graph.nodes if n.op == "kernel" and n.attr("kind") == "matmul"]


def test_prefill_gemms_call_mkl_and_match_eager(block):
    module, args, want = block
    compiled = fusec.compile(module, args)
    assert compiled.stats["blas"] == "onednn" and "blas_note" not in compiled.stats  # MKL's blocks on oneDNN
    assert re.search(r"\bgemm(\d|_add)?_mkl\(", compiled.source) and not re.search(r"\bgemm\(", compiled.source)
    _close(compiled(*args), want, 1e-5)


def test_prologue_and_epilogue_run_over_the_tiled_row_blocks(block):
    """Every GEMM kernel's prologue and epilogue are parallel loops over blocks of the `rows` tile the
    tiling pass chose (the numbers `fusec dump --stage tiled` prints), not serial loops."""
    module, args, _ = block
    compiled = fusec.compile(module, args)
    kernels = _matmul_kernels(compiled)
    assert kernels
    for node, code in zip(kernels, [c for c in compiled.program.codes if c.loop == "gemm"]):
        if "gemm_add_mkl(" in code.source:  # a projection plus residual: one call, neither around it
            continue
        rows = dict(node.attr("tiles"))["rows"]
        assert 8 <= rows < ROWS and rows % 8 == 0
        # the prologue (a norm into the A tile) or the first epilogue loop: blocks of `rows` rows
        assert re.search(rf"for (\w+) in prange\({-(-ROWS // rows)}\):\n\s+for \w+ in range\(\1 \* {rows}, "
                         rf"min\({ROWS}, \1 \* {rows} \+ {rows}\)\)", code.source), code.source
        assert "prange(" in re.split(r"gemm\d?_mkl\(", code.source)[-1]  # the epilogue after the last GEMM too


def test_products_of_one_kernel_share_one_parallel_gemm_call(block):
    """Q, K and V (and W1 and W3) are one `gemm3_mkl` (`gemm2_mkl`) call: one parallel loop over the
    columns of all of them, not one loop per product with the narrow K and V split in narrower calls."""
    module, args, want = block
    compiled = fusec.compile(module, args)
    calls = [re.findall(r"\b(gemm\d?_mkl)\(", c.source) for c in compiled.program.codes if c.loop == "gemm"]
    assert ["gemm3_mkl"] in calls and ["gemm2_mkl"] in calls, calls
    _close(compiled(*args), want, 1e-5)


def test_attention_projection_outputs_share_one_parallel_loop(block):
    """Q and K with their RoPE and V, the three outputs of the projection kernel, are written by one
    parallel loop after the GEMM (each iteration a share of each), not by a parallel loop each."""
    module, args, want = block
    compiled = fusec.compile(module, args)
    qkv = [c.source for c in compiled.program.codes if "gemm3_mkl(" in c.source]
    assert len(qkv) == 1
    epilogue = qkv[0].split("gemm3_mkl(")[-1]
    assert epilogue.count("prange(") == 1 and epilogue.count("o0[") and epilogue.count("o2["), epilogue
    _close(compiled(*args), want, 1e-5)


def test_rows_tile_gives_every_core_a_block():
    from fusec.machines import cpu
    from fusec.tracing import trace
    from fusec.passes.pipeline import run_pipeline
    module, args = load_model("llama-block:stories15M", seq_len=ROWS)
    graph = run_pipeline(trace(module, args).graph, until="tiled")
    cores = cpu().cores
    for node in graph.nodes:
        if node.op == "kernel" and node.attr("kind") == "matmul":
            rows = dict(node.attr("tiles"))["rows"]
            assert -(-ROWS // rows) >= min(cores, ROWS // 8)


def test_openblas_when_asked_or_when_mkl_is_missing(block, monkeypatch):
    module, args, want = block
    monkeypatch.setenv("FUSEC_BLAS", "openblas")
    compiled = fusec.compile(module, args)
    assert compiled.stats["blas"] == "openblas" and compiled.stats["blas_note"] == "FUSEC_BLAS=openblas"
    assert re.search(r"\bgemm\(", compiled.source) and "_mkl(" not in compiled.source
    _close(compiled(*args), want, 1e-5)
    monkeypatch.delenv("FUSEC_BLAS")
    monkeypatch.setattr(mkl, "UNAVAILABLE", "torch's CPU library exports no sgemm_")
    assert mkl.blas_choice() == ("openblas", "MKL unavailable: torch's CPU library exports no sgemm_")
    monkeypatch.setenv("FUSEC_BLAS", "mkl")
    with pytest.raises(FusecError, match="FUSEC_BLAS=mkl, but MKL cannot be used: .*sgemm_"):
        mkl.blas_choice()
    monkeypatch.setenv("FUSEC_BLAS", "atlas")
    with pytest.raises(FusecError, match="FUSEC_BLAS must be one of onednn, mkl, openblas .*'atlas'"):
        mkl.blas_choice()


@pytest.mark.parametrize("threads", [1, 2])
def test_gemm_mkl_shapes_strides_and_threads(threads):
    """Odd shapes, both layouts of B, an output that is a column window of a wider array; MKL's thread
    setting and torch's are left as they were (MKL runs single-threaded on each Numba thread)."""
    rng = np.random.default_rng(threads)
    torch_threads = torch.get_num_threads()
    with numba_threads(threads):
        for m, k, n in [(100, 96, 200), (257, 130, 77), (65, 7, 1), (3, 5, 33)]:
            a = rng.standard_normal((m, k), dtype=np.float32)
            w = rng.standard_normal((n, k), dtype=np.float32)
            want = a.astype(np.float64) @ w.T.astype(np.float64)
            wide = np.full((m, n + 20), np.nan, np.float32)
            mkl.gemm_mkl(a, w, wide[:, 7:7 + n], True)
            np.testing.assert_allclose(wide[:, 7:7 + n], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
            assert np.isnan(wide[:, :7]).all() and np.isnan(wide[:, 7 + n:]).all()
            c = np.full((m, n), np.nan, np.float32)
            mkl.gemm_mkl(a, np.ascontiguousarray(w.T), c, False)
            np.testing.assert_allclose(c, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert torch.get_num_threads() == torch_threads


@pytest.mark.parametrize("threads", [1, 2])
def test_joint_gemms_split_the_columns_of_all_products(threads):
    """gemm2_mkl / gemm3_mkl over odd widths (a thread's block straddles products, one product narrower
    than a block, one with no columns), outputs that are column windows of wider arrays."""
    rng = np.random.default_rng(threads)
    with numba_threads(threads):
        for m, k, widths in [(70, 40, (50, 3, 29)), (33, 17, (0, 65, 1)), (5, 9, (100, 20))]:
            a = rng.standard_normal((m, k), dtype=np.float32)
            ws = [rng.standard_normal((n, k), dtype=np.float32) for n in widths]
            wides = [np.full((m, n + 9), np.nan, np.float32) for n in widths]
            args = [x for w, wide in zip(ws, wides) for x in (w, wide[:, 4:4 + w.shape[0]])]
            (mkl.gemm3_mkl if len(widths) == 3 else mkl.gemm2_mkl)(a, *args)
            for w, wide in zip(ws, wides):
                want = a.astype(np.float64) @ w.T.astype(np.float64)
                got = wide[:, 4:4 + w.shape[0]]
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(want).max(initial=0)))
                assert np.isnan(wide[:, :4]).all() and np.isnan(wide[:, 4 + w.shape[0]:]).all()


@pytest.mark.parametrize("threads", [1, 2])
def test_gemm_add_mkl_adds_the_product_to_the_residual(threads):
    """c = r + a @ w^T over odd shapes, into a column window of a wider array, and in place (r is c)."""
    rng = np.random.default_rng(threads)
    with numba_threads(threads):
        for m, k, n in [(100, 96, 200), (257, 130, 77), (65, 7, 1), (3, 5, 33)]:
            a = rng.standard_normal((m, k), dtype=np.float32)
            w = rng.standard_normal((n, k), dtype=np.float32)
            r = rng.standard_normal((m, n), dtype=np.float32)
            want = r + a.astype(np.float64) @ w.T.astype(np.float64)
            wide = np.full((m, n + 20), np.nan, np.float32)
            mkl.gemm_add_mkl(a, w, wide[:, 7:7 + n], r)
            np.testing.assert_allclose(wide[:, 7:7 + n], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
            assert np.isnan(wide[:, :7]).all() and np.isnan(wide[:, 7 + n:]).all()
            mkl.gemm_add_mkl(a, w, r, r)
            np.testing.assert_allclose(r, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


class _Residual(torch.nn.Module):
    """x + x @ W^T (or the product first), plus a row bias that is no residual (same last axis only)."""

    def __init__(self, width: int, product_first: bool, bias: bool):
        super().__init__()
        self.proj = torch.nn.Linear(width, width, bias=False)
        self.row = torch.nn.Parameter(torch.randn(width)) if bias else None
        self.product_first = product_first

    def forward(self, x):
        y = self.proj(x)
        y = y + x if self.product_first else x + y
        return y + self.row if self.row is not None else y


@pytest.mark.parametrize("rank, product_first, bias", [(3, False, False), (2, True, False), (3, True, True)])
def test_residual_projection_is_one_gemm_add_call(rank, product_first, bias):
    """A projection plus residual over more rows than the matrix-vector limit (and no multiple of the
    tiles) is one `gemm_add_mkl` call with no epilogue, equal to eager; with a bias added after it, the
    kernel is no plain residual sum and keeps its GEMM and epilogue."""
    torch.manual_seed(rank)
    module = _Residual(48, product_first, bias).eval()
    x = torch.randn((1, ROWS, 48) if rank == 3 else (ROWS, 48))
    with torch.no_grad():
        want = module(x)
    compiled = fusec.compile(module, (x,))
    folded = "gemm_add_mkl(" in compiled.source
    assert folded != bias, compiled.source
    if folded:
        assert "prange(" not in compiled.source.split("gemm_add_mkl(")[-1]
    _close(compiled(x), want, 1e-5)


def test_block_residual_projections_fold_into_the_gemm(block):
    """The attention output and MLP down projections of a block add the residual in the GEMM."""
    module, args, want = block
    compiled = fusec.compile(module, args)
    assert len(re.findall(r"gemm_add_mkl\(", compiled.source)) >= 1
    codes = [c for c in compiled.program.codes if "gemm_add_mkl(" in c.source]
    assert len(codes) == 2, [c.name for c in compiled.program.codes]  # o-proj and down-proj call sites
    _close(compiled(*args), want, 1e-5)


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.bfloat16().view(torch.int16).numpy().view(np.uint16)


def test_gemm_bf16_mkl_is_exact_products_summed_in_float32():
    rng = np.random.default_rng(0)
    m, k, n = 130, 200, 90
    a = torch.from_numpy(rng.standard_normal((m, k), dtype=np.float32)).bfloat16()
    w = torch.from_numpy(rng.standard_normal((n, k), dtype=np.float32)).bfloat16()
    c = np.full((m, n), np.nan, np.float32)
    mkl.gemm_bf16_mkl(_bits(a), _bits(w), c)
    want = a.double() @ w.double().T  # bf16 x bf16 products are exact in float32; only the sums round
    np.testing.assert_allclose(c, want.numpy(), rtol=0, atol=1e-5 * want.abs().max().item())


def test_bf16_bits_rounds_as_torch():
    from numba import njit

    @njit
    def convert(x, out):
        for i in range(x.size):
            out[i] = mkl.bf16_bits(x[i])

    rng = np.random.default_rng(0)
    special = [np.inf, -np.inf, 3.4e38, -3.4e38, 0.0, -0.0, 1e-40, -1e-45, 1.00390625, 1.01171875]
    x = np.concatenate([rng.standard_normal(20000).astype(np.float32) * 1e3, np.float32(special)])
    out = np.empty(x.size, np.uint16)
    convert(np.append(x, np.float32(np.nan)), np.append(out, np.uint16(0)))  # (warms the NaN branch too)
    convert(x, out)
    np.testing.assert_array_equal(out, _bits(torch.from_numpy(x)))
    nan = np.empty(1, np.uint16)
    convert(np.float32([np.nan]), nan)
    assert np.isnan(torch.from_numpy(nan.view(np.int16)).view(torch.bfloat16).float().item())


def test_bf16_weights_at_prefill_use_the_bf16_gemm_on_a_cpu_with_bf16_products(block, monkeypatch):
    """weights="bf16" at prefill where the CPU multiplies bf16 fast (AVX512-BF16 or AMX-BF16; MKL emulates them
    elsewhere, so this runs on any CPU): activations rounded to bf16 (to nearest even) in the prologue, bf16
    x bf16 products summed in float32, everything else float32. Closer to fp32 than eager bf16 (which also
    rounds every op's result, the GEMM outputs included); within 0.2% of the output's scale of fp32 eager.
    (Without bf16 products the weights are widened instead: tests/test_gemm_widen.py.)"""
    monkeypatch.setattr(mkl, "_target_features", lambda: {"avx512f", "avx512bf16"})
    monkeypatch.setenv("FUSEC_BF16_GEMM", "mkl")  # where it measured faster (`bf16_gemm_choice`)
    module, args, want = block
    compiled = fusec.compile(module, args, weights="bf16")
    assert "gemm_bf16_mkl(" in compiled.source and "bf16_bits(" in compiled.source
    err = _close(compiled(*args), want, 2e-3)
    assert err > 0  # the weights and activations really are rounded
    eager_bf16 = load_model("llama-block:stories15M", seq_len=ROWS)[0].bfloat16()
    with torch.no_grad():
        eager_err = (eager_bf16(args[0].bfloat16()).float() - want).abs().max().item()
    assert err < eager_err


CACHED_RUN = """
import torch, fusec
torch.manual_seed(0)
module = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.SiLU()).eval()
x = torch.randn(80, 64)
compiled = fusec.compile(module, (x,))
with torch.no_grad():
    want = module(x)
assert compiled.stats["blas"] == "onednn", compiled.stats
torch.testing.assert_close(compiled(x), want, rtol=1e-4, atol=1e-5)
print("ok")
"""


def test_a_cached_mkl_kernel_runs_in_a_new_process(tmp_path):
    """The second process loads the kernel's machine code from the disk cache: MKL's symbols must be
    resolvable by then (bound by name when the generated module imports `mkl.py`)."""
    env = {**os.environ, "FUSEC_CACHE_DIR": str(tmp_path)}
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", CACHED_RUN], env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]
