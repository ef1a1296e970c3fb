"""`fusec generate MODEL_PATH --prompt TEXT`: load a checkpoint people have (a Hugging Face directory, a
llama2.c .bin, a GGUF file: fusec/loaders), compile its generator, stream the continuation to stdout as it
is produced, and end with the speed on stderr:

    prompt 7 tokens at 410.2 tok/s, generated 64 tokens at 48.1 tok/s, 37% of the bandwidth roofline ...

The rates are of a second run (the first, of one new token, loads the kernels and is not timed).
Progress (loading, compiling) goes to stderr too, so stdout is the text alone; `--json` prints one JSON
object instead (text, token ids, rates, roofline). Sampling is seeded: the seed used is reported.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

from fusec import benchtools
from fusec.argtypes import nonnegative_float, nonnegative_int, positive_int
from fusec.generate import compile_generator
from fusec.passes.weights import BYTES_PER_WEIGHT
CACHE_ROWS = 64  # the KV cache is sized to prompt + new tokens rounded up to this: fewer distinct programs
from fusec.loaders import load

from fusec.loaders.tokenize import TextStream

def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="generate text with a Hugging Face directory, llama2.c .bin or GGUF model")
    g.add_argument("model", metavar="MODEL_PATH", help="a model directory (config.json, *.safetensors, "
                   "tokenizer.json), a llama2.c .bin (tokenizer.bin beside it) or a .gguf file")
    g.add_argument("--prompt", required=True, help="the text to continue")
    g.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate (default 64)")
    g.add_argument("--temperature", type=nonnegative_float, default=0.8, help="0 for greedy (default 0.8)")
    g.add_argument("--top-k", type=positive_int, default=None, help="sample from the k most likely tokens")
    g.add_argument("--top-p", type=_probability, default=0.95, help="sample from the most likely tokens "
                   "making up this probability (default 0.95; 1 for all)")
    g.add_argument("--seed", type=nonnegative_int, default=None, help="seed of the sampler (default: random, "
                   "reported at the end)")
    g.add_argument("--weights", choices=("fp32", "bf16", "int8"), default="fp32",
                   help="weight storage, as compile_generator's weights= (default fp32)")
    g.add_argument("--threads", type=positive_int, default=None, help="threads for numba and torch")
    g.add_argument("--tokenizer", default=None, help="the tokenizer file, when not where the format keeps it")
    g.add_argument("--backend", choices=("numba", "reference"), default="numba", help=argparse.SUPPRESS)
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    g.add_argument("--no-roofline", action="store_true", help="skip the memory-bandwidth measurement")
    g.add_argument("--json", action="store_true", help="print one JSON object (text, ids, rates) instead")


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, given {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a probability in (0, 1], given {text}")
    return value


def progress(message: str) -> None:
    print(f"fusec: {message}", file=sys.stderr, flush=True)


def generate_main(args: argparse.Namespace) -> int:
    if args.threads:
        benchtools.set_threads(args.threads)

    start = time.perf_counter()
    progress(f"loading {args.model} ...")
    loaded = load(args.model, args.tokenizer)
    model, tokenizer = loaded.model, loaded.tokenizer
    config = model.config
    if tokenizer is None:
        raise ValueError(f"{args.model}: {loaded.tokenizer_error}")
    params = sum(p.numel() for p in model.parameters())
    progress(f"loaded a {loaded.format} model: {params / 1e6:.1f}M parameters, {config.n_layers} layers, "
             f"vocab {config.vocab_size}, in {time.perf_counter() - start:.1f} s")
    for note in loaded.notes:
        progress(f"note: {note}")
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise ValueError("the prompt is empty and the tokenizer adds no BOS token: give some text")
    new_tokens = min(args.max_new_tokens, config.max_seq_len + 1 - len(ids))
    if new_tokens < 1:
        raise ValueError(f"the prompt is {len(ids)} tokens, the model's context {config.max_seq_len}")
    if new_tokens < args.max_new_tokens:
        progress(f"note: {new_tokens} new tokens fit in the model's context of {config.max_seq_len}")
    rows = min(config.max_seq_len, math.ceil((len(ids) + new_tokens - 1) / CACHE_ROWS) * CACHE_ROWS)

    start = time.perf_counter()
    progress(f"compiling the decode program ({args.weights} weights, {rows} cache rows) ...")
    gen = compile_generator(model, rows, weights=args.weights, backend=args.backend)
    progress(f"compiling the prefill program for {len(ids)} prompt tokens ...")
    gen.prefill_program(1, len(ids))
    gen.generate(torch.tensor(ids), max_new_tokens=min(2, new_tokens))  # the first run of each program loads
    progress(f"compiled {gen.stats['compiles']} programs in {time.perf_counter() - start:.1f} s")  # its kernels

    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    stream = TextStream(tokenizer, ids)
    if not args.json:
        sys.stdout.write(args.prompt)
        sys.stdout.flush()

    def show(step: int, token: torch.Tensor) -> None:
        text = stream.push(token.tolist())
        if text and not args.json:
            sys.stdout.write(text)
            sys.stdout.flush()

    stop = None if args.ignore_eos else tokenizer.eos_id
    out = gen.generate(torch.tensor(ids), max_new_tokens=new_tokens, temperature=args.temperature, seed=seed,
                       top_k=args.top_k, top_p=args.top_p, stop_token=stop, on_token=show)
    new = out[len(ids):].tolist()
    if stop is not None and stop in new:
        new = new[:new.index(stop) + 1]
    result = {"model": str(args.model), "format": loaded.format, "notes": list(loaded.notes),
              "prompt": args.prompt, "prompt_ids": ids, "new_ids": new,
              "text": tokenizer.decode(new), "seed": seed, "temperature": args.temperature,
              "top_k": args.top_k, "top_p": args.top_p, "weights": args.weights,
              "compile_seconds": gen.stats["compile_seconds"],
              **{k: gen.last[k] for k in ("prompt_tokens", "tokens_generated", "prefill_tokens_per_s",
                                          "decode_tokens_per_s", "prefill_seconds", "decode_seconds")}}
    if not args.no_roofline and result["decode_tokens_per_s"] > 0:
        result.update(roofline(model, args.weights, result["decode_tokens_per_s"]))
    if args.json:
        print(json.dumps(result))
    else:
        print()
        print(summary(result), file=sys.stderr)
    return 0


def roofline(model, weights: str, decode_tokens_per_s: float) -> dict:
    """The decode rate set against the bandwidth roofline: the bytes of weights one token reads at the read
    bandwidth measured now (torch's threaded sum; as `fusec bench generate`, weights only)."""
    progress("measuring the memory bandwidth for the roofline (--no-roofline skips) ...")
    bandwidth = benchtools.measure_memory_bandwidth(repeat=3, readers=("torch",))["best"]
    weight_bytes = model.weight_bytes_per_token(BYTES_PER_WEIGHT.get(weights, 4))
    ceiling = bandwidth / weight_bytes
    return {"bandwidth_bytes_per_s": bandwidth, "weight_bytes_per_token": weight_bytes,
            "roofline_tokens_per_s": ceiling, "roofline_fraction": decode_tokens_per_s / ceiling}


def summary(r: dict) -> str:
    line = (f"prompt {r['prompt_tokens']} tokens at {r['prefill_tokens_per_s']:.1f} tok/s, generated "
            f"{r['tokens_generated']} tokens at {r['decode_tokens_per_s']:.1f} tok/s")
    if "roofline_fraction" in r:
        line += (f", {r['roofline_fraction']:.0%} of the bandwidth roofline ({r['roofline_tokens_per_s']:.1f} "
                 f"tok/s: {r['weight_bytes_per_token'] / 1e6:.1f} MB of weights per token at "
                 f"{r['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s)")
    return line + f"; seed {r['seed']}"


__all__ = ["add_parser", "generate_main"]
