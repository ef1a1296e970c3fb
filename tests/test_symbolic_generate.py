"""Generation with one symbolic prefill program: every prompt length 1..max_seq_len matches eager greedy
decoding with exactly two programs compiled (one prefill, one decode)."""
from __future__ import annotations

import pytest
import torch

from fusec.generate import compile_generator, eager_generate
from fusec.models.causal_lm import random_model
from test_generate import TINY, assert_same_greedy, prompt

pytestmark = pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning")


def test_prompts_of_many_lengths_two_programs():
    model = random_model(TINY, seed=0)
    gen = compile_generator(model, max_seq_len=64)
    assert gen.symbolic
    for length in (1, 2, 5, 13, 31, 60):
        tokens = prompt(length=length, seed=length)
        ids, logits = gen.generate(tokens, max_new_tokens=5, return_logits=True)
        ref_ids, ref_logits = eager_generate(model, tokens, 5, max_seq_len=64)
        assert assert_same_greedy(ids, logits, ref_ids, ref_logits, length) >= 1
    assert gen.stats["compiles"] == 2 and len(gen._prefill) == 1


def test_a_full_length_prompt_runs_the_same_program():
    model = random_model(TINY, seed=1)
    gen = compile_generator(model, max_seq_len=12, backend="reference")
    for length in (12, 3):
        ids = prompt(length=length)
        got = gen.generate(ids, max_new_tokens=1)
        assert torch.equal(got, eager_generate(model, ids, 1, 12)[0])
    assert gen.stats["compiles"] == 2


def test_buckets_still_pad_prompts():
    gen = compile_generator(random_model(TINY, seed=2), max_seq_len=32, backend="reference",
                            prompt_buckets=(16,))
    assert not gen.symbolic
    gen.generate(prompt(length=5), max_new_tokens=2)
    gen.generate(prompt(length=7), max_new_tokens=2)
    assert list(gen._prefill) == [(1, 16)]
