"""The loops the Numba backend emits for a Llama block: RoPE's rotate-half as one loop over the head,
attention written straight to its output with its buffers allocated once per parallel iteration,
and attention's loops blocked by exactly the tiles the tiling pass recorded (from the cache sizes)."""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch

import fusec
import fusec.passes.tile
from fusec.machines import KiB, get_machine
from fusec.models import load_model
from fusec.tracing import trace
from fusec.passes.pipeline import run_pipeline


def kernel_source(source: str, kind: str) -> str:
    """The generated function of the (first) kernel of this kind."""
    return source.split(f"kind={kind}\n", 1)[1].split("\n\n\n", 1)[0]


@pytest.fixture
def tiny_cache_cpu(monkeypatch, tmp_path):
    """A cpu whose L1 holds 56 keys of the tiny block's attention and whose L2 then 32 query rows: tiles
    smaller than the 80-token sequence, neither dividing it."""
    machine = dataclasses.replace(get_machine("test_cpu"), cores=2, l1_bytes=8 * KiB, l2_bytes=32 * KiB, pmu_bytes=32 * KiB)
    monkeypatch.setattr(fusec.passes.tile, "cpu", lambda: machine)
    monkeypatch.setenv("FUSEC_CACHE_DIR", str(tmp_path))
    return machine


def test_rope_rotate_half_runs_as_one_loop_over_the_head(tmp_path, monkeypatch):
    """One loop over head_dim reading the half it needs through a branch: split into a branch-free loop per
    half it ran no faster and took LLVM ~0.5 s longer to compile (each half unrolled)."""
    monkeypatch.setenv("FUSEC_CACHE_DIR", str(tmp_path))
    module, args = load_model("llama-block:tiny")
    compiled = fusec.compile(module, args)
    projection = kernel_source(compiled.source, "matmul")  # q, k, v and RoPE
    assert "neg" not in projection and "(-t" in projection  # RoPE is in there
    assert re.search(r"^\s*if j\d+ < 8:", projection, re.M), projection  # the first half of head_dim 16
    assert not re.search(r"for j\d+ in range\(8, 16\):", projection)
    torch.testing.assert_close(compiled(*args), module(*args), rtol=1e-5, atol=1e-5)


def test_attention_writes_its_output_directly_and_allocates_once_per_parallel_iteration(tiny_cache_cpu):
    module, args = load_model("llama-block:tiny", seq_len=80)
    compiled = fusec.compile(module, args)
    attention = kernel_source(compiled.source, "attention")
    assert "obuf" not in attention  # no copy of the output
    chunk_loop = re.search(r"^( *)for c in prange\(", attention, re.M)
    assert chunk_loop, attention
    body = attention[chunk_loop.end():]
    first_row_loop = body.index("for i in range(i0, i1)")
    allocations = [m.start() for m in re.finditer(r"np\.empty", body)]
    assert allocations and all(a < first_row_loop for a in allocations), attention
    torch.testing.assert_close(compiled(*args), module(*args), rtol=1e-5, atol=1e-5)


def test_attention_loops_use_the_tiles_of_the_tiled_program(tiny_cache_cpu):
    module, args = load_model("llama-block:tiny", seq_len=80)
    tiled = run_pipeline(trace(module, args).graph, until="tiled", target="cpu")
    (node,) = [n for n in tiled.nodes if n.op == "kernel" and n.attr("kind") == "attention"]
    tiles = dict(node.attr("tiles"))
    assert (tiles["q"], tiles["kv"]) == (32, 56)  # 56 * (16*4 + 16*4 + 4) <= 8 KiB; then 32 rows fit 32 KiB
    compiled = fusec.compile(module, args)
    attention = kernel_source(compiled.source, "attention")
    assert f"oacc = np.empty(({tiles['q']}, 16), np.float32)" in attention
    assert f"i0 = (c % 3) * {tiles['q']}" in attention  # ceil(80 / 32) query blocks per head
    # the key blocks of the attention library's flash loop (`attention_block`), one score tile each
    assert re.search(rf"flash_block_gemm\(.*, {tiles['kv']}, oacc\[:i1 - i0\]\)", attention), attention
    torch.testing.assert_close(compiled(*args), module(*args), rtol=1e-5, atol=1e-5)


class DecodeAttention(torch.nn.Module):
    """One decode query against a cache, keys after the run-time position `pos` hidden, as the
    generator's decode step attends (its output is the attention's, nothing mixes its columns after)."""

    def forward(self, q, k, v, pos):
        key_index = torch.arange(k.shape[2]).view(1, k.shape[2])
        scores = (q @ k.transpose(-2, -1) / 4.0).masked_fill(key_index > pos, float("-inf"))
        return torch.softmax(scores, dim=-1) @ v


def test_masked_nonfinite_values_make_only_their_columns_nan_without_a_second_pass(tmp_path, monkeypatch):
    """A key past the position weighs 0, and 0 * inf is nan in eager: the columns where such a value is
    not finite are nan, the others exact. The kernel finds them in its one pass over the masked values
    (`vcol`) instead of reading the masked values again for every row."""
    monkeypatch.setenv("FUSEC_CACHE_DIR", str(tmp_path))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 1, 16, generator=g), torch.randn(1, 2, 24, 16, generator=g),
               torch.randn(1, 2, 24, 16, generator=g))
    pos = torch.tensor([9])
    module = DecodeAttention()
    compiled = fusec.compile(module, (q, k, v, pos))
    attention = kernel_source(compiled.source, "attention")
    assert len(re.findall(r"for jm in range\(", attention)) == 1, attention  # the scan only
    v[0, 1, 15, 3], v[0, 1, 20, 7] = float("inf"), float("nan")  # masked keys (after 9) of head 1
    v[0, 0, 4, 5] = float("inf")  # a key head 0 sees: inf (or nan) in eager as well
    got, want = compiled(q, k, v, pos), module(q, k, v, pos)
    torch.testing.assert_close(got, want, equal_nan=True)
    assert torch.isnan(got[0, 1, 0, [3, 7]]).all() and torch.isfinite(got[0, 1, 0, :3]).all()
