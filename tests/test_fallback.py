"""Torch fallback: ATen ops fusec cannot lower run through PyTorch between fused kernels (`extern` nodes);
`strict=True` raises UnsupportedOpError instead."""
from __future__ import annotations

import pytest
import torch

import fusec
from fusec.errors import UnsupportedOpError
from fusec.ir import verify
from fusec.printer import format_graph, parse_graph

torch.manual_seed(0)


class ScanMLP(torch.nn.Module):
    """cumsum (no lowering) between two fusable regions."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(8, 16)
        self.down = torch.nn.Linear(16, 8)

    def forward(self, x):
        h = torch.relu(self.up(x))
        s = torch.cumsum(h, dim=-1)
        return self.down(s * 0.5) + x


class SortTopTwo(torch.nn.Module):
    """A multi-output op (sort: values and indices) both of whose outputs are used."""

    def forward(self, x):
        values, indices = torch.sort(x * 2.0, dim=-1, descending=True)
        return torch.sigmoid(values) + indices.float(), indices


class Buckets(torch.nn.Module):
    """A fallback with a constant tensor operand (a buffer) and an integer result."""

    def __init__(self):
        super().__init__()
        self.register_buffer("edges", torch.tensor([-1.0, 0.0, 0.5, 1.0]))

    def forward(self, x):
        return torch.bucketize(torch.tanh(x), self.edges) * 2 + 1


class FloorDiv(torch.nn.Module):
    """div with rounding_mode: the lowering rejects it, so it falls back."""

    def forward(self, x, y):
        return torch.div(x * 3.0, y, rounding_mode="floor") + 1.0


class LateRead(torch.nn.Module):
    """A fallback reading a value computed several kernels earlier (its buffer must not be reused)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (torch.nn.Linear(8, 8) for _ in range(3))

    def forward(self, x):
        h1 = torch.relu(self.a(x))
        h2 = torch.sigmoid(self.b(h1))
        h3 = torch.tanh(self.c(h2)) * h2
        return torch.cummax(h1, dim=0)[0] + h3, torch.cumsum(h3, 0)


def _close(got, want):
    if isinstance(want, (tuple, list)):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            _close(g, w)
        return
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


CASES = {
    "scan": (ScanMLP, lambda: (torch.randn(4, 8),)),
    "sort": (SortTopTwo, lambda: (torch.randn(3, 6),)),
    "bucketize": (Buckets, lambda: (torch.randn(5, 7),)),
    "floor_div": (FloorDiv, lambda: (torch.randn(4, 4), torch.rand(4, 4) + 0.5)),
    "late_read": (LateRead, lambda: (torch.randn(6, 8),)),
}


@pytest.mark.parametrize("backend, fuse", [("numba", True), ("numba", False), ("reference", True)])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fallback_matches_eager(case, backend, fuse):
    make, inputs = CASES[case]
    module = make().eval()
    example = inputs()
    compiled = fusec.compile(module, example, backend=backend, fuse=fuse)
    assert compiled.stats["torch_ops"] >= 1
    for args in (example, inputs()):
        with torch.no_grad():
            want = module(*args)
        _close(compiled(*args), want)


def test_strict_raises_unsupported_op_error_naming_the_op():
    with pytest.raises(UnsupportedOpError, match="cumsum") as info:
        fusec.compile(ScanMLP(), (torch.randn(4, 8),), strict=True)
    assert "test_fallback.py" in info.value.origin


def test_extern_nodes_are_never_fused_and_split_the_kernels():
    compiled = fusec.compile(ScanMLP().eval(), (torch.randn(4, 8),))
    g = compiled.graph
    ops = [n.op for n in g.nodes]
    assert ops.count("extern") == 1
    for n in g.walk():
        if n.op == "kernel":
            assert "extern" not in n.attr("body").ops()
    ext = ops.index("extern")
    assert g.nodes[ext].attr("target") == "aten.cumsum.default"
    assert g.nodes[ext].attr("reason") == "no lowering"
    assert "kernel" in ops[:ext] and "kernel" in ops[ext + 1:]  # the MLP halves run fused around it


def test_multi_output_op_is_one_node_per_output_and_one_call(monkeypatch):
    import fusec.fallback as fallback
    compiled = fusec.compile(SortTopTwo(), (torch.randn(3, 6),))
    externs = [n for n in compiled.graph.nodes if n.op == "extern"]
    assert sorted(n.attr("output") for n in externs) == [0, 1]
    calls = []
    real = fallback.run_op
    monkeypatch.setattr(fallback, "run_op", lambda *a: calls.append(a[0]) or real(*a))
    compiled(torch.randn(3, 6))
    assert calls == ["aten.sort.default"]  # both outputs from one call


def test_lowering_that_rejects_its_arguments_falls_back_with_the_reason():
    compiled = fusec.compile(FloorDiv(), (torch.randn(2, 2), torch.rand(2, 2) + 1))
    (ext,) = [n for n in compiled.graph.nodes if n.op == "extern"]
    assert ext.attr("target") == "aten.div.Tensor_mode"
    assert "rounding_mode" in ext.attr("reason")


def test_constant_tensor_argument_becomes_an_operand():
    compiled = fusec.compile(Buckets(), (torch.randn(5, 7),), backend="reference")
    (ext,) = [n for n in compiled.graph.nodes if n.op == "extern"]
    assert len(ext.args) == 2 and ext.dtype == "i64"
    assert '{"$": 1}' in ext.attr("args")


def test_extern_graph_prints_and_parses_back():
    compiled = fusec.compile(Buckets(), (torch.randn(5, 7),), backend="reference")
    g = compiled.traced.graph
    text = format_graph(g)
    again = parse_graph(text, dict(g.tensors))
    verify(again)
    assert format_graph(again) == text


def test_random_ops_are_not_taken_as_fallbacks():
    class Noisy(torch.nn.Module):
        def forward(self, x):
            return x + torch.rand_like(x)
    with pytest.raises(UnsupportedOpError, match="random"):
        fusec.compile(Noisy(), (torch.randn(3),))


def test_fallback_on_a_constant_is_still_folded():
    from test_errors import ScanOfBuffer  # cumsum of a buffer: evaluated at trace time, not a fallback
    compiled = fusec.compile(ScanOfBuffer(), (torch.randn(2, 8),))
    assert compiled.stats["torch_ops"] == 0
