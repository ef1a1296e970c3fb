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
