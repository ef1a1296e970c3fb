"""The analytical RDU performance model: what a placed program would do on an SN40L-class chip.

    rep = report(graph, "sn40l", layers=32, decode=True)   # a graph (placed or not) or a Placement
    print(format_report(rep))

Per stage s of a section (docs/rdu-model.md, formula 1), with its bytes per tier and PCUs/PMUs from the
placement, every term in seconds per call:
    compute  FLOPs / (PCUs x per-PCU peak of its mode x eta)     systolic for matmuls, SIMD otherwise
    SRAM     bytes read from its input buffer / (its PMUs x PMU bandwidth), and likewise from each
             on-chip tensor it reads
    HBM/DDR  its off-chip bytes / its share of the tier's achievable bandwidth; in steady state all stages
             stream at once and share it in proportion to their bytes, while filling or draining the
             pipeline a stage has the tier to itself
    network  the load of the busiest link its flows cross / link bandwidth
A section pipelines its stages over N tiles (Spatial's metapipeline, N = `Section.tiles`):
    T_sec = (N-1)/N * max_s t_s(steady) + 1/N * sum_s t_s(alone) + launch + sync + program load
Launch: `launch_overhead_s` per section call under software orchestration, once per program call under
hardware orchestration (SN40L §IV-D). Sync: `call_sync_s` per section call (argument load and the barrier
at its end) under either. Program load: `program_load_s` per section call when a program has several
sections (they take turns on the chip); a one-section program stays loaded (counted once, `load_once_s`).
A whole model is `layers` calls of the traced block (its weights assumed resident in HBM); tensor
parallelism over `tp` sockets divides every stage's FLOPs and bytes by tp and adds two all-reduces of the
block's output per layer (`allreduce_latency_s` + ring transfer at `p2p_bw`). Kernel looping
(`looping=True`, KL) makes the layers one call (`_program_time`). Tokens/s = tokens per call / model time
per call. All unpublished figures are the machine's (`fusec.machines`; calibrated in docs/rdu-model.md).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from fusec.benchtools import format_table
from fusec.errors import FusecError
from fusec.ir import Graph
from fusec.machines import Machine, get_machine
from fusec.rdu.placement import Placement, Section, Stage, pcu_rate, pmu_bandwidth, tier_bandwidth
from fusec.passes.place import plan

ALLREDUCES_PER_LAYER = 2       # Megatron-style TP: after attention and after the MLP
BOUNDS = ("compute", "SRAM", "HBM", "DDR", "network")


def report(target: Graph | Placement, machine: Machine | str | None = None, *, layers: int = 1, tp: int = 1,
           orchestration: str = "software", decode: bool = False, tokens: int | None = None, seed: int = 0,
           dtype: str | None = None, looping: bool = False, p2p_bw: float | None = None,
           allreduce_latency_s: float | None = None) -> dict[str, Any]:
    """The model's estimate for `target` on `machine` (see the module docstring) as plain data.

    A Graph is placed on `machine` (or its own placement is used when it carries one for that machine,
    seed and dtype); a Placement is evaluated with `machine`'s figures (default: its own), which must
    have the same grid. `tokens`: tokens a call produces (default: the graph's first input without its
    last axis, e.g. batch x sequence; 1 for a Placement). `looping`: the `layers` calls of the block are
    one looped call (kernel looping, KL). `p2p_bw`, `allreduce_latency_s`: default the machine's."""
    if orchestration not in ("software", "hardware"):
        raise ValueError(f"orchestration must be 'software' or 'hardware', got {orchestration!r}")
    if layers < 1 or tp < 1:
        raise ValueError(f"layers and tp must be at least 1, got layers={layers}, tp={tp}")
    placement, m = _placement(target, machine, seed, dtype)
    if tokens is None:
        tokens = tokens_per_call(target) if isinstance(target, Graph) else 1
    sections = [_section(placement, sec, m, tp) for sec in placement.sections]
    n = len(sections)
    for row in sections:
        row["launch_s"] = m.launch_overhead_s if orchestration == "software" else 0.0
        row["sync_s"] = m.call_sync_s
        row["load_s"] = m.program_load_s if n > 1 else 0.0
        row["time_s"] = row["pipeline_s"] + row["launch_s"] + row["sync_s"] + row["load_s"]
        if row["launch_s"] + row["sync_s"] + row["load_s"] > row["pipeline_s"]:
            row["bound"] = "overhead"
    output_bytes = sum(t.bytes for t in placement.memory.tensors if t.kind == "output")
    p2p = m.p2p_bw if p2p_bw is None else p2p_bw
    latency = m.allreduce_latency_s if allreduce_latency_s is None else allreduce_latency_s
    ar_latency = ALLREDUCES_PER_LAYER * latency if tp > 1 else 0.0
    ar_transfer = ALLREDUCES_PER_LAYER * 2 * (tp - 1) / tp * output_bytes / p2p if tp > 1 else 0.0
    times = _program_time(sections, m, layers, orchestration, looping, ar_latency, ar_transfer)
    return {
        "machine": m.name, "dtype": placement.dtype or "as traced", "seed": placement.seed, "layers": layers,
        "tp": tp, "orchestration": orchestration, "looping": looping, "decode": decode, "sections": sections,
        "total": _total(sections, placement, m, layers, times, tokens, decode),
    }


def _program_time(sections: list[dict], m: Machine, layers: int, orchestration: str, looping: bool,
                  ar_latency: float, ar_transfer: float) -> dict[str, float]:
    """Seconds per model call and their parts. Without looping, every layer calls every section: launch
    (software orchestration), sync and program load per call, then the all-reduces, one after another.
    Kernel looping makes the layers one call: one launch and one sync; a layer of one section stays
    loaded and its tiles stream on into the next layer's (the metapipeline over layers x N tiles, so the
    pipeline fills and drains once), and the all-reduce's transfer streams alongside (P2P, tile to tile),
    leaving its latency per layer; a layer of several sections still loads them in turn."""
    once = m.launch_overhead_s if orchestration == "hardware" else 0.0
    allreduce = ar_latency + ar_transfer
    if not looping or layers == 1:
        layer_s = sum(r["time_s"] for r in sections) + allreduce
        return {"time_s": layers * layer_s + once, "layer_s": layer_s, "allreduce_s": allreduce,
                "launch_s": layers * sum(r["launch_s"] for r in sections) + once,
                "sync_s": layers * sum(r["sync_s"] for r in sections),
                "load_s": layers * sum(r["load_s"] for r in sections)}
    head = m.launch_overhead_s + m.call_sync_s
    if len(sections) == 1:
        r = sections[0]
        n = max(r["tiles"], 1)
        stream = (layers * n - 1) / n * r["steady_s"] + r["fill_s"] / n
        layer_ar = ar_latency + max(0.0, ar_transfer - r["steady_s"])
        body, load = stream + layers * layer_ar, 0.0
    else:
        load = layers * sum(r["load_s"] for r in sections)
        layer_ar = allreduce
        body = layers * (sum(r["pipeline_s"] for r in sections) + allreduce) + load
    return {"time_s": head + body, "layer_s": body / layers, "allreduce_s": layer_ar,
            "launch_s": m.launch_overhead_s, "sync_s": m.call_sync_s, "load_s": load}


def _placement(target, machine, seed: int, dtype: str | None) -> tuple[Placement, Machine]:
    if isinstance(target, Placement):
        m = target.machine if machine is None else get_machine(machine)
        if (m.grid, m.pcus, m.pmus, m.pmu_bytes) != (target.machine.grid, target.machine.pcus,
                                                     target.machine.pmus, target.machine.pmu_bytes):
            raise FusecError(f"the placement was made for {target.machine.name}'s grid; place the graph again "
                             f"for {m.name}")
        return target, m
    own = target.annotations.get("placement")
    m = get_machine(machine) if machine is not None else (own.machine if own is not None else get_machine("sn40l"))
    if own is not None and own.machine == m and own.seed == seed and own.dtype == dtype:
        return own, m
    return plan(target, m, seed, dtype), m


def tokens_per_call(graph: Graph) -> int:
    """Tokens one call processes: the first input without its last axis (batch x sequence)."""
    if not graph.inputs:
        return 1
    shape = graph.nodes[graph.inputs[0]].shape
    return max(1, math.prod(shape[:-1]))


# --- stages and sections --------------------------------------------------------------------------------

def stage_terms(p: Placement, st: Stage, m: Machine, shares: dict[str, float], tp: int = 1) -> dict[str, float]:
    """Seconds per call of each bound of one stage; `shares`: its fraction of each off-chip tier."""
    bw_pmu = pmu_bandwidth(m)
    buf = p.buffers[st.buffer]
    sram = st.buffer_reads / (buf.pmus * bw_pmu)
    tensor_buffers = {b.name: b for b in (p.buffers[i] for i in p.sections[st.section].buffers) if b.kind == "tensor"}
    for r in st.reads:
        if r.source in tensor_buffers:
            sram = max(sram, r.bytes / (tensor_buffers[r.source].pmus * bw_pmu))
    tiers = st.bytes_by_tier()
    terms = {"compute": st.flops / (st.pcus * pcu_rate(m, st.mode)), "SRAM": sram}
    for tier, name in (("hbm", "HBM"), ("ddr", "DDR")):
        share = shares.get(tier, 1.0)
        terms[name] = tiers[tier] / (tier_bandwidth(m, tier) * share) if tiers[tier] else 0.0
    mine = {f"stage:{st.id}", f"buffer:{st.buffer}"}
    links = [f.max_link_bytes for f in p.flows if f.src in mine or f.dst in mine]
    terms["network"] = max(links, default=0) / m.link_bw
    return {k: v / tp for k, v in terms.items()}


def _section(p: Placement, sec: Section, m: Machine, tp: int) -> dict[str, Any]:
    stages = [p.stages[i] for i in sec.stages]
    totals = {t: sum(st.bytes_by_tier()[t] for st in stages) for t in ("sram", "hbm", "ddr")}
    rows, steady, alone = [], [], []
    for st in stages:
        tiers = st.bytes_by_tier()
        shares = {t: tiers[t] / totals[t] for t in ("hbm", "ddr") if tiers[t]}
        busy, solo = stage_terms(p, st, m, shares, tp), stage_terms(p, st, m, {}, tp)
        bound = max(BOUNDS, key=lambda b: (busy[b], -BOUNDS.index(b)))
        steady.append(busy[bound])
        alone.append(max(solo.values()))
        rows.append({"stage": st.name, "pcus": st.pcus, "pmus": p.buffers[st.buffer].pmus, "flops": st.flops / tp,
                     **{f"{t}_bytes": tiers[t] / tp for t in ("sram", "hbm", "ddr")},
                     **{f"{b.lower()}_s": busy[b] for b in BOUNDS}, "time_s": busy[bound], "bound": bound})
    n = max(sec.tiles, 1)
    slowest = max(range(len(stages)), key=lambda i: steady[i], default=0)
    pipeline = (n - 1) / n * max(steady, default=0.0) + sum(alone) / n
    flows = [f for f in p.flows if f.src in {f"stage:{i}" for i in sec.stages} | {f"buffer:{i}" for i in sec.buffers}]
    return {
        "section": sec.index, "kernels": " ".join(f"%{k}" for k in sec.kernels),
        "names": " ".join(dict(p.kernel_names)[k] for k in sec.kernels), "stages": rows,
        "pcus": sec.pcus, "pmus": sec.pmus, "pcu_utilisation": sec.pcus / m.pcus, "pmu_utilisation": sec.pmus / m.pmus,
        "tiles": sec.tiles, "pipeline_s": pipeline, "steady_s": max(steady, default=0.0), "fill_s": sum(alone), "bound": rows[slowest]["bound"] if rows else "compute",
        "flops": sum(st.flops for st in stages) / tp,
        "bytes": {"sram": totals["sram"] / tp, "hbm": totals["hbm"] / tp, "ddr": totals["ddr"] / tp,
                  "network": sum(f.bytes for f in flows) / tp},
        "weighted_hops": sec.weighted_hops, "random_weighted_hops": sec.random_weighted_hops,
        "busiest_link": {"from": list(sec.busiest_link[0]), "to": list(sec.busiest_link[1]),
                         "bytes": sec.busiest_link[2] / tp},
    }


def _total(sections, p: Placement, m: Machine, layers: int, times: dict[str, float], tokens: int,
           decode: bool) -> dict[str, Any]:
    by_bound: dict[str, float] = {}
    for r in sections:
        by_bound[r["bound"]] = by_bound.get(r["bound"], 0.0) + r["time_s"]
    flops = sum(r["flops"] for r in sections)
    tiers = {t: sum(r["bytes"][t] for r in sections) for t in ("sram", "hbm", "ddr", "network")}
    weight = sum(r["time_s"] for r in sections) or 1.0
    model_s = times["time_s"]
    return {
        "sections": len(sections), "kernels": sum(len(r["kernels"].split()) for r in sections),
        **times, "load_once_s": m.program_load_s if len(sections) == 1 else 0.0,
        "bound": max(by_bound, key=by_bound.get) if by_bound else "compute",
        "flops": flops * layers, "bytes": {t: v * layers for t, v in tiers.items()},
        "pcu_utilisation": sum(r["pcu_utilisation"] * r["time_s"] for r in sections) / weight,
        "pmu_utilisation": sum(r["pmu_utilisation"] * r["time_s"] for r in sections) / weight,
        "flops_utilisation": flops * layers / (model_s * m.peak_flops) if model_s else 0.0,
        "hbm_bandwidth_utilisation": (tiers["hbm"] * layers / (model_s * m.hbm_bw)
                                      if model_s and m.hbm_bw else 0.0),
        "tokens": tokens, "tokens_per_s": tokens / model_s if model_s else 0.0, "decode": decode,
    }


def with_figures(machine: Machine | str, **figures: Any) -> Machine:
    """A machine with some figures changed (e.g. `hbm_bw=3.6e12`), for what-if questions."""
    m = get_machine(machine)
    return dataclasses.replace(m, **figures, sources=m.sources + tuple((k, "what-if override [M]") for k in figures))


# --- text -----------------------------------------------------------------------------------------------

SECTION_COLUMNS = [("section", "sec", "d"), ("names", "kernels", ""), ("pcus", "PCUs", "d"), ("pmus", "PMUs", "d"),
                   ("pcu_pct", "PCU %", ".0f"), ("tiles", "tiles", "d"), ("time_us", "time us", ".2f"),
                   ("bound", "bound", ""), ("gflop", "GFLOP", ".3f"), ("hbm_mb", "HBM MB", ".2f"),
                   ("ddr_mb", "DDR MB", ".2f"), ("sram_mb", "SRAM MB", ".2f"), ("net_mb", "net MB", ".2f")]
STAGE_COLUMNS = [("stage", "stage", ""), ("pcus", "PCUs", "d"), ("pmus", "PMUs", "d"), ("gflop", "GFLOP", ".4f"),
                 ("compute_us", "compute us", ".2f"), ("sram_us", "SRAM us", ".2f"), ("hbm_us", "HBM us", ".2f"),
                 ("ddr_us", "DDR us", ".2f"), ("network_us", "net us", ".2f"), ("bound", "bound", "")]


def format_report(rep: dict[str, Any], stages: bool | None = None) -> str:
    """The report as text: a header, one row per section, the stages (by default when there are at most
    8 sections), and the totals."""
    t = rep["total"]
    lines = [f"# RDU model on {rep['machine']} ({rep['dtype']}, {rep['orchestration']} orchestration, "
             f"tp={rep['tp']}, {rep['layers']} layer(s) x the traced block"
             + (", kernel looping)" if rep.get("looping") else ")")]
    rows = [{**r, "pcu_pct": 100 * r["pcu_utilisation"], "time_us": 1e6 * r["time_s"], "gflop": r["flops"] / 1e9,
             **{f"{k}_mb": r["bytes"][t_] / 1e6 for k, t_ in (("hbm", "hbm"), ("ddr", "ddr"), ("sram", "sram"),
                                                              ("net", "network"))}}
            for r in rep["sections"]]
    lines.append(format_table(rows, SECTION_COLUMNS))
    if stages if stages is not None else len(rows) <= 8:
        for r in rep["sections"]:
            lines.append(f"\n## section {r['section']} ({r['names']}): {r['tiles']} tiles, pipeline "
                         f"{1e6 * r['pipeline_s']:.2f} us, busiest link {r['busiest_link']['bytes'] / 1e6:.3f} MB "
                         f"{tuple(r['busiest_link']['from'])}->{tuple(r['busiest_link']['to'])}")
            lines.append(format_table([{**s, "gflop": s["flops"] / 1e9,
                                        **{f"{b.lower()}_us": 1e6 * s[f"{b.lower()}_s"] for b in BOUNDS}}
                                       for s in r["stages"]], STAGE_COLUMNS))
    lines.append("")
    lines.append(f"per layer   {1e6 * t['layer_s']:.2f} us in {t['sections']} section(s), {t['kernels']} kernel(s); "
                 f"bound: {t['bound']}")
    lines.append(f"model       {1e3 * t['time_s']:.4f} ms per call ({rep['layers']} layer(s)"
                 + (f", all-reduce {1e6 * t['allreduce_s']:.2f} us per layer" if rep["tp"] > 1 else "") + ")"
                 + f"; launch {1e3 * t['launch_s']:.4f} ms, sync {1e3 * t['sync_s']:.4f} ms, "
                 f"program load {1e3 * t['load_s']:.4f} ms")
    lines.append(f"traffic     HBM {t['bytes']['hbm'] / 1e9:.4f} GB, DDR {t['bytes']['ddr'] / 1e9:.4f} GB, "
                 f"SRAM {t['bytes']['sram'] / 1e9:.4f} GB, network {t['bytes']['network'] / 1e9:.4f} GB")
    lines.append(f"utilisation PCUs {100 * t['pcu_utilisation']:.0f}%, PMUs {100 * t['pmu_utilisation']:.0f}%, "
                 f"FLOPs {100 * t['flops_utilisation']:.1f}% of peak, HBM {100 * t['hbm_bandwidth_utilisation']:.1f}% "
                 f"of peak bandwidth")
    rate = "tokens/s (decode)" if rep["decode"] else "tokens/s"
    lines.append(f"throughput  {t['tokens_per_s']:,.1f} {rate} ({t['tokens']} token(s) per call)")
    return "\n".join(lines)
