"""Matrix-vector GB/s of the fp32, bf16 and int8 weight kernels at decode shapes, beside the read bandwidth.

    python benchmarks/bench_matvec.py [--threads 2] [--rounds 30] [--footprint 64] [--only stories15M]
        [--rows 1] [--out bench_out]

One activation row (or --rows of them: a short prompt's prefill, a batch's decode step) against each
weight matrix of stories15M, stories110M and TinyLlama-1.1B (the shapes a decode step streams; the
32000-row LM head too). The kernels run in turn, round after round, so that a neighbour's
load hits all of them alike; reported: weight bytes read per second at the median and at the best round
(the best is the kernel's own speed on a noisy machine), and bf16's bytes per second over fp32's, of the
best rounds and the median of each round's ratio. The machine's read bandwidth (a large sum, see
`fusec.benchtools.measure_memory_bandwidth`) is measured in the same run. With --footprint MB, each kernel
cycles through copies of its weights that add up to at least that many MB, so that a call reads them from
beyond the core's L2 cache as a decode step does (it streams every layer's weights once); otherwise a
small matrix stays in L2 between calls and the kernels compare their arithmetic, not their bytes. The
copies are in huge pages, as the generator keeps weights (`fusec.huge_pages`).
Writes bench_matvec.json (`benchmarks/tables.py` makes the docs' table of it).
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fusec.argtypes import positive_int
from fusec.backends.numba_cpu.matvec import matvec, with_group
from fusec.backends.numba_cpu.lowp import matvec_bf16, matvec_int8
from fusec import benchtools, huge_pages
from fusec.machines import cpu
from fusec.passes.tile import MatmulShape, loop_tiles
from fusec.passes.weights import quantize_int8

SHAPES = {  # name: (rows N, columns K) of a weight matrix; c[1, N] = a[1, K] @ w^T
    "stories15M qkvo": (288, 288), "stories15M w1/w3": (768, 288), "stories15M w2": (288, 768),
    "stories15M head": (32000, 288), "stories110M qkvo": (768, 768), "stories110M w1/w3": (2048, 768), "stories110M w2": (768, 2048),
    "stories110M head": (32000, 768), "tinyllama q/o": (2048, 2048), "tinyllama w1/w3": (5632, 2048),
    "tinyllama w2": (2048, 5632), "tinyllama head": (32000, 2048),
}


def kernels(n: int, k: int, rng: np.random.Generator, footprint: float = 0.0, rows: int = 1) -> dict:
    """{format: (call, weight bytes)} for one N x K matrix in every format against `rows` activation rows;
    each call reads the next of enough copies to fill `footprint` bytes."""
    a = rng.standard_normal((rows, k), dtype=np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32) * np.float32(0.02)
    bits = torch.from_numpy(w).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    q, s = (t.numpy() for t in quantize_int8(torch.from_numpy(w)))
    c = np.empty((rows, n), np.float32)

    def cycled(arrays: tuple, kernel, stored: int) -> tuple:
        nbytes = sum(x.nbytes for x in arrays)
        # the copies one after another in huge pages, as the generator keeps weights (`fusec.huge_pages`)
        count = max(1, math.ceil(footprint / nbytes))
        packed = [t.numpy() for t in huge_pages.pack([torch.from_numpy(x) for _ in range(count) for x in arrays])]
        copies = [tuple(packed[i:i + len(arrays)]) for i in range(0, len(packed), len(arrays))]
        turn = itertools.cycle(copies)
        group = loop_tiles(cpu(), MatmulShape(m=rows, n=n, k=k, a=4, b=stored, out=4, acc=4))["matvec_group"]
        call = with_group(kernel, group, len(arrays) + 2)
        return (lambda: call(a, *next(turn), c)), nbytes
    return {"fp32": cycled((w,), matvec, 4), "bf16": cycled((bits,), matvec_bf16, 2),
            "int8": cycled((q, s), matvec_int8, 1)}


def run(args: argparse.Namespace) -> dict:
    benchtools.run_record()  # the run's commit and date as it starts
    load = os.getloadavg()[0]
    threads = benchtools.set_threads(args.threads)
    bandwidth = benchtools.measure_memory_bandwidth()
    rng = np.random.default_rng(0)
    rows = []
    for name, (n, k) in SHAPES.items():
        if args.only and not any(word in name for word in args.only):
            continue
        calls = kernels(n, k, rng, args.footprint * 1e6, args.rows)
        times = {fmt: [] for fmt in calls}
        for call, _ in calls.values():
            call()  # compile / load
        for _ in range(args.rounds):
            for fmt, (call, _) in calls.items():
                start = time.perf_counter()
                call()
                times[fmt].append(time.perf_counter() - start)
        row = {"shape": name, "n": n, "k": k}
        for fmt, (_, nbytes) in calls.items():
            row[f"{fmt}_gb_s"] = nbytes / statistics.median(times[fmt]) / 1e9
            row[f"{fmt}_best_gb_s"] = nbytes / min(times[fmt]) / 1e9
        row["bf16_vs_fp32_bytes"] = row["bf16_best_gb_s"] / row["fp32_best_gb_s"]
        # the same ratio round by round (the kernels ran side by side), its median: steadier on a shared
        # machine than the ratio of two best rounds, which a neighbour's load moves one at a time
        row["bf16_vs_fp32_rounds"] = statistics.median(
            calls["bf16"][1] / b / (calls["fp32"][1] / f) for f, b in zip(times["fp32"], times["bf16"]))
        # weights per second of int8 (1.125 bytes each with the scales) over fp32's (4 bytes): time saved
        row["int8_vs_fp32_time"] = row["int8_best_gb_s"] / 1.125 / (row["fp32_best_gb_s"] / 4)
        rows.append(row)
        print(f"  {name}: done", flush=True)
    return {"threads": threads, "rounds": args.rounds, "rows": args.rows, "load_average": load,
            "footprint_mb": args.footprint, "bandwidth": bandwidth, "results": rows}


COLUMNS = [("shape", "weight", ""), ("n", "N", "d"), ("k", "K", "d"),
           ("fp32_gb_s", "fp32 GB/s", ".1f"), ("fp32_best_gb_s", "best", ".1f"),
           ("bf16_gb_s", "bf16 GB/s", ".1f"), ("bf16_best_gb_s", "best", ".1f"),
           ("int8_gb_s", "int8 GB/s", ".1f"), ("int8_best_gb_s", "best", ".1f"),
           ("bf16_vs_fp32_bytes", "bf16/fp32 B/s", ".2f"), ("bf16_vs_fp32_rounds", "by round", ".2f"),
           ("int8_vs_fp32_time", "int8 speedup", ".2f")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_matvec", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="numba threads")
    parser.add_argument("--rounds", type=int, default=30, help="timed calls of each kernel per shape")
    parser.add_argument("--footprint", type=float, default=0.0,
                        help="MB of weight copies each kernel cycles through (0: one copy, cache-resident)")
    parser.add_argument("--rows", type=positive_int, default=1, help="activation rows (1: decode at batch 1)")
    parser.add_argument("--only", nargs="*", default=[], help="only the shapes whose name contains one of these")
    parser.add_argument("--out", default="bench_out", help="directory for bench_matvec.json")
    args = parser.parse_args(argv)
    report = run(args)
    bw = report["bandwidth"]
    print(f"\nmatvec, {report['threads']} numba threads, weights cycled over {report['footprint_mb']:g} MB, "
          f"median and best of {report['rounds']} rounds; read "
          f"bandwidth {bw['best'] / 1e9:.1f} GB/s (numba {bw['numba'] / 1e9:.1f}, numpy {bw['numpy'] / 1e9:.1f}, "
          f"torch {bw['torch'] / 1e9:.1f})")
    print(benchtools.format_table(report["results"], COLUMNS))
    print("bf16/fp32 B/s: bytes/s of bf16 over fp32's (best rounds; by round: the median of each round's ratio); "
          "int8 speedup: fp32 time / int8 time")
    path = benchtools.write_json(Path(args.out) / "bench_matvec.json", report)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
