"""The placement of a program on an RDU: plain frozen data, made by `passes.place` and read by the RDU
performance model (`fusec.rdu.model`), the CLI and the drawings.

    placed = place(graph, "sn40l")                  # the same nodes, with graph.annotations["placement"]
    p = placement_of(placed)                        # a Placement
    p.sections[0].stages, p.stage(3).cells, p.memory.tier_of("attention.wq.weight")

What it holds (SN40L §III-A, Fig 4; SNdocs "sections"):
- `sections`: consecutive kernels (in graph order) that are on the chip at once; sections run one after
  another and each one owns the whole grid while it runs.
- `stages`: the pipeline stages of every kernel (compute -> PCUs), with FLOPs and bytes per call by tier.
- `buffers`: PMU groups: the input buffer of every stage (double-buffered tiles) and whole tensors that
  stay on chip between the kernels of a section.
- `flows`: bytes per call between unit groups on the on-chip network (stage buffer -> stage, stage ->
  next stage's buffer, ...), with the hops and the busiest link of their dimension-order routes.
- `memory`: every tensor with its tier (sram / hbm / ddr), address and lifetime.
Grid cells are (row, col); a checkerboard has a PCU where row + col is even and a PMU where it is odd.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from fusec.errors import FusecError
from fusec.machines import Machine

Cell = tuple[int, int]
Link = tuple[Cell, Cell]          # a directed link between neighbouring cells
TIERS = ("sram", "hbm", "ddr")


@dataclass(frozen=True)
class Read:
    """Bytes a stage reads per call from one source: a tensor (by name) or the previous stage."""

    source: str       # tensor name, or "<stage>j" for stage j of the same kernel
    tier: str         # "sram" (another stage or an on-chip tensor), "hbm" or "ddr"
    bytes: int        # fetched from the source per call, re-reads included (weights once per row block)


@dataclass(frozen=True)
class Stage:
    """One pipeline stage of a kernel: compute on `pcus` PCUs, fed by its input buffer."""

    id: int
    name: str              # "k1.gemm": kernel node %1, its GEMM stage
    kernel: int            # the kernel node's id in the graph
    section: int
    role: str              # prologue, gemm, epilogue, qk, softmax, pv, vector
    mode: str              # "systolic" (matmul) or "simd" (vector ops)
    flops: float           # per call
    reads: tuple[Read, ...]
    writes: tuple[Read, ...]   # bytes written per call to each tensor it produces (tier of the tensor)
    buffer_reads: int      # bytes per call its PCUs read from its input buffer (on-chip re-reads included)
    sends: int             # bytes per call it sends to other stages and on-chip tensors
    buffer: int            # id of its input buffer
    pcus: int
    cells: tuple[Cell, ...]

    def bytes_by_tier(self, reads_only: bool = False) -> dict[str, int]:
        out = {t: 0 for t in TIERS}
        for r in self.reads + (() if reads_only else self.writes):
            out[r.tier] += r.bytes
        return out


@dataclass(frozen=True)
class Buffer:
    """A group of PMUs: a stage's input buffer (double-buffered tiles) or a whole on-chip tensor."""

    id: int
    name: str              # "k1.gemm.in", or the tensor's name ("%2")
    kind: str              # "stage" or "tensor"
    kernel: int            # the kernel it feeds (stage) or produces it (tensor)
    section: int
    capacity: int          # bytes it must hold (stage buffers: double-buffered)
    pmus: int              # max(capacity need, bandwidth need), within the chip
    cells: tuple[Cell, ...]


@dataclass(frozen=True)
class Flow:
    """Traffic per call between two unit groups, routed in dimension order (X first, then Y)."""

    src: str               # "stage:3" or "buffer:5"
    dst: str
    bytes: int
    hops: float            # traffic-weighted mean hop count of its routes
    max_link_bytes: int    # load (all flows of the section) on the busiest link its routes cross


@dataclass(frozen=True)
class Section:
    """Kernels on the chip at once, pipelined over `tiles` iterations (Spatial's metapipeline)."""

    index: int
    kernels: tuple[int, ...]
    stages: tuple[int, ...]
    buffers: tuple[int, ...]
    tiles: int
    pcus: int              # units used
    pmus: int
    weighted_hops: float   # sum over flows of bytes x hops
    random_weighted_hops: float  # the same for a random placement of the same groups (for comparison)
    busiest_link: tuple[Cell, Cell, int]  # (from, to, bytes per call); ((0, 0), (0, 0), 0) without traffic


@dataclass(frozen=True)
class Tensor:
    """One tensor of the memory plan."""

    name: str              # "%3" (a value of the graph), a parameter name, or a constant key
    kind: str              # input, weight, const, activation, output
    bytes: int
    tier: str              # sram, hbm, ddr
    offset: int            # address in its tier (sram: within its section's on-chip tensors)
    lifetime: tuple[int, int]   # first and last section that uses it
    traffic: int           # bytes read and written per call: its bandwidth need
    streamed: bool = False  # on chip only as tiles passing through stage buffers, never whole


@dataclass(frozen=True)
class MemoryPlan:
    tensors: tuple[Tensor, ...]
    peak: tuple[tuple[str, int], ...]     # bytes in use at the fullest moment, per tier
    spilled: tuple[str, ...]              # tensors moved from HBM to DDR because HBM was full

    def tier_of(self, name: str) -> str:
        for t in self.tensors:
            if t.name == name:
                return t.tier
        raise KeyError(f"no tensor {name!r} in the memory plan")


@dataclass(frozen=True)
class Placement:
    """A program mapped onto one RDU (see the module docstring)."""

    machine: Machine
    seed: int
    dtype: str | None      # floats counted at this dtype's size (None: as traced)
    sections: tuple[Section, ...]
    stages: tuple[Stage, ...]
    buffers: tuple[Buffer, ...]
    flows: tuple[Flow, ...]
    memory: MemoryPlan
    kernel_names: tuple[tuple[int, str], ...]   # kernel id -> "matmul", "attention", "op:add", ...

    def stage(self, i: int) -> Stage:
        return self.stages[i]

    def buffer(self, i: int) -> Buffer:
        return self.buffers[i]

    def section_of(self, kernel: int) -> Section:
        for s in self.sections:
            if kernel in s.kernels:
                return s
        raise KeyError(f"kernel %{kernel} is in no section")

    def owners(self, section: int) -> dict[Cell, tuple[str, int]]:
        """cell -> ("pcu" or "pmu", kernel id) for every unit the section uses."""
        sec = self.sections[section]
        out: dict[Cell, tuple[str, int]] = {}
        for s in sec.stages:
            for c in self.stages[s].cells:
                out[c] = ("pcu", self.stages[s].kernel)
        for b in sec.buffers:
            for c in self.buffers[b].cells:
                out[c] = ("pmu", self.buffers[b].kernel)
        return out

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-ready data (cells as [row, col] lists)."""
        data = asdict(self)
        data["machine"] = self.machine.name
        data["grid"] = list(self.machine.grid)
        data["kernel_names"] = {f"%{k}": v for k, v in self.kernel_names}
        return _lists(data)


def _lists(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _lists(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_lists(v) for v in x]
    return x


def placement_of(graph) -> Placement:
    """The placement a graph carries (after the "placed" stage); FusecError if it has none."""
    p = graph.annotations.get("placement")
    if p is None:
        raise FusecError("the graph carries no placement: run the 'placed' stage (passes.place.place) first")
    return p


# --- figures derived from a machine, shared by the placement pass and the RDU model --------------------

def simd_flops(machine: Machine) -> float:
    """Peak of one PCU in SIMD mode (vector ops): lanes x stages x clock, one op per lane and stage
    [D from PLAS]; never above the PCU's systolic peak."""
    return min(machine.pcu_flops, machine.lanes * machine.stages * machine.clock_hz)


def pcu_rate(machine: Machine, mode: str) -> float:
    """Achievable FLOP/s of one PCU: systolic (matmul) at peak x eta, SIMD at its own peak x eta."""
    peak = machine.pcu_flops if mode == "systolic" else simd_flops(machine)
    return peak * machine.systolic_efficiency


def pmu_bandwidth(machine: Machine) -> float:
    """Bytes/s one PMU delivers: one read and one write port of lanes x 4 bytes per cycle [M] (PLAS:
    banks aligned to the lanes; SN40L §IV-B: concurrent reads and writes). On SN40L that is ~205 GB/s per
    PMU, ~213 TB/s for the chip: the "hundreds of TB/s" of SN40L Table II. `machine.pmu_bw` overrides it."""
    return machine.pmu_bw or 2 * machine.lanes * 4 * machine.clock_hz


def tier_bandwidth(machine: Machine, tier: str) -> float:
    """Achievable bytes/s of an off-chip tier: peak x efficiency (without HBM, everything off chip is in
    the DDR/DRAM tier)."""
    if tier == "hbm" and machine.hbm_bytes > 0:
        return machine.hbm_bw * machine.hbm_efficiency
    return machine.ddr_bw * machine.ddr_efficiency
