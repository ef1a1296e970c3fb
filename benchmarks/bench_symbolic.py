"""A symbolic program against programs specialized to each length, side by side in one run.

    python benchmarks/bench_symbolic.py block tinyllama_1b --lengths 1,17,128,256 --upper 256
    python benchmarks/bench_symbolic.py generator stories110M --lengths 5,64,200 --upper 256

`block`: a Llama block compiled once with `dynamic={"x": {1: (1, upper)}}` against `fusec.compile` per
length. `generator`: a generator's one prefill program (every prompt length) against static prefill
programs per length (random weights). Calls alternate between the two and each time is the median of
`--repeat` calls; the spread (max - min) says how noisy the machine was. Compile times are of this
process (cold or warm depending on the cache), after a warm-up (`warm_up`) that pays what only the first
compile of a process pays (importing torch.export and sympy, loading the BLAS and matrix-vector helpers,
starting the compile workers), so the symbolic program, compiled first, is not charged for it and the
specialized ones are; `--no-warm-up` leaves it out. With `--new-process-rounds N` (block), each program
is also compiled in a process of its own with an empty kernel cache, alternating, N rounds: what a user's
first `fusec.compile` of it pays, with no order between the programs. Writes bench_symbolic_block.json or
bench_symbolic_generator.json in `--out` (`benchmarks/tables.py` makes the table).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from fusec import benchtools


NEW_PROCESS = """
import json, sys, time
import fusec
from fusec.models import LlamaBlock, LlamaConfig, example_inputs
from fusec.models.llama import init_weights
config = LlamaConfig.preset(sys.argv[1])
module = init_weights(LlamaBlock(config), seed=0).eval()
tokens, upper = int(sys.argv[2]), int(sys.argv[3])
start = time.perf_counter()
if tokens == 0:
    compiled = fusec.compile(module, example_inputs(config, seq_len=8), dynamic={"x": {1: (1, upper)}})
else:
    compiled = fusec.compile(module, example_inputs(config, seq_len=tokens))
print(json.dumps({"seconds": time.perf_counter() - start, "phases": compiled.stats["phase_seconds"]}))
"""


def compile_in_new_processes(preset: str, lengths: list[int], upper: int, rounds: int) -> list[dict]:
    """The block's compile each in a process of its own with an empty kernel cache, as a user's first
    `fusec.compile` pays it (the library's machine code cached): the symbolic program (tokens None) and one
    specialized to each length, alternating, `rounds` times. [{"tokens", "seconds": [...], "phases": [...]}]"""
    runs = [{"tokens": n or None, "seconds": [], "phases": []} for n in [0, *lengths]]
    for _ in range(rounds):
        for run in runs:
            with benchtools.fresh_cache_dir() as cache:
                got = benchtools.child_json(NEW_PROCESS, [preset, str(run["tokens"] or 0), str(upper)],
                                            {**os.environ, "FUSEC_CACHE_DIR": cache}, "a compile in a new process")
            run["seconds"].append(got["seconds"])
            run["phases"].append(got["phases"])
    return runs


def _time(fn, x) -> float:
    t = time.perf_counter()
    fn(x)
    return time.perf_counter() - t


def compare(symbolic, specialized, x, repeat: int) -> tuple[float, float, float, float, float]:
    """(median symbolic s, median specialized s, spread symbolic, spread specialized, max difference)."""
    with torch.no_grad():
        a, b = symbolic(x), specialized(x)
        a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
        diff = max(float((p - q).abs().max()) for p, q in zip(a, b))
        ts, tt = [], []
        for _ in range(repeat):
            ts.append(_time(symbolic, x))
            tt.append(_time(specialized, x))
    return statistics.median(ts), statistics.median(tt), max(ts) - min(ts), max(tt) - min(tt), diff


def warm_up(upper: int) -> float:
    """Compile a tiny Llama block as every kind of program the benchmark compiles (symbolic, specialized to
    one row and to more than the matrix-vector rows): the first compile of a process pays for imports, the
    helpers' machine code and the compile workers, whichever program it is. Returns its seconds."""
    import fusec
    from fusec.models import LlamaBlock, LlamaConfig, example_inputs
    from fusec.models.llama import init_weights
    start = time.perf_counter()
    config = LlamaConfig.preset("tiny")
    module = init_weights(LlamaBlock(config), seed=0).eval()
    fusec.compile(module, example_inputs(config, seq_len=8), dynamic={"x": {1: (1, min(upper, config.max_seq_len))}})
    for n in (1, min(100, config.max_seq_len)):  # the matrix-vector and the GEMM paths
        fusec.compile(module, example_inputs(config, seq_len=n))
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> Path:
    import fusec
    from fusec.generate import Generator, compile_generator, fusec_compiler
    from fusec.models import LlamaBlock, LlamaConfig, example_inputs
    from fusec.models.causal_lm import random_model
    from fusec.models.llama import init_weights
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("block", "generator"))
    p.add_argument("preset")
    p.add_argument("--lengths", default="1,17,128,256")
    p.add_argument("--upper", type=int, default=256)
    p.add_argument("--repeat", type=int, default=9)
    p.add_argument("--out", default="bench_out", help="directory for the JSON report")
    p.add_argument("--new-process-rounds", type=int, default=0,
                   help="block: also time each program's compile in new processes with empty kernel caches")
    p.add_argument("--no-warm-up", dest="warm_up", action="store_false",
                   help="time the symbolic program's compile as the process's first (see the docstring)")
    args = p.parse_args(argv)
    config = LlamaConfig.preset(args.preset)
    lengths = [int(n) for n in args.lengths.split(",")]
    warm_up_s = warm_up(args.upper) if args.warm_up else 0.0
    if args.warm_up:
        print(f"warm-up (a tiny block, every kind of program) in {warm_up_s:.1f} s", flush=True)
    start = time.perf_counter()
    if args.what == "block":
        module = init_weights(LlamaBlock(config), seed=0).eval()
        symbolic = fusec.compile(module, example_inputs(config, seq_len=8), dynamic={"x": {1: (1, args.upper)}})
        make = lambda n: fusec.compile(module, example_inputs(config, seq_len=n))  # noqa: E731
        inputs = lambda n: example_inputs(config, seq_len=n, seed=n)[0]  # noqa: E731
    else:
        model = random_model(config, seed=0)
        symbolic = compile_generator(model, max_seq_len=args.upper).prefill_program(1, 8)
        fused = fusec_compiler()
        static = Generator(model, args.upper, lambda m, example: fused(m, example))
        make = lambda n: static.prefill_program(1, n)  # noqa: E731
        inputs = lambda n: torch.randint(0, config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))  # noqa: E731
    symbolic_compile_s = time.perf_counter() - start
    print(f"{args.what} {args.preset}: symbolic program compiled in {symbolic_compile_s:.1f} s", flush=True)
    print("| tokens | symbolic ms | specialized ms | ratio | spread ms (sym / spec) | specialized compile s |")
    print("|---|---|---|---|---|---|")
    rows = []
    for n in lengths:
        start = time.perf_counter()
        specialized = make(n)
        compile_s = time.perf_counter() - start
        ms, mt, ss, st, diff = compare(symbolic, specialized, inputs(n), args.repeat)
        assert diff < 1e-3, f"symbolic and specialized differ by {diff} at {n} tokens"
        print(f"| {n} | {1e3 * ms:.2f} | {1e3 * mt:.2f} | {ms / mt:.3f} | {1e3 * ss:.1f} / {1e3 * st:.1f} | "
              f"{compile_s:.1f} |", flush=True)
        rows.append({"tokens": n, "symbolic_ms": 1e3 * ms, "specialized_ms": 1e3 * mt, "ratio": ms / mt,
                     "spread_symbolic_ms": 1e3 * ss, "spread_specialized_ms": 1e3 * st,
                     "specialized_compile_s": compile_s})
    programs = getattr(symbolic, "stats", {}).get("programs", 1)
    print(f"programs compiled by the symbolic one: {programs}")
    fresh = (compile_in_new_processes(args.preset, lengths, args.upper, args.new_process_rounds)
             if args.what == "block" and args.new_process_rounds > 0 else [])
    for run in fresh:
        print(f"compiled in new processes, {run['tokens'] or 'symbolic'}: "
              + " / ".join(f"{t:.1f}" for t in run["seconds"]) + " s")
    return benchtools.write_json(Path(args.out) / f"bench_symbolic_{args.what}.json", {
        "what": args.what, "preset": args.preset, "upper": args.upper, "repeat": args.repeat,
        "symbolic_compile_s": symbolic_compile_s, "warm_up_s": warm_up_s, "programs": programs, "rows": rows,
        **({"new_process_compiles": fresh} if fresh else {})})


if __name__ == "__main__":
    main()
