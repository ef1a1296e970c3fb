"""Prefill attention's two products as MKL GEMMs per (head, query block, key block) (`attention_gemm.py`):
the same answers as eager, tiles that do not divide the sequence, grouped-query heads, and a NaN or inf in
one token spreading to the same rows as in eager (a masked key inside a computed tile weighs exactly 0,
and 0 * inf is nan there as in eager)."""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch

import fusec
import fusec.passes.tile
from fusec.backends.numba_cpu import mkl
from fusec.machines import KiB, get_machine
from fusec.models.llama import LlamaBlock, LlamaConfig

pytestmark = [pytest.mark.filterwarnings("ignore::numba.NumbaPerformanceWarning"),
              pytest.mark.skipif(bool(mkl.UNAVAILABLE), reason=f"MKL unavailable: {mkl.UNAVAILABLE}")]
SEQ = 40


def kernel_source(source: str, kind: str) -> str:
    return source.split(f"kind={kind}\n", 1)[1].split("\n\n\n", 1)[0]


@pytest.fixture(scope="module")
def block_and_program(tmp_path_factory):
    """A grouped-query block (4 heads over 2 K/V heads) on a cpu whose caches make tiles of 16 query rows
    and 32 keys: neither divides the 40 tokens."""
    machine = dataclasses.replace(get_machine("test_cpu"), cores=2, l1_bytes=5 * KiB, l2_bytes=16 * KiB, pmu_bytes=16 * KiB)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fusec.passes.tile, "cpu", lambda: machine)
        mp.setenv("FUSEC_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        mp.delenv("FUSEC_BLAS", raising=False)
        torch.manual_seed(0)
        block = LlamaBlock(dataclasses.replace(LlamaConfig.tiny(), n_kv_heads=2)).eval()
        for p in block.parameters():
            torch.nn.init.normal_(p, std=0.2)
        x = torch.randn(1, SEQ, block.config.dim)
        return block, x, fusec.compile(block, (x, 0))


def test_prefill_attention_products_are_gemms_and_match_eager(block_and_program):
    block, x, program = block_and_program
    attention = kernel_source(program.source, "attention")
    assert "flash_block_gemm(" in attention, attention  # S = Q.K^T and P.V per block, in the library
    assert "for c in prange(" in attention
    # the tiles: neither divides 40 tokens
    assert "oacc = np.empty((16, 16), np.float32)" in attention and ", 32, oacc[:i1 - i0])" in attention
    with torch.no_grad():
        torch.testing.assert_close(program(x, 0), block(x, 0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("token", [0, 17, SEQ - 1])
def test_nonfinite_token_makes_the_same_rows_nan_as_eager(block_and_program, value, token):
    block, x, program = block_and_program
    x = x.clone()
    x[0, token, 5] = value
    with torch.no_grad():
        want = block(x, 0)
    got = program(x, 0)
    assert torch.equal(got.isnan(), want.isnan()), (got.isnan().any(-1), want.isnan().any(-1))
    finite = ~want.isnan()
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-5)


def test_causal_mask_is_not_read(block_and_program):
    """The key loop stops at the causal limit, so the constant mask is False wherever it runs: it is not
    read (the library takes each row's limit). A row's max and sum run in 16 lanes there; rows of 1..40
    keys against key blocks of 32 exercise every tail length."""
    block, x, program = block_and_program
    attention = kernel_source(program.source, "attention")
    assert not re.search(r"\bc\d+\[", attention), attention  # the mask constant is an argument, never read
    assert "lims[i - i0] = min(40, (i) + 1)" in attention, attention
    with torch.no_grad():
        torch.testing.assert_close(program(x, 0), block(x, 0), rtol=1e-5, atol=1e-5)


def test_grouped_query_keys_and_values_are_read_in_place(block_and_program):
    """K and V rows lie in the projection's output, key after key: each key block is a slice the GEMMs
    read in place, not a copy per head (two heads share each K/V head here)."""
    block, x, program = block_and_program
    attention = kernel_source(program.source, "attention")
    assert "kbuf" not in attention and "vbuf" not in attention, attention
    assert re.search(r"flash_block_gemm\(a\d+\[.*, i0:i1\], a\d+\[0, .*, 0:klim\], a\d+\[0, .*, 0:40\]",
                     attention), attention
    with torch.no_grad():
        torch.testing.assert_close(program(x, 0), block(x, 0), rtol=1e-5, atol=1e-5)


class TokenMajorAttention(torch.nn.Module):
    """Causal attention over K (and V, or not) given token-major [B, T, H, D]: a key's row is not the
    array's axis before the row, so that operand is packed per key block."""

    def __init__(self, t: int, v_token_major: bool):
        super().__init__()
        self.register_buffer("mask", torch.ones(t, t, dtype=torch.bool).triu(1))
        self.v_token_major = v_token_major

    def forward(self, q, k, v):
        k = k.transpose(1, 2)
        v = v.transpose(1, 2) if self.v_token_major else v
        s = (q @ k.transpose(-1, -2) / 4.0).masked_fill(self.mask, float("-inf"))
        return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("v_token_major", [False, True])
def test_keys_that_are_not_rows_of_one_array_are_packed(monkeypatch, tmp_path, v_token_major):
    monkeypatch.setenv("FUSEC_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FUSEC_BLAS", raising=False)
    t = 37
    torch.manual_seed(1)
    q = torch.randn(1, 2, t, 16)
    k = torch.randn(1, t, 2, 16)
    v = torch.randn(1, t, 2, 16) if v_token_major else torch.randn(1, 2, t, 16)
    module = TokenMajorAttention(t, v_token_major).eval()
    program = fusec.compile(module, (q, k, v))
    attention = kernel_source(program.source, "attention")
    assert "flash_block_gemm(" in attention and "kbuf[:klim - 0]" in attention, attention
    assert ("vbuf[:klim - 0]" in attention) == v_token_major, attention
    with torch.no_grad():
        torch.testing.assert_close(program(q, k, v), module(q, k, v), rtol=1e-5, atol=1e-5)


class MaskedAttention(torch.nn.Module):
    """softmax(q.k^T / 4 with a constant mask) @ v."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, q, k, v):
        s = (q @ k.transpose(-1, -2) / 4.0).masked_fill(self.mask, float("-inf"))
        return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("window", [None, 5])
def test_a_mask_that_is_not_causal_is_still_read(monkeypatch, tmp_path, window):
    """Causal: the mask is not read, the attention library takes each row's limit. A sliding window (keys
    more than `window` back are masked too) is no causal limit: the generated key loop runs over every
    key and reads the mask at each."""
    monkeypatch.setenv("FUSEC_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FUSEC_BLAS", raising=False)
    t = 37
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    mask = (j > i) | ((i - j > window) if window else torch.zeros(t, t, dtype=torch.bool))
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, t, 16) for _ in range(3))
    module = MaskedAttention(mask).eval()
    program = fusec.compile(module, (q, k, v))
    attention = kernel_source(program.source, "attention")
    assert ("flash_block_gemm(" in attention) == (window is None), attention
    assert ("gemm_tile_mkl(" in attention) == (window is not None), attention
    assert bool(re.search(r"\bc\d+\[", attention)) == (window is not None), attention
    with torch.no_grad():
        torch.testing.assert_close(program(q, k, v), module(q, k, v), rtol=1e-5, atol=1e-5)


def test_openblas_keeps_the_scalar_loops(monkeypatch, tmp_path):
    monkeypatch.setenv("FUSEC_BLAS", "openblas")
    monkeypatch.setenv("FUSEC_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    block = LlamaBlock(LlamaConfig.tiny()).eval()
    x = torch.randn(1, 24, block.config.dim)
    program = fusec.compile(block, (x, 0))
    assert "gemm_tile_mkl(" not in program.source and "for c in prange(" in program.source
    with torch.no_grad():
        torch.testing.assert_close(program(x, 0), block(x, 0), rtol=1e-5, atol=1e-5)
