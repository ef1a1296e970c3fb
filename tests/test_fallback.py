"""Torch fallback: ATen ops fusec cannot lower run through PyTorch between fused kernels (`extern` nodes);
`strict=True` raises UnsupportedOpError instead."""
from __future__ import annotations

import pytest
import torch

import fusec
from fusec.errors import UnsupportedOpError
from fusec.verify import verify
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


# --- fallbacks that read weights -------------------------------------------------------------------------

class DivByWeight(torch.nn.Module):
    """The README's fallback example with a parameter operand: floor division by a weight."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, x):
        return torch.div(x * 3.0, self.w, rounding_mode="floor") + 1.0


class Conv1dReLU(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv1d(4, 6, 3)

    def forward(self, x):
        return torch.relu(self.conv(x))


class Conv2dScaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x * 0.5) * 2.0 + 1.0


WEIGHT_CASES = {
    "div_by_weight": (DivByWeight, lambda: (torch.randn(4, 8),)),
    "conv1d": (Conv1dReLU, lambda: (torch.randn(2, 4, 10),)),
    "conv2d": (Conv2dScaled, lambda: (torch.randn(1, 3, 6, 6),)),
}


@pytest.mark.parametrize("backend, fuse, weights", [
    ("numba", True, "fp32"), ("numba", False, "fp32"), ("reference", True, "fp32"), ("reference", False, "fp32"),
    ("numba", True, "bf16"), ("numba", False, "bf16")])
@pytest.mark.parametrize("case", sorted(WEIGHT_CASES))
def test_fallback_reading_a_weight_matches_eager(case, backend, fuse, weights):
    make, inputs = WEIGHT_CASES[case]
    module = make().eval()
    if weights == "bf16":  # the eager baseline sees the weights fusec stores (bf16, widened when read)
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(p.to(torch.bfloat16).float())
    example = inputs()
    compiled = fusec.compile(module, example, backend=backend, fuse=fuse, weights=weights)
    assert compiled.stats["torch_ops"] >= 1
    for args in (example, inputs()):
        with torch.no_grad():
            want = module(*args)
        torch.testing.assert_close(compiled(*args), want, rtol=1e-5, atol=1e-5)


def test_explain_and_check_of_a_conv_model():
    from fusec.check import check
    from fusec.explain import explain
    module, (x,) = Conv1dReLU().eval(), WEIGHT_CASES["conv1d"][1]()
    info = explain(module, (x,))
    assert [f.target for f in info.fallbacks] == ["aten.convolution.default"]
    assert check(module, (x,)).ok


def test_torch_compile_of_a_conv_model_gives_eager_result():
    import warnings
    module, (x,) = Conv1dReLU().eval(), WEIGHT_CASES["conv1d"][1]()
    torch._dynamo.reset()
    compiled = torch.compile(module, backend="fusec")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # compiled by fusec, not run eagerly with a warning
        got = compiled(x)
        want = module(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_torch_compile_runs_eagerly_with_a_warning_when_fusec_fails(monkeypatch):
    module, (x,) = Conv1dReLU().eval(), WEIGHT_CASES["conv1d"][1]()

    def broken(*args, **kwargs):  # an internal error, not a FusecError
        raise KeyError(0)
    monkeypatch.setattr(fusec, "compile", broken)
    torch._dynamo.reset()
    compiled = torch.compile(module, backend="fusec")
    with torch.no_grad(), pytest.warns(UserWarning, match="KeyError"):
        got = compiled(x)
    with torch.no_grad():
        torch.testing.assert_close(got, module(x), rtol=0, atol=0)
    torch._dynamo.reset()


def test_rdu_placement_of_a_program_with_fallbacks_names_the_fallback(tmp_path, capsys):
    from fusec.cli import main
    (tmp_path / "conv_model.py").write_text(
        "import torch\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Conv1d(4, 6, 3), (torch.randn(2, 4, 10),)\n")
    assert main(["dump", f"{tmp_path}/conv_model.py:make", "--stage", "placed"]) == 1
    assert "torch fallback" in capsys.readouterr().err
