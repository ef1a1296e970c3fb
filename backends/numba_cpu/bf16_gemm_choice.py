"""Whether prefill GEMMs over bf16 weights call a bf16 x bf16 -> f32 GEMM or widen weight tiles to float32
for the fp32 one (`mkl.bf16_gemm_in_hardware`), decided by a measurement on this machine. Both are the
GEMM blocks of `mkl.py`, run by oneDNN where it is installed, else by MKL (`onednn.py`): the verdict is
kept per library (its key names it). With oneDNN on an AMD CPU with AVX512-BF16 the bf16 GEMM ran at
about twice the fp32 one's rate and is used; what follows was measured with MKL.

A CPU that reports AVX512-BF16 need not run MKL's bf16 GEMM fast: on a 2-core virtual machine reporting it,
MKL's bf16 GEMM ran at 0.63-0.73x its sgemm (tinyllama_1b block, 256-token bf16 prefill: 141 ms through it
against 101-104 ms with widened tiles, fp32 84-104 ms). So where the CPU reports the instructions, the two
GEMMs are timed once at a prefill shape (about a third of a second) and the bf16 one is used only when it
takes at most `FASTER` of sgemm's time. The verdict is kept in the compile cache directory (`MACHINE_FILE`,
keyed by the CPU's name and features and torch's version), so every later process generates the same
kernels (a verdict measured again could flip when the two are close, and kernels compiled for the other
path would miss the cache). `FUSEC_BF16_GEMM=mkl|widen` decides without measuring.
"""
from __future__ import annotations

import functools
import json
import os
import statistics
import time

import numpy as np

FASTER = 0.85       # the bf16 GEMM's time over sgemm's at most this to be used (widening costs ~0.1 of sgemm)
SHAPE = (256, 2048, 2048)  # M, K, N: a prefill of 256 tokens through a 2048-wide projection
MACHINE_FILE = "machine.json"


def bf16_gemm_faster(key: str, gemms: tuple) -> bool:
    """True when MKL's bf16 GEMM is to be used on this machine (`key`: the CPU's name, features and torch's
    version; `gemms`: `mkl.gemm_bf16_mkl` and `mkl.gemm_mkl`, passed in: that module asks this one):
    FUSEC_BF16_GEMM's choice, else measured at most once per machine and cache directory."""
    wanted = os.environ.get("FUSEC_BF16_GEMM", "").strip().lower()
    if wanted in ("mkl", "widen"):
        return wanted == "mkl"
    if wanted:
        raise ValueError(f"FUSEC_BF16_GEMM must be 'mkl' or 'widen' (or unset), got {wanted!r}")
    from fusec.cache import choose_dir
    return measured_faster(key, choose_dir()[0], gemms)


@functools.lru_cache(maxsize=None)
def measured_faster(key: str, directory: str | None, gemms: tuple) -> bool:
    """The verdict for `key` kept in `directory`'s machine file, else measured (and kept there)."""
    path = os.path.join(directory, MACHINE_FILE) if directory else None
    stored = _read(path)
    if stored.get("bf16_gemm", {}).get("key") == key and isinstance(stored["bf16_gemm"].get("ratio"), float):
        return stored["bf16_gemm"]["ratio"] <= FASTER
    ratio = measure_ratio(*gemms)
    if path:
        from fusec.cache_manifest import write_atomic
        stored["bf16_gemm"] = {"key": key, "ratio": ratio}
        try:
            write_atomic(path, json.dumps(stored).encode())
        except OSError:  # not kept: measured again by the next process
            pass
    return ratio <= FASTER


def measure_ratio(gemm_bf16_mkl, gemm_mkl, rounds: int = 5) -> float:
    """The median over `rounds` of MKL's bf16 GEMM's time over its sgemm's at `SHAPE` (alternating, after
    one call of each), both as fusec's prefill kernels call them: a block of columns per Numba thread."""
    m, k, n = SHAPE
    rng = np.random.default_rng(0)
    a, w = rng.standard_normal((m, k), np.float32), rng.standard_normal((n, k), np.float32)
    a16, w16 = ((x.view(np.uint32) >> np.uint32(16)).astype(np.uint16) for x in (a, w))  # (truncated: timing only)
    c = np.empty((m, n), np.float32)

    def seconds(call) -> float:
        start = time.perf_counter()
        call()
        return time.perf_counter() - start
    runs = [lambda: gemm_bf16_mkl(a16, w16, c), lambda: gemm_mkl(a, w, c, True)]
    for run in runs:
        run()
    ratios = [seconds(runs[0]) / seconds(runs[1]) for _ in range(rounds)]
    return float(statistics.median(ratios))


def _read(path: str | None) -> dict:
    """The machine file's verdicts, or {} when there is none or it is not a JSON object."""
    if not path:
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and isinstance(data.get("bf16_gemm", {}), dict) else {}
