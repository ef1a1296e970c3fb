"""`torch.compile(model, backend="fusec")`: registered by entry point, inference graphs through fusec,
graph breaks as several fusec programs, Dynamo's dynamic shapes, and eager fallback for training."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

import fusec.dynamo
from fusec.models import LlamaBlock, LlamaConfig, example_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def fusec_graphs(compiled_model) -> list:
    """The graphs fusec compiled for calls made so far (they stay alive while Dynamo caches them)."""
    return [g for g in fusec.dynamo.graphs() if g.compiled or g.eager]


def test_backend_is_registered_by_entry_point_without_importing_fusec():
    code = ("import sys, torch\n"
            "assert 'fusec' in torch._dynamo.list_backends(), torch._dynamo.list_backends()\n"
            "f = torch.compile(lambda x: torch.relu(x) * 2 + 1, backend='fusec')\n"
            "x = torch.randn(5)\n"
            "with torch.no_grad():\n"
            "    assert torch.allclose(f(x), torch.relu(x) * 2 + 1)\n"
            "assert 'fusec.dynamo' in sys.modules  # loaded by torch through the entry point\n"
            "print('ok')\n")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"


def test_builtin_llama_block():
    block = LlamaBlock(LlamaConfig.tiny()).eval()
    (x,) = example_inputs(block.config, seq_len=16, seed=3)
    compiled = torch.compile(block, backend="fusec")
    with torch.no_grad():
        got, want = compiled(x), block(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    (graph,) = fusec_graphs(compiled)
    (program,) = graph.compiled
    assert program.stats["torch_ops"] == 0
    assert program.stats["kernels"] <= 8  # fused: Dynamo's parameters are fusec weights


def test_hf_llama_decoder_layer():
    pytest.importorskip("transformers")
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from test_tracing import hf_config, hf_layer_inputs, randomize
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    config = hf_config("sdpa")
    layer = randomize(LlamaDecoderLayer(config, layer_idx=0), seed=10)
    x, kwargs = hf_layer_inputs(config, seq_len=12, seed=11)
    compiled = torch.compile(layer, backend="fusec")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got, want = compiled(x, **kwargs), layer(x, **kwargs)
    got = got[0] if isinstance(got, tuple) else got
    want = want[0] if isinstance(want, tuple) else want
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert fusec_graphs(compiled) and not any(g.eager for g in fusec_graphs(compiled))


class WithBreak(torch.nn.Module):
    """Two regions with a graph break between them, plus an op fusec lacks in the second."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 16)
        self.b = torch.nn.Linear(16, 8)

    def forward(self, x):
        h = torch.relu(self.a(x))
        torch._dynamo.graph_break()
        return torch.softmax(self.b(h), dim=-1) + torch.cumsum(x, dim=-1)


def test_graph_break_gives_several_fusec_programs():
    module = WithBreak().eval()
    compiled = torch.compile(module, backend="fusec")
    x = torch.randn(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), module(x), rtol=1e-5, atol=1e-5)
    graphs = fusec_graphs(compiled)
    assert len(graphs) == 2
    assert sum(p.stats["torch_ops"] for g in graphs for p in g.compiled) == 1  # cumsum runs in torch


def test_new_shapes_and_dynamic_shapes_give_correct_results():
    module = WithBreak().eval()
    compiled = torch.compile(module, backend="fusec", options={"backend": "reference"})
    with torch.no_grad():
        for n in (4, 5, 7, 4):
            x = torch.randn(n, 8)
            torch.testing.assert_close(compiled(x), module(x), rtol=1e-5, atol=1e-5)
    assert not any(g.eager for g in fusec_graphs(compiled))


def test_same_graph_with_other_parameters_is_compiled_for_them():
    first, second = WithBreak().eval(), WithBreak().eval()
    f1 = torch.compile(first, backend="fusec", options={"backend": "reference"})
    f2 = torch.compile(second, backend="fusec", options={"backend": "reference"})
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(f1(x), first(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(f2(x), second(x), rtol=1e-5, atol=1e-5)


def test_options_unfused_and_strict():
    module = WithBreak().eval()
    x = torch.randn(2, 8)
    compiled = torch.compile(module, backend="fusec", options={"fuse": False})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), module(x), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    strict = torch.compile(module, backend="fusec", options={"strict": True})
    with torch.no_grad(), pytest.raises(Exception, match="cumsum"):
        strict(x)
    with pytest.raises(ValueError, match="unknown fusec backend option"):
        fusec.dynamo.fusec_backend(torch.fx.symbolic_trace(module.a), [x], options={"tile": 4})


def test_training_graph_runs_eagerly_with_a_warning():
    module = WithBreak()
    compiled = torch.compile(module, backend="fusec")
    x = torch.randn(3, 8)
    with pytest.warns(UserWarning, match="inference"):
        out = compiled(x)
    out.sum().backward()
    assert module.a.weight.grad is not None
    torch.testing.assert_close(out, module(x))
