"""Lowering torch.export's program without `run_decompositions` (`fusec.lowering_direct`): the Llama
programs a generator compiles never pay for that retrace, and give exactly the IR the decomposed program
gives; a program with an op the direct lowerings do not reproduce is decomposed first, as before."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch.export.exported_program import ExportedProgram

import fusec
import fusec.tracing as tracing
from fusec.ir import format_graph
from fusec.models import LlamaBlock, LlamaConfig, example_inputs
from fusec.models.causal_lm import DecodeStep, Prefill, decode_example, random_model
from fusec.models.llama import init_weights

VARIANTS = {"tiny": {}, "qkv_bias": {"qkv_bias": True}, "window": {"sliding_window": 4},
            "gelu": {"activation": "gelu", "embed_scale": 8.0}}


def programs(variant: str) -> dict:
    """{name: (module, example inputs, dynamic)} of every program kind fusec compiles for a Llama."""
    config = dataclasses.replace(LlamaConfig.preset("tiny"), vocab_size=256, **VARIANTS[variant])
    model = random_model(config)
    tokens = torch.zeros(1, 8, dtype=torch.int64)
    block = init_weights(LlamaBlock(config), seed=0).eval()
    return {"decode": (DecodeStep(model), decode_example(model, 1, 16), None),
            "prefill symbolic": (Prefill(model, None), (tokens,), {"tokens": {1: (1, 16)}}),
            "prefill at": (Prefill(model, 8, "at"), (tokens, torch.zeros(1, dtype=torch.int64)), None),
            "block": (block, example_inputs(config, seq_len=8), None),
            "block symbolic": (block, example_inputs(config, seq_len=8), {"x": {1: (1, 16)}})}


# every program kind once, and each variant where it changes what is traced (a bias on the projections,
# the sliding window's `|` of two masks, GELU and a scaled embedding)
CASES = [("tiny", name) for name in ("decode", "prefill symbolic", "prefill at", "block", "block symbolic")] + [
    ("qkv_bias", "prefill symbolic"), ("qkv_bias", "decode"), ("window", "decode"), ("gelu", "block")]


@pytest.fixture
def no_decompositions(monkeypatch):
    """run_decompositions raises: a trace that needs it fails."""
    def refuse(*args, **kwargs):
        raise AssertionError("run_decompositions was called")
    monkeypatch.setattr(ExportedProgram, "run_decompositions", refuse)


@pytest.mark.parametrize("variant, name", CASES)
def test_llama_programs_trace_without_decompositions(variant, name, no_decompositions):
    module, example, dynamic = programs(variant)[name]
    assert tracing.trace(module, example, dynamic=dynamic).graph.nodes


@pytest.mark.parametrize("variant, name", CASES)
def test_direct_ir_equals_decomposed_ir(variant, name, monkeypatch):
    module, example, dynamic = programs(variant)[name]
    monkeypatch.setattr(tracing, "DIRECT", True)
    direct = format_graph(tracing.trace(module, example, dynamic=dynamic).graph)
    monkeypatch.setattr(tracing, "DIRECT", False)
    decomposed = format_graph(tracing.trace(module, example, dynamic=dynamic).graph)
    assert direct == decomposed, f"{variant} {name}: the direct IR differs from the decomposed one"


class Other(nn.Module):
    """Ops the direct lowerings do not take: layer_norm (composite), an in-place add, stack on axis 1."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        y = self.norm(x)
        y.add_(1.0)
        return torch.stack([y, x], dim=1).sum(1)


class StackSecond(nn.Module):
    """Only stack on the second axis: direct_ok accepts it, its lowering raises NotDirect."""

    def forward(self, x):
        return torch.stack([x, x * 2], dim=1)


@pytest.mark.parametrize("module", [Other(), StackSecond()], ids=["other ops", "stack axis 1"])
def test_other_programs_are_decomposed_and_match_eager(module):
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    compiled = fusec.compile(module, (x,), backend="reference")
    with torch.no_grad():
        want = module(x)
    torch.testing.assert_close(compiled(x), want, rtol=1e-5, atol=1e-5)
    assert not any(n.op == "extern" for n in compiled.graph.nodes)


def test_stack_second_axis_raises_not_direct():
    from fusec.lowering_direct import NotDirect, direct_ok
    program = tracing.export(StackSecond(), (torch.randn(3, 8),), decompose=False)
    assert direct_ok(program) is None
    with pytest.raises(NotDirect):
        tracing.lower_program(program, StackSecond(), direct=True)


class SizeArithmetic(nn.Module):
    """Views whose sizes are products of a symbolic size (`operator.mul` nodes in the exported program)."""

    def forward(self, x):
        b, t, d = x.shape
        return (x.reshape(b * t, d) * 2).reshape(b, t * d)


def test_symbolic_size_arithmetic_traces_directly(monkeypatch):
    x = torch.randn(2, 5, 4)
    dynamic = {"x": {1: (2, 16)}}
    monkeypatch.setattr(tracing, "DIRECT", False)
    decomposed = format_graph(tracing.trace(SizeArithmetic(), (x,), dynamic=dynamic).graph)
    monkeypatch.setattr(tracing, "DIRECT", True)
    monkeypatch.setattr(ExportedProgram, "run_decompositions", None)  # not called
    assert format_graph(tracing.trace(SizeArithmetic(), (x,), dynamic=dynamic).graph) == decomposed


def test_hf_llama_layer_traces_directly(monkeypatch):
    """A transformers decoder layer (eager attention; its dropout is not training): the same IR, without
    run_decompositions."""
    import warnings

    from test_tracing import hf_config, hf_layer_inputs, randomize
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    config = hf_config("eager")
    layer = randomize(LlamaDecoderLayer(config, layer_idx=0), seed=10)
    x, kwargs = hf_layer_inputs(config, seq_len=12, seed=11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monkeypatch.setattr(tracing, "DIRECT", False)
        decomposed = format_graph(tracing.trace(layer, (x,), kwargs).graph)
        monkeypatch.setattr(tracing, "DIRECT", True)
        monkeypatch.setattr(ExportedProgram, "run_decompositions", None)  # not called
        assert format_graph(tracing.trace(layer, (x,), kwargs).graph) == decomposed


def test_training_dropout_is_decomposed():
    """Dropout while training is random: not the identity, so the program goes through the
    decompositions (which refuse a random op) as before."""
    from fusec.lowering_direct import direct_ok
    program = tracing.export(nn.Dropout(0.5).train(), (torch.randn(4, 4),), decompose=False)
    assert direct_ok(program) is not None


class WhereNumber(nn.Module):
    """`where` with a Python number in place of either tensor (aten.where.ScalarSelf / ScalarOther)."""

    def forward(self, x):
        return torch.where(x > 0, 0.0, x) + torch.where(x < 1, x, 2.5)


def test_where_with_a_number_traces_directly_as_decomposed(monkeypatch):
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(tracing, "DIRECT", False)
    decomposed = format_graph(tracing.trace(WhereNumber(), (x,)).graph)
    monkeypatch.setattr(tracing, "DIRECT", True)
    monkeypatch.setattr(ExportedProgram, "run_decompositions", None)  # not called
    assert format_graph(tracing.trace(WhereNumber(), (x,)).graph) == decomposed
    torch.testing.assert_close(fusec.compile(WhereNumber(), (x,), backend="reference")(x), WhereNumber()(x))
