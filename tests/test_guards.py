"""Guards: every call is checked against the signature its program was compiled for; a mismatch is a
clear error, a recompile (recompile=True, up to cache_limit) or, in dynamic dimensions, a new program
without counting. Never a crash or an out-of-bounds read."""
from __future__ import annotations

import warnings

import pytest
import torch

import fusec

torch.manual_seed(0)


class SeqMix(torch.nn.Module):
    """[batch, seq, 8] -> same: a projection, a softmax over the sequence and a residual."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.softmax(self.proj(x), dim=1) * 2.0 + x


class Embed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.table = torch.nn.Embedding(10, 4)

    def forward(self, ids):
        return self.table(ids) * 3.0


def eager(module, *args):
    with torch.no_grad():
        return module(*args)


@pytest.fixture(scope="module")
def module():
    return SeqMix().eval()


@pytest.fixture(scope="module")
def static(module):
    return fusec.compile(module, (torch.randn(2, 5, 8),))


@pytest.fixture(scope="module")
def static_reference(module):
    return fusec.compile(module, (torch.randn(2, 5, 8),), backend="reference")


# --- static programs: clear errors ------------------------------------------------------------------------

@pytest.mark.parametrize("shape, words", [((3, 5, 8), ["[2, 5, 8]", "[3, 5, 8]"]),
                                          ((2, 5), ["[2, 5, 8]", "[2, 5]"]),
                                          ((2, 5, 8, 1), ["[2, 5, 8]", "[2, 5, 8, 1]"])],
                         ids=["dim", "rank-down", "rank-up"])
def test_wrong_shape_or_rank_is_a_value_error(static, shape, words):
    with pytest.raises(ValueError) as info:
        static(torch.randn(shape))
    assert all(w in str(info.value) for w in words)


def test_wrong_dtype_is_a_type_error(static):
    with pytest.raises(TypeError, match="float32.*float64"):
        static(torch.randn(2, 5, 8, dtype=torch.float64))


def test_other_device_is_a_value_error(static):
    with pytest.raises(ValueError, match="CPU.*meta"):
        static(torch.empty(2, 5, 8, device="meta"))


def test_sparse_input_is_a_value_error(static):
    with pytest.raises(ValueError, match="strided"):
        static(torch.randn(2, 5, 8).to_sparse())


@pytest.mark.parametrize("make", [
    lambda: torch.randn(2, 8, 5).transpose(1, 2),             # permuted strides
    lambda: torch.randn(2, 10, 8)[:, ::2],                     # a step
    lambda: torch.randn(1, 5, 8).expand(2, 5, 8),              # stride 0
    lambda: torch.randn(3, 6, 9)[1:, :5, 1:],                  # an offset and gaps
], ids=["transposed", "strided", "expanded", "offset"])
@pytest.mark.parametrize("backend", ["numba", "reference"])
def test_non_contiguous_inputs_give_correct_results(module, make, backend, request):
    compiled = request.getfixturevalue("static" if backend == "numba" else "static_reference")
    x = make()
    assert not x.is_contiguous()
    torch.testing.assert_close(compiled(x), eager(module, x), rtol=1e-5, atol=1e-5)


def test_out_of_range_indices_raise_index_error_not_read_out_of_bounds():
    module = Embed().eval()
    compiled = fusec.compile(module, (torch.tensor([[1, 2, 3]]),))
    torch.testing.assert_close(compiled(torch.tensor([[9, 0, 4]])), eager(module, torch.tensor([[9, 0, 4]])))
    for bad in (10, 1000, -1):
        with pytest.raises(IndexError, match="out of range"):
            compiled(torch.tensor([[1, bad, 3]]))


def test_changed_constant_argument_is_a_value_error_or_a_recompile():
    class Scale(torch.nn.Module):
        def forward(self, x, k: float):
            return x * k
    x = torch.randn(3)
    with pytest.raises(ValueError, match="constant 2.0"):
        fusec.compile(Scale(), (x, 2.0))(x, 3.0)
    compiled = fusec.compile(Scale(), (x, 2.0), recompile=True)
    torch.testing.assert_close(compiled(x, 3.0), x * 3.0)
    assert compiled.recompiles == 1


# --- recompile=True: one program per signature, up to cache_limit ---------------------------------------

def test_recompile_compiles_new_signatures_and_reuses_them(module):
    compiled = fusec.compile(module, (torch.randn(2, 5, 8),), recompile=True)
    for x in (torch.randn(3, 5, 8), torch.randn(3, 5, 8), torch.randn(2, 5, 8), torch.randn(5, 8)):
        torch.testing.assert_close(compiled(x), eager(module, x), rtol=1e-5, atol=1e-5)
    assert compiled.recompiles == 2  # [3,5,8] and rank 2; repeats reuse their programs
    assert len(compiled.specializations) == 3
    assert compiled.graph.input_types[0].shape == (2, 5, 8)  # the attributes describe the first program


def test_recompile_for_another_dtype():
    class Gate(torch.nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(x) + 1.0
    compiled = fusec.compile(Gate(), (torch.randn(4, 3),), recompile=True)
    x = torch.randn(4, 3, dtype=torch.float64)
    got = compiled(x)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, Gate()(x))
    assert compiled.recompiles == 1


def test_cache_limit_warns_once_then_runs_eagerly(module):
    compiled = fusec.compile(module, (torch.randn(1, 5, 8),), recompile=True, cache_limit=1,
                             backend="reference")
    compiled(torch.randn(2, 5, 8))  # the one recompile allowed
    with pytest.warns(UserWarning, match="cache_limit"):
        x = torch.randn(3, 5, 8)
        torch.testing.assert_close(compiled(x), eager(module, x))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fusec")  # only once
        x = torch.randn(4, 5, 8)
        torch.testing.assert_close(compiled(x), eager(module, x))
    assert compiled.recompiles == 1


@pytest.mark.parametrize("bad, words", [(3.0, "must be a torch.Tensor"), ([[1.0] * 8] * 5, "expects 1 input tensor")],
                         ids=["scalar", "list"])
def test_non_tensor_is_an_error_even_with_recompile(module, bad, words):
    compiled = fusec.compile(module, (torch.randn(2, 5, 8),), recompile=True, backend="reference")
    with pytest.raises(TypeError, match=words):
        compiled(bad)


# --- dynamic dimensions ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dynamic", [{"x": {1}}, {0: [1]}, {"x": -2}], ids=["name", "position", "negative"])
def test_dynamic_dimension_is_one_symbolic_program_without_counting(module, dynamic):
    compiled = fusec.compile(module, (torch.randn(2, 5, 8),), dynamic=dynamic, cache_limit=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fusec")  # no limit warning
        for seq in (3, 7, 5, 3, 1):
            x = torch.randn(2, seq, 8)
            torch.testing.assert_close(compiled(x), eager(module, x), rtol=1e-5, atol=1e-5)
    assert compiled.recompiles == 0
    # one program for the range torch.export finds (2 and up), one for the size torch specializes (1)
    programs = {id(s): str(s.graph.input_types[0].shape[1]) for s in compiled.specializations}
    assert sorted(programs.values()) == ["1", "s0"] and compiled.stats["programs"] == 2
    with pytest.raises(ValueError, match=r"dimensions \[1\] may change"):
        compiled(torch.randn(4, 5, 8))  # the batch is static


def test_dynamic_names_an_unknown_input(module):
    with pytest.raises(ValueError, match="'y'.*'x'"):
        fusec.compile(module, (torch.randn(2, 5, 8),), dynamic={"y": {1}}, backend="reference")


def test_dynamic_true_allows_every_dimension(module):
    compiled = fusec.compile(module, (torch.randn(2, 5, 8),), dynamic=True, backend="reference")
    x = torch.randn(1, 2, 8)
    torch.testing.assert_close(compiled(x), eager(module, x))
    assert compiled.recompiles == 0


# --- constants are guarded by type and value ------------------------------------------------------------

class Times(torch.nn.Module):
    def forward(self, x, n):
        return x.long() * n


class Pick(torch.nn.Module):
    def forward(self, x, i):
        return x[i]


@pytest.mark.parametrize("backend", ["numba", "reference"])
def test_equal_constants_of_another_type_are_another_signature(backend):
    x = torch.arange(6.0).reshape(2, 3)
    times = fusec.compile(Times(), (x, 2), backend=backend)
    with pytest.raises(ValueError, match=r"constant 2 \(int\).*2\.0 \(float\)"):
        times(x, 2.0)
    pick = fusec.compile(Pick(), (x, 1), backend=backend)
    with pytest.raises(ValueError, match=r"constant 1 \(int\).*True \(bool\)"):
        pick(x, True)
    pick = fusec.compile(Pick(), (x, 1), backend=backend, recompile=True)
    times = fusec.compile(Times(), (x, 2), backend=backend, recompile=True)
    for compiled, module, arg in ((times, Times(), 2.0), (pick, Pick(), True), (pick, Pick(), 1)):
        got, want = compiled(x, arg), eager(module, x, arg)
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want)


# --- keyword arguments, outputs that are not tensors, empty batches -------------------------------------

class Affine(torch.nn.Module):
    def forward(self, x, *, a, b):
        return x * a + b


@pytest.mark.parametrize("example_order", ["ab", "ba"])
def test_keyword_arguments_in_any_order(example_order):
    x, a, b = torch.randn(3), torch.randn(3), torch.randn(3)
    example = {"a": a, "b": b} if example_order == "ab" else {"b": b, "a": a}
    compiled = fusec.compile(Affine(), (x,), example)
    want = x * a + b
    torch.testing.assert_close(compiled(x, a=a, b=b), want)
    torch.testing.assert_close(compiled(x, b=b, a=a), want)
    with pytest.raises(TypeError, match="keyword"):
        compiled(x, a=a, c=b)


class Returns(torch.nn.Module):
    def __init__(self, what):
        super().__init__()
        self.what = what

    def forward(self, x):
        y = x * 2.0
        return {"none": lambda: None, "int": lambda: 3, "mixed": lambda: (y, None, 2, {"t": x + 1, "s": 1.5}),
                "only_constants": lambda: (None, 4)}[self.what]()


@pytest.mark.parametrize("backend", ["numba", "reference"])
@pytest.mark.parametrize("what", ["none", "int", "mixed", "only_constants"])
def test_outputs_that_are_not_tensors_pass_through_like_eager(backend, what):
    x = torch.randn(4)
    module = Returns(what)
    got, want = fusec.compile(module, (x,), backend=backend)(x), eager(module, x)
    assert type(got) is type(want)
    if what == "mixed":
        torch.testing.assert_close(got[0], want[0])
        assert got[1:3] == want[1:3] and got[3]["s"] == 1.5
        torch.testing.assert_close(got[3]["t"], want[3]["t"])
    else:
        assert got == want


def test_empty_batch_gives_eager_result_or_clear_error(module):
    empty = torch.randn(0, 5, 8)
    compiled = fusec.compile(module, (torch.randn(2, 5, 8),), dynamic={"x": {0}})
    got = compiled(empty)
    assert got.shape == (0, 5, 8)
    static = fusec.compile(module, (torch.randn(2, 5, 8),))
    with pytest.raises(ValueError, match=r"\[0, 5, 8\]"):
        static(empty)
    with pytest.raises(ValueError, match="empty"):
        fusec.compile(module, (empty,))
    lin = torch.nn.Linear(4, 3)
    compiled = fusec.compile(lin, (torch.randn(2, 4),), recompile=True)
    assert compiled(torch.randn(0, 4)).shape == (0, 3)
