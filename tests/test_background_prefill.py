"""A cold start's first prompts while the compile workers still build the prefill program
(`compile_generator(background=True)`): they run through the decode program a token at a time, or in
PyTorch eager when the programs read the model's own fp32 weights, and give eager's tokens; the prefill
program takes over once it is done, or at once when it is done mid-prompt."""
from __future__ import annotations

import pytest
import torch

from fusec.backends.numba_cpu import compile_pool
from fusec.generate import Generator, compile_generator, eager_compiler, eager_generate
from fusec.models.causal_lm import Prefill, random_model
from test_generate import TINY, assert_same_greedy, prompt

pytestmark = pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning")


class Staged:
    """A compiler of eager programs whose prefill program reports itself compiling in the workers for its
    first `busy` polls (`compiling_elsewhere`), as `fusec.api.compile_started`'s does."""
    symbolic = True

    def __init__(self, busy: int, weights: str | None = None):
        self.busy, self.polls, self.finished = busy, 0, 0
        if weights is not None:  # as `fusec_compiler` says of its programs
            self.weights = weights

    def __call__(self, module, example, dynamic=None):
        return eager_compiler(module, example)

    def start(self, module, example, dynamic=None):
        program = eager_compiler(module, example)

        def finish():
            self.finished += 1
            return program

        def compiling_elsewhere():
            self.polls += isinstance(module, Prefill)
            return isinstance(module, Prefill) and self.polls <= self.busy
        finish.compiling_elsewhere = compiling_elsewhere
        return finish


def generator(busy: int, background: bool = True, seed: int = 0, weights: str | None = None) -> Generator:
    gen = Generator(random_model(TINY, seed=seed), 32, Staged(busy, weights), background=background)
    gen.compile_programs(1)
    return gen


def test_prompts_run_through_the_decode_program_while_the_prefill_compiles():
    gen = generator(busy=10**6)
    assert gen.prefill_compiling() and gen.stats["compiles"] == 1
    for length in (1, 5, 9):
        tokens = prompt(length=length, seed=length)
        ids, logits = gen.generate(tokens, max_new_tokens=4, return_logits=True)
        want_ids, want_logits = eager_generate(gen.model, tokens, 4, max_seq_len=32)
        assert assert_same_greedy(ids, logits, want_ids, want_logits, length) >= 1
        assert gen.last["prompts_by_decode"] == 1 and gen.last["compiles"] == 0
    gen.wait()  # the prefill program finished: it runs the next prompts
    assert not gen.prefill_compiling() and gen.stats["compiles"] == 2 and gen.compiler.finished == 2
    tokens = prompt(length=6, seed=6)
    ids, logits = gen.generate(tokens, max_new_tokens=4, return_logits=True)
    assert torch.equal(ids, eager_generate(gen.model, tokens, 4, max_seq_len=32)[0])
    assert gen.last["prompts_by_decode"] == 0 and gen.stats["prompts_by_decode"] == 3


def test_prompts_of_fp32_programs_run_in_eager_while_the_prefill_compiles():
    gen = generator(busy=10**6, weights="fp32")
    for length in (2, 7, 20):  # one pass over the prompt, its K/V rows in the caches for the steps after it
        tokens = prompt(length=length, seed=length)
        ids, logits = gen.generate(tokens, max_new_tokens=5, return_logits=True)
        want_ids, want_logits = eager_generate(gen.model, tokens, 5, max_seq_len=32)
        assert torch.equal(ids, want_ids) and torch.allclose(logits, want_logits, rtol=1e-4, atol=1e-4)
        assert gen.last["prompts_by_eager"] == 1 and gen.last["prompts_by_decode"] == 0
    gen.generate(prompt(length=1), max_new_tokens=2)  # one token: one decode step reads the weights once too
    assert gen.last["prompts_by_eager"] == 0 and gen.last["prompts_by_decode"] == 1
    assert gen.prefill_compiling() and gen.stats["prompts_by_eager"] == 3


@pytest.mark.parametrize("weights", ["bf16", "bound"])
def test_prompts_run_through_the_decode_program_where_eager_would_compute_otherwise(weights):
    gen = generator(busy=10**6, weights="fp32" if weights == "bound" else weights)
    if weights == "bound":  # weights in place of the model's own: eager would read the model's
        gen._bound = {}
    gen.generate(prompt(length=6), max_new_tokens=2)
    assert gen.last["prompts_by_eager"] == 0 and gen.last["prompts_by_decode"] == 1


def test_a_prefill_done_mid_prompt_runs_the_whole_prompt():
    gen = generator(busy=3)  # compile_programs polls once; the prompt's second token finds it done
    tokens = prompt(length=7, seed=1)
    ids, logits = gen.generate(tokens, max_new_tokens=3, return_logits=True)
    want_ids, want_logits = eager_generate(gen.model, tokens, 3, max_seq_len=32)
    assert assert_same_greedy(ids, logits, want_ids, want_logits, 7) >= 1
    assert gen.last["prompts_by_decode"] == 0 and gen.last["compiles"] == 1 and gen.stats["compiles"] == 2
    assert gen.last["prefill_seconds"] > 0  # the prompt's time alone, not the program's since its start


def test_without_background_both_programs_are_finished_first():
    gen = generator(busy=10**6, background=False)
    assert not gen.prefill_compiling() and gen.stats["compiles"] == 2
    gen.generate(prompt(length=3), max_new_tokens=2)
    assert gen.last["prompts_by_decode"] == 0


def test_a_cold_start_with_compile_workers_gives_eager_tokens(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSEC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FUSEC_COMPILE_WORKERS", "1")
    try:
        model = random_model(TINY, seed=4)
        gen = compile_generator(model, max_seq_len=32)
        for length in (5, 11):  # the first prompt likely while the worker builds the prefill program
            tokens = prompt(length=length, seed=length)
            ids, logits = gen.generate(tokens, max_new_tokens=4, return_logits=True)
            want_ids, want_logits = eager_generate(model, tokens, 4, max_seq_len=32)
            assert assert_same_greedy(ids, logits, want_ids, want_logits, length) >= 1
        gen.wait()
        assert gen.stats["compiles"] == 2 and not gen.prefill_compiling()
    finally:
        compile_pool._POOL.close()
