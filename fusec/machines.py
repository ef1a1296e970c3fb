"""Machine descriptions as plain data: the figures the tiling, placement and RDU-model passes read.

    m = get_machine("sn40l")           # a preset: sn40l, plasticine, test_grid, cpu, test_cpu
    m = get_machine("my_rdu.toml")     # a JSON/TOML file: {"base": "sn40l", "hbm_bw": 1.6e12, ...}
    m.pcu_flops, m.tile_budget, m.source("hbm_bw")

Every figure carries its source key and reliability tag (as listed in docs/rdu-hardware.md) in `sources`
(`[P]` primary text, `[S]` secondary, `[M]` unverified or an assumption of ours, `[D]` derived).
Unpublished figures (network link bandwidth, hop latency, launch overhead, program load, efficiencies)
are named parameters with stated defaults, meant to be calibrated, never read as facts.
`cpu` describes the machine fusec runs on (the Numba backend's target), read from the OS where it can be.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import tomllib
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

from fusec.host import GiB, KiB, MiB, cache_size, read_host  # noqa: F401 - cache_size is part of this API

TiB = 2**40


class MemoryTier(NamedTuple):
    name: str          # "hbm" or "ddr"
    bytes: int
    bw: float          # bytes/s, peak
    efficiency: float  # achievable fraction of `bw`


@dataclass(frozen=True)
class Machine:
    """One chip (RDU socket) or one CPU. Bandwidths in bytes/s, times in seconds, capacities in bytes."""

    name: str
    kind: str                     # "rdu" (spatial PCU/PMU grid) or "cpu" (the Numba backend's host)
    pcus: int                     # compute units (for a cpu: cores)
    pmus: int                     # memory units (for a cpu: one L2 slice per core)
    pmu_bytes: int                # capacity of one PMU (for a cpu: its L2 per core)
    grid: tuple[int, int]         # (rows, cols) of the unit grid
    layout: str                   # "checkerboard": PCU where (row + col) is even, PMU where odd; "smp" for a cpu
    peak_flops: float             # per chip, in the machine's main datatype (BF16 for SN40L, FP32 otherwise)
    clock_hz: float
    lanes: int                    # SIMD lanes per PCU (f32 vector width for a cpu)
    stages: int                   # pipeline stages per PCU (FMA pipes per core for a cpu)
    hbm_bytes: int                # 0: no HBM; the DDR/DRAM tier is then the off-chip tier
    hbm_bw: float
    ddr_bytes: int
    ddr_bw: float
    ddr_to_hbm_bw: float          # DDR -> HBM copy bandwidth (weight/expert switching)
    link_bw: float                # one on-chip network link, bytes/s (unpublished: a parameter)
    hop_latency_s: float          # one network hop (unpublished: a parameter)
    launch_overhead_s: float      # one software-orchestrated kernel launch (a parameter to calibrate)
    program_load_s: float         # loading one section's configuration (a parameter to calibrate)
    hbm_efficiency: float         # achievable fraction of hbm_bw
    ddr_efficiency: float         # achievable fraction of ddr_bw
    systolic_efficiency: float    # eta: achievable fraction of PCU peak on real GEMM shapes
    stage_pmus: int               # PMUs one pipeline stage may use for its tile buffers
    cores: int = 0                # cpu only: cores (hardware threads) available to this process
    l1_bytes: int = 0             # cpu only: L1 data cache per core
    l2_bytes: int = 0             # cpu only: L2 per core (the tile budget)
    l3_bytes: int = 0             # cpu only: last-level cache, shared
    fork_join_s: float = 0.0      # cpu only: one parallel loop's fork and join (waking the pool, the barrier)
    # rdu only, unpublished (parameters calibrated in docs/rdu-model.md, "Calibration"):
    call_sync_s: float = 0.0      # every kernel call: argument load and the barrier at its end (KL)
    p2p_bw: float = 0.0           # bytes/s per socket for tensor-parallel all-reduces (SN40L §IV-D P2P)
    allreduce_latency_s: float = 0.0   # one all-reduce's fixed cost
    pmu_bw: float = 0.0           # bytes/s of one PMU's ports; 0: lanes x 4 B x 2 ports x clock
    # (field, "KEY where [tag]") for every figure; notes, so not part of equality
    sources: tuple[tuple[str, str], ...] = dataclasses.field(default=(), compare=False)

    def __post_init__(self):
        if self.kind not in ("rdu", "cpu"):
            raise ValueError(f"machine {self.name!r}: kind must be 'rdu' or 'cpu', got {self.kind!r}")
        counts = {"pcus": self.pcus, "pmus": self.pmus, "pmu_bytes": self.pmu_bytes, "lanes": self.lanes,
                  "stages": self.stages, "stage_pmus": self.stage_pmus, "grid rows": self.grid[0],
                  "grid cols": self.grid[1]}
        for what, v in counts.items():
            if not (isinstance(v, int) and v > 0):
                raise ValueError(f"machine {self.name!r}: {what} must be a positive integer, got {v!r}")
        if self.layout == "checkerboard" and self.grid[0] * self.grid[1] < self.pcus + self.pmus:
            raise ValueError(f"machine {self.name!r}: a {self.grid[0]}x{self.grid[1]} grid cannot hold "
                             f"{self.pcus} PCUs + {self.pmus} PMUs")
        for what in ("hbm_efficiency", "ddr_efficiency", "systolic_efficiency"):
            if not 0 < getattr(self, what) <= 1:
                raise ValueError(f"machine {self.name!r}: {what} must be in (0, 1], got {getattr(self, what)}")
        if self.kind == "cpu" and self.l2_bytes <= 0:
            raise ValueError(f"machine {self.name!r}: a cpu needs l2_bytes > 0 (its tile budget)")

    @property
    def pcu_flops(self) -> float:
        """Peak of one PCU (one core for a cpu) [D]: peak_flops / pcus."""
        return self.peak_flops / self.pcus

    @property
    def sram_bytes(self) -> int:
        """All on-chip scratchpad [D]: pmus x pmu_bytes."""
        return self.pmus * self.pmu_bytes

    @property
    def tile_budget(self) -> int:
        """Bytes the working set of one tile may occupy: L2 per core on a cpu; on an RDU the PMUs one
        stage may use, pmu_bytes x stage_pmus (double buffering is counted in the working set)."""
        return self.l2_bytes if self.kind == "cpu" else self.pmu_bytes * self.stage_pmus

    def offchip(self) -> MemoryTier:
        """The tier tensors live in by default: HBM when there is one, else DDR/DRAM (Plasticine, cpu)."""
        if self.hbm_bytes > 0:
            return MemoryTier("hbm", self.hbm_bytes, self.hbm_bw, self.hbm_efficiency)
        return MemoryTier("ddr", self.ddr_bytes, self.ddr_bw, self.ddr_efficiency)

    def unit_at(self, row: int, col: int) -> str:
        """'pcu' or 'pmu' at a grid position of a checkerboard layout."""
        if not (0 <= row < self.grid[0] and 0 <= col < self.grid[1]):
            raise ValueError(f"({row}, {col}) is outside the {self.grid[0]}x{self.grid[1]} grid of {self.name}")
        return "pcu" if (row + col) % 2 == 0 else "pmu"

    def source(self, name: str) -> str:
        """Where figure `name` comes from ("" when not recorded)."""
        return dict(self.sources).get(name, "")


def _machine(sources: dict[str, str], **figures: Any) -> Machine:
    return Machine(**figures, sources=tuple(sorted(sources.items())))


CALIBRATED = "not published; fitted to published figures (docs/rdu-model.md, Calibration) [M]"


def sn40l() -> Machine:
    """One SambaNova SN40L socket (2 dies), SN40L = Prabhakar et al., arXiv:2405.07518."""
    return _machine({
        "pcus": "SN40L Table II [P]", "pmus": "SN40L Table II [P]",
        "pmu_bytes": "SN40L Table II: 520 MiB / 1040 PMUs [D]",
        "grid": "assumption: 40x52 checkerboard holds 1040+1040 units; the floorplan is not published [M]",
        "layout": "SN40L §IV-C 2-D mesh; PCU/PMU checkerboard as in PLAS [M]",
        "peak_flops": "SN40L Table II, 638 BF16 TFLOPS [P]",
        "clock_hz": "SN40L Table II says '< 2 GHz'; 1.6 GHz assumed (192 MAC/cycle fits 307 GMAC/s) [M]",
        "lanes": "not published (HC24: 'M lanes'); Plasticine's 16 assumed [M]",
        "stages": "not published; Plasticine's 6 assumed [M]",
        "hbm_bytes": "SN40L Table II, 64 GiB [P]",
        "hbm_bw": "SN40L Table II 1.8 TB/s [P]; §IV ~2 TB/s, HC24 1.6 TB/s: sources disagree",
        "ddr_bytes": "SN40L Table II, up to 1.5 TiB [P]",
        "ddr_bw": "SN40L Table II 200 GB/s [P]; HC24 implies 100 GB/s: sources disagree",
        "ddr_to_hbm_bw": "SN40L §I/§VI-C: >1 TB/s per 8-socket node, so ~125 GB/s per socket [D]",
        "link_bw": "not published; 64 B/cycle (Plasticine vector link) x 1.6 GHz assumed [M]",
        "hop_latency_s": "not published; 1 cycle per hop as SARA's network_delay = 1 [M]",
        "launch_overhead_s": CALIBRATED,
        "program_load_s": "not published; 10 us assumed (no published figure isolates it) [M]",
        "call_sync_s": CALIBRATED,
        "p2p_bw": "not published; 100 GB/s per socket assumed [M]",
        "allreduce_latency_s": CALIBRATED,
        "pmu_bw": "not published; 0 = lanes x 4 B x 2 ports x clock = 205 GB/s [M]",
        "hbm_efficiency": "not published; 0.95 assumed: KL's looped decode reaches over 90% of peak end to end, "
                          "so streaming reaches more (SN40L §VI-B: over 85%) [M]",
        "ddr_efficiency": "not published; 0.8 assumed [M]",
        "systolic_efficiency": "not published; eta = 0.8 default (tunable, docs/rdu-model.md) [M]",
        "stage_pmus": "SN40L §III-A Fig 4: stage buffers of 2-4 PMUs; 8 per stage (two 4-PMU buffers) assumed [M]",
    }, name="sn40l", kind="rdu", pcus=1040, pmus=1040, pmu_bytes=512 * KiB, grid=(40, 52),
        layout="checkerboard", peak_flops=638e12, clock_hz=1.6e9, lanes=16, stages=6,
        hbm_bytes=64 * GiB, hbm_bw=1.8e12, ddr_bytes=int(1.5 * TiB), ddr_bw=200e9, ddr_to_hbm_bw=125e9,
        link_bw=64 * 1.6e9, hop_latency_s=1 / 1.6e9, launch_overhead_s=11e-6, program_load_s=10e-6,
        hbm_efficiency=0.95, ddr_efficiency=0.8, systolic_efficiency=0.8, stage_pmus=8,
        call_sync_s=11e-6, p2p_bw=100e9, allreduce_latency_s=0.15e-6)


def plasticine() -> Machine:
    """Plasticine (PLAS = Prabhakar et al., ISCA 2017): no HBM, DRAM is the off-chip tier."""
    return _machine({
        "pcus": "PLAS: 64 PCU [S]; pir default 16x8 checkerboard [P]", "pmus": "PLAS: 64 PMU [S]",
        "pmu_bytes": "PLAS: 256 KB = 16 banks x 16 KB [S]; pir pmu-sram-size = 64K words [P]",
        "grid": "pir SpadeConfig row=16, col=8 [P]", "layout": "pir pattern=checkerboard [P]",
        "peak_flops": "PLAS abstract, 12.3 SP TFLOPS [P] (= 64 x 16 x 6 x 2 x 1 GHz [D])",
        "clock_hz": "PLAS, 1 GHz [P]", "lanes": "PLAS, 16 SIMD lanes [S]", "stages": "PLAS, 6 stages [S]",
        "hbm_bytes": "no HBM [P]", "hbm_bw": "no HBM [P]",
        "ddr_bytes": "not published; 16 GiB assumed (4 DDR3 channels) [M]",
        "ddr_bw": "PLAS: 4x DDR3-1600 channels, 51.2 GB/s [S]", "ddr_to_hbm_bw": "no HBM [P]",
        "link_bw": "PLAS vector network 16 words = 512 b per cycle at 1 GHz [D from S]",
        "hop_latency_s": "SARA/pir network_delay = 1 cycle [M]",
        "launch_overhead_s": "not published; 10 us default [M]", "program_load_s": "not published; 100 us [M]",
        "call_sync_s": "not published; sn40l's default [M]", "p2p_bw": "not published; sn40l's default [M]",
        "allreduce_latency_s": "not published; sn40l's default [M]", "pmu_bw": "0: derived from lanes and clock [M]",
        "hbm_efficiency": "unused (no HBM)", "ddr_efficiency": "not published; 0.8 assumed [M]",
        "systolic_efficiency": "SIMD only (no systolic mode); eta = 0.8 default [M]",
        "stage_pmus": "assumption: 4 PMUs per stage [M]",
    }, name="plasticine", kind="rdu", pcus=64, pmus=64, pmu_bytes=256 * KiB, grid=(16, 8),
        layout="checkerboard", peak_flops=12.3e12, clock_hz=1e9, lanes=16, stages=6,
        hbm_bytes=0, hbm_bw=0.0, ddr_bytes=16 * GiB, ddr_bw=51.2e9, ddr_to_hbm_bw=0.0,
        link_bw=64e9, hop_latency_s=1e-9, launch_overhead_s=10e-6, program_load_s=100e-6,
        hbm_efficiency=0.85, ddr_efficiency=0.8, systolic_efficiency=0.8, stage_pmus=4,
        call_sync_s=5e-6, p2p_bw=100e9, allreduce_latency_s=2e-6)


def _test_grid() -> Machine:  # not `test_grid`: pytest would collect it
    """A 4x4 checkerboard (8 PCU + 8 PMU) with tiny capacities, so tests exercise tiling and spilling."""
    made_up = "test value [M]"
    names = ("pcus pmus pmu_bytes grid layout peak_flops clock_hz lanes stages hbm_bytes hbm_bw ddr_bytes "
             "ddr_bw ddr_to_hbm_bw link_bw hop_latency_s launch_overhead_s program_load_s hbm_efficiency "
             "ddr_efficiency systolic_efficiency stage_pmus call_sync_s p2p_bw allreduce_latency_s pmu_bw").split()
    return _machine({k: made_up for k in names} | {"peak_flops": "8 PCUs x 4 lanes x 2 stages x 2 x 1 GHz [D]"},
                    name="test_grid", kind="rdu", pcus=8, pmus=8, pmu_bytes=16 * KiB, grid=(4, 4),
                    layout="checkerboard", peak_flops=8 * 4 * 2 * 2 * 1e9, clock_hz=1e9, lanes=4, stages=2,
                    hbm_bytes=64 * MiB, hbm_bw=100e9, ddr_bytes=1 * GiB, ddr_bw=10e9, ddr_to_hbm_bw=5e9,
                    link_bw=16e9, hop_latency_s=1e-9, launch_overhead_s=1e-6, program_load_s=10e-6,
                    hbm_efficiency=0.85, ddr_efficiency=0.8, systolic_efficiency=0.8, stage_pmus=2,
                    call_sync_s=0.5e-6, p2p_bw=10e9, allreduce_latency_s=1e-6)


# --- this machine (its figures are read from the OS by fusec/host.py) -----------------------------------

# One parallel loop's fork and join in Numba's thread pool (omp layer): 1.8 us measured on a 2-core x86 (a
# median); not measured at start-up (a compile, and noise), so a machine file sets another host's.
FORK_JOIN_S = 2e-6


@functools.lru_cache(maxsize=None)
def cpu() -> Machine:
    """This machine, for the Numba backend: caches and cores from the OS; peak and DRAM bandwidth are
    estimates (the benchmarks measure both in the same run)."""
    host = read_host()
    (l1, s1), (l2, s2), (l3, s3) = host.caches
    return _cpu("cpu", host.cores, l1, l2, l3, host.clock_hz, host.lanes, host.ram_bytes, {
        "pcus": "os.sched_getaffinity [P]", "cores": "os.sched_getaffinity [P]", "pmu_bytes": s2,
        "l1_bytes": s1, "l2_bytes": s2, "l3_bytes": s3, "clock_hz": host.clock_source,
        "lanes": "f32 SIMD width from /proc/cpuinfo flags (avx512f 16, avx 8, else 4) [M]",
        "ddr_bytes": "os.sysconf SC_PHYS_PAGES x SC_PAGE_SIZE [P]"})


def _test_cpu() -> Machine:  # not `test_cpu`: pytest would collect it
    """A fixed 2-core cpu (48 KiB L1d and 2 MiB L2 per core, 2.3 GHz, AVX-512): what the host is for
    tests that must give the same tiles, and so the same generated code, on every machine."""
    made_up = "test value [M]"
    return _cpu("test_cpu", 2, 48 * KiB, 2 * MiB, 32 * MiB, 2.3e9, 16, 8 * GiB, {
        k: made_up for k in ("pcus", "cores", "pmu_bytes", "l1_bytes", "l2_bytes", "l3_bytes", "clock_hz",
                             "lanes", "ddr_bytes")})


def _cpu(name: str, cores: int, l1: int, l2: int, l3: int, clock: float, lanes: int, ram: int,
         sources: dict[str, str]) -> Machine:
    """A cpu Machine from its cores, caches (bytes per core; L3 whole), clock, f32 SIMD lanes and RAM."""
    fma_pipes = 2
    return _machine({
        "pmus": "one L2 per core", "stages": "2 FMA pipes per core assumed [M]",
        "peak_flops": "cores x clock x lanes x FMA pipes x 2 [D from M]; the benchmarks measure it",
        "ddr_bw": "not measured here; 20 GB/s default, the benchmarks measure it [M]",
        "hbm_bytes": "no HBM", "layout": "cores share memory (smp)",
        "launch_overhead_s": "one Numba kernel call, ~5 us assumed [M]", "grid": "cores in a row",
        "hbm_bw": "no HBM", "ddr_to_hbm_bw": "no HBM", "link_bw": "no on-chip network modelled",
        "hop_latency_s": "no on-chip network modelled", "program_load_s": "none: code is loaded once",
        "hbm_efficiency": "unused (no HBM)", "ddr_efficiency": "0.8 assumed [M]",
        "systolic_efficiency": "BLAS fraction of peak, 0.8 assumed [M]", "stage_pmus": "one L2 per thread",
        "fork_join_s": "measured on a 2-core x86: median of an empty Numba prange loop, 1.8 us; 2 us assumed "
                       "(machines.FORK_JOIN_S) [M]",
    } | sources, name=name, kind="cpu", pcus=cores, pmus=cores, pmu_bytes=l2, grid=(1, cores), layout="smp",
        peak_flops=cores * clock * lanes * fma_pipes * 2, clock_hz=clock, lanes=lanes, stages=fma_pipes,
        hbm_bytes=0, hbm_bw=0.0, ddr_bytes=ram, ddr_bw=20e9, ddr_to_hbm_bw=0.0, link_bw=0.0,
        hop_latency_s=0.0, launch_overhead_s=5e-6, program_load_s=0.0, hbm_efficiency=0.85,
        ddr_efficiency=0.8, systolic_efficiency=0.8, stage_pmus=1, cores=cores, l1_bytes=l1,
        l2_bytes=l2, l3_bytes=l3, fork_join_s=FORK_JOIN_S)


# --- lookup --------------------------------------------------------------------------------------------

PRESETS: dict[str, Callable[[], Machine]] = {"sn40l": sn40l, "plasticine": plasticine,
                                             "test_grid": _test_grid, "cpu": cpu, "test_cpu": _test_cpu}
FIELDS = tuple(f.name for f in dataclasses.fields(Machine))


def list_machines() -> list[str]:
    """Names of the presets `get_machine` accepts."""
    return list(PRESETS)


def get_machine(name_or_path: str | Machine) -> Machine:
    """A preset by name, or a JSON/TOML file whose keys override a base preset (`"base": "sn40l"`; without
    a base the file must give every figure). A Machine passes through. ValueError names the valid choices."""
    if isinstance(name_or_path, Machine):
        return name_or_path
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]()
    if not name_or_path.lower().endswith((".json", ".toml")):
        raise ValueError(f"unknown machine {name_or_path!r}; the presets are {', '.join(PRESETS)} "
                         f"(or give a path to a .json or .toml file)")
    return _from_file(name_or_path)


def _from_file(path: str) -> Machine:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f) if path.lower().endswith(".toml") else json.load(f)
    except (OSError, tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read machine file {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"machine file {path}: expected a table of figures, got {type(data).__name__}")
    data = dict(data)
    base_name = data.pop("base", None)
    unknown = sorted(set(data) - set(FIELDS) - {"sources"})
    if unknown:
        raise ValueError(f"machine file {path}: unknown key(s) {', '.join(unknown)}; valid keys are base, "
                         f"{', '.join(FIELDS)}")
    sources = dict(data.pop("sources", {}))
    if base_name is None:
        missing = [f.name for f in dataclasses.fields(Machine) if f.name not in data
                   and f.default is dataclasses.MISSING]
        if missing:
            raise ValueError(f"machine file {path}: no 'base' preset, so it must give {', '.join(missing)}")
        values = {k: _coerce(path, k, v, getattr(_test_grid(), k)) for k, v in data.items()}
        return _machine({k: sources.get(k, f"{path} [M]") for k in values}, **values)
    if base_name not in PRESETS:
        raise ValueError(f"machine file {path}: unknown base {base_name!r}; the presets are {', '.join(PRESETS)}")
    base = PRESETS[base_name]()
    values = {k: _coerce(path, k, v, getattr(base, k)) for k, v in data.items()}
    merged = dict(base.sources) | {k: sources.get(k, f"override in {path} [M]") for k in values}
    return dataclasses.replace(base, **values, sources=tuple(sorted(merged.items())))


def _coerce(path: str, key: str, value: Any, like: Any) -> Any:
    """`value` from a file in the type of the base figure `like` (TOML/JSON have no tuples; 1e9 is a float)."""
    try:
        if isinstance(like, str):
            return str(value)
        if isinstance(like, int):
            if float(value) != int(value):
                raise ValueError("not an integer")
            return int(value)
        if isinstance(like, float):
            return float(value)
        if isinstance(like, tuple):
            return tuple(int(x) for x in value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"machine file {path}: {key} = {value!r} has the wrong type ({e})") from e
    return value
