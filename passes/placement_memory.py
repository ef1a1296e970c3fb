"""The three-tier memory plan: every tensor of the program in SRAM (PMUs), HBM or DDR (SN40L §V-A).

- A value produced and consumed inside one section (never a graph output) stays on chip. If every
  reader takes it in the order it is produced (row blocks: not the B operand of a matmul), it streams
  from stage to stage through their input buffers and never exists whole (`streamed`). A value some
  matmul reads as its B operand (attention's K and V) is re-read for every row block, so it is kept
  whole in PMUs of its own, when the section has room: most-read per byte first, then the smaller.
- Everything else lives off chip, HBM by default. Addresses are reused between tensors whose lifetimes
  (the sections from the first write or use to the last use) do not overlap: largest first, each at the
  lowest address free during its whole lifetime.
- When HBM is full, activations move to DDR, the ones with the least bandwidth need (bytes moved per
  call) first; weights and constants stay in HBM while they fit, then move the same way.
Sections run one after another and all kernels of a section run at once (pipelined), so on-chip tensors
of one section never share addresses; on-chip space is reused from one section to the next.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from fusec.errors import IRError
from fusec.ir import Graph
from fusec.machines import Machine
from fusec.rdu.placement import MemoryPlan, Tensor
from fusec.passes.placement_stages import PREVIOUS, KernelSpec, Sizer, tensor_name

ALIGN = 64  # bytes; off-chip addresses are aligned to a 512-bit burst


@dataclass(frozen=True)
class TensorUse:
    """What the plan needs to know about one tensor before it has a tier."""

    name: str
    kind: str                  # input, weight, const, activation, output
    bytes: int
    first: int                 # first section that writes or reads it
    last: int                  # last section that reads it (the last section for weights and outputs)
    reads: int                 # logical bytes read per call (each reading stage once)
    resident: bool = False     # some matmul reads it as its B operand (re-read per block of rows)

    @property
    def local(self) -> bool:
        """Produced and used within one section: a candidate to stay on chip."""
        return self.kind == "activation" and self.first == self.last


def tensor_uses(graph: Graph, kernels: list[KernelSpec], section_of: dict[int, int], sizer: Sizer
                ) -> dict[str, TensorUse]:
    """Every tensor the kernels read or write, with kind, size and the sections using it."""
    last_section = max(section_of.values(), default=0)
    outputs = {tensor_name(graph, o) for o in graph.outputs}
    sizes: dict[str, tuple[str, int]] = {}
    for i, n in enumerate(graph.nodes):
        if n.op == "input":
            sizes[f"%{i}"] = ("input", sizer(n.type))
        elif n.op in ("kernel", "result"):
            sizes[f"%{i}"] = ("output" if f"%{i}" in outputs else "activation", sizer(n.type))
        if n.op == "kernel":
            for b in n.attr("body").nodes:
                if b.op == "param":
                    sizes[b.attr("name")] = ("weight", sizer(b.type))
                elif b.op == "const" and b.attr("key") is not None:
                    sizes[b.attr("key")] = ("const", sizer(b.type))
    sections: dict[str, list[int]] = {}
    reads: dict[str, int] = {}
    resident: set[str] = set()
    for k in kernels:
        s = section_of[k.kernel]
        for stage in k.stages:
            for source, size, side in stage.reads:
                if not source.startswith(PREVIOUS):
                    sections.setdefault(source, []).append(s)
                    reads[source] = reads.get(source, 0) + size
                    if side == "b":
                        resident.add(source)
            for name, _ in stage.writes:
                sections.setdefault(name, []).append(s)
    uses = {}
    for name, used in sections.items():
        kind, size = sizes[name]
        first = 0 if kind in ("input", "weight", "const") else min(used)
        last = last_section if kind in ("weight", "const", "output") else max(used)
        uses[name] = TensorUse(name, kind, size, first, last, reads.get(name, 0), name in resident)
    return uses


def choose_on_chip(uses: dict[str, TensorUse], free_pmus: dict[int, int], pmu_bytes: int) -> dict[str, int]:
    """name -> section for the local values that stay on chip: every streamed one, and the resident ones
    that fit in PMUs of their own within each section's free PMUs."""
    chosen = {u.name: u.first for u in uses.values() if u.local and not u.resident}
    left = dict(free_pmus)
    ranked = sorted((u for u in uses.values() if u.local and u.resident),
                    key=lambda u: (-u.reads / max(u.bytes, 1), u.bytes, u.name))
    for u in ranked:
        need = pmus_for(u.bytes, pmu_bytes)
        if need <= left.get(u.first, 0):
            chosen[u.name] = u.first
            left[u.first] -= need
    return chosen


def pmus_for(nbytes: int, pmu_bytes: int) -> int:
    return max(1, math.ceil(nbytes / pmu_bytes))


def plan_memory(uses: dict[str, TensorUse], on_chip: dict[str, int], traffic: dict[str, int],
                machine: Machine) -> MemoryPlan:
    """Tiers and addresses of every tensor (see the module docstring). `traffic`: bytes per call moved
    for each tensor (its bandwidth need). IRError when even DDR cannot hold what does not fit in HBM."""
    tensors = [Tensor(u.name, u.kind, u.bytes, "sram", 0, (u.first, u.last), traffic.get(u.name, 0),
                      streamed=u.name in on_chip and not u.resident)
               for u in sorted(uses.values(), key=lambda u: u.name)]
    sram = [t for t in tensors if t.name in on_chip]
    offchip = [t for t in tensors if t.name not in on_chip]
    placed = _on_chip_offsets(sram, machine.pmu_bytes)
    has_hbm = machine.hbm_bytes > 0
    home, spilled = ("hbm" if has_hbm else "ddr"), []
    tiers = {t.name: home for t in offchip}
    while has_hbm:
        hbm = [t for t in offchip if tiers[t.name] == "hbm"]
        offsets, peak = allocate(hbm)
        if peak <= machine.hbm_bytes:
            break
        victims = [t for t in hbm if t.kind not in ("weight", "const")] or hbm
        victim = min(victims, key=lambda t: (t.traffic, -t.bytes, t.name))
        tiers[victim.name] = "ddr"
        spilled.append(victim.name)
    peaks: dict[str, int] = {"sram": max((sum(t.bytes for t in sram if on_chip[t.name] == s and not t.streamed)
                                          for s in set(on_chip.values())), default=0)}
    for tier in ("hbm", "ddr"):
        group = [t for t in offchip if tiers[t.name] == tier]
        offsets, peaks[tier] = allocate(group)
        placed += [replace(t, tier=tier, offset=offsets[t.name]) for t in group]
    if peaks["ddr"] > machine.ddr_bytes:
        raise IRError(f"memory plan: {peaks['ddr']:,} bytes must live in DDR but {machine.name} has "
                      f"{machine.ddr_bytes:,} (HBM {machine.hbm_bytes:,} is full)")
    order = {t.name: i for i, t in enumerate(tensors)}
    return MemoryPlan(tuple(sorted(placed, key=lambda t: order[t.name])), tuple(sorted(peaks.items())),
                      tuple(spilled))


def _on_chip_offsets(sram: list[Tensor], pmu_bytes: int) -> list[Tensor]:
    """Whole PMUs per resident tensor, one after another within its section (all of a section's tensors
    are live while it runs); streamed values live in stage buffers, at offset 0."""
    out, next_free = [t for t in sram if t.streamed], {}
    for t in sorted((t for t in sram if not t.streamed), key=lambda t: (t.lifetime, -t.bytes, t.name)):
        at = next_free.get(t.lifetime[0], 0)
        out.append(replace(t, offset=at))
        next_free[t.lifetime[0]] = at + pmus_for(t.bytes, pmu_bytes) * pmu_bytes
    return out


def allocate(tensors: list[Tensor]) -> tuple[dict[str, int], int]:
    """Offsets with reuse across non-overlapping lifetimes: largest first, lowest free address; the peak."""
    placed: list[tuple[int, int, tuple[int, int]]] = []
    offsets = {}
    for t in sorted(tensors, key=lambda t: (-t.bytes, t.lifetime, t.name)):
        busy = sorted((o, o + size) for o, size, life in placed if overlaps(life, t.lifetime))
        at = 0
        for lo, hi in busy:
            if at + t.bytes <= lo:
                break
            at = max(at, _align(hi))
        placed.append((at, t.bytes, t.lifetime))
        offsets[t.name] = at
    return offsets, max((o + size for o, size, _ in placed), default=0)


def overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN
