"""Every bad input to fusec raises a clear error naming what was expected and what was given."""
from __future__ import annotations

import re

import pytest
import torch

import fusec
from fusec.errors import FusecError, UnsupportedOpError


# --- unsupported ops ------------------------------------------------------------------------------------

class RunningSum(torch.nn.Module):
    def forward(self, x):
        return torch.cumsum(x, dim=-1)


class WithScan(torch.nn.Module):
    """The unsupported op sits in a submodule, so the error can name its module path."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.scan = RunningSum()

    def forward(self, x):
        return self.scan(self.proj(x)) + 1.0


class Spectrum(torch.nn.Module):
    def forward(self, x):
        return torch.fft.fft(x).real


def test_unsupported_op_names_op_module_path_and_source_line():
    with pytest.raises(UnsupportedOpError) as info:
        fusec.compile(WithScan(), (torch.randn(2, 8),), strict=True)  # default: cumsum runs in torch
    message = str(info.value)
    assert "cumsum" in message
    assert "scan" in message  # the module path of the submodule that used it
    assert re.search(r"test_errors\.py:\d+", message), message  # the line in the user's code
    assert "cumsum" in info.value.op
    assert "scan" in info.value.origin
    assert isinstance(info.value, FusecError)


def test_unsupported_fft_names_the_op_and_source_line():
    with pytest.raises(UnsupportedOpError) as info:
        fusec.compile(Spectrum(), (torch.randn(2, 8),))
    message = str(info.value)
    assert "fft" in message
    line = Spectrum.forward.__code__.co_firstlineno + 1
    assert f"test_errors.py:{line}" in message, message


class ScanOfBuffer(torch.nn.Module):
    """cumsum of a constant is folded at trace time, so only input-dependent uses are errors."""

    def __init__(self):
        super().__init__()
        self.register_buffer("steps", torch.arange(8, dtype=torch.float32))

    def forward(self, x):
        return x + torch.cumsum(self.steps, dim=0)


def test_unsupported_op_on_a_constant_is_folded():
    module = ScanOfBuffer()
    x = torch.randn(2, 8)
    compiled = fusec.compile(module, (x,))
    assert torch.allclose(compiled(x), module(x))


# --- calling a compiled module with the wrong inputs -----------------------------------------------------

class TwoInputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 4)

    def forward(self, x, y):
        return self.proj(x) + y


@pytest.fixture(scope="module")
def compiled():
    return fusec.compile(TwoInputs(), (torch.randn(2, 8), torch.randn(2, 4)))


def test_valid_call_works(compiled):
    out = compiled(torch.randn(2, 8), torch.randn(2, 4))
    assert out.shape == (2, 4)


@pytest.mark.parametrize("count", [1, 3])
def test_wrong_number_of_inputs_is_a_type_error(compiled, count):
    args = [torch.randn(2, 8), torch.randn(2, 4), torch.randn(2, 4)][:count]
    with pytest.raises(TypeError) as info:
        compiled(*args)
    message = str(info.value)
    assert "expects 2 input tensor" in message  # expected
    assert f"got {count} positional" in message  # given
    assert "f32[2,8]" in message and "f32[2,4]" in message


def test_unexpected_keyword_is_a_type_error(compiled):
    with pytest.raises(TypeError, match=r"expects 2 input tensor.*got 2 positional and 1 keyword"):
        compiled(torch.randn(2, 8), torch.randn(2, 4), scale=torch.randn(1))


def test_wrong_shape_is_a_value_error_with_both_shapes(compiled):
    with pytest.raises(ValueError) as info:
        compiled(torch.randn(3, 8), torch.randn(2, 4))
    message = str(info.value)
    assert "[2, 8]" in message and "[3, 8]" in message
    assert "input 0" in message


def test_wrong_shape_of_second_input_names_it(compiled):
    with pytest.raises(ValueError) as info:
        compiled(torch.randn(2, 8), torch.randn(2, 5))
    message = str(info.value)
    assert "[2, 4]" in message and "[2, 5]" in message
    assert "input 1" in message and "(y)" in message


def test_wrong_rank_is_a_value_error(compiled):
    with pytest.raises(ValueError, match=re.escape("[2, 8]") + ".*" + re.escape("[16]")):
        compiled(torch.randn(16), torch.randn(2, 4))


def test_wrong_dtype_is_a_type_error_with_both_dtypes(compiled):
    with pytest.raises(TypeError) as info:
        compiled(torch.randn(2, 8, dtype=torch.float64), torch.randn(2, 4))
    message = str(info.value)
    assert "float32" in message and "float64" in message


def test_integer_input_for_a_float_one_is_a_type_error(compiled):
    with pytest.raises(TypeError) as info:
        compiled(torch.randn(2, 8), torch.ones(2, 4, dtype=torch.int64))
    message = str(info.value)
    assert "float32" in message and "int64" in message


@pytest.mark.parametrize("bad", [3.0, [[1.0] * 4] * 2, None], ids=["float", "list", "none"])
def test_non_tensor_input_is_a_type_error(compiled, bad):
    with pytest.raises(TypeError):
        compiled(torch.randn(2, 8), bad)


def test_non_tensor_scalar_input_names_tensor_and_type(compiled):
    with pytest.raises(TypeError) as info:
        compiled(torch.randn(2, 8), 3.0)
    message = str(info.value)
    assert "torch.Tensor" in message and "float" in message


def test_numpy_array_input_is_a_type_error(compiled):
    import numpy as np
    with pytest.raises(TypeError) as info:
        compiled(torch.randn(2, 8), np.zeros((2, 4), np.float32))
    assert "ndarray" in str(info.value)


# --- bad arguments to fusec.compile ----------------------------------------------------------------------

@pytest.mark.parametrize("not_a_module", [lambda x: x * 2, torch.randn(2), "model"],
                         ids=["function", "tensor", "string"])
def test_compile_rejects_a_non_module(not_a_module):
    with pytest.raises(TypeError) as info:
        fusec.compile(not_a_module, (torch.randn(2),))
    message = str(info.value)
    assert "torch.nn.Module" in message
    assert type(not_a_module).__name__ in message


def test_compile_rejects_an_unknown_backend():
    with pytest.raises(ValueError) as info:
        fusec.compile(TwoInputs(), (torch.randn(2, 8), torch.randn(2, 4)), backend="tpu")
    message = str(info.value)
    assert "'tpu'" in message
    assert "reference" in message  # the valid choices are listed
