"""Token generation with a compiled Llama: one symbolic prefill program for every prompt length, one decode
program for every position (each per batch size), and a static KV cache the generator owns.

    gen = fusec.compile_generator(model, max_seq_len=256)      # a CausalLM or a transformers LlamaForCausalLM
    ids = gen.generate(input_ids, max_new_tokens=64)           # greedy; temperature=0.8, seed=0 samples
    gen.stats                                                  # programs compiled, tokens, seconds, tokens/s

The decode program (`DecodeStep`) takes the position as a tensor, so it is compiled once per batch size
and serves every position. It returns the new K/V rows; the generator writes them into its caches
[n_layers, B, n_kv_heads, max_seq_len, head_dim] in place, one row per layer per step.
`eager_generate` runs the same two programs in PyTorch eager: the reference the tests compare with.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from fusec import huge_pages
from fusec.generate_programs import (PREFIX, WEIGHTS, Compiler, Program, bind, program_weights,  # noqa: F401
                                     bind_all, check_prompt, counters, decode_stepper, eager_compiler,
                                     fusec_compiler, kernel_counts, prompt_by_decode, prompt_by_eager,
                                     run_prefill, with_rates)
from fusec.models.causal_lm import CausalLM, DecodeStep, Prefill, cache_shape, from_hf
from fusec.sampling import sampler as _sampler


def as_causal_lm(model: nn.Module) -> CausalLM:
    """`model` if it is a CausalLM; a transformers causal LM of a Llama-family architecture (Llama, Mistral,
    Qwen2, Gemma, Phi-3) mapped by `from_hf`; else TypeError (ValueError for a config it cannot map)."""
    if isinstance(model, CausalLM):
        return model
    if getattr(getattr(model, "config", None), "model_type", None) is not None:
        return from_hf(model)
    raise TypeError(f"expected a fusec CausalLM or a transformers causal LM (LlamaForCausalLM, ...), got "
                    f"{type(model).__name__}")


class Generator:
    """Generates tokens with a model's Prefill and DecodeStep programs, made by `compiler`.

    Programs are compiled on first need and kept: prefill per (batch, prompt length or bucket), decode per
    batch. The caches per batch size are allocated once and reused (stale rows are masked by position).
    """

    def __init__(self, model: CausalLM, max_seq_len: int, compiler: Compiler,
                 prompt_buckets: Sequence[int] | None = None, name: str = "fusec", background: bool = False):
        if not 1 <= max_seq_len <= model.config.max_seq_len:
            raise ValueError(f"max_seq_len must be in 1..{model.config.max_seq_len} (the model's), "
                             f"given {max_seq_len}")
        self.model, self.max_seq_len, self.compiler, self.name = model, max_seq_len, compiler, name
        self.background = background  # see `compile_generator`
        self.prompt_buckets = sorted({b for b in (prompt_buckets or ()) if 1 <= b <= max_seq_len})
        self._prefill: dict[tuple[int, int], Program] = {}
        # batch -> (finish, start): the symbolic prefill program while the compile workers finish it
        self._compiling: dict[int, tuple[Callable[[], Program], float]] = {}
        self._decode: dict[int, Program] = {}
        self._caches: dict[int, tuple[Tensor, Tensor]] = {}
        self._faulting: dict[int, threading.Thread] = {}  # batch -> the thread faulting its caches in
        self._totals = counters()
        self._bound: dict | None = None  # weights bound in place of the model's own (`bind_weights`)
        self.last: dict = {}  # the stats of the last `generate` call alone
        self._lock = threading.Lock()  # one generate at a time (`_exclusive`)
        self._owner: int | None = None  # the thread inside generate
        self.to_pack: nn.Module | None = None  # a model whose parameters go to huge pages (`_pack_when_idle`)
        self.packing: huge_pages.Packing | None = None  # its parameters being copied there

    @property
    def stats(self) -> dict:
        """Totals over this generator's life: compiles, compile_seconds, prompt_tokens, prefill_seconds,
        prompts_by_decode and prompts_by_eager (prompts run a token at a time through the decode program,
        or in PyTorch eager, while the prefill program compiled),
        tokens_generated, decode_steps, decode_tokens (steps x batch), decode_seconds, and the rates
        prefill_tokens_per_s and decode_tokens_per_s; kernel_calls per run of each program and the
        distinct_kernels they compiled (kernels of equal bodies share one function, see `kernel_counts`)."""
        return {**with_rates(self._totals), **kernel_counts(self._prefill, self._decode)}

    # --- programs -------------------------------------------------------------------------------------

    def _compile(self, module: nn.Module, example: tuple, dynamic=None) -> Program:
        start = time.perf_counter()
        program = self.compiler(module, example, dynamic=dynamic) if dynamic else self.compiler(module, example)
        return self._compiled(program, start)

    def _compiled(self, program: Program, start: float) -> Program:
        if self._bound is not None:
            bind(program, self._bound)
        self._totals["compiles"] += 1
        self._totals["compile_seconds"] += time.perf_counter() - start
        return program

    def weight_types(self) -> dict:
        """{parameter name of the model: TensorType} of the weights the programs read (bf16 matrices with
        weights="bf16"): what `bind_weights` takes."""
        types = program_weights(self.decode_program(1)).weight_types()
        return {name.removeprefix(PREFIX): t for name, t in types.items()}

    def bind_weights(self, tensors: dict) -> None:
        """Generate with `tensors` ({parameter name of the model: tensor}, see `weight_types`) instead of
        the model's own weights, in every program compiled so far or later. Nothing recompiles: the
        programs take weights as arguments. This is how experts of one architecture share a generator."""
        with self._exclusive("bind_weights"):  # not in the middle of a generation
            self._bound = bind_all([*self._prefill.values(), *self._decode.values()], tensors)

    def decode_program(self, batch: int = 1) -> Program:
        """The decode program for `batch` sequences (compiled on first use)."""
        if batch not in self._decode:
            self._decode[batch] = self._compile(*self._decode_example(batch))
        return self._decode[batch]

    def _decode_example(self, batch: int) -> tuple:
        # the example's caches are the generator's own (zero until a generation writes them): a second
        # pair of cache-sized tensors cost a warm start tens of milliseconds
        token, pos = torch.zeros(batch, 1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
        return DecodeStep(self.model), (token, pos, *self.caches(batch, wait=False))

    def _symbolic_prefill_example(self, batch: int) -> tuple:
        tokens = torch.zeros(batch, min(8, self.max_seq_len), dtype=torch.int64)
        return Prefill(self.model, None), (tokens,), {"tokens": {1: (1, self.max_seq_len)}}

    def compile_programs(self, batch: int = 1) -> None:
        """The decode program for `batch` and, when `symbolic`, the one prefill program, compiled so that
        the compile workers build the decode program's kernel bodies while this process traces the prefill
        (a cold start otherwise traced with the workers idle). A prefill of fixed lengths waits for its
        first prompt (its length is not known yet)."""
        start = getattr(self.compiler, "start", None)
        if (not self.symbolic or start is None or batch in self._decode or (batch, "T") in self._prefill
                or batch in self._compiling):
            self.decode_program(batch)
            return
        began = time.perf_counter()
        finish_decode = start(*self._decode_example(batch))
        middle = time.perf_counter()
        try:
            finish_prefill = start(*self._symbolic_prefill_example(batch))
        finally:  # the decode program is finished even when the prefill fails to start (its bodies are in flight)
            self._decode[batch] = self._compiled(finish_decode(), began)
        # (each program's time counts from its own start to its end; the overlap is counted in both)
        self._compiling[batch] = (finish_prefill, middle)
        if not (self.background and finish_prefill.compiling_elsewhere()):
            self._finish_prefill(batch)

    def _finish_prefill(self, batch: int) -> None:
        """The symbolic prefill program for `batch`, finished now if the workers were still at it."""
        if batch in self._compiling:
            finish, start = self._compiling.pop(batch)
            self._prefill[batch, "T"] = self._compiled(finish(), start)

    def _eager_prompts(self) -> bool:
        """Whether a prompt may run in PyTorch eager while the prefill program compiles: the programs read
        the model's own fp32 weights (not bf16 or int8 copies, nor weights bound in place of the model's),
        so eager's results are theirs up to the order of float sums."""
        return getattr(self.compiler, "weights", None) == "fp32" and self._bound is None

    def prefill_compiling(self, batch: int = 1) -> bool:
        """True while the compile workers still build the prefill program for `batch`: prompts meanwhile
        run in PyTorch eager or through the decode program, a token at a time (`background`)."""
        return batch in self._compiling and self._compiling[batch][0].compiling_elsewhere()

    def wait(self) -> None:
        """Finish the programs still compiling in the background, and the move of the weights to huge
        pages (for timings of the programs alone)."""
        with self._exclusive("wait"):
            for batch in list(self._compiling):
                self._finish_prefill(batch)
            self._pack_when_idle()
            self._move_weights(wait=True)

    def _pack_when_idle(self) -> bool:
        """Start copying `to_pack`'s parameters to huge pages once no program is compiling, and move them
        there once copied; True when they moved (steps made before then rebind). Called where no program
        runs, after a first token. Not sooner: the copy takes a core and memory bandwidth (a cold start's
        first token, its prompt run a token at a time beside the compile workers, came 0.7-1 s later
        beside it; a warm start's prefill of a 1B model 2x later)."""
        if self.to_pack is not None and not any(self.prefill_compiling(b) for b in self._compiling):
            self.packing, self.to_pack = huge_pages.Packing(self.to_pack), None
        return self._move_weights()

    def _move_weights(self, wait: bool = False) -> bool:
        """Move the parameters onto their huge-page copies once those are made (or, with `wait`, after
        waiting for them): called where no program runs. True when they moved."""
        if self.packing is not None and (wait or self.packing.ready()):
            packing, self.packing = self.packing, None
            packing.finish()
            return True
        return False

    def prefill_length(self, prompt_len: int) -> int:
        """The length the prefill of a `prompt_len`-token prompt runs at: the smallest bucket that holds
        it, or `prompt_len` itself (no bucket given, or none large enough)."""
        return next((b for b in self.prompt_buckets if b >= prompt_len), prompt_len)

    @property
    def symbolic(self) -> bool:
        """One prefill program per batch size for every prompt length (symbolic sizes), unless prompts
        are padded to buckets or the compiler takes no `dynamic` (then one per length)."""
        return getattr(self.compiler, "symbolic", False) and not self.prompt_buckets and self.max_seq_len > 1

    def prefill_program(self, batch: int, length: int) -> Program:
        """The prefill program for `batch` prompts run at `length` tokens (compiled on first use; with
        `symbolic`, one program for every length 1..max_seq_len)."""
        if self.symbolic:
            self._finish_prefill(batch)
            if (batch, "T") not in self._prefill:
                self._prefill[batch, "T"] = self._compile(*self._symbolic_prefill_example(batch))
            return self._prefill[batch, "T"]
        key = (batch, length)
        if key not in self._prefill:
            tokens = torch.zeros(batch, length, dtype=torch.int64)
            if self.prompt_buckets:  # padded prompts: the logits row is an input
                module, example = Prefill(self.model, length, "at"), (tokens, torch.zeros(1, dtype=torch.int64))
            else:
                module, example = Prefill(self.model, length), (tokens,)
            self._prefill[key] = self._compile(module, example)
        return self._prefill[key]

    def caches(self, batch: int, wait: bool = True) -> tuple[Tensor, Tensor]:
        """The (k, v) caches for `batch` sequences, [n_layers, batch, n_kv_heads, max_seq_len, head_dim], faulted
        in by a thread meanwhile (`huge_pages.fault_in`; `wait=False`: for the example, which nothing writes)."""
        if batch not in self._caches:
            shape = cache_shape(self.model, batch, self.max_seq_len)
            self._caches[batch] = (huge_pages.zeros(shape), huge_pages.zeros(shape))  # (read every step)
            self._faulting[batch] = huge_pages.fault_in(list(self._caches[batch]))
        if wait and batch in self._faulting:
            self._faulting.pop(batch).join()
        return self._caches[batch]

    # --- generation -----------------------------------------------------------------------------------

    def generate(self, input_ids: Tensor | Sequence, max_new_tokens: int = 32, temperature: float = 0.0,
                 seed: int | None = None, top_k: int | None = None, stop_token: int | None = None,
                 return_logits: bool = False, on_token: Callable[[int, Tensor], None] | None = None,
                 top_p: float | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """The prompt followed by up to `max_new_tokens` new tokens, int64 [B, T + new] ([T + new] for a
        1-d prompt), like transformers' `generate`.

        Greedy when `temperature == 0`; otherwise samples softmax(logits / temperature) (only the `top_k`
        most likely tokens when given, then only the most likely ones that make up `top_p` of the
        probability) with a torch.Generator seeded by `seed`. Stops early once every sequence has produced
        `stop_token` (later tokens of a finished sequence are `stop_token`).
        `return_logits=True` also returns the logits each new token was chosen from, [B, new, vocab].
        `on_token(n, tokens)` is called after each of the n new tokens (tokens: [B]).
        ValueError before anything runs if the prompt and the new tokens do not fit: every token but the
        last new one takes a cache row, so together they may be max_seq_len + 1.
        Calls from several threads are serialized (the KV cache belongs to the generator).
        """
        with self._exclusive("generate"):
            return self._generate(input_ids, max_new_tokens, temperature, seed, top_k, stop_token,
                                  return_logits, on_token, top_p)

    @contextmanager
    def _exclusive(self, what: str):
        """One generate (or weight binding) at a time: the KV caches and the bound weights are shared state.
        Re-entering from the same thread (an `on_token` callback) would deadlock: RuntimeError instead."""
        if self._owner == threading.get_ident():
            raise RuntimeError(f"{what} was called from inside this generator's own generate (an on_token "
                               f"callback); it shares the KV cache: call it after generate returns, or use "
                               f"another generator")
        with self._lock:
            self._owner = threading.get_ident()
            try:
                yield
            finally:
                self._owner = None

    def _generate(self, input_ids, max_new_tokens, temperature, seed, top_k, stop_token, return_logits,
                  on_token, top_p=None):
        input_ids = torch.as_tensor(input_ids)  # a list of ids is fine too
        squeeze = input_ids.dim() == 1
        ids = check_prompt(input_ids[None] if squeeze else input_ids, self.model.config.vocab_size, self.max_seq_len,
                           max_new_tokens, temperature, top_k)
        pick = _sampler(temperature, seed, top_k, top_p)  # checks top_p before anything compiles
        batch, prompt_len = ids.shape
        length = self.prefill_length(prompt_len)
        compiled_before = dict(self._totals)
        self._move_weights()  # (the copy starts after a first token: `_pack_when_idle`)
        decode = self.decode_program(batch)
        prefill = None if self.prefill_compiling(batch) else self.prefill_program(batch, length)
        k_cache, v_cache = self.caches(batch)
        decode_step = decode_stepper(decode, k_cache, v_cache)
        new, step_logits = [], []
        run = counters()

        start = time.perf_counter()
        # a cold start's first prompts, while the workers still build the prefill program: in PyTorch
        # eager where that is the programs' own arithmetic, else a token at a time through the decode program
        logits = None
        if prefill is None and self._eager_prompts() and prompt_len > 1:
            logits = prompt_by_eager(Prefill(self.model, None), ids, k_cache, v_cache)
            run["prompts_by_eager"] = 1
        elif prefill is None:
            logits = prompt_by_decode(ids, decode_step, lambda: self.prefill_compiling(batch))
            run["prompts_by_decode"] = int(logits is not None)
        if logits is None:
            finishing = time.perf_counter()
            prefill = self.prefill_program(batch, length)
            start += time.perf_counter() - finishing  # (the prompt's time, not the program's)
            logits = run_prefill(prefill, ids, length, bool(self.prompt_buckets), k_cache, v_cache)
        finished = torch.zeros(batch, dtype=torch.bool)
        run.update(prompt_tokens=batch * prompt_len, prefill_seconds=time.perf_counter() - start)
        for key in ("compiles", "compile_seconds"):  # compiled for this call
            run[key] = self._totals[key] - compiled_before[key]

        start = time.perf_counter()
        for step in range(max_new_tokens):
            if return_logits:
                step_logits.append(logits)
            token = pick(logits)
            if stop_token is not None:
                token = torch.where(finished, stop_token, token)
                finished |= token == stop_token
            new.append(token)
            if on_token is not None:
                on_token(step + 1, token)
            if step + 1 == max_new_tokens or (stop_token is not None and bool(finished.all())):
                break
            if self._pack_when_idle():  # the parameters moved: the next step follows them
                decode_step = decode_stepper(decode, k_cache, v_cache)
            logits = decode_step(token, prompt_len + step)
            run["decode_steps"] += 1
        run.update(tokens_generated=batch * len(new), decode_tokens=batch * run["decode_steps"],
                   decode_seconds=time.perf_counter() - start)

        self._pack_when_idle()  # (a generation of one token started no copy yet)
        self.last = with_rates(run)
        for key, value in run.items():
            if key not in ("compiles", "compile_seconds"):  # counted by _compile already
                self._totals[key] += value
        out = torch.cat([ids, torch.stack(new, dim=1)], dim=1)
        out = out[0] if squeeze else out
        if return_logits:
            logits_out = torch.stack(step_logits, dim=1)
            return out, logits_out[0] if squeeze else logits_out
        return out

    def __repr__(self) -> str:
        config = self.model.config
        return (f"<{self.name} generator: Llama dim={config.dim} layers={config.n_layers} "
                f"vocab={config.vocab_size}, max_seq_len={self.max_seq_len}, {self._totals['compiles']} "
                f"program(s) compiled>")


def compile_generator(model: nn.Module, max_seq_len: int | None = None, weights: str = "fp32",
                      backend: str = "numba", prompt_buckets: Sequence[int] | None = None,
                      fuse: bool = True, batch: int = 1, loop: bool | None = None,
                      background: bool = True, pack_weights: bool = True) -> Generator:
    """A Generator running fusec-compiled programs of `model` (a `fusec.models.causal_lm.CausalLM` or a
    transformers `LlamaForCausalLM`, whose weights are mapped into one).

    `max_seq_len` (default the model's) sizes the static KV cache: prompt plus new tokens must fit.
    `weights="bf16"` stores weights as bfloat16, `"int8"` as int8 blocks with float32 scales (see
    `fusec.compile`). `backend` is a
    fusec backend ("numba", "reference"). `prompt_buckets` (e.g. (16, 64, 256)) pads prompts on the right
    to the next bucket, one static prefill program per bucket; without it one symbolic prefill program
    serves every prompt length. The decode program for `batch` and the symbolic prefill program are compiled
    here, except that with `background` (and compile workers, `fusec.backends.numba_cpu.compile_pool`) this
    returns once the decode program is ready and the workers are only finishing the prefill program's
    kernels: prompts meanwhile run in PyTorch eager (fp32 weights) or through the decode program a token at
    a time (a cold start's first token comes seconds sooner), and the first prompt after the workers are
    done finishes the prefill program (loading their machine code). `background=False` waits here for both
    programs; `generator.wait()` waits for them and for the weights' copy to huge pages (for timings).
    `loop=False` (or FUSEC_LOOP=0) keeps one Python call per kernel instead of one per run of layers.
    `pack_weights` moves an fp32 model's parameters into one block of huge pages (`fusec.huge_pages`: the
    same Parameters and values, read faster by every decode step, eager's too); False leaves them.
    """
    causal_lm = as_causal_lm(model)
    generator = Generator(causal_lm, max_seq_len or causal_lm.config.max_seq_len,
                          fusec_compiler(backend, weights, fuse, loop), prompt_buckets,
                          name=f"fusec {backend} {weights}", background=background)
    generator.compile_programs(batch)
    if pack_weights and weights == "fp32":
        # fp32 programs read the parameters themselves (bf16 and int8 ones their converted copies, packed
        # as they are made: `passes.weights.stored_form`). Copied in a thread once no program compiles,
        # moved between decode steps (or at `wait`); the programs rebind then (`fusec.binding.Follow`).
        generator.to_pack = causal_lm  # (not waited for with background=False: a copy, not a compile)
    return generator


def eager_generator(model: nn.Module, max_seq_len: int | None = None,
                    compiler: Compiler = eager_compiler, name: str = "eager") -> Generator:
    """A Generator running Prefill/DecodeStep through `compiler` (default: PyTorch eager, no compile)."""
    causal_lm = as_causal_lm(model)
    return Generator(causal_lm, max_seq_len or causal_lm.config.max_seq_len, compiler, name=name)


def eager_generate(model: nn.Module, input_ids: Tensor, max_new_tokens: int,
                   max_seq_len: int | None = None) -> tuple[Tensor, Tensor]:
    """Greedy decoding in PyTorch eager with a KV cache (the same Prefill/DecodeStep modules, uncompiled):
    (ids [B, T + new], the logits each new token was chosen from [B, new, vocab])."""
    generator = eager_generator(model, max_seq_len)
    return generator.generate(input_ids, max_new_tokens=max_new_tokens, return_logits=True)


__all__ = ["Generator", "compile_generator", "eager_compiler", "eager_generate", "eager_generator",
           "fusec_compiler"]
