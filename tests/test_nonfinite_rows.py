"""A NaN or inf in one token of a Llama block's input spreads as in eager: through the scores to the
later rows, and through 0 * nan in P @ V to the earlier rows that mask that token. The fused Numba
program skips masked keys, so it must add those products back when a masked value is not finite."""
from __future__ import annotations

import pytest
import torch

import fusec
from fusec.models.llama import LlamaBlock, LlamaConfig

pytestmark = pytest.mark.filterwarnings("ignore::numba.NumbaPerformanceWarning")


@pytest.fixture(scope="module")
def block_and_programs():
    torch.manual_seed(0)
    block = LlamaBlock(LlamaConfig.tiny()).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(1, 8, block.config.dim)
    return block, x, {b: fusec.compile(block, (x, 0), backend=b) for b in ("numba", "reference")}


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("token", [0, 3, 7])
def test_nonfinite_token_makes_the_same_rows_nan_as_eager(block_and_programs, value, token):
    block, x, programs = block_and_programs
    x = x.clone()
    x[0, token, 5] = value
    with torch.no_grad():
        want = block(x, 0).isnan()
    for backend, program in programs.items():
        got = program(x, 0)
        assert torch.equal(got.isnan(), want), (backend, got.isnan().any(-1), want.any(-1))


def test_finite_rows_stay_finite_and_exact(block_and_programs):
    block, x, programs = block_and_programs
    with torch.no_grad():
        want = block(x, 0)
    torch.testing.assert_close(programs["numba"](x, 0), want, rtol=1e-4, atol=1e-4)
