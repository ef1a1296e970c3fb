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


def test_prefill_is_traced_while_the_decode_program_compiles(monkeypatch, tmp_path):
    """compile_generator compiles both programs, and traces the prefill before it waits for the decode
    program's kernels (which compile in worker processes meanwhile): a cold start used to trace the
    prefill only at the first prompt, after the decode program was done, the workers idle."""
    import fusec.tracing as tracing
    from fusec.backends.numba_cpu.runtime import Program
    monkeypatch.setenv("FUSEC_CACHE_DIR", str(tmp_path))
    events = []
    export, load_cached = tracing.export, Program.load_cached
    monkeypatch.setattr(tracing, "export", lambda module, *a, **k: events.append(
        f"trace {type(module).__name__}") or export(module, *a, **k))
    monkeypatch.setattr(Program, "load_cached", lambda self: events.append("compiled") or load_cached(self))
    gen = compile_generator(random_model(TINY, seed=3), max_seq_len=16, background=False)
    assert events == ["trace DecodeStep", "trace Prefill", "compiled", "compiled"]
    assert gen.stats["compiles"] == 2 and (1, "T") in gen._prefill
    tokens = prompt(length=5, seed=3)
    ids, logits = gen.generate(tokens, max_new_tokens=4, return_logits=True)
    assert gen.last["compiles"] == 0
    ref_ids, ref_logits = eager_generate(random_model(TINY, seed=3), tokens, 4, max_seq_len=16)
    assert assert_same_greedy(ids, logits, ref_ids, ref_logits, 5) >= 1
