"""Building a section's records: PMUs per buffer, unit groups and flows, grid placement with congestion
repair, then the Stage / Buffer / Flow / Section data of `fusec.rdu.placement`.

Congestion repair (SN40L §VII: performance bugs were mostly network congestion; more bandwidth means more
concurrent streams): when the busiest link would need longer than the section's pipeline interval (the
slowest stage's compute or off-chip time; and than a kernel launch, below which it cannot matter), every
flow crossing an overloaded link gets the buffer at its PMU end doubled, within the PMUs the section has
left, so its traffic starts from or lands on more units; the section is then placed again, annealed from
several seeds, a few rounds at most.
"""
from __future__ import annotations

import math

from fusec.machines import Machine
from fusec.rdu.placement import Buffer, Flow, MemoryPlan, Read, Section, Stage, pcu_rate, pmu_bandwidth, tier_bandwidth
from fusec.passes import placement_grid as grid
from fusec.passes.placement_memory import pmus_for
from fusec.passes.placement_stages import PREVIOUS, KernelSpec

REPAIR_ROUNDS = 3
RESTARTS = 3        # annealing runs per placement while repairing congestion


class PlacementBuilder:
    """Accumulates the records of every section, in order."""

    def __init__(self, m: Machine, seed: int, tier: dict[str, str], memory: MemoryPlan):
        self.m, self.seed, self.tier, self.memory = m, seed, tier, memory
        self.sections: list[Section] = []
        self.stages: list[Stage] = []
        self.buffers: list[Buffer] = []
        self.flows: list[Flow] = []

    def section(self, s: int, kernels: list[KernelSpec], pcus: dict[int, list[int]], reads, buffer_reads,
                capacity) -> None:
        """Place section `s`: its kernels' stages with `pcus[kernel][stage]` PCUs, `reads[kernel, stage]`
        (source, bytes fetched with re-reads, side), `buffer_reads` (bytes the PCUs read from the input
        buffer) and `capacity` (bytes the input buffer holds)."""
        m = self.m
        specs = [(k, j, st) for k in kernels for j, st in enumerate(k.stages)]
        stage0, buffer0 = len(self.stages), len(self.buffers)
        on_chip = [t for t in self.memory.tensors if t.tier == "sram" and t.lifetime[0] == s and not t.streamed]
        stage_key = {(k.kernel, j): f"stage:{stage0 + n}" for n, (k, j, _) in enumerate(specs)}
        buffer_key = {(k.kernel, j): f"buffer:{buffer0 + n}" for n, (k, j, _) in enumerate(specs)}
        tensor_key = {t.name: f"buffer:{buffer0 + len(specs) + i}" for i, t in enumerate(on_chip)}
        stage_reads = {key: [Read(src, self._tier(src), size) for src, size, _ in reads[key]] for key in stage_key}
        counts = {stage_key[key]: pcus[key[0]][key[1]] for key in stage_key}
        counts |= {tensor_key[t.name]: pmus_for(t.bytes, m.pmu_bytes) for t in on_chip}
        busy = [self._busy(st, pcus[k.kernel][j], stage_reads[k.kernel, j]) for k, j, st in specs]
        interval = max(busy, default=0.0)
        budget = m.pmus - sum(counts[tensor_key[t.name]] for t in on_chip)
        for (k, j, _), n in zip(specs, self._stage_pmus(specs, buffer_reads, capacity, interval, budget)):
            counts[buffer_key[k.kernel, j]] = n
        order, flows = self._groups_and_flows(specs, stage_key, buffer_key, tensor_key, stage_reads, buffer_reads)
        cells, routing = self._place(order, counts, flows, interval, s)
        random_hops = grid.weighted_hops(m, grid.random_placement(m, self._groups(order, counts), self.seed + s), flows)
        for (k, j, st) in specs:
            key = stage_key[k.kernel, j]
            self.stages.append(Stage(
                int(key.split(":")[1]), f"k{k.kernel}.{st.role}", k.kernel, s, st.role, st.mode, st.flops,
                tuple(stage_reads[k.kernel, j]), tuple(Read(name, self._tier(name), size) for name, size in st.writes),
                buffer_reads[k.kernel, j], sum(size for src, _, size in flows if src == key),
                int(buffer_key[k.kernel, j].split(":")[1]),
                counts[key], tuple(sorted(cells[key]))))
        for (k, j, st) in specs:
            key = buffer_key[k.kernel, j]
            self.buffers.append(Buffer(int(key.split(":")[1]), f"k{k.kernel}.{st.role}.in", "stage", k.kernel, s,
                                       capacity[k.kernel, j], counts[key], tuple(sorted(cells[key]))))
        producer = {name: k.kernel for k, _, st in specs for name, _ in st.writes}
        for t in on_chip:
            key = tensor_key[t.name]
            self.buffers.append(Buffer(int(key.split(":")[1]), t.name, "tensor",
                                       producer.get(t.name, kernels[0].kernel), s, t.bytes, counts[key],
                                       tuple(sorted(cells[key]))))
        for (src, dst, size), hops, peak in zip(flows, routing.flow_hops, routing.flow_max_link):
            self.flows.append(Flow(src, dst, size, round(hops, 4), peak))
        self.sections.append(Section(
            s, tuple(k.kernel for k in kernels), tuple(range(stage0, len(self.stages))),
            tuple(range(buffer0, len(self.buffers))), min(k.tiles for k in kernels),
            sum(counts[key] for key in stage_key.values()),
            sum(v for key, v in counts.items() if key.startswith("buffer:")),
            round(routing.weighted_hops, 1), round(random_hops, 1), routing.busiest))

    # --- pieces ------------------------------------------------------------------------------------------

    def _tier(self, source: str) -> str:
        return "sram" if source.startswith(PREVIOUS) else self.tier[source]

    def _busy(self, st, pcus: int, reads: list[Read]) -> float:
        """Seconds per call the stage needs for its compute or its off-chip reads, alone on the chip."""
        m = self.m
        offchip = [sum(r.bytes for r in reads if r.tier == t) / tier_bandwidth(m, t) for t in ("hbm", "ddr")]
        return max(st.flops / (pcus * pcu_rate(m, st.mode)), *offchip)

    def _stage_pmus(self, specs, buffer_reads, capacity, interval: float, budget: int) -> list[int]:
        """PMUs per stage buffer: max(capacity, bandwidth need). A buffer must deliver what its stage reads
        within the pipeline interval, no faster, and one PMU delivers at most its port bandwidth into one
        network link; the extra above capacity is scaled down when the section has too few PMUs left."""
        m = self.m
        bw = min(pmu_bandwidth(m), m.link_bw)
        need, want = [], []
        for k, j, _ in specs:
            need.append(pmus_for(capacity[k.kernel, j], m.pmu_bytes))
            bandwidth = math.ceil(buffer_reads[k.kernel, j] / (interval * bw)) if interval > 0 else 0
            want.append(max(need[-1], bandwidth))
        extra, room = sum(want) - sum(need), budget - sum(need)
        if extra > room:
            want = [c + (w - c) * room // extra for c, w in zip(need, want)]
        return want

    def _groups_and_flows(self, specs, stage_key, buffer_key, tensor_key, stage_reads, buffer_reads):
        """The group keys in greedy order (each stage's buffer, the stage, the tensors it writes) and the
        flows: buffer -> its stage (all it reads), earlier stage -> buffer, stage -> on-chip tensor ->
        buffer of each stage reading it, and for a streamed value stage -> buffer of each reader."""
        order, flows = [], []
        streamed = {t.name for t in self.memory.tensors if t.streamed}
        writer = {name: stage_key[k.kernel, j] for k, j, st in specs for name, _ in st.writes if name in streamed}
        for k, j, st in specs:
            key, buf = stage_key[k.kernel, j], buffer_key[k.kernel, j]
            order += [buf, key] + [tensor_key[name] for name, _ in st.writes if name in tensor_key]
            flows.append((buf, key, buffer_reads[k.kernel, j]))
            for r in stage_reads[k.kernel, j]:
                if r.source.startswith(PREVIOUS):
                    flows.append((stage_key[k.kernel, int(r.source[len(PREVIOUS):])], buf, r.bytes))
                elif r.source in tensor_key:
                    flows.append((tensor_key[r.source], buf, r.bytes))
                elif r.source in writer:  # streamed from the stage that computes it
                    flows.append((writer[r.source], buf, r.bytes))
            flows += [(key, tensor_key[name], size) for name, size in st.writes if name in tensor_key]
        order += [key for key in tensor_key.values() if key not in order]
        return order, flows

    @staticmethod
    def _groups(order: list[str], counts: dict[str, int]) -> list[grid.Group]:
        return [grid.Group(key, "pcu" if key.startswith("stage:") else "pmu", counts[key]) for key in order]

    def _place(self, order, counts: dict[str, int], flows, interval: float, s: int):
        """Place the groups. When the busiest link would bound the section (longer than its pipeline
        interval and than a kernel launch, below which it does not matter), anneal from more seeds,
        grow buffers on congested flows and place again (see the module docstring)."""
        m = self.m
        cells, routing = grid.place(m, self._groups(order, counts), flows, self.seed + s)
        floor = max(interval, m.launch_overhead_s)
        for _ in range(REPAIR_ROUNDS):
            if routing.busiest[2] / m.link_bw <= floor:
                break
            free = m.pmus - sum(v for key, v in counts.items() if key.startswith("buffer:"))
            for (src, dst, _), peak in zip(flows, routing.flow_max_link):
                if peak / m.link_bw > interval and free > 0:
                    end = src if src.startswith("buffer:") else dst
                    extra = min(counts[end], free)
                    counts[end] += extra
                    free -= extra
            cells, routing = grid.place(m, self._groups(order, counts), flows, self.seed + s, RESTARTS)
        return cells, routing
