"""Generated code keeps the meaning of every float op as written: no reassociation (which folds
(x + c) - c to x and a Kahan compensation to 0), no NaN/inf assumptions (exp(log(x)) is NaN for x < 0),
and the sign of zero (-0.0 + 0.0 is +0.0: 1 / it is +inf). Eager, the reference backend and the fused
Numba program agree exactly here."""
from __future__ import annotations

import pytest
import torch

import fusec

pytestmark = pytest.mark.filterwarnings("ignore::numba.NumbaPerformanceWarning")
MAGIC = 12582912.0  # 1.5 * 2**23: (x + MAGIC) - MAGIC rounds x to an integer (ties to even) in float32


class RoundToInteger(torch.nn.Module):
    def forward(self, x):
        return (x + MAGIC) - MAGIC


class KahanCompensation(torch.nn.Module):
    def forward(self, s, y):
        t = s + y
        return (t - s) - y


class ExpOfLog(torch.nn.Module):
    def forward(self, x):
        return torch.exp(torch.log(x))


class InverseOfSum(torch.nn.Module):
    def forward(self, x):
        return 1.0 / (x + 0.0)


class SumOfRounded(torch.nn.Module):
    def forward(self, x):
        return ((x + MAGIC) - MAGIC).sum(-1)


X = torch.tensor([[0.3, 1.7, -2.5], [2.5, -1.0, 0.0]])
CASES = {
    "round": (RoundToInteger(), (X,)),
    "kahan": (KahanCompensation(), (torch.full((2, 3), 1e8), torch.tensor([[1.0, 3.3, -7.7], [0.1, 2.0, 5.0]]))),
    "exp_log": (ExpOfLog(), (X,)),
    "signed_zero": (InverseOfSum(), (torch.tensor([-0.0, 0.0, 1.0]),)),
    "sum_of_rounded": (SumOfRounded(), (X,)),
}


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("backend", ["numba", "reference"])
@pytest.mark.parametrize("case", CASES)
def test_float_ops_keep_their_meaning(case, backend, fuse):
    module, args = CASES[case]
    want = module(*args)
    got = fusec.compile(module, args, backend=backend, fuse=fuse)(*args)
    if case == "exp_log":  # exp and log are rounded by each library: NaN where eager has NaN is the point
        assert torch.equal(got.isnan(), want.isnan()), (got, want)
        torch.testing.assert_close(got, want, equal_nan=True)
    else:
        assert torch.equal(got, want), (got, want)
        assert torch.equal(got.signbit(), want.signbit()) and torch.equal(1 / got, 1 / want)
