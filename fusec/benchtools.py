"""Measuring tools for the benchmarks: median timing, the machine's roofline (memory bandwidth and matmul
peak, measured in the same run, and whether other processes compete for its cores), thread control and
the table / JSON / PNG writers.

Timings are medians after warm-up: the machines fusec is measured on are shared and noisy, so a mean or a
single run says little. Nothing here asserts a timing.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

MIB = 1 << 20
MIN_STREAM_BYTES = 256 * MIB  # the bandwidth array must dwarf the caches, or we measure the cache


def median_time(fn: Callable[[], Any], warmup: int = 2, repeat: int = 10) -> float:
    """Median wall time of `fn()` in seconds over `repeat` runs, after `warmup` untimed runs."""
    if repeat < 1:
        raise ValueError(f"median_time: repeat must be at least 1, given {repeat}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --- threads --------------------------------------------------------------------------------------------

def set_threads(n: int) -> int:
    """Run torch and numba on `n` threads (numba is capped at its pool size); returns the numba count.

    BLAS libraries already loaded by NumPy keep their own pool; the OPENBLAS/OMP/MKL variables set here
    reach the subprocesses this process starts.
    """
    import numba  # loads in seconds: only the measurements that run Numba need it
    if n < 1:
        raise ValueError(f"set_threads: need at least 1 thread, given {n}")
    numba_threads = min(n, numba.config.NUMBA_NUM_THREADS)
    # numba first: launching its OpenMP pool resets the OpenMP thread count torch reads, and torch reads
    # it from the same libgomp.
    numba.set_num_threads(numba_threads)
    torch.set_num_threads(n)
    # not NUMBA_NUM_THREADS: Numba re-reads it at every compile and refuses a value below its running pool
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    return numba_threads


# --- roofline -------------------------------------------------------------------------------------------

def last_level_cache_bytes() -> int:
    """Size of the largest CPU cache per Linux sysfs (0 when unknown)."""
    sizes = [0]
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes)


def stream_bytes() -> int:
    """Size of the array the bandwidth test reads: 256 MiB or twice the last-level cache, whichever is
    larger (some servers report hundreds of MiB of L3), capped at a quarter of the free memory."""
    want = max(MIN_STREAM_BYTES, 2 * last_level_cache_bytes())
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return want
    return max(MIN_STREAM_BYTES, min(want, available // 4))


def _parallel_sum():
    import numba  # loads in seconds: only this measurement needs it

    # fastmath lets LLVM reorder the float reduction, so the loop vectorises and is bound by memory.
    @numba.njit(parallel=True, fastmath=True, cache=False)
    def parallel_sum(a):
        total = np.float32(0.0)
        for i in numba.prange(a.size):
            total += a[i]
        return total

    return parallel_sum


def measure_memory_bandwidth(nbytes: int | None = None, repeat: int = 5,
                             readers: Sequence[str] = ("numba", "numpy", "torch")) -> dict[str, float]:
    """Read bandwidth in bytes/s: median over `repeat` sums of a float32 array of `nbytes`.

    Returns {"numba": ..., "numpy": ..., "torch": ..., "best": max of them}: numba's parallel prange sum
    on all its threads, NumPy's single-threaded sum and torch's threaded sum (only those in `readers`:
    ("torch",) is the quick one, without numba's compile).
    """
    nbytes = nbytes or stream_bytes()
    data = np.ones(nbytes // 4, dtype=np.float32)  # ones, not empty: every page must really exist
    tensor = torch.from_numpy(data)
    parallel_sum = _parallel_sum() if "numba" in readers else None
    readers = {name: read for name, read in (("numba", lambda: parallel_sum(data)), ("numpy", lambda: data.sum()),
                                             ("torch", lambda: tensor.sum())) if name in readers}
    result = {name: data.nbytes / median_time(read, warmup=1, repeat=repeat) for name, read in readers.items()}
    result["best"] = max(result.values())
    result["array_bytes"] = float(data.nbytes)
    return result


def measure_matmul_peak(n: int = 2048, repeat: int = 5) -> dict[str, float]:
    """Float32 GEMM rate in flop/s on n x n matrices, median over `repeat` runs.

    Returns {"torch": ..., "numpy": ..., "best": max of them} (torch.mm and numpy.dot), and "onednn" (fusec's
    own prefill GEMM, `mkl.gemm_mkl` with oneDNN running its blocks) where oneDNN is installed: the peak is
    the fastest float32 GEMM this machine has, not only torch's. "bf16": the fastest bf16 x bf16 -> f32
    GEMM (torch.mm on bf16, and fusec's `mkl.gemm_bf16_mkl` where oneDNN runs it), the peak of a bf16
    prefill that uses one.
    """
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    flops = 2.0 * n ** 3
    kernels = {"torch": lambda: torch.mm(ta, tb), "numpy": lambda: np.dot(a, b)}
    a16, b16 = ta.bfloat16(), tb.bfloat16()
    bf16 = {"torch_bf16": lambda: torch.mm(a16, b16)}
    from fusec.backends.numba_cpu import mkl  # here: only benchmarks measure the peak
    if not mkl.UNAVAILABLE and mkl.gemm_blocks()[0] == "onednn":
        c = np.empty((n, n), np.float32)
        kernels["onednn"] = lambda: mkl.gemm_mkl(a, b, c, False)
        a_bits, b_bits = (t.view(torch.int16).numpy().view(np.uint16) for t in (a16, b16))
        bf16["onednn_bf16"] = lambda: mkl.gemm_bf16_mkl(a_bits, b_bits, c)  # a @ b^T: the same flops
    result = {name: flops / median_time(mm, warmup=1, repeat=repeat) for name, mm in kernels.items()}
    result["best"] = max(result.values())
    rates = {name: flops / median_time(mm, warmup=1, repeat=repeat) for name, mm in bf16.items()}
    result.update(rates, bf16=max(rates.values()), n=float(n))
    return result


def measure_machine(when: str) -> dict:
    """The machine's read bandwidth and matmul peak measured now (`when`, e.g. "before", names the moment
    in the progress line), with its core count and 1-minute load average."""
    print(f"measuring memory bandwidth and matmul peak ({when}) ...", flush=True)
    return {"bandwidth": measure_memory_bandwidth(), "matmul_peak": measure_matmul_peak(),
            "cpu_count": os.cpu_count(), "load_average_1min": os.getloadavg()[0]}


def best_of(before: dict, after: dict) -> dict:
    """The machine measured before and after the benchmark, each figure the higher of the two: other
    processes only ever slow a measurement down, and they come and go during a run."""
    best = {key: {k: max(v, after[key][k]) for k, v in before[key].items()} for key in ("bandwidth", "matmul_peak")}
    return dict(before, **best, load_average_1min=max(before["load_average_1min"], after["load_average_1min"]),
                before=before, after=after)


def contention_warning(machine: dict, threads: int) -> str:
    """A warning when other processes keep the cores busy: threaded runs then wait at every barrier."""
    load, cores = machine["load_average_1min"], machine["cpu_count"] or 1
    if load <= max(cores - threads, 0) + 0.75:  # our own start-up adds a little
        return ""
    return (f"warning: 1-minute load average {load:.1f} on {cores} cores before this run: other processes "
            f"compete for the cores, so {threads}-thread timings (small kernels above all) are inflated")


# --- output ---------------------------------------------------------------------------------------------

Column = tuple[str, str, str]  # (key in the row, header, format spec, e.g. ".2f"; "" for str())


def format_table(rows: Sequence[dict], columns: Sequence[Column]) -> str:
    """A plain-text table, one line per row; a missing or None value prints as '-'."""
    def cell(row: dict, key: str, spec: str) -> str:
        value = row.get(key)
        if value is None:
            return "-"
        if spec and isinstance(value, (int, float)) and not isinstance(value, bool):
            return format(value, spec)
        return str(value)

    cells = [[header for _, header, _ in columns]]
    cells += [[cell(row, key, spec) for key, _, spec in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(text.ljust(w) if i == 0 else text.rjust(w) for i, (text, w) in enumerate(zip(line, widths)))
             for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


_RUN: dict[str, Any] = {}


def run_record() -> dict[str, Any]:
    """Where a benchmark's numbers come from: the date (UTC), the source commit (with `+changes` when the
    work tree differs from it; None outside a git checkout) and the command as a user would type it. Taken
    once, at the first call (a benchmark's `main` calls it as it starts), so a commit made while the
    benchmark runs is not credited with its numbers."""
    if not _RUN:
        _RUN.update(_take_run_record())
    return dict(_RUN)


def _take_run_record() -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    commit = None
    try:
        git = ["git", "-C", str(root)]
        commit = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        if subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True,
                          text=True, timeout=10).stdout.strip():
            commit += "+changes"
    except (OSError, subprocess.SubprocessError):
        pass
    script = Path(sys.argv[0])
    program = "fusec" if script.name in ("fusec", "__main__.py") else f"python {script.parent.name}/{script.name}"
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": commit, "command": " ".join([program, *sys.argv[1:]])}


@contextmanager
def fresh_cache_dir():
    """A new, empty compile cache directory (private to this user, as the cache requires), removed after."""
    import tempfile
    with tempfile.TemporaryDirectory() as directory:
        os.chmod(directory, 0o700)
        yield directory


def child_json(code: str, args: Sequence[str], env: dict, what: str, timeout: float = 1800) -> Any:
    """Run `code` in a new Python process (`python -c code *args`, environment `env`) and return the JSON
    of the last line it prints; RuntimeError with the end of its stderr, naming `what`, when it fails."""
    done = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{what}: the run failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_json(path: str | Path, data: Any) -> Path:
    """Write `data` as indented JSON (creating the directory), with a `run` record (`run_record`) added to
    a dict that has none; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, dict) and "run" not in data:
        data = {"run": run_record(), **data}
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    return path


def write_bar_chart(path: str | Path, groups: dict[str, dict[str, float]], ylabel: str,
                    title: str = "") -> Path | None:
    """A PNG with one panel per group (e.g. per case), one bar per entry (e.g. per implementation).

    Uses matplotlib's Agg backend; without matplotlib prints a one-line notice and returns None.
    """
    try:  # matplotlib is optional (the `bench` extra)
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: skipping {path} (pip install 'fusec[bench]')")
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, max(len(groups), 1), figsize=(5 * max(len(groups), 1), 4), squeeze=False)
    for ax, (group, bars) in zip(axes[0], groups.items()):
        names, values = list(bars), list(bars.values())
        drawn = ax.bar(range(len(names)), values, color=[f"C{i}" for i in range(len(names))])
        ax.bar_label(drawn, fmt="%.3g", fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
        ax.set_title(group)
        ax.set_ylabel(ylabel)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@contextmanager
def quiet_warnings():
    """Silence what would bury a benchmark table: Numba's "parallel=True but nothing to parallelise" notes
    on generated kernels and torch's deprecation notices."""
    from numba.core.errors import NumbaPerformanceWarning  # numba loads on use (seconds)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=NumbaPerformanceWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


def run_and_report(args, run: Callable, print_report: Callable, write_outputs: Callable) -> int:
    """A benchmark's main after its arguments: `run(args)` with the noise silenced, its table printed and
    its JSON (and chart) written to `args.out`."""
    with quiet_warnings():
        report = run(args)
    print_report(report)
    write_outputs(report, Path(args.out))
    return 0


def seconds_outside_kernels(program, inputs: list, repeat: int = 20) -> float:
    """Median seconds of one `program.run(inputs)` (a Numba `Program`) spent outside its kernels: the run
    with every kernel and loop driver replaced by a compiled function of as many parameters that does
    nothing. What remains is the Python between calls and Numba's unboxing of each call's arguments; a
    loop driver's own work between its kernels (a copy of the carried value per layer) is not in it."""
    saved = [step.fn for step in program.steps]
    try:
        for step in program.steps:
            step.fn = _nothing(step.fn.py_func.__code__.co_argcount)
        return median_time(lambda: program.run(inputs), warmup=2, repeat=repeat)
    finally:
        for step, fn in zip(program.steps, saved):
            step.fn = fn


def _nothing(count: int):
    """A Numba function of `count` parameters that does nothing (varargs would dispatch more slowly)."""
    from numba import njit  # numba loads on use (seconds)
    names = ", ".join(f"a{k}" for k in range(count))
    scope: dict = {}
    exec(f"def nothing({names}):\n    return None\n", scope)
    return njit(nogil=True)(scope["nothing"])


def loop_kernel_seconds(program, inputs: list, repeat: int = 10) -> list[tuple[str, float]]:
    """What each kernel call in a loop driver's body costs one `program.run(inputs)` (a Numba `Program`):
    [(label, seconds)], the label `loop%<node> K[<n>] <kernel name>`, the seconds the median run time less
    the median with that call left out of the driver (all its iterations). The kernels after a left-out
    call read what it wrote last, so that run's values are wrong but its work is the same. The runs
    alternate (full, each left-out one, again), so a busy machine shifts them alike; still, compare
    numbers from one call. The drivers without a call compile in memory (nothing written to the cache)."""
    variants: list[tuple[str, int, object]] = []  # (label, step index, driver function)
    for s, step in enumerate(program.steps):
        driver = program.drivers.get(step.kernel)
        if driver is None:
            continue
        lines = driver.text.split("\n")
        names = [getattr(module, "__name__", "?") for module, _ in driver.calls]
        for row, line in enumerate(lines):
            found = re.match(r"(\s*)call_at\(K\[(\d+)\]", line)
            if found is None:
                continue
            text = "\n".join(lines[:row] + [found.group(1) + "pass"] + lines[row + 1:])
            scope: dict = {}
            exec(compile(text.replace("cache=True", "cache=False"), f"<loop{step.kernel} without a call>",
                         "exec"), scope)
            k = int(found.group(2))
            variants.append((f"loop%{step.kernel} K[{k}] {names[k]}", s, scope["driver"]))
    saved = [step.fn for step in program.steps]
    full: list[float] = []
    without: list[list[float]] = [[] for _ in variants]

    def timed() -> float:
        start = time.perf_counter()
        program.run(inputs)
        return time.perf_counter() - start

    try:
        for _ in range(repeat + 1):  # the first round warms up (and compiles the drivers without a call)
            full.append(timed())
            for times, (_, s, fn) in zip(without, variants):
                program.steps[s].fn = fn
                times.append(timed())
                program.steps[s].fn = saved[s]
    finally:
        for step, fn in zip(program.steps, saved):
            step.fn = fn
    base = statistics.median(full[1:])
    return [(label, base - statistics.median(times[1:])) for (label, _, _), times in zip(variants, without)]
