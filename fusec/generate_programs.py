"""The programs a `fusec.generate.Generator` runs, and how it runs them: the compilers that make them
(`fusec_compiler`, `eager_compiler`), a prompt's prefill and one decode step on the generator's KV caches
(`run_prefill`, `decode_stepper`), binding weights to compiled programs (`bind_all`), and the counts a
generator keeps of its runs (`counters`, `with_rates`, `kernel_counts`).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from fusec.api import compile as compile_module
from fusec.api import compile_started

Program = Callable[..., tuple]                    # a compiled (or eager) Prefill / DecodeStep
Compiler = Callable[[nn.Module, tuple], Program]  # (module, example inputs) -> program
WEIGHTS = ("fp32", "bf16", "int8")


def fusec_compiler(backend: str = "numba", weights: str = "fp32", fuse: bool = True,
                   loop: bool | None = None) -> Compiler:
    """A Compiler running `fusec.compile` with these options."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, given {weights!r}")
    options = {}
    if weights != "fp32":
        options["weights"] = weights
    if loop is not None:
        options["loop"] = loop

    def compile_program(module: nn.Module, example: tuple, dynamic=None) -> Program:
        return compile_module(module, example, backend=backend, fuse=fuse, dynamic=dynamic, **options)

    def start_program(module: nn.Module, example: tuple, dynamic=None) -> Callable[[], Program]:
        return compile_started(module, example, backend=backend, fuse=fuse, dynamic=dynamic, **options)

    compile_program.symbolic = True  # takes `dynamic`: one prefill program for every prompt length
    compile_program.weights = weights  # the programs' arithmetic is PyTorch's with "fp32" (`prompt_by_eager`)
    compile_program.start = start_program  # in two halves (`Generator.compile_programs`)
    return compile_program


def eager_compiler(module: nn.Module, example: tuple) -> Program:
    """The module itself, run in PyTorch eager without autograd."""
    def run(*args):
        with torch.no_grad():
            return module(*args)
    return run


def decode_stepper(decode: Program, k_cache: Tensor, v_cache: Tensor) -> Callable[[Tensor, int], Tensor]:
    """(token [B], pos) -> logits [B, vocab]: one decode step, its new K/V rows written into the caches in
    place. A fusec program runs on NumPy views of one set of input arrays (`run_arrays`: the inputs have
    its signature by construction, so the guards are skipped); anything else runs as a torch callable."""
    batch = k_cache.shape[1]
    if not hasattr(decode, "run_arrays"):
        def torch_step(token: Tensor, pos: int) -> Tensor:
            logits, k_new, v_new = decode(token.view(batch, 1), torch.tensor([pos]), k_cache, v_cache)
            k_cache[:, :, :, pos] = k_new[:, :, :, 0]  # one row per layer, in place
            v_cache[:, :, :, pos] = v_new[:, :, :, 0]
            return logits
        return torch_step
    token_in, pos_in = np.zeros((batch, 1), np.int64), np.zeros(1, np.int64)
    k_np, v_np = k_cache.numpy(), v_cache.numpy()
    first = True  # the module's parameters are followed at the first step (one generation's steps share them)

    def array_step(token: Tensor, pos: int) -> Tensor:
        nonlocal first
        token_in[:, 0] = token.numpy()
        pos_in[0] = pos
        logits, k_new, v_new = decode.run_arrays([token_in, pos_in, k_np, v_np], follow=first)
        first = False
        k_np[:, :, :, pos] = k_new[:, :, :, 0]
        v_np[:, :, :, pos] = v_new[:, :, :, 0]
        return torch.from_numpy(logits)
    return array_step


def run_prefill(prefill: Program, ids: Tensor, length: int, padded: bool, k_cache: Tensor,
                v_cache: Tensor) -> Tensor:
    """The logits after prompts `ids` [B, T] run through the prefill program at `length` tokens, their
    K/V rows written into the caches. A program of prompt buckets (`padded`), or one longer than the
    prompt, takes it padded with zeros on the right and the row of the logits to return."""
    batch, prompt_len = ids.shape
    if length == prompt_len and not padded:
        logits, k_all, v_all = prefill(ids)
    else:
        padded_ids = torch.zeros(batch, length, dtype=torch.int64)
        padded_ids[:, :prompt_len] = ids
        logits, k_all, v_all = prefill(padded_ids, torch.tensor([prompt_len - 1]))
    k_cache[:, :, :, :length] = k_all
    v_cache[:, :, :, :length] = v_all
    return logits


def prompt_by_decode(ids: Tensor, decode_step: Callable[[Tensor, int], Tensor],
                     prefill_compiling: Callable[[], bool]) -> Tensor | None:
    """The logits after prompts `ids` [B, T] run through the decode program a token at a time (their K/V
    rows written as decode steps write them), while `prefill_compiling()`; None as soon as it is not (the
    prefill program then runs the whole prompt: a long prompt does not wait on single steps for long)."""
    logits = None
    for pos in range(ids.shape[1]):
        if not prefill_compiling():
            return None
        logits = decode_step(ids[:, pos], pos)
    return logits


def prompt_by_eager(prefill: nn.Module, ids: Tensor, k_cache: Tensor, v_cache: Tensor) -> Tensor:
    """The logits after prompts `ids` [B, T] run through the `prefill` module in PyTorch eager, their K/V
    rows written into the caches: a cold start's first prompt of fp32 weights while the workers still build
    the prefill program. One pass reads the weights once where the decode program reads them once per
    token: tinyllama_1b's 5-token prompt 0.44-0.48 s against 0.84-0.89 s beside the workers."""
    with torch.no_grad():
        return run_prefill(prefill, ids, ids.shape[1], False, k_cache, v_cache)


PREFIX = "model."  # Prefill and DecodeStep hold the model as `self.model`


def program_weights(program: Program):
    """The compiled module behind a program, which can bind weights; TypeError for an eager program."""
    if not hasattr(program, "bind_weights"):
        raise TypeError("only fusec-compiled programs take weights as arguments; this generator runs "
                        f"{type(program).__name__}")
    return program


def bind(program: Program, bound: dict) -> None:
    program_weights(program).bind_weights(bound)


def bind_all(programs: list[Program], tensors: dict) -> dict:
    """Bind `tensors` ({parameter name of the model: tensor}) in every one of `programs`, all checked before
    any changes (a wrong tensor leaves every program as it was); the bound dict, for programs made later."""
    bound = {PREFIX + name: t for name, t in tensors.items()}
    for program in programs:  # check them all before changing any
        from fusec.binding import check_weights
        check_weights(program_weights(program).graph, bound)
    for program in programs:
        bind(program, bound)
    return bound


def counters() -> dict:
    """A generator's run counts, all zero (its totals, and each `generate` call's own)."""
    return dict(compiles=0, compile_seconds=0.0, prompt_tokens=0, prefill_seconds=0.0, prompts_by_decode=0,
                prompts_by_eager=0, tokens_generated=0, decode_steps=0, decode_tokens=0, decode_seconds=0.0)


def kernel_counts(prefill: dict, decode: dict) -> dict:
    """kernel_calls: {"decode b1": calls per run, "prefill b1 t8": ...}; distinct_kernels: the functions
    all these programs compiled, each distinct kernel body counted once (None without compiled kernels)."""
    programs = {**{f"prefill b{b} t{t}": p for (b, t), p in prefill.items()},
                **{f"decode b{b}": p for b, p in decode.items()}}
    calls = {name: p.stats["kernel_calls"] for name, p in programs.items() if getattr(p, "stats", None)}
    modules = {m.__name__ for p in programs.values() for m in getattr(getattr(p, "program", None), "modules", ())}
    return {"kernel_calls": calls, "distinct_kernels": len(modules) or None}


def with_rates(counts: dict) -> dict:
    """`counts` plus prefill_tokens_per_s (prompt tokens) and decode_tokens_per_s (the tokens decode steps
    yield: all but each sequence's first, which comes from prefill)."""
    def rate(n: float, seconds: float) -> float:
        return n / seconds if seconds > 0 else 0.0
    return dict(counts, prefill_tokens_per_s=rate(counts["prompt_tokens"], counts["prefill_seconds"]),
                decode_tokens_per_s=rate(counts["decode_tokens"], counts["decode_seconds"]))


def check_prompt(ids: Tensor, vocab: int, max_seq_len: int, max_new_tokens: int, temperature: float,
                 top_k: int | None) -> Tensor:
    """The prompt ids [B, T] as int64, or the error that says what a generation of `max_new_tokens` from
    them needs (a vocabulary of `vocab` tokens, a KV cache of `max_seq_len` rows)."""
    if ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
        raise ValueError(f"input_ids must be a non-empty int tensor [B, T] (or [T]), given "
                         f"{getattr(ids, 'shape', type(ids).__name__)}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"input_ids must hold integer token ids, given {ids.dtype}")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(f"input_ids must be token ids in 0..{vocab - 1}, given values in "
                         f"{int(ids.min())}..{int(ids.max())}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, given {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, given {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive number of tokens (or None for all), given {top_k!r}")
    # every token but the last new one goes through the model into a cache row (the last is chosen
    # from the logits of the one before): prompt and new tokens may be max_seq_len + 1 together
    prompt_len, last = ids.shape[1], ids.shape[1] + max_new_tokens - 2
    if prompt_len > max_seq_len or last >= max_seq_len:
        what = (f"a {prompt_len}-token prompt" if prompt_len > max_seq_len else
                f"a {prompt_len}-token prompt plus {max_new_tokens} new tokens needs cache position {last}")
        raise ValueError(f"{what}, past max_seq_len={max_seq_len} (cache positions 0.."
                         f"{max_seq_len - 1}; prompt + new tokens may be max_seq_len + 1); shorten "
                         f"the prompt, generate fewer tokens, or compile with a larger max_seq_len")
    return ids.to(torch.int64)
