"""Tracing fusec's generation programs through two layers and expanding the IR to every layer
(`fusec.expand_layers`, `fusec.trace_layers`): the expanded IR is the IR traced from the whole model, the
compiled generators' tokens are eager's, and programs where expansion does not apply trace as before.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch

import fusec.expand_layers
from fusec import printer
from fusec.expand_layers import ExpandError, expand_layers
from fusec.generate import compile_generator, eager_generate
from fusec.models.causal_lm import DecodeStep, Prefill, decode_example, from_hf, random_model
from fusec.models.llama import LlamaConfig
from fusec.trace_layers import trace_program
from fusec.tracing import trace

TINY = LlamaConfig(dim=64, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=97, max_seq_len=64, n_layers=3)
STORIES = dataclasses.replace(LlamaConfig.preset("stories15M"), max_seq_len=64)


def hf_llama(layers: int):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                      num_key_value_heads=2, num_hidden_layers=layers, vocab_size=97,
                                      max_position_embeddings=64, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    return from_hf(transformers.LlamaForCausalLM(config).eval())


MODELS = {  # name -> a CausalLM of 3 layers or more
    "stories-3": lambda: random_model(dataclasses.replace(STORIES, n_layers=3), tie_embeddings=True),
    "stories-6": lambda: random_model(dataclasses.replace(STORIES, n_layers=6), tie_embeddings=True),
    "gqa-untied-4": lambda: random_model(dataclasses.replace(TINY, n_layers=4), seed=1),
    "sliding-window": lambda: random_model(dataclasses.replace(TINY, sliding_window=5), seed=2),
    "gemma-like": lambda: random_model(dataclasses.replace(TINY, qkv_bias=True, embed_scale=8.0, head_size=24,
                                                           activation="gelu_tanh"), seed=3, tie_embeddings=True),
    "hf-llama-3": lambda: hf_llama(3),
}


def programs(model):
    """(name, program, example inputs, dynamic) of the programs a generator traces: the decode step and
    the symbolic prefill, and (batch 2) those of a prefill of fixed length padded on the right."""
    tokens = torch.zeros(1, 8, dtype=torch.int64)
    return [("decode", DecodeStep(model), decode_example(model), None),
            ("prefill", Prefill(model, None), (tokens,), {"tokens": {1: (1, model.config.max_seq_len)}}),
            ("decode-2", DecodeStep(model), decode_example(model, batch=2, max_seq_len=16), None),
            ("prefill-at", Prefill(model, 8, "at"), (tokens.expand(2, 8), torch.tensor([5])), None)]


def canonical(graph) -> str:
    """The printed graph with its stored constants renamed in order of first use (their keys count the
    parameters traced before them), each checked to hold the same array."""
    names: dict[str, str] = {}

    def rename(match):
        key = match.group(1)
        names.setdefault(key, f"k{len(names)}")
        return f'key="{names[key]}"'
    text = re.sub(r'key="([^"]+)"', rename, printer.format_graph(graph))
    return text + "".join(f"\n{new}: {np.asarray(graph.tensors[old]).tobytes().hex()}" for old, new in names.items())


@pytest.fixture
def expansions(monkeypatch, tmp_path):
    """The calls of expand_layers (graph sizes in and out) while the test runs, in a cache directory of its
    own: a trace cached by an earlier run or test (same shapes; weights are not in a trace's key) would be
    served without tracing or expanding."""
    monkeypatch.setenv("FUSEC_CACHE_DIR", str(tmp_path))
    calls = []
    real = fusec.expand_layers.expand_layers

    def spy(graph, n_layers, tensors):
        result = real(graph, n_layers, tensors)
        calls.append((len(graph.nodes), len(result.nodes)))
        return result
    monkeypatch.setattr(fusec.expand_layers, "expand_layers", spy)
    return calls


@pytest.mark.parametrize("name", MODELS)
def test_expanded_ir_is_the_ir_traced_from_the_whole_model(name, expansions):
    model = MODELS[name]()
    for program, module, example, dynamic in programs(model):
        expanded = trace_program(module, example, dynamic=dynamic)
        whole = trace(module, example, dynamic=dynamic)
        assert canonical(expanded.graph) == canonical(whole.graph), f"{name} {program}"
        params = {n.attr("name") for n in whole.graph.nodes if n.op == "param"}
        assert all(expanded.graph.tensors[p] is whole.graph.tensors[p] for p in params)
        assert (expanded.input_names, expanded.input_leaves) == (whole.input_names, whole.input_leaves)
        assert expanded.out_spec == whole.out_spec and expanded.in_spec == whole.in_spec
    assert len(expansions) == 4 and all(small < big for small, big in expansions)


@pytest.mark.parametrize("name, backend", [("gqa-untied-4", "numba"), ("sliding-window", "reference"),
                                           ("gemma-like", "reference"), ("hf-llama-3", "reference")])
def test_generators_through_expanded_programs_give_eager_tokens(name, backend, expansions):
    model = MODELS[name]()
    ids = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(5))
    gen = compile_generator(model, backend=backend)
    got, got_logits = gen.generate(ids, max_new_tokens=20, return_logits=True)
    want, want_logits = eager_generate(model, ids, 20)
    assert len(expansions) == 2  # the decode step and the symbolic prefill
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4 * float(want_logits.abs().max()))
    assert torch.equal(got, want)


def test_the_trace_cache_stores_and_serves_the_expanded_program(tmp_path, monkeypatch, expansions):
    model = MODELS["gqa-untied-4"]()
    example = decode_example(model, max_seq_len=16, pos=3)
    example[2].normal_(generator=torch.Generator().manual_seed(0))
    example[3].normal_(generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = DecodeStep(model)(*example)
    for how in ("stored", "hit"):
        compiled = fusec.compile(DecodeStep(model), example, backend="reference")
        assert compiled.stats["trace_cache"] == how
        for got, w in zip(compiled(*example), want):
            torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-5)
    assert len(expansions) == 1


class Stack(torch.nn.Module):
    """Not fusec's program: a list of equal layers, traced as it is."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(4))

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


@pytest.mark.parametrize("case", ["one layer", "two layers", "user module", "decode with other caches"])
def test_programs_expansion_does_not_apply_to_trace_whole(case, expansions):
    if case == "user module":
        module, example, dynamic = Stack(), (torch.randn(2, 8),), None
    else:
        layers = {"one layer": 1, "two layers": 2}.get(case, 3)
        model = random_model(dataclasses.replace(TINY, n_layers=layers))
        _, module, example, dynamic = programs(model)[0]
        if case == "decode with other caches":  # rows for 4 layers (the program reads 3): not cut to 2
            example = example[:2] + (torch.zeros((4,) + example[2].shape[1:]),) * 2
    traced = trace_program(module, example, dynamic=dynamic)
    assert canonical(traced.graph) == canonical(trace(module, example, dynamic=dynamic).graph)
    assert not expansions


def test_graphs_that_are_not_two_equal_layers_are_refused():
    model = random_model(dataclasses.replace(TINY, n_layers=2))
    traced = trace(DecodeStep(model), decode_example(model))
    assert expand_layers(traced.graph, 2, {}) is traced.graph
    with pytest.raises(ValueError, match="n_layers >= 2"):
        expand_layers(traced.graph, 1, {})
    with pytest.raises(ExpandError, match="no tensor for the parameter"):
        expand_layers(traced.graph, 3, {})
    stack = trace(Stack(), (torch.randn(2, 8),)).graph  # four layers, none named as a model's
    with pytest.raises(ExpandError, match="layers 0 and 1"):
        expand_layers(stack, 3, {})
    model.layers[1].ffn_norm.eps = 1e-3  # layer 1 no longer computes what layer 0 does
    different = trace(DecodeStep(model), decode_example(model)).graph
    with pytest.raises(ExpandError):
        expand_layers(different, 3, dict(random_model(dataclasses.replace(TINY, n_layers=3)).named_parameters()))
