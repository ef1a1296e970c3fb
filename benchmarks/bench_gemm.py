"""The GEMMs fusec's kernels can call, at Llama prefill shapes: NumPy's OpenBLAS (`blas.gemm`), MKL's
per-thread blocks from torch's CPU library (`mkl.gemm_mkl`, `mkl.gemm_bf16_mkl`), the same blocks run by
oneDNN where it is installed (`onednn.py`) and, for reference, torch.matmul in fp32 and bf16.

    python benchmarks/bench_gemm.py [--threads 2] [--repeat 9] [--shapes 256x2048x5632,256x5632x2048]

Per library: GFLOP/s of wall time, and GFLOP per CPU-second of this process (`time.process_time`): on a
shared machine the second is the steadier measure of how much work a library needs, as other processes
stretch wall times; spinning threads count against it. Calls alternate between the libraries, one call
of each per round, and each figure is the median over the rounds. A is [M, K] and the weight is [N, K]
(c = a @ w.T), as in a Linear layer. Writes bench_gemm.json to --out (`benchmarks/tables.py` makes the
docs' table of it).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fusec.backends.numba_cpu import blas, mkl, onednn
from fusec import benchtools


# seconds between calls: the thread pools of the call before (OpenBLAS's, torch's OpenMP) spin for a while
# after it and would take the cores from the next library's call (measured: oneDNN's blocks ran at 137-191
# GFLOP/s right after other libraries' calls, 312-356 alone)
SETTLE = 0.05


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--shapes", default="256x2048x5632,256x5632x2048,256x2048x2048",
                        help="comma-separated MxKxN")
    parser.add_argument("--out", default="bench_out", help="directory for bench_gemm.json")
    return parser.parse_args(argv)


def libraries(m: int, k: int, n: int) -> dict:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32)
    c = np.empty((m, n), np.float32)
    ta, tw = torch.from_numpy(a), torch.from_numpy(w)
    a16, w16 = ta.bfloat16(), tw.bfloat16()
    a16_bits, w16_bits = (t.view(torch.int16).numpy().view(np.uint16) for t in (a16, w16))
    calls = {"OpenBLAS sgemm": lambda: blas.gemm(a, w, c, True)}

    def on(library: bool, call):  # the blocks of MKL's helpers on oneDNN or on MKL for this call
        return lambda: (onednn.use(library), call())
    if not mkl.UNAVAILABLE:
        calls["MKL sgemm"] = on(False, lambda: mkl.gemm_mkl(a, w, c, True))
        calls["MKL bf16"] = on(False, lambda: mkl.gemm_bf16_mkl(a16_bits, w16_bits, c))
        if not onednn.use(True):
            calls["oneDNN fp32"] = on(True, lambda: mkl.gemm_mkl(a, w, c, True))
            calls["oneDNN bf16"] = on(True, lambda: mkl.gemm_bf16_mkl(a16_bits, w16_bits, c))
    return {**calls, "torch fp32": lambda: ta @ tw.T, "torch bf16": lambda: a16 @ w16.T}


def main(argv=None) -> int:
    args = parse_args(argv)
    benchtools.run_record()  # the run's commit and date as it starts
    benchtools.set_threads(args.threads)
    load = os.getloadavg()[0]
    print(f"{args.threads} threads; median of {args.repeat} alternating rounds; MKL: "
          f"{mkl.UNAVAILABLE or 'bound from torch'}; 1-minute load average {load:.1f}")
    rows = []
    for shape in args.shapes.split(","):
        m, k, n = (int(x) for x in shape.split("x"))
        calls = libraries(m, k, n)
        wall = {name: [] for name in calls}
        cpu = {name: [] for name in calls}
        for fn in calls.values():
            fn()  # compile / warm up
        for _ in range(args.repeat):
            for name, fn in calls.items():
                time.sleep(SETTLE)
                w0, c0 = time.perf_counter(), time.process_time()
                fn()
                wall[name].append(time.perf_counter() - w0)
                cpu[name].append(time.process_time() - c0)
        gflop = 2 * m * n * k / 1e9
        print(f"\n{m}x{k}x{n} ({gflop:.2f} GFLOP)")
        for name in calls:
            rows.append({"shape": f"{m} x {k} x {n}", "implementation": name, "status": "ok", "gflop": gflop,
                         "gflop_s": gflop / statistics.median(wall[name]),
                         "gflop_per_cpu_s": gflop / statistics.median(cpu[name])})
            print(f"  {name:15s} {rows[-1]['gflop_s']:7.1f} GFLOP/s  {rows[-1]['gflop_per_cpu_s']:7.1f} GFLOP per "
                  "CPU-second")
    path = benchtools.write_json(Path(args.out) / "bench_gemm.json", {
        "threads": args.threads, "repeat": args.repeat, "load_average": load,
        "mkl": mkl.UNAVAILABLE or "bound from torch", "onednn": onednn.use(True) or "installed",
        "results": rows})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
