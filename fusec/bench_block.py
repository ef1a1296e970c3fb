"""Fused versus unfused fusec against PyTorch eager and torch.compile on one Llama block.

    python benchmarks/bench_block.py                          # tinyllama_1b: prefill 256 tokens, decode at 512
    python benchmarks/bench_block.py --preset tiny --seq 8 --past 8 --repeat 3

Implementations: PyTorch eager and torch.compile; fusec unfused, fused, and fused with bf16 or int8 weights.
Two cases: prefill (batch 1, --seq tokens, no past) and decode (1 new token attending to --past tokens of
K/V that are passed in and concatenated). Everything runs in one process with torch and numba on the same
thread count; times are medians after warm-up. The machine's read bandwidth and float32 matmul peak are
measured in the same run, and each time is reported as a fraction of its roofline (the block's parameters
in huge pages, `fusec.huge_pages`, for every implementation): decode against the bytes
it must read (weights plus past K/V) at that bandwidth, prefill against its FLOPs at that peak.
Compile time: cold is the first fusec.compile in a fresh FUSEC_CACHE_DIR, warm a new process compiling
the same programs with that cache. Writes bench_block.json and bench_block.png to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch

import fusec
from fusec import benchtools, huge_pages
from fusec.argtypes import nonnegative_int, positive_int
from fusec.ir_types import TensorType
from fusec.models.llama import PRESETS, LlamaBlock, LlamaConfig, example_inputs, init_weights
from fusec.models.registry import decode_inputs
from fusec.passes.weights import stored_bytes

IMPLEMENTATIONS = ("eager", "torch.compile", "fusec unfused", "fusec fused", "fusec bf16", "fusec int8")
# fusec.compile options of each fusec implementation; "fusec bf16" / "fusec int8" store the weights as
# bfloat16 / int8 blocks (passes.weights)
FUSEC_IMPLEMENTATIONS = {"fusec unfused": {"fuse": False}, "fusec fused": {"fuse": True},
                         "fusec bf16": {"fuse": True, "weights": "bf16"},
                         "fusec int8": {"fuse": True, "weights": "int8"}}
WEIGHT_FORMATS = {"fusec bf16": "bf16", "fusec int8": "int8"}  # the rest read float32 weights
CASES = ("prefill", "decode")
CHILD_PREFIX = "FUSEC_BENCH_CHILD "  # marks the line the warm-compile subprocess reports on
COLUMNS = [("implementation", "implementation", ""), ("case", "case", ""), ("median_ms", "median ms", ".3f"),
           ("speedup", "vs eager", ".2f"), ("roofline_fraction", "roofline", ".1%"),
           ("kernels", "kernels", "d"), ("intermediate_mb", "interm. MB", ".2f"),
           ("max_error", "max error", ".1e"), ("backend", "backend", ""), ("blas", "blas", ""), ("status", "status", "")]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fusec bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tinyllama_1b", choices=list(PRESETS), help="Llama block shape")
    parser.add_argument("--seq", type=positive_int, default=256, help="prefill tokens (batch 1)")
    parser.add_argument("--past", type=nonnegative_int, default=512, help="past K/V tokens in the decode case")
    parser.add_argument("--repeat", type=positive_int, default=10, help="timed runs per measurement (median)")
    parser.add_argument("--warmup", type=nonnegative_int, default=2, help="untimed runs before timing")
    parser.add_argument("--threads", type=positive_int, default=2, help="threads for torch and numba alike")
    parser.add_argument("--backend", default="numba", help="fusec backend (falls back to reference)")
    parser.add_argument("--out", default="bench_out", help="directory for bench_block.json and .png")
    parser.add_argument("--cache-dir", help="FUSEC_CACHE_DIR to use and keep (default: a fresh temporary "
                        "one, so that the first compile is cold)")
    parser.add_argument("--no-compile-time", action="store_true",
                        help="skip the warm-compile subprocess (cold compile times are still recorded)")
    parser.add_argument("--no-torch-compile", action="store_true", help="skip torch.compile (inductor)")
    parser.add_argument("--child-compile", action="store_true", help=argparse.SUPPRESS)
    # `fusec bench` takes the block first (fusec.cli.bench turns it into --preset): say so in the usage
    parser.usage = parser.format_usage().removeprefix("usage: ").replace(
        "fusec bench", "fusec bench [llama-block[:PRESET]]", 1).strip()
    parser.epilog = ("llama-block:PRESET is --preset PRESET; without a block, tinyllama_1b; `llama-block` "
                     "alone is the tiny preset. Whole-model generation tokens/s: `fusec bench generate --help`.")
    return parser.parse_args(argv)


# --- the model and its inputs ---------------------------------------------------------------------------

def build_block(preset: str) -> LlamaBlock:
    """The block, its parameters in huge pages (`fusec.huge_pages`, as the generator keeps a model's):
    every implementation reads the same memory."""
    block = init_weights(LlamaBlock(LlamaConfig.preset(preset)), seed=0).eval()
    huge_pages.pack_parameters(block)
    return block


def case_inputs(config: LlamaConfig, case: str, seq: int, past: int) -> tuple[tuple, dict]:
    """(args, kwargs) of the block for `case`: prefill takes `seq` tokens, decode one token after `past`."""
    if case == "prefill":
        return example_inputs(config, batch=1, seq_len=seq, seed=1), {}
    return decode_inputs(config, past_len=past, batch=1, seed=1)


def failure(error: Exception) -> str:
    """'failed: <type>: <first line of the message>', the status of an implementation that raised."""
    reason = (str(error).strip().splitlines() or [""])[0][:200]
    return f"failed: {type(error).__name__}: {reason}"


# --- compiling with fusec -------------------------------------------------------------------------------

_notices: set[str] = set()


def _notice(text: str) -> None:
    if text not in _notices:
        _notices.add(text)
        print(text)


def fusec_compile(module: torch.nn.Module, args: tuple, kwargs: dict, fuse: bool,
                  backend: str, weights: str = "fp32") -> tuple[Any, str]:
    """fusec.compile with `fuse` and `weights` on `backend`, or on the reference backend when `backend`
    is unknown (ValueError). Returns (compiled, the backend used)."""
    options = {"fuse": fuse}
    if weights != "fp32":
        options["weights"] = weights
    try:
        return fusec.compile(module, args, kwargs, backend=backend, **options), backend
    except ValueError as e:
        if backend == "reference":
            raise
        _notice(f"fusec backend {backend!r} unavailable ({e}); using backend 'reference'")
        return fusec.compile(module, args, kwargs, backend="reference", **options), "reference"


def timed_compile(module, args, kwargs, options: dict, backend: str) -> dict:
    """Compile with `options` (fuse, weights) and call once; the seconds of each, the backend used and
    the compiled callable."""
    start = time.perf_counter()
    compiled, used = fusec_compile(module, args, kwargs, backend=backend, **options)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        output = compiled(*args, **kwargs)
    return {"compiled": compiled, "backend": used, "compile_s": compile_s,
            "first_call_s": time.perf_counter() - start, "output": output}


@contextmanager
def cache_dir(path: str | None = None):
    """FUSEC_CACHE_DIR set for the block to `path`, or to a new empty directory that is removed afterwards;
    the previous value is restored."""
    previous = os.environ.get("FUSEC_CACHE_DIR")
    if path:
        Path(path).mkdir(parents=True, exist_ok=True)
    directory = path or tempfile.mkdtemp(prefix="fusec-bench-cache-")
    os.environ["FUSEC_CACHE_DIR"] = directory
    try:
        yield directory
    finally:
        if previous is None:
            os.environ.pop("FUSEC_CACHE_DIR", None)
        else:
            os.environ["FUSEC_CACHE_DIR"] = previous
        if not path:
            shutil.rmtree(directory, ignore_errors=True)


def child_compile(args: argparse.Namespace) -> int:
    """The warm-compile subprocess: compile every fusec program again (same cache dir) and report times."""
    benchtools.set_threads(args.threads)
    block = build_block(args.preset)
    report = {}
    for case in CASES:
        inputs, kwargs = case_inputs(block.config, case, args.seq, args.past)
        for name, options in FUSEC_IMPLEMENTATIONS.items():
            try:
                run = timed_compile(block, inputs, kwargs, options, args.backend)
            except Exception as e:
                report[f"{name}/{case}"] = {"error": failure(e)}
                continue
            report[f"{name}/{case}"] = {"compile_s": run["compile_s"], "first_call_s": run["first_call_s"]}
    print(CHILD_PREFIX + json.dumps(report), flush=True)
    return 0


def warm_compile_times(args: argparse.Namespace, directory: str) -> dict:
    """Run `child_compile` in a new Python process that shares the cache `directory`; its report, or
    {"error": ...}."""
    command = [sys.executable, "-m", "fusec.bench_block", "--child-compile", "--preset", args.preset,
               "--seq", str(args.seq), "--past", str(args.past), "--threads", str(args.threads),
               "--backend", args.backend]
    root = str(Path(fusec.__file__).resolve().parent.parent)
    env = dict(os.environ, FUSEC_CACHE_DIR=directory,
               PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    except subprocess.TimeoutExpired:
        return {"error": "timed out"}
    for line in done.stdout.splitlines():
        if line.startswith(CHILD_PREFIX):
            return json.loads(line[len(CHILD_PREFIX):])
    last = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit {done.returncode}: {last}"}


# --- torch.compile --------------------------------------------------------------------------------------

def inductor_compile(block: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[Callable | None, dict]:
    """torch.compile (inductor) called once: (callable, info) or (None, {"status": "failed: ..."})."""
    torch._dynamo.reset()  # a fresh compile per case, so the second case does not turn dynamic
    compiled = torch.compile(block, backend="inductor")
    start = time.perf_counter()
    try:
        with torch.no_grad():
            output = compiled(*args, **kwargs)
    except Exception as e:  # inductor needs a C++ toolchain and more; report, do not crash
        return None, {"status": failure(e)}
    return compiled, {"first_call_s": time.perf_counter() - start, "output": output}


# --- rooflines ------------------------------------------------------------------------------------------

def roofline(block: LlamaBlock, case: str, seq: int, past: int, machine: dict) -> dict:
    """The best possible time of `case`: decode is bound by bytes read, prefill by FLOPs."""
    config = block.config
    params = sum(p.numel() for p in block.parameters())
    if case == "decode":
        kv_bytes = 2 * config.n_kv_heads * past * config.head_dim * 4  # past K and V, float32, batch 1
        stored = {fmt: sum(stored_bytes(TensorType(tuple(p.shape), "f32"), fmt) for p in block.parameters())
                  for fmt in ("fp32", *WEIGHT_FORMATS.values())}
        line = {"bound": "memory", "bytes": stored["fp32"] + kv_bytes, "weight_bytes": stored["fp32"],
                "kv_bytes": kv_bytes}
        # each weight format's own bytes: "seconds" (fp32), "seconds_bf16", "seconds_int8"
        for fmt, weight_bytes in stored.items():
            key = "seconds" if fmt == "fp32" else f"seconds_{fmt}"
            line[key] = (weight_bytes + kv_bytes) / machine["bandwidth"]["best"]
        return line
    # Causal attention without a past: query i sees i + 1 keys; QK^T and PV cost 2 * head_dim flops per
    # query-key pair each.
    pairs = seq * (seq + 1) // 2
    flops = 2 * params * seq + 4 * config.n_heads * config.head_dim * pairs
    peak = machine["matmul_peak"]
    # bf16 weights at prefill run a bf16 GEMM where the CPU has one (its own peak); int8 widens to fp32
    return {"bound": "compute", "flops": flops, "seconds": flops / peak["best"],
            "seconds_bf16": flops / max(peak.get("bf16", 0.0), peak["best"])}


# --- the benchmark --------------------------------------------------------------------------------------

def max_error(output: torch.Tensor, expected: torch.Tensor) -> float:
    return float((output.double() - expected.double()).abs().max())


def bench_case(block: LlamaBlock, case: str, args: argparse.Namespace) -> tuple[list, dict]:
    """Time every implementation on `case`; (result rows, cold compile times)."""
    inputs, kwargs = case_inputs(block.config, case, args.seq, args.past)
    with torch.no_grad():
        expected = block(*inputs, **kwargs)
    callables: dict[str, Callable | None] = {"eager": block}
    info: dict[str, dict] = {"eager": {"output": expected}}
    cold = {}
    for name, options in FUSEC_IMPLEMENTATIONS.items():
        try:
            run = timed_compile(block, inputs, kwargs, options, args.backend)
        except Exception as e:  # one broken implementation must not hide the others' numbers
            callables[name], info[name] = None, {"status": failure(e)}
            cold[f"{name}/{case}"] = {"error": failure(e)}
            continue
        callables[name], info[name] = run.pop("compiled"), run
        cold[f"{name}/{case}"] = {"compile_s": run["compile_s"], "first_call_s": run["first_call_s"]}
        _notice(f"fusec ran on backend {run['backend']!r}")
    # After fusec: the first fusec compile of the process then pays torch.export's start-up, as in the
    # warm-compile subprocess, so cold and warm compare like with like.
    if args.no_torch_compile:
        callables["torch.compile"], info["torch.compile"] = None, {"status": "skipped"}
    else:
        callables["torch.compile"], info["torch.compile"] = inductor_compile(block, inputs, kwargs)
    if "first_call_s" in info["torch.compile"]:
        cold[f"torch.compile/{case}"] = {"first_call_s": info["torch.compile"]["first_call_s"]}

    rows = []
    for name in IMPLEMENTATIONS:
        fn, details = callables[name], info[name]
        row = {"implementation": name, "case": case, "status": details.get("status", "ok")}
        if fn is not None:
            with torch.no_grad():
                seconds = benchtools.median_time(lambda: fn(*inputs, **kwargs), args.warmup, args.repeat)
            stats = getattr(fn, "stats", None) or {}
            row.update(median_ms=seconds * 1e3, max_error=max_error(details["output"], expected),
                       kernels=stats.get("kernels"), intermediate_mb=_mb(stats.get("intermediate_bytes")),
                       backend=details.get("backend"), blas=stats.get("blas"))
        rows.append(row)
    eager_ms = rows[0]["median_ms"]
    for row in rows:
        if row.get("median_ms"):
            row["speedup"] = eager_ms / row["median_ms"]
    return rows, cold


def _mb(nbytes: int | None) -> float | None:
    return None if nbytes is None else nbytes / 1e6


def compile_table(cold: dict, warm: dict) -> str:
    def row(key: str, times: dict) -> dict:
        again = warm.get(key, {})
        # A failure's reason is in the results table already; here it would only widen every line.
        return {"program": key, "cold": "failed" if "error" in times else times.get("compile_s"),
                "cold_call": times.get("first_call_s"), "warm_call": again.get("first_call_s"),
                "warm": "failed" if "error" in again else again.get("compile_s")}

    return benchtools.format_table([row(key, times) for key, times in cold.items()], [
        ("program", "program", ""), ("cold", "cold compile s", ".2f"), ("cold_call", "cold 1st call s", ".2f"),
        ("warm", "warm compile s", ".2f"), ("warm_call", "warm 1st call s", ".2f")])


def run(args: argparse.Namespace) -> dict:
    """Measure the machine, every implementation on every case and the compile times: the JSON report."""
    _notices.clear()
    threads = benchtools.set_threads(args.threads)
    machine_before = benchtools.measure_machine("before")
    block = build_block(args.preset)
    results, cold, warm = [], {}, {}
    with cache_dir(args.cache_dir) as directory:
        for case in CASES:
            print(f"benchmarking {case} ...", flush=True)
            rows, cold_times = bench_case(block, case, args)
            results += rows
            cold.update(cold_times)
        if not args.no_compile_time:
            print("measuring warm compile time in a new process ...", flush=True)
            warm = warm_compile_times(args, directory)
    machine = benchtools.best_of(machine_before, benchtools.measure_machine("after"))
    lines = {case: roofline(block, case, args.seq, args.past, machine) for case in CASES}
    for row in results:
        if row.get("median_ms"):
            line = lines[row["case"]]
            key = f"seconds_{WEIGHT_FORMATS.get(row['implementation'])}"  # its own bytes (decode)
            row["roofline_fraction"] = line.get(key, line["seconds"]) / (row["median_ms"] / 1e3)
    return {"preset": args.preset, "seq": args.seq, "past": args.past, "repeat": args.repeat,
            "warmup": args.warmup, "threads": {"torch": torch.get_num_threads(), "numba": threads},
            "machine": machine, "roofline": lines, "results": results,
            "compile_time": {"cold": cold, "warm": warm, "measured_warm": not args.no_compile_time}}


def print_report(report: dict) -> None:
    machine, threads = report["machine"], report["threads"]
    print(f"\nLlama block {report['preset']}: prefill {report['seq']} tokens, decode 1 token after "
          f"{report['past']}; {threads['torch']} torch threads, {threads['numba']} numba threads; "
          f"median of {report['repeat']}")
    bandwidth, peak = machine["bandwidth"], machine["matmul_peak"]
    gemms = ", ".join(f"{k} {peak[k] / 1e9:.1f}" for k in ("torch", "numpy", "onednn", "bf16") if k in peak)
    print(f"read bandwidth {bandwidth['best'] / 1e9:.1f} GB/s (numba {bandwidth['numba'] / 1e9:.1f}, numpy "
          f"{bandwidth['numpy'] / 1e9:.1f}, torch {bandwidth['torch'] / 1e9:.1f}); matmul peak "
          f"{peak['best'] / 1e9:.1f} GFLOP/s ({gemms}); each the better of before and after the run")
    warning = benchtools.contention_warning(machine, threads["torch"])
    if warning:
        print(warning)
    for case, line in report["roofline"].items():
        amount = f"{line['bytes'] / 1e6:.1f} MB" if case == "decode" else f"{line['flops'] / 1e9:.2f} GFLOP"
        print(f"roofline {case}: {amount} -> {line['seconds'] * 1e3:.3f} ms ({line['bound']} bound)")
    print("\n" + benchtools.format_table(report["results"], COLUMNS))
    cold, warm = report["compile_time"]["cold"], report["compile_time"]["warm"]
    print("\ncompile time (cold: fresh cache dir; warm: new process, same cache dir)")
    print(compile_table(cold, warm) if "error" not in warm else f"warm compile failed: {warm['error']}")


def write_outputs(report: dict, out: Path) -> None:
    json_path = benchtools.write_json(out / "bench_block.json", report)
    chart = {case: {row["implementation"]: row["median_ms"] for row in report["results"]
                    if row["case"] == case and row.get("median_ms")} for case in CASES}
    png_path = benchtools.write_bar_chart(out / "bench_block.png", chart, "median ms",
                                          f"Llama block {report['preset']}, {report['threads']['torch']} threads")
    print(f"\nwrote {json_path}" + (f" and {png_path}" if png_path else ""))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    benchtools.run_record()  # the commit and command of this run, taken as it starts
    if args.child_compile:
        return child_compile(args)
    return benchtools.run_and_report(args, run, print_report, write_outputs)


if __name__ == "__main__":
    sys.exit(main())
