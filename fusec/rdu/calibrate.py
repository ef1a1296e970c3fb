"""Calibration of the RDU model's unpublished parameters, and how much each one moves the paper figures.

    fitted = fit()                       # {"hbm_efficiency": ..., "call_sync_s": ..., "launch_overhead_s": ...}
    rows = sensitivity()                 # one row per parameter: default, range, figures it moves

Fit (`FIT_TARGETS`): each fitted parameter is solved by bisection so that one named published figure is
met exactly, the others held at their defaults, in two rounds (the three barely interact); every other
figure of `fusec.rdu.paper` is held out and checks the result. Parameters no published figure
isolates keep an assumed default; the sensitivity table shows what they move over their range.
"""
from __future__ import annotations

import math
from typing import Callable

from fusec.benchtools import format_table
from fusec.machines import Machine, get_machine
from fusec.rdu.model import with_figures
from fusec.rdu.paper import FIT, KL_SEQ, SOCKETS_TABLE_IV, SOCKETS_VI_A, looping_table, model_time, paper_rows

# name -> (low, high, what it is); ranges are what the sources leave open (docs/rdu-hardware.md)
PARAMETERS = {
    "launch_overhead_s": (1e-6, 50e-6, "host launch of one kernel call, software orchestration"),
    "call_sync_s": (0.0, 20e-6, "argument load and barrier of every kernel call (removed by looping)"),
    "program_load_s": (1e-6, 100e-6, "loading a section's configuration when sections take turns"),
    "hbm_efficiency": (0.80, 0.95, "achievable fraction of HBM peak while streaming"),
    "p2p_bw": (25e9, 400e9, "bytes/s per socket for tensor-parallel all-reduces"),
    "allreduce_latency_s": (0.0, 10e-6, "fixed cost of one all-reduce (on the critical path of every layer)"),
    "pmu_bw": (100e9, 400e9, "bytes/s of one PMU's ports (default 0: 205 GB/s from lanes and clock)"),
    "link_bw": (51.2e9, 204.8e9, "bytes/s of one on-chip network link"),
    "systolic_efficiency": (0.5, 1.0, "achievable fraction of PCU peak on GEMMs"),
    "hbm_bw": (1.6e12, 2.0e12, "published, but the sources disagree (HC24 1.6, Table II 1.8, text ~2 TB/s)"),
}
PUBLISHED = {"hbm_bw": "published: SN40L Table II (sources disagree)"}
MOVES = 0.05   # a figure "moves" when it changes by more than 5% over the parameter's range


def _tok_s_8b(m: Machine) -> float:
    return model_time(m, FIT["call_sync_s"][1], "decode", 8192, "fused", tp=SOCKETS_TABLE_IV,
                      orchestration="hardware")["tokens_per_s"]


def _looped_util(m: Machine) -> float:
    _, name, tp = FIT["allreduce_latency_s"]
    return model_time(m, name, "decode", KL_SEQ, "fused", tp=tp, orchestration="hardware",
                      looping=True)["hbm_bandwidth_utilisation"]


def _ho_gain(m: Machine) -> float:
    _, name, case = FIT["launch_overhead_s"]
    so, ho = (model_time(m, name, case, 4096, "fused-kernels", tp=SOCKETS_VI_A, orchestration=o)["time_s"]
              for o in ("software", "hardware"))
    return so / ho


# parameter -> (figure as a function of the machine, target, published as)
FIT_TARGETS: dict[str, tuple[Callable[[Machine], float], float, str]] = {
    "allreduce_latency_s": (_looped_util, 0.90, "KL: over 90% of peak HBM bandwidth, looped Llama 3.1 8B, 16 sockets"),
    "call_sync_s": (_tok_s_8b, 1042.0, "SN40L Table IV: Llama 3.1 8B, 1042 tok/s on 16 sockets"),
    "launch_overhead_s": (_ho_gain, 1.4, "SN40L §VI-A: HO gain 1.4-8x in decode; the low end for llama2-7b 4K"),
}


def _solve(m: Machine, name: str, rounds: int = 30) -> float:
    figure, target, _ = FIT_TARGETS[name]
    return solve(m, name, figure, target, *PARAMETERS[name][:2], rounds)


def solve(m: Machine, name: str, figure: Callable[[Machine], float], target: float, lo: float, hi: float,
          rounds: int = 30) -> float:
    """The value of parameter `name` in [lo, hi] where `figure` (monotone in it) meets `target`, by
    bisection (an end of the interval when the target lies outside)."""
    increasing = figure(with_figures(m, **{name: hi})) > figure(with_figures(m, **{name: lo}))
    for _ in range(rounds):
        mid = (lo + hi) / 2
        if (figure(with_figures(m, **{name: mid})) < target) == increasing:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _kl_geomean(m: Machine) -> float:
    gains = [r["gain"] for r in looping_table(m)]
    return math.exp(sum(map(math.log, gains)) / len(gains))


def kl_would_need(machine: Machine | str = "sn40l") -> dict[str, float]:
    """What the KL geomean of 1.6x would take in this model: the per-call sync that gives it, and what
    that sync does to the figure it was fitted to (Table IV, Llama 3.1 8B)."""
    m = get_machine(machine)
    sync = solve(m, "call_sync_s", _kl_geomean, 1.6, 0.0, 500e-6, rounds=20)
    other = with_figures(m, call_sync_s=sync)
    return {"call_sync_s": sync, "kl_geomean": _kl_geomean(other), "table_iv_8b_tok_s": _tok_s_8b(other)}


def fit(machine: Machine | str = "sn40l", rounds: int = 2) -> dict[str, float]:
    """The fitted values of FIT_TARGETS' parameters, starting from `machine`'s figures."""
    m = get_machine(machine)
    values: dict[str, float] = {}
    for _ in range(rounds):
        for name in FIT_TARGETS:
            values[name] = _solve(m, name)
            m = with_figures(m, **{name: values[name]})
    return values


def sensitivity(machine: Machine | str = "sn40l") -> list[dict]:
    """Per parameter: its default, range, and the figures that move by more than MOVES over the range
    (model value at the low end, default and high end), every figure evaluated on the same placements."""
    m = get_machine(machine)
    base = {r["figure"]: r["model"] for r in paper_rows(m)}
    out = []
    for name, (lo, hi, what) in PARAMETERS.items():
        ends = [{r["figure"]: r["model"] for r in paper_rows(with_figures(m, **{name: v}))} for v in (lo, hi)]
        moved = []
        for fig, v in base.items():
            a, b = ends[0][fig], ends[1][fig]
            change = (max(a, b, v) - min(a, b, v)) / v if v else 0.0
            if change > MOVES:
                moved.append({"figure": fig, "low": a, "default": v, "high": b, "change": change})
        moved.sort(key=lambda x: -x["change"])
        out.append({"parameter": name, "default": getattr(m, name), "low": lo, "high": hi, "what": what,
                    "fitted_to": FIT_TARGETS[name][2] if name in FIT_TARGETS else PUBLISHED.get(name, ""),
                    "figures_moved": len(moved), "moves": moved})
    return out


def format_sensitivity(rows: list[dict], top: int = 3) -> str:
    cells = [{**r, "range": f"{r['low']:.3g} - {r['high']:.3g}", "default_text": f"{r['default']:.3g}",
              "largest": "; ".join(f"{x['figure']}: {x['low']:.3g} / {x['default']:.3g} / {x['high']:.3g}"
                                   for x in r["moves"][:top]) or "-",
              "fit": r["fitted_to"] or "assumed"} for r in rows]
    return format_table(cells, [("parameter", "parameter", ""), ("default_text", "default", ""),
                                ("range", "range", ""), ("figures_moved", "figures moved >5%", "d"),
                                ("largest", "largest moves (low / default / high)", ""),
                                ("fit", "default from", "")])
