"""bfloat16 modules and inputs: computed in float32 and rounded to bf16 op by op, as torch eager does;
outputs are bf16 tensors. Narrow integers wrap around op by op, as in eager. Other dtypes either work or
are refused by name."""
from __future__ import annotations

import pytest
import torch

import fusec
from fusec.errors import FusecError

pytestmark = pytest.mark.filterwarnings("ignore::numba.NumbaPerformanceWarning")
BACKENDS = ("numba", "reference")


class Add(torch.nn.Module):
    def forward(self, x):
        return x + 1


class Exact(torch.nn.Module):
    """Op by op rounding decides the result: 256 + 1 is 256 in bf16, so this is 0 where a float32
    computation would give 1."""

    def forward(self, x):
        return ((x + 1) - x) * 3 + x.sum(-1, keepdim=True)


class Wrap(torch.nn.Module):
    def forward(self, x):
        return (x * 2) > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_add_matches_eager(backend):
    x = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.bfloat16)
    y = fusec.compile(Add(), (x,), backend=backend)(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, Add()(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_rounds_after_every_op_as_eager(backend):
    x = torch.tensor([[256.0, 1.0, 3.0, 0.5], [512.0, -7.0, 1e-3, 2.0]], dtype=torch.bfloat16)
    y = fusec.compile(Exact(), (x,), backend=backend)(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, Exact()(x)), (y, Exact()(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_linear_matches_eager(backend):
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8).bfloat16().eval()
    x = torch.randn(4, 16).bfloat16()
    with torch.no_grad():
        want = lin(x)
    y = fusec.compile(lin, (x,), backend=backend)(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, want, rtol=2e-2, atol=2e-2)


def test_bf16_llama_matches_eager_and_the_reference_backend():
    from fusec.models.llama import LlamaBlock, LlamaConfig
    torch.manual_seed(0)
    block = LlamaBlock(LlamaConfig.tiny()).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    block = block.to(torch.bfloat16)
    x = torch.randn(1, 8, block.config.dim).bfloat16()
    with torch.no_grad():
        want = block(x, 0)
    got = {b: fusec.compile(block, (x, 0), backend=b)(x, 0) for b in BACKENDS}
    for b, y in got.items():
        assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all(), b
        torch.testing.assert_close(y.float(), want.float(), rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(got["numba"].float(), got["reference"].float(), rtol=2e-2, atol=2e-2)


def test_bf16_through_torch_compile():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8).bfloat16().eval()
    x = torch.randn(4, 16).bfloat16()
    with torch.no_grad():
        want = lin(x)
        y = torch.compile(lin, backend="fusec")(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.uint8])
def test_narrow_integers_wrap_op_by_op(dtype):
    x = torch.tensor([100, 120, 7, 1], dtype=torch.int64)
    x = (x * {torch.int8: 1, torch.uint8: 1, torch.int16: 300, torch.int32: 20_000_000}[dtype]).to(dtype)
    y = fusec.compile(Wrap(), (x,))(x)
    assert torch.equal(y, Wrap()(x))


def test_float16_is_a_clear_error_on_numba_and_complex_everywhere():
    x = torch.ones(4, dtype=torch.float16)
    with pytest.raises(FusecError, match="float16"):
        fusec.compile(Add(), (x,))
    z = torch.ones(4, dtype=torch.complex64)
    with pytest.raises(FusecError, match="complex64 is not supported"):
        fusec.compile(Add(), (z,))
