"""The passes run on a two-layer trace and its loop expanded to every layer (`fusec.expand_loop`): the
program is the one the passes make of the expanded trace, node for node, with the same stored weights
(fp32, bf16, int8), and programs not of that form are refused (the build then lowers every layer)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import fusec
import fusec.expand_loop
from fusec.build import lower
from fusec.expand_layers import ExpandError
from fusec.expand_loop import expand_loop
from fusec.models.causal_lm import DecodeStep, decode_example, random_model
from fusec.trace_layers import trace_program
from test_expand_layers import MODELS, TINY, canonical, programs


def both_ways(module, example, dynamic, weights="fp32"):
    traced = trace_program(module, example, dynamic=dynamic)
    assert traced.two_layers is not None
    small, n_layers, tensors = traced.two_layers
    return expand_loop(lower(small, weights=weights), n_layers, tensors), lower(traced.graph, weights=weights)


def same_tensors(a, b):
    assert sorted(a.tensors) == sorted(b.tensors)
    for name, t in a.tensors.items():
        u = b.tensors[name]
        assert t.dtype == u.dtype and t.shape == u.shape and torch.equal(torch.as_tensor(t), torch.as_tensor(u)), name


@pytest.mark.parametrize("name", ["stories-3", "gqa-untied-4", "sliding-window", "gemma-like", "hf-llama-3"])
def test_passes_on_two_layers_make_the_program_of_every_layer(name, tmp_path, monkeypatch):
    monkeypatch.setenv("FUSEC_CACHE_DIR", str(tmp_path))
    model = MODELS[name]()
    for program, module, example, dynamic in programs(model):
        expanded, direct = both_ways(module, example, dynamic)
        assert canonical(expanded) == canonical(direct), f"{name} {program}"
        assert any(n.op == "loop" and n.attr("trips") == model.config.n_layers for n in expanded.nodes)
        same_tensors(expanded, direct)


@pytest.mark.parametrize("weights", ["bf16", "int8"])
def test_layers_expanded_store_their_weights_as_the_passes_do(weights, tmp_path, monkeypatch):
    monkeypatch.setenv("FUSEC_CACHE_DIR", str(tmp_path))
    model = MODELS["gqa-untied-4"]()
    for program, module, example, dynamic in programs(model)[:2]:
        expanded, direct = both_ways(module, example, dynamic, weights)
        assert canonical(expanded) == canonical(direct), program
        same_tensors(expanded, direct)
        dtypes = {str(t.dtype) for name, t in expanded.tensors.items() if ".layers.3." in name}
        assert {"torch.bfloat16": "bf16", "torch.int8": "int8"}.keys() & dtypes  # layer 3 stored too


def test_programs_not_of_two_looped_layers_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSEC_CACHE_DIR", str(tmp_path))
    model = random_model(dataclasses.replace(TINY, n_layers=4))
    traced = trace_program(DecodeStep(model), decode_example(model))
    small, n_layers, tensors = traced.two_layers
    with pytest.raises(ExpandError, match="one loop of two trips"):
        expand_loop(lower(small, loop=False), n_layers, tensors)
    with pytest.raises(ExpandError, match="one loop of two trips"):
        expand_loop(lower(traced.graph), n_layers, tensors)  # four trips already
    looped = lower(small)
    with pytest.raises(ExpandError, match="no tensor"):
        expand_loop(looped, n_layers, {})


def test_a_build_runs_the_passes_on_two_layers_and_matches_eager(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSEC_CACHE_DIR", str(tmp_path))
    calls = []
    real = fusec.expand_loop.expand_loop
    monkeypatch.setattr(fusec.expand_loop, "expand_loop", lambda g, n, t: calls.append(n) or real(g, n, t))
    model = random_model(dataclasses.replace(TINY, n_layers=5), seed=4)
    example = decode_example(model, max_seq_len=16, pos=3)
    example[2].normal_(generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = DecodeStep(model)(*example)
    compiled = fusec.compile(DecodeStep(model), example)
    assert calls == [5]
    for got, w in zip(compiled(*example), want):
        torch.testing.assert_close(got, w, rtol=1e-4, atol=1e-4)
