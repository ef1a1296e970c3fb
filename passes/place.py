"""Placement: map a tiled kernel program onto the PCU/PMU grid of an RDU (the "placed" stage).

`place(graph, machine="sn40l", seed=0, dtype=None)` expects a verified graph of kernels (fused or unfused,
tiled) and returns the same nodes carrying a `fusec.rdu.placement.Placement` in
`graph.annotations["placement"]`; `plan(...)` returns the Placement alone. Nothing the backends run
changes, so numerics are untouched; the result depends only on the graph, machine, seed and dtype, so a
second run gives the same placement. The placement is verified before it is returned (IRError).

Steps (SN40L §III-A and §V-A; docs/rdu-model.md):
1. Stage graph (`placement_stages`): each kernel -> pipeline stages with FLOPs and bytes.
2. Sections: kernels in graph order fill a section while its stages (one PCU each, at least) and stage
   buffers (double-buffered tiles, in whole PMUs) fit the chip; an unfused `op` kernel is a section of
   its own, as in the unfused baseline (SNdocs o0: every operator in its own section).
3. Allocation: the chip's PCUs go to the stages of a section in proportion to their work (FLOPs over the
   PCU rate of their mode, or bytes in and out over a link, so stages balance), each capped at its output
   width in lanes. Values used only
   inside a section stay on chip (`placement_memory`); GEMM stages keep their whole A operand on chip
   where PMUs remain, so their weights stream once (`operand_traffic`); then PMUs per stage buffer =
   max(capacity need, bandwidth need), the bandwidth need being its bytes over the pipeline interval.
4. Memory plan: every tensor in SRAM, HBM or DDR, addresses reused across lifetimes, spills to DDR.
5. Placement and routing (`placement_grid`): greedy start + simulated annealing, dimension-order routes.
"""
from __future__ import annotations

from typing import Callable

from fusec.errors import FusecError, IRError
from fusec.ir import Graph
from fusec.machines import Machine, get_machine
from fusec.rdu.placement import TIERS, MemoryPlan, Placement, pcu_rate
from fusec.sizes import concrete
from fusec.passes.placement_build import PlacementBuilder
from fusec.passes.placement_memory import choose_on_chip, overlaps, plan_memory, pmus_for, tensor_uses
from fusec.passes.placement_stages import KernelSpec, Sizer, a_bytes, analyze, operand_traffic
from fusec.passes.placement_torchops import section_groups


def place(graph: Graph, machine: Machine | str = "sn40l", seed: int = 0, dtype: str | None = None) -> Graph:
    """The graph with its placement on `machine` in `annotations["placement"]` (see the module docstring)."""
    placement = plan(graph, machine, seed, dtype)
    return Graph(graph.nodes, graph.outputs, graph.tensors, {**graph.annotations, "placement": placement})


def make_place_pass(machine: Machine | str, seed: int = 0, dtype: str | None = None) -> Callable[[Graph], Graph]:
    """`place` for another machine, seed or dtype, as a Graph -> Graph pass."""
    m = get_machine(machine)

    def run(graph: Graph) -> Graph:
        return place(graph, m, seed, dtype)
    run.__name__ = run.__qualname__ = f"place_{m.name}"
    return run


def plan(graph: Graph, machine: Machine | str = "sn40l", seed: int = 0, dtype: str | None = None,
         sections: str = "packed") -> Placement:
    """The Placement of `graph` on `machine` (a preset name, machine file or Machine). `sections`: how
    kernels share sections (`passes.placement_torchops.SECTION_MODES`): "packed" while they fit (an
    unfused `op` kernel alone), "kernel" one kernel per section, "torch" one PyTorch-level op per section.
    A graph with symbolic sizes is placed at their upper bounds (`fusec.sizes.concrete` for another size
    first)."""
    m = get_machine(machine)
    if graph.sizes:
        graph = concrete(graph)
    if m.kind != "rdu" or m.layout != "checkerboard":
        raise FusecError(f"place maps onto an RDU's PCU/PMU checkerboard; machine {m.name!r} is a {m.kind} "
                         f"({m.layout} layout); use sn40l, plasticine or test_grid")
    sizer = Sizer(dtype)
    kernels = analyze(graph, m, sizer)
    groups = partition(kernels, m, section_groups(graph, sections))
    section_of = {k.kernel: s for s, ks in enumerate(groups) for k in ks}
    uses = tensor_uses(graph, kernels, section_of, sizer)
    free = {s: m.pmus - sum(pmus_for(st.capacity, m.pmu_bytes) for k in ks for st in k.stages)
            for s, ks in enumerate(groups)}
    on_chip = choose_on_chip(uses, free, m.pmu_bytes)
    for name, s in on_chip.items():
        if uses[name].resident:
            free[s] -= pmus_for(uses[name].bytes, m.pmu_bytes)
    pcus = {s: allocate_pcus(ks, m) for s, ks in enumerate(groups)}
    resident = {key for s, ks in enumerate(groups) for key in resident_operands(ks, pcus[s], free[s], m)}
    reads, buffer_reads, capacity = {}, {}, {}
    for k in kernels:
        for j, st in enumerate(k.stages):
            key = (k.kernel, j)
            n_pcus = pcus[section_of[k.kernel]][k.kernel][j]
            reads[key], buffer_reads[key] = operand_traffic(st, n_pcus, key in resident)
            capacity[key] = st.capacity + (a_bytes(st) if key in resident else 0)
    traffic: dict[str, int] = {}
    for k in kernels:
        for j, st in enumerate(k.stages):
            for source, size, _ in reads[k.kernel, j]:
                traffic[source] = traffic.get(source, 0) + size
            for name, size in st.writes:
                traffic[name] = traffic.get(name, 0) + size
    memory = plan_memory(uses, on_chip, traffic, m)
    tier = {t.name: t.tier for t in memory.tensors}
    builder = PlacementBuilder(m, seed, tier, memory)
    for s, ks in enumerate(groups):
        builder.section(s, ks, pcus[s], reads, buffer_reads, capacity)
    placement = Placement(m, seed, dtype, tuple(builder.sections), tuple(builder.stages), tuple(builder.buffers),
                          tuple(builder.flows), memory, tuple((k.kernel, k.name) for k in kernels))
    verify_placement(placement, graph)
    return placement


# --- sections and allocation -----------------------------------------------------------------------------

def partition(kernels: list[KernelSpec], m: Machine, group_of: dict[int, int] | None = None
              ) -> list[list[KernelSpec]]:
    """Consecutive kernels per section while their stages and stage buffers fit; `op` kernels alone.
    With `group_of` (kernel -> group), a section holds the kernels of one group (while they fit)."""
    sections: list[list[KernelSpec]] = []
    used = (0, 0)
    for k in kernels:
        need = (len(k.stages), sum(pmus_for(st.capacity, m.pmu_bytes) for st in k.stages))
        if need[0] > m.pcus or need[1] > m.pmus:
            raise IRError(f"kernel %{k.kernel} ({k.name}) needs {need[0]} PCUs and {need[1]} PMUs for its "
                          f"stages and tiles; {m.name} has {m.pcus} PCUs and {m.pmus} PMUs")
        if group_of is not None:
            alone = bool(sections) and group_of[k.kernel] != group_of[sections[-1][-1].kernel]
        else:
            alone = k.name.startswith("op:") or (sections and sections[-1][-1].name.startswith("op:"))
        if not sections or alone or used[0] + need[0] > m.pcus or used[1] + need[1] > m.pmus:
            sections.append([])
            used = (0, 0)
        sections[-1].append(k)
        used = (used[0] + need[0], used[1] + need[1])
    return sections


def allocate_pcus(kernels: list[KernelSpec], m: Machine) -> dict[int, list[int]]:
    """kernel -> PCUs per stage: the whole chip shared in proportion to each stage's work, the larger of
    its compute (FLOPs over the PCU rate of its mode) and its input and output (bytes over one network
    link per PCU: a copy has no FLOPs but still moves its data through PCUs)."""
    stages = [st for k in kernels for st in k.stages]
    work = [max(st.flops / pcu_rate(m, st.mode),
                (sum(size for _, size, _ in st.reads) + sum(size for _, size in st.writes)) / m.link_bw)
            for st in stages]
    counts = proportional(work, [st.cap for st in stages], m.pcus)
    out, at = {}, 0
    for k in kernels:
        out[k.kernel] = counts[at:at + len(k.stages)]
        at += len(k.stages)
    return out


def proportional(weights: list[float], caps: list[int], budget: int) -> list[int]:
    """Integers >= 1 and <= caps, summing to at most `budget`, in proportion to `weights` (water-filling,
    then the largest remainders)."""
    share = [1.0] * len(weights)
    active = {i for i, w in enumerate(weights) if w > 0 and caps[i] > 1}
    remaining = budget - (len(weights) - len(active))
    while active:
        total = sum(weights[i] for i in active)
        fixed = {i: caps[i] for i in active if remaining * weights[i] / total >= caps[i]}
        fixed |= {i: 1 for i in active if remaining * weights[i] / total < 1}
        if not fixed:
            for i in active:
                share[i] = remaining * weights[i] / total
            break
        for i, v in fixed.items():
            share[i] = v
            remaining -= v
            active.discard(i)
    counts = [max(1, min(caps[i], int(s))) for i, s in enumerate(share)]
    spare = budget - sum(counts)
    for i in sorted(range(len(share)), key=lambda i: (counts[i] - share[i], i)):
        if spare <= 0:
            break
        if counts[i] < caps[i] and share[i] - counts[i] > 1e-9:
            counts[i] += 1
            spare -= 1
    return counts


def resident_operands(kernels: list[KernelSpec], pcus: dict[int, list[int]], free: int, m: Machine
                      ) -> set[tuple[int, int]]:
    """(kernel, stage) of the GEMM stages that keep their whole A operand in their input buffer, so that B
    (the weights) is fetched once: those that would re-read B the most bytes first, while `free` PMUs
    last."""
    options = []
    for k in kernels:
        for j, st in enumerate(k.stages):
            if st.gemm is None:
                continue
            streamed, _ = operand_traffic(st, pcus[k.kernel][j], False)
            saved = sum(size for _, size, _ in streamed) - sum(size for _, size, _ in st.reads)
            if saved > 0:
                options.append((-saved, k.kernel, j, pmus_for(a_bytes(st), m.pmu_bytes)))
    chosen = set()
    for _, kernel, j, need in sorted(options):
        if need <= free:
            chosen.add((kernel, j))
            free -= need
    return chosen


# --- the verifier ----------------------------------------------------------------------------------------

def verify_placement(p: Placement, graph: Graph | None = None) -> None:
    """Every kernel in one section, sections in graph order; every unit used at most once per section and
    of the right type; no capacity exceeded (PCUs, PMUs, buffers, SRAM, HBM, DDR, overlapping addresses)."""
    m = p.machine
    kernels = [k for s in p.sections for k in s.kernels]
    if graph is not None:
        expected = [i for i, n in enumerate(graph.nodes) if n.op == "kernel"]
        if kernels != expected:
            raise IRError(f"placement: sections cover kernels {kernels}, expected each of {expected} once, "
                          f"in graph order")
    for sec in p.sections:
        seen: dict = {}
        groups = [(f"stage {p.stages[i].name}", p.stages[i].cells, p.stages[i].pcus, "pcu") for i in sec.stages]
        groups += [(f"buffer {p.buffers[i].name}", p.buffers[i].cells, p.buffers[i].pmus, "pmu") for i in sec.buffers]
        for name, cells, count, unit in groups:
            if len(cells) != count:
                raise IRError(f"placement: section {sec.index}: {name} has {len(cells)} cells for {count} units")
            for c in cells:
                if not (0 <= c[0] < m.grid[0] and 0 <= c[1] < m.grid[1]) or m.unit_at(*c) != unit:
                    raise IRError(f"placement: section {sec.index}: {name} uses {c}, which is not a {unit}")
                if c in seen:
                    raise IRError(f"placement: section {sec.index}: unit {c} is assigned to both {seen[c]} and {name}")
                seen[c] = name
        for used, total, unit in ((sec.pcus, m.pcus, "PCUs"), (sec.pmus, m.pmus, "PMUs")):
            if used > total:
                raise IRError(f"placement: section {sec.index} uses {used} {unit}; {m.name} has {total}")
        for i in sec.buffers:
            b = p.buffers[i]
            if b.capacity > b.pmus * m.pmu_bytes:
                raise IRError(f"placement: buffer {b.name} holds {b.capacity:,} bytes in {b.pmus} PMUs of "
                              f"{m.pmu_bytes:,}")
    _verify_memory(p.memory, m)


def _verify_memory(memory: MemoryPlan, m: Machine) -> None:
    limits = {"hbm": m.hbm_bytes, "ddr": m.ddr_bytes, "sram": m.sram_bytes}
    for tier, peak in memory.peak:
        if peak > limits[tier]:
            raise IRError(f"memory plan: {peak:,} bytes in {tier}; {m.name} has {limits[tier]:,}")
    for t in memory.tensors:
        if t.tier not in TIERS:
            raise IRError(f"memory plan: tensor {t.name} has no tier ({t.tier!r})")
    for tier in TIERS:
        ts = sorted((t for t in memory.tensors if t.tier == tier and not t.streamed), key=lambda t: t.offset)
        for i, a in enumerate(ts):
            for b in ts[i + 1:]:
                if b.offset >= a.offset + a.bytes:
                    break
                same_time = overlaps(a.lifetime, b.lifetime) if tier != "sram" else a.lifetime == b.lifetime
                if same_time:
                    raise IRError(f"memory plan: {a.name} and {b.name} share {tier} addresses while both are live")
