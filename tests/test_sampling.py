"""Token sampling (fusec/sampling.py): greedy, temperature, top-k and top-p, seeded."""
from __future__ import annotations

import pytest
import torch

from fusec.sampling import sampler

LOGITS = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))


def draws(n: int = 400, **options) -> set[int]:
    pick = sampler(1.0, 0, None, **options)
    return {int(pick(LOGITS)) for _ in range(n)}


def test_top_p_keeps_the_fewest_most_likely_tokens_that_reach_it():
    assert draws() == {0, 1, 2, 3}
    assert draws(top_p=0.5) == {0}           # the most likely already holds half
    assert draws(top_p=0.7) == {0, 1}
    assert draws(top_p=0.85) == {0, 1, 2}    # 0.8 is not enough, 0.95 is
    assert draws(top_p=0.01) == {0}          # never empty


def test_seeded_draws_repeat_and_bad_top_p_is_refused():
    a, b = sampler(0.9, 3, 3, 0.9), sampler(0.9, 3, 3, 0.9)
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(0))
    assert [a(logits).tolist() for _ in range(20)] == [b(logits).tolist() for _ in range(20)]
    for top_p in (0, 1.5, -0.1):
        with pytest.raises(ValueError, match="top_p must be a probability"):
            sampler(0.9, 0, None, top_p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_greedy_is_torch_argmax_with_ties_nan_and_inf(dtype):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 1000, generator=g).to(dtype)
    logits[0, [7, 300]] = 9.0                   # equal maxima: the first
    logits[1, [11, 500]] = float("nan")         # nan counts as the largest: the first nan
    logits[2, 900] = float("inf")
    logits[3] = float("-inf")                   # every logit -inf: index 0
    logits[4] = -1.0
    logits[4, 3], logits[4, 4] = -0.0, 0.0      # signed zeros are equal: the first
    pick = sampler(0.0, None, None)
    got = pick(logits)
    assert got.dtype == torch.int64 and got.shape == (5,)
    assert got.tolist() == logits.argmax(dim=-1).tolist() == [7, 11, 900, 0, 3]
    assert pick(logits[:, ::2]).tolist() == logits[:, ::2].argmax(dim=-1).tolist()  # a strided view
