"""A decode step's attention up to `attention.DECODE_SERIAL` elements is a serial loop (its parallel loop
cost Numba about 2 s of CPU to compile and saved a tenth of a millisecond per call); prefill attention and
larger decode steps keep the parallel loop."""
from __future__ import annotations

import pytest
import torch

import fusec
from fusec.backends.numba_cpu.attention import DECODE_SERIAL
from fusec.build import lower
from fusec.tracing import trace


class Attention(torch.nn.Module):
    """Queries against keys, those after `pos` hidden (one query row: a decode step)."""

    def forward(self, q, k, v, pos):
        key_index = torch.arange(k.shape[2]).view(1, k.shape[2])
        scores = (q @ k.transpose(-2, -1) / 8.0).masked_fill(key_index > pos, float("-inf"))
        return torch.softmax(scores, dim=-1) @ v


def inputs(heads: int, rows: int, keys: int, depth: int = 64, pos: int = 29):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, heads, rows, depth, generator=g), torch.randn(1, heads, keys, depth, generator=g),
            torch.randn(1, heads, keys, depth, generator=g), torch.tensor([pos]))


def attention_source(args, monkeypatch) -> str:
    """The generated attention kernel (nothing compiled: no workers, no run)."""
    from fusec.backends.numba_cpu.runtime import Program
    monkeypatch.setenv("FUSEC_COMPILE_WORKERS", "0")
    source = Program(lower(trace(Attention(), args, {}).graph)).source
    return source.split("kind=attention\n", 1)[1].split("\n\n\n", 1)[0]


def test_decode_attention_is_serial_and_matches_eager(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSEC_CACHE_DIR", str(tmp_path))
    args = inputs(8, 1, 256)  # 8 x 256 x 128 elements: a parallel loop before
    source = attention_source(args, monkeypatch)
    assert "prange(" not in source and "@njit(parallel=False" in source, source
    compiled = fusec.compile(Attention(), args)
    torch.testing.assert_close(compiled(*args), Attention()(*args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads, rows, keys", [(8, 16, 256), (32, 1, 2048)])
def test_prefill_and_large_decode_attention_stay_parallel(tmp_path, monkeypatch, heads, rows, keys):
    monkeypatch.setenv("FUSEC_CACHE_DIR", str(tmp_path))
    assert rows > 1 or heads * keys * 128 > DECODE_SERIAL
    assert "prange(" in attention_source(inputs(heads, rows, keys), monkeypatch)
