"""The decode attention loops' two products with explicit vectors (`rowops`, `simd.row_intrinsics`):
Q.K as a 16-lane dot of the query and key rows, P.V as a vector update of the output row, both straight
from the operand arrays; heads whose rows are not whole 16-lane chunks sum Q.K in lane partial sums in
the generated source. The same answers as eager either way."""
from __future__ import annotations

import re

import numba
import numpy as np
import pytest
import torch

import fusec
from fusec.backends.numba_cpu.int8_dot import _target_features
from fusec.backends.numba_cpu.rowops import row_axpy, row_dot, row_finite, weighted_rows
from fusec.backends.numba_cpu.generated import HEADER
from fusec.models.causal_lm import DecodeStep, decode_example, random_model
from fusec.models.llama import LlamaConfig


class DecodeAttention(torch.nn.Module):
    """One query row against a cache, keys after the run-time position `pos` hidden (the decode step);
    `rep` query heads share each K/V head (grouped-query attention)."""

    def __init__(self, rep: int = 1):
        super().__init__()
        self.rep = rep

    def forward(self, q, k, v, pos):
        k, v = (x.repeat_interleave(self.rep, dim=1) for x in (k, v))
        key_index = torch.arange(k.shape[2]).view(1, k.shape[2])
        scores = (q @ k.transpose(-2, -1) / 8.0).masked_fill(key_index > pos, float("-inf"))
        return torch.softmax(scores, dim=-1) @ v


def _inputs(heads: int, kv_heads: int, keys: int, depth: int, pos: int):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, heads, 1, depth, generator=g), torch.randn(1, kv_heads, keys, depth, generator=g),
            torch.randn(1, kv_heads, keys, depth, generator=g), torch.tensor([pos]))


def _attention_source(compiled) -> str:
    return compiled.source.split("kind=attention\n", 1)[1].split("\n\n\n", 1)[0]


@pytest.mark.parametrize("rep", [1, 2])
def test_decode_products_are_vector_row_operations_and_match_eager(tmp_path, monkeypatch, rep):
    monkeypatch.setenv("FUSEC_CACHE_DIR", str(tmp_path))
    module, args = DecodeAttention(rep), _inputs(4, 4 // rep, 40, 64, 29)
    compiled = fusec.compile(module, args)
    attention = _attention_source(compiled)
    assert "s = row_dot(a0, (" in attention and "row_axpy(oacc, (r,), " in attention, attention
    torch.testing.assert_close(compiled(*args), module(*args), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif("fma" not in _target_features(), reason="needs a CPU with FMA instructions")
def test_decode_attention_machine_code_has_more_packed_than_scalar_fmas(tmp_path, monkeypatch):
    """Before: 8 packed FMAs (the exp's) against 34 scalar ones, Q.K one scalar chain and P.V unrolled
    into scalar FMAs; now the rows' products are packed. Compiled afresh from the generated text (machine
    code loaded from the cache cannot be inspected)."""
    monkeypatch.setenv("FUSEC_CACHE_DIR", str(tmp_path))
    module, args = DecodeAttention(), _inputs(2, 2, 24, 64, 20)
    compiled = fusec.compile(module, args)
    namespace: dict = {}
    exec(HEADER + _attention_source(compiled).replace("cache=True", "cache=False"), namespace)
    kernel = namespace["k0"]
    q, k, v, pos = (x.numpy() for x in args)
    out = np.empty((1, 2, 1, 64), np.float32)
    kernel(q, k, pos, v, np.arange(24).reshape(1, 24), out)
    np.testing.assert_allclose(out, module(*args).numpy(), rtol=1e-5, atol=1e-5)
    asm = kernel.inspect_asm(kernel.signatures[0])
    packed = re.findall(r"^\s*vfn?m(?:add|sub)\w*ps\s", asm, re.M)
    scalar = re.findall(r"^\s*vfn?m(?:add|sub)\w*ss\s", asm, re.M)
    assert len(packed) > len(scalar), (len(packed), len(scalar))


def test_heads_not_a_multiple_of_16_sum_in_lanes_and_match_eager(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSEC_CACHE_DIR", str(tmp_path))
    module, args = DecodeAttention(), _inputs(2, 2, 30, 24, 17)
    compiled = fusec.compile(module, args)
    attention = _attention_source(compiled)
    assert "row_dot" not in attention and "slane[l] += " in attention, attention
    torch.testing.assert_close(compiled(*args), module(*args), rtol=1e-5, atol=1e-5)


def test_row_operations_on_strided_arrays_take_the_plain_loops():
    @numba.njit
    def both(x, y, o):
        s = row_dot(x, (1,), y, (0,))
        row_axpy(o, (0,), y, (1,), np.float32(2.0))
        return s

    base = np.arange(4 * 64, dtype=np.float32).reshape(2, 128) / 100
    x, y = base[:, ::2], base[:, 1::2]  # not contiguous: the scalar loops
    o = np.ones((1, 64), np.float32)
    s = both(x, y, o)
    np.testing.assert_allclose(s, np.dot(x[1], y[0]), rtol=1e-5)
    np.testing.assert_allclose(o[0], 1 + 2 * y[1], rtol=1e-6)
    xc, yc, oc = np.ascontiguousarray(x), np.ascontiguousarray(y), np.ones((1, 64), np.float32)
    np.testing.assert_allclose(both(xc, yc, oc), s, rtol=1e-5)
    np.testing.assert_allclose(oc, o, rtol=1e-6)



class PastAndNew(torch.nn.Module):
    """Keys and values of the past and of this step concatenated (a Llama block's decode)."""

    def forward(self, q, k_past, v_past, k, v, pos):
        k_all, v_all = torch.cat((k_past, k), dim=2), torch.cat((v_past, v), dim=2)
        key_index = torch.arange(k_all.shape[2]).view(1, k_all.shape[2])
        scores = (q @ k_all.transpose(-2, -1) / 8.0).masked_fill(key_index > pos, float("-inf"))
        return torch.softmax(scores, dim=-1) @ v_all


def _chooses_rows_per_key(attention: str) -> None:
    assert re.search(r"s = \(row_dot\(.*\) if .* else row_dot\(", attention), attention
    assert re.search(r"\(row_axpy\(.*\) if .* else row_axpy\(", attention), attention


def test_past_and_new_rows_are_chosen_per_key_and_match_eager(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSEC_CACHE_DIR", str(tmp_path))
    q, k_past, v_past, pos = _inputs(2, 2, 24, 32, 24)
    k, v = torch.randn(1, 2, 1, 32), torch.randn(1, 2, 1, 32)
    module, args = PastAndNew(), (q, k_past, v_past, k, v, pos)
    compiled = fusec.compile(module, args)
    _chooses_rows_per_key(_attention_source(compiled))
    torch.testing.assert_close(compiled(*args), module(*args), rtol=1e-5, atol=1e-5)


def _compiled_decode_step(tmp_path, monkeypatch):
    """(compiled, eager, inputs) of a one-layer generator's `DecodeStep` at position 9 over random caches."""
    monkeypatch.setenv("FUSEC_CACHE_DIR", str(tmp_path))
    config = LlamaConfig(dim=128, n_heads=2, n_kv_heads=1, hidden_dim=128, vocab_size=97, max_seq_len=32,
                         n_layers=1)
    model = random_model(config)
    token, _, k_cache, v_cache = decode_example(model, max_seq_len=32)
    k_cache.normal_(generator=torch.Generator().manual_seed(1))
    v_cache.normal_(generator=torch.Generator().manual_seed(2))
    step, args = DecodeStep(model), (token, torch.tensor([9]), k_cache, v_cache)
    return fusec.compile(step, args), step, args


def _reads_the_cache_in_place(attention: str) -> None:
    """The attention library's call with the cache's rows before the position read in place (keys and
    values: `DecodeStep` zeroes those after it, so none there need checking for infs) and the new key and
    value as its extra ones (the library's check of masked values with extra keys:
    tests/test_attention_block.py)."""
    assert re.search(r"nx = 1 if 0 <= int\(\w+\) < 32 else 0", attention), attention
    assert re.search(r"flash_block_new\(\w+\[:i1 - i0\], a\d+\[0, [^\]]*, 0:klim\], a\d+\[0, [^\]]*, 0:klim\], "
                     r"a\d+\[[^\]]*0:0 \+ nx\], a\d+\[[^\]]*0:0 \+ nx\], lims", attention), attention


def test_generator_decode_step_reads_the_new_row_or_the_cache_row_and_matches_eager(tmp_path, monkeypatch):
    """`DecodeStep`: K is where(is_new, k, k_cache): the new row at the position, the cache's before it,
    which the attention library reads in place (`attention_flash.decode_keys`)."""
    compiled, step, (token, pos, k_cache, v_cache) = _compiled_decode_step(tmp_path, monkeypatch)
    _reads_the_cache_in_place(_attention_source(compiled))
    with torch.no_grad():
        for got, want in zip(compiled(token, pos, k_cache, v_cache), step(token, pos, k_cache, v_cache)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_row_finite_finds_inf_and_nan_in_any_lane_and_takes_extreme_finite_values():
    @numba.njit
    def check(x, i):
        return row_finite(x, (i,))

    rows = np.full((6, 48), np.float32(3.0e38))  # extreme but finite: x - x is still 0
    rows[1, 0], rows[2, 17], rows[3, 47], rows[4, 30] = np.inf, -np.inf, np.nan, np.nan
    rows[5] = 0.0
    assert [check(rows, i) for i in range(6)] == [True, False, False, False, False, True]
    strided = np.ascontiguousarray(np.repeat(rows, 2, axis=1))[:, ::2]  # the plain loop, same answers
    assert [check(strided, i) for i in range(6)] == [True, False, False, False, False, True]


def test_masked_value_rows_are_ignored_by_the_decode_step_as_in_eager(tmp_path, monkeypatch):
    """`DecodeStep` zeroes the values after the position: an inf or nan there reaches no logit, in eager and
    compiled alike, and the compiled step does not read those rows."""
    compiled, step, (token, pos, k_cache, v_cache) = _compiled_decode_step(tmp_path, monkeypatch)
    v_cache[0, 0, 0, 20, 5], v_cache[0, 0, 0, 31, 60] = float("inf"), float("nan")  # masked: after 9
    k_cache[0, 0, 0, 25, 1] = float("nan")
    with torch.no_grad():
        got, want = compiled(token, pos, k_cache, v_cache), step(token, pos, k_cache, v_cache)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert not torch.isnan(got[0]).any()


def test_the_stale_cache_row_at_the_position_is_neither_read_nor_checked(tmp_path, monkeypatch):
    """Against eager: all finite, an inf in the cache's row at the position (the new row replaces it: no
    nan), at the last position (no masked key), a masked nan (zeroed), the same row read at its own
    position (the new row)."""
    compiled, step, (token, pos, k_cache, v_cache) = _compiled_decode_step(tmp_path, monkeypatch)
    _reads_the_cache_in_place(_attention_source(compiled))

    def check(at: int, nan_expected: bool) -> None:
        with torch.no_grad():
            args = (token, torch.tensor([at]), k_cache, v_cache)
            got, want = compiled(*args), step(*args)
        for g, e in zip(got, want):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, equal_nan=True)
        assert bool(torch.isnan(got[0]).any()) == nan_expected

    check(9, False)
    v_cache[0, 0, 0, 9, 3] = float("inf")   # the position's rows: the new ones are read instead
    k_cache[0, 0, 0, 9, 7] = float("nan")
    check(9, False)
    v_cache[0, 0, 0, 9, 3] = k_cache[0, 0, 0, 9, 7] = 0.0  # (past rows at later positions: seen)
    check(31, False)                        # the last position: nothing masked, an empty span
    v_cache[0, 0, 0, 31, 40] = float("nan")  # masked after 9: zeroed, no nan, as in eager
    check(9, False)
    check(31, False)                        # the same row read at its own position is the new row


@pytest.mark.parametrize("width", [16, 48, 64, 80, 128, 144])  # whole groups of four vectors and vectors left
def test_weighted_rows_adds_each_key_row_times_its_weight(width):
    """`weighted_rows` (the P.V update of the decode attention) against NumPy, for keys 0, 1, an odd count
    and a block's worth, from an offset into the value rows; the other output rows stay as they were."""
    @numba.njit
    def update(o, r, v, j0, n, p):
        weighted_rows(o, r, v, j0, n, p)

    rng = np.random.default_rng(width)
    for n in (0, 1, 7, 88):
        o = rng.standard_normal((3, width)).astype(np.float32)
        v = rng.standard_normal((100, width)).astype(np.float32)
        p = rng.standard_normal(n + 3).astype(np.float32)
        want = o.copy()
        want[1] += (p[:n, None].astype(np.float64) * v[5:5 + n]).sum(0)
        update(o, 1, v, 5, n, p)
        np.testing.assert_allclose(o, want, rtol=1e-5, atol=1e-4, err_msg=f"{n} keys")
