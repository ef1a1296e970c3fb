"""The layout pass: attention's K and V are stored with the axis its inner loops walk last, decided once
(passes/layout.py), shown in the dump as the attention kernel's `layout` attr, and obeyed by the Numba
emitter (the dot product over the head depth reads K contiguously)."""
from __future__ import annotations

import math
import re

import torch
from torch import nn

import fusec
from fusec.models import load_model
from fusec.models.registry import decode_inputs
from fusec.tracing import trace
from fusec.passes.layout import choose_layout
from fusec.passes.pipeline import run_pipeline


class KTransposed(nn.Module):
    """GPT-2 style attention: K is transposed to [B, H, D, T] before the score matmul."""

    def __init__(self, dim: int = 32, heads: int = 2, kt_input: bool = False):
        super().__init__()
        self.h, self.d, self.kt_input = heads, dim // heads, kt_input
        self.wq, self.wk, self.wv = (nn.Linear(dim, dim, bias=False) for _ in range(3))

    def forward(self, x, kt=None):
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.h, self.d).permute(0, 2, 1, 3)
        if kt is None:
            kt = self.wk(x).view(b, t, self.h, self.d).permute(0, 2, 3, 1) * 1.5  # [b, h, d, t]
        v = self.wv(x).view(b, t, self.h, self.d).permute(0, 2, 1, 3)
        s = (q @ kt) / math.sqrt(self.d)
        s = s.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), 1), float("-inf"))
        return (torch.softmax(s, dim=-1) @ v).permute(0, 2, 1, 3).reshape(b, t, -1)


def layouts(graph) -> list:
    return [dict(n.attr("layout")) for n in graph.nodes if n.op == "kernel" and n.attr("kind") == "attention"]


def fused(module, args):
    return run_pipeline(trace(module, args).graph, until="tiled", target="cpu")


def test_a_transposed_k_is_stored_by_its_producer_as_keys_by_depth(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSEC_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    module, x = KTransposed().eval(), torch.randn(1, 12, 32)
    assert layouts(fused(module, (x,))) == [{"k": "transposed at store", "v": "as stored"}]
    compiled = fusec.compile(module, (x,))
    torch.testing.assert_close(compiled(x), module(x), rtol=1e-5, atol=1e-5)
    # K is scaled on the way, so the kernel packs its rows for the attention library (`attention_flash.py`)
    # and reads K at [.., key, d] with d the innermost loop: the last (contiguous) index
    attention = compiled.source.split("kind=attention")[1]
    pack = re.search(r"for d in range\(16\):\n\s+t\d+ = a\d\[0, \(b\d+\), \(x\), \(d\)\]", attention)
    assert pack and "flash_block_" in attention, attention
    # and the projection writes K^T's replacement with its innermost loop contiguous on both sides
    assert not re.search(r"acc\d\[\(j\d+\), ", compiled.source.split("kind=attention")[0])


def test_a_transposed_k_given_by_the_caller_stays_strided():
    torch.manual_seed(0)
    module, x = KTransposed(kt_input=True).eval(), torch.randn(1, 12, 32)
    kt = torch.randn(1, 2, 16, 12)
    (decision,) = layouts(run_pipeline(trace(module, (x, kt)).graph, until="tiled", target="cpu"))
    assert decision["k"].startswith("strided: a graph input")


def test_llama_block_k_and_v_are_already_contiguous_and_a_second_run_changes_nothing():
    """Prefill and decode of the Llama block read K and V contiguously as traced: nothing to move."""
    module, args = load_model("llama-block:tiny")
    graph = fused(module, args)
    assert layouts(graph) == [{"k": "as stored", "v": "as stored"}]
    args, kwargs = decode_inputs(module.config, past_len=5)  # K and V: concats of the past and the new
    decode = run_pipeline(trace(module, args, kwargs).graph, until="tiled", target="cpu")
    assert layouts(decode) == [{"k": "as stored", "v": "as stored"}]
    again = choose_layout(fused(KTransposed().eval(), (torch.randn(1, 12, 32),)))
    assert layouts(again) == [{"k": "as stored", "v": "as stored"}]
