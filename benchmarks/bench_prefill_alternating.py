"""Block prefill timed side by side: eager, torch.compile and fusec (fp32 with MKL, fp32 with OpenBLAS, bf16
weights) in one process, one call of each per round, medians over the rounds.

    python benchmarks/bench_prefill_alternating.py [--preset tinyllama_1b] [--seq 256] [--threads 2] [--rounds 7]

On a shared machine `fusec bench` (each implementation timed in its own stretch) can land its stretches
in quiet or busy moments; alternating call by call spreads the other jobs evenly over the implementations.
Reports wall time and the process's CPU time per call (steadier under contention), each against
torch.compile.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

import fusec
from fusec import benchtools
from fusec.bench_block import build_block, case_inputs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tinyllama_1b")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    benchtools.set_threads(args.threads)
    block = build_block(args.preset)
    inputs, _ = case_inputs(block.config, "prefill", args.seq, 0)
    with benchtools.quiet_warnings(), torch.no_grad():
        want = block(*inputs)
        impls = {"eager": block}
        previous = os.environ.get("FUSEC_BLAS")
        os.environ["FUSEC_BLAS"] = "openblas"
        impls["fusec fp32 openblas"] = fusec.compile(block, inputs)
        os.environ["FUSEC_BLAS"] = "mkl"
        impls["fusec fp32 mkl"] = fusec.compile(block, inputs)
        impls["fusec bf16 mkl"] = fusec.compile(block, inputs, weights="bf16")
        os.environ.pop("FUSEC_BLAS") if previous is None else os.environ.update(FUSEC_BLAS=previous)
        impls["torch.compile"] = torch.compile(block)
        errors = {name: (fn(*inputs) - want).abs().max().item() for name, fn in impls.items()}  # (warm-up)
        wall = {name: [] for name in impls}
        cpu = {name: [] for name in impls}
        for _ in range(args.rounds):
            for name, fn in impls.items():
                w0, c0 = time.perf_counter(), time.process_time()
                fn(*inputs)
                wall[name].append(time.perf_counter() - w0)
                cpu[name].append(time.process_time() - c0)
    print(f"{args.preset} block prefill, {args.seq} tokens, {args.threads} threads; median of {args.rounds} "
          f"alternating rounds; 1-minute load average {os.getloadavg()[0]:.1f}")
    ref_wall, ref_cpu = statistics.median(wall["torch.compile"]), statistics.median(cpu["torch.compile"])
    for name in impls:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        print(f"  {name:20s} wall {w * 1e3:8.1f} ms  cpu {c * 1e3:8.1f} ms  vs torch.compile: wall "
              f"{ref_wall / w:.2f}x, cpu {ref_cpu / c:.2f}x  max error {errors[name]:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
