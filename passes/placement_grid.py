"""Placement of unit groups on the PCU/PMU checkerboard, and dimension-order routing of their traffic.

A section's groups (a stage's PCUs, a buffer's PMUs) are placed to minimise traffic-weighted hop
distance (SARA/pir: Manhattan distance on the mesh), each stage in a compact patch where that costs
nothing. Two families of candidates (`STYLES`):
- compact: a greedy start along a Hilbert curve (a space-filling order: consecutive cells form a compact
  patch), then annealing as a local refinement (cool start, short moves) on hops plus a locality term
  that pulls each PCU towards its stage's centre with `locality` times the traffic it carries. Hops alone
  leave many placements of equal cost (every cell at the same distance from a buffer is as good), and
  annealing on them scattered the units of a stage over the whole chip.
- strips: a greedy start along a boustrophedon scan of vertical strips about as wide as the section is
  tall, then hot annealing on hops alone (the placement made before the compact family existed).
Greedy start: the groups in pipeline order fill the scan, each taking the free cells of its type nearest
where the previous group ended, so a stage sits beside its buffer and next to the stage after it; then
a small group feeding (or fed by) a much larger one is spread evenly over it.
Simulated annealing (seeded, so deterministic): move a unit to a cell of its type nearby, or swap it with
the unit there; the pairs the routing uses (below) and the stage centres are formed again from the new
positions at every temperature step. A unit is proposed in proportion to the traffic it carries. A
section with one flow keeps its greedy starts. Of the starts and the annealing runs (one per family, or
several seeds while repairing congestion), the placement kept has the fewest weighted hops among those
whose busiest link is within 10% of the least loaded busiest link (the busiest link bounds the section
when the network does), compact first on a tie: never worse by these measures than the strips alone.
Routing: every flow is split evenly over pairs of units (both groups in Hilbert-curve order, each unit
of the smaller group paired with an equal consecutive share of the larger), and each pair goes X first,
then Y (dimension-order routing). Link loads are bytes per call on each directed link; `Routing`
reports weighted hops, per flow its busiest link, and the busiest link overall.
"""
from __future__ import annotations

import bisect
import functools
import itertools
import math
import random
from dataclasses import dataclass

import numpy as np

from fusec.machines import Machine
from fusec.rdu.placement import Cell

MAX_MOVES = 20000       # annealing moves per section, at most
MOVES_PER_UNIT = 30
MOVES_PER_FLOW = 2000   # a section with few flows settles quickly
STEPS = 25              # temperature steps (pairs and centres are refreshed after each)


@dataclass(frozen=True)
class Style:
    """How one family of candidate placements starts and anneals."""

    compact: bool       # greedy start along a Hilbert curve (compact patches) or along vertical strips
    heat: float         # starting temperature, as a share of a typical move's cost change
    radius: float       # starting move radius, as a share of the grid's longer side (at least 2 cells)
    locality: float     # pull of a PCU towards its stage's centre, per byte of traffic it carries


# compact patches refined locally, preferred on equal hops; strips annealed hot, free to scatter
STYLES = (Style(True, 0.1, 0.1, 0.5), Style(False, 1.0, 0.5, 0.0))


@dataclass(frozen=True)
class Group:
    key: str            # "stage:3" or "buffer:5"
    unit: str           # "pcu" or "pmu"
    count: int


@dataclass(frozen=True)
class Routing:
    weighted_hops: float                      # sum over flows of bytes x hops
    flow_hops: tuple[float, ...]              # per flow: mean hops (weighted by bytes)
    flow_max_link: tuple[int, ...]            # per flow: the load of the busiest link it crosses
    busiest: tuple[Cell, Cell, int]           # (from, to, bytes)


def scan_order(machine: Machine, units: int, compact: bool = True) -> list[Cell]:
    """Every cell in greedy scan order. compact: along a Hilbert curve (a run of consecutive cells is a
    compact patch). Else vertical strips about as wide as the square the section's `units` fill, each
    scanned row by row in alternating directions (boustrophedon)."""
    if compact:
        order = _hilbert(*machine.grid)
        return sorted(order, key=order.__getitem__)
    rows, cols = machine.grid
    width = min(cols, max(2, 2 * math.ceil(math.sqrt(max(units, 1)) / 2)))

    def key(cell: Cell) -> tuple[int, int, int]:
        r, c = cell
        strip = c // width
        rr = r if strip % 2 == 0 else rows - 1 - r
        return strip, rr, c if rr % 2 == 0 else -c
    return sorted(((r, c) for r in range(rows) for c in range(cols)), key=key)


def greedy(machine: Machine, groups: list[Group], flows: list[tuple[str, str, int]] = (),
           compact: bool = True) -> dict[str, list[Cell]]:
    """Groups in order along the scan: each takes the free cells of its type nearest the cursor (where the
    previous group ended), so a buffer lands between the stage before it and the stage it feeds. Then a
    group feeding (or fed by) one at least four times its size is spread over that group's area."""
    units = 2 * max(sum(g.count for g in groups if g.unit == u) for u in ("pcu", "pmu"))
    order = scan_order(machine, units, compact)
    free = {u: [i for i, c in enumerate(order) if machine.unit_at(*c) == u] for u in ("pcu", "pmu")}
    cursor, out = 0, {}
    for g in groups:
        ranked = sorted(free[g.unit], key=lambda i: (abs(i - cursor), i))[:g.count]
        out[g.key] = [order[i] for i in ranked]
        taken = set(ranked)
        free[g.unit] = [i for i in free[g.unit] if i not in taken]
        cursor = max(ranked, default=cursor - 1) + 1
    _spread(machine, groups, flows, out)
    return out


def _spread(machine: Machine, groups: list[Group], flows, cells: dict[str, list[Cell]]) -> None:
    """Move each unit of a small group to the free cell of its type nearest the centre of its share of
    the large group it exchanges the most traffic with (its pairs in the routing)."""
    unit = {g.key: g.unit for g in groups}
    used = {c for cs in cells.values() for c in cs}
    heaviest: dict[str, tuple[int, str]] = {}
    for src, dst, size in flows:
        for small, big in ((src, dst), (dst, src)):
            if 4 * len(cells[small]) <= len(cells[big]) and size > heaviest.get(small, (0, ""))[0]:
                heaviest[small] = (size, big)
    rows, cols = machine.grid
    for small, (_, big) in sorted(heaviest.items()):
        order = _hilbert(rows, cols)
        ranked = sorted(cells[big], key=order.__getitem__)
        n = len(cells[small])
        used -= set(cells[small])
        free = [(r, c) for r in range(rows) for c in range(cols)
                if machine.unit_at(r, c) == unit[small] and (r, c) not in used]
        placed = []
        for k in range(n):
            share = ranked[k * len(ranked) // n:(k + 1) * len(ranked) // n] or ranked
            cr, cc = sum(r for r, _ in share) / len(share), sum(c for _, c in share) / len(share)
            best = min(free, key=lambda x: (abs(x[0] - cr) + abs(x[1] - cc), x))
            free.remove(best)
            placed.append(best)
        cells[small] = placed
        used |= set(placed)


def place(machine: Machine, groups: list[Group], flows: list[tuple[str, str, int]], seed: int,
          restarts: int = 1) -> tuple[dict[str, list[Cell]], Routing]:
    """Cells of every group and the routing of the flows (see the module docstring): of each style's
    greedy start and `restarts` annealing runs (seeds seed, seed + 1000, ...), the placement with the
    fewest traffic-weighted hops among those whose busiest link carries at most 10% more than the least
    (the first style on a tie)."""
    candidates = []
    for style in STYLES:
        start = greedy(machine, groups, flows, style.compact)
        candidates.append((start, route(machine, start, flows)))
        if len(flows) > 1:  # one flow between two groups: the spread greedy start is already near the best
            for k in range(restarts if len(flows) > 2 else 1):
                annealed = anneal(machine, groups, flows, start, seed + 1000 * k, style)
                candidates.append((annealed, route(machine, annealed, flows)))
    least = min(r.busiest[2] for _, r in candidates)
    return min(((c, r) for c, r in candidates if r.busiest[2] <= 1.1 * least), key=lambda x: x[1].weighted_hops)


def random_placement(machine: Machine, groups: list[Group], seed: int) -> dict[str, list[Cell]]:
    """The same groups on randomly chosen cells of their type: the baseline placement quality is
    measured against."""
    rng = random.Random(seed)
    rows, cols = machine.grid
    free = {u: [(r, c) for r in range(rows) for c in range(cols) if machine.unit_at(r, c) == u]
            for u in ("pcu", "pmu")}
    for cells in free.values():
        rng.shuffle(cells)
    out, taken = {}, {"pcu": 0, "pmu": 0}
    for g in groups:
        out[g.key] = free[g.unit][taken[g.unit]:taken[g.unit] + g.count]
        taken[g.unit] += g.count
    return out


# --- simulated annealing ---------------------------------------------------------------------------------

def anneal(machine: Machine, groups: list[Group], flows: list[tuple[str, str, int]],
           start: dict[str, list[Cell]], seed: int, style: Style = STYLES[0]) -> dict[str, list[Cell]]:
    rng = random.Random(seed)
    uniform = rng.random
    rows, cols = machine.grid
    index = {g.key: i for i, g in enumerate(groups)}
    cells = [list(start[g.key]) for g in groups]
    owner: dict[Cell, tuple[int, int]] = {c: (gi, u) for gi, cs in enumerate(cells) for u, c in enumerate(cs)}
    links = [(index[a], index[b], size) for a, b, size in flows if index[a] != index[b] and size > 0]
    partners: dict[tuple[int, int], list[tuple[tuple[int, int], float]]] = {}
    pull: dict[tuple[int, int], float] = {}
    centre: list[tuple[float, float]] = [(0.0, 0.0)] * len(groups)
    stages = {gi for gi, g in enumerate(groups) if g.unit == "pcu" and g.count > 1 and style.locality > 0}

    def refresh() -> None:
        """Pair the units of every flow again (the routing's pairing, for the current positions), and
        find every stage's centre again."""
        partners.clear()
        for a, b, size in links:
            pairs = pair_indices(machine, cells[a], cells[b])
            w = size / len(pairs)
            for i, j in pairs:
                partners.setdefault((a, i), []).append(((b, j), w))
                partners.setdefault((b, j), []).append(((a, i), w))
        for gi in stages:
            cs = cells[gi]
            centre[gi] = (sum(r for r, _ in cs) / len(cs), sum(c for _, c in cs) / len(cs))
        pull.clear()
        pull.update({x: style.locality * sum(w for _, w in ps) for x, ps in partners.items() if x[0] in stages})

    def gain(unit: tuple[int, int], here: Cell, there: Cell, skip: tuple[int, int] | None) -> float:
        """Change of the unit's weighted distance to its partners when it moves from here to there."""
        total = 0.0
        for (g, v), w in partners.get(unit, ()):
            if (g, v) != skip:
                r, c = cells[g][v]
                total += w * (abs(there[0] - r) + abs(there[1] - c) - abs(here[0] - r) - abs(here[1] - c))
        if unit in pull:
            r, c = centre[unit[0]]
            total += pull[unit] * (abs(there[0] - r) + abs(there[1] - c) - abs(here[0] - r) - abs(here[1] - c))
        return total

    def propose(radius: int) -> tuple[int, int, Cell, float] | None:
        gi, u = movable[bisect.bisect_left(cumulative, uniform() * cumulative[-1])]
        r, c = cells[gi][u]
        span = 2 * radius + 1
        tr = min(rows - 1, max(0, r - radius + int(uniform() * span)))
        tc = min(cols - 1, max(0, c - radius + int(uniform() * span)))
        if (tr + tc) % 2 != (r + c) % 2:  # keep the unit type: step to a neighbour on the same colour
            tc = tc + 1 if tc + 1 < cols else tc - 1
        target = (tr, tc)
        other = owner.get(target)
        if target == (r, c) or (other is not None and other[0] == gi):
            return None
        delta = gain((gi, u), (r, c), target, other)
        if other is not None:
            delta += gain(other, target, (r, c), (gi, u))
        return gi, u, target, delta

    def apply(gi: int, u: int, target: Cell) -> None:
        here = cells[gi][u]
        other = owner.pop(target, None)
        if other is not None:
            cells[other[0]][other[1]] = here
            owner[here] = other
        else:
            del owner[here]
        cells[gi][u] = target
        owner[target] = (gi, u)

    refresh()
    movable = sorted(partners)
    if not movable:
        return start
    # a unit is proposed in proportion to the traffic it carries: one PMU feeding many PCUs moves often
    cumulative = list(itertools.accumulate(sum(w for _, w in partners[x]) for x in movable))
    moves = min(MAX_MOVES, MOVES_PER_UNIT * len(movable), MOVES_PER_FLOW * len(links))
    samples = [abs(p[3]) for p in (propose(4) for _ in range(50)) if p is not None]
    temperature = style.heat * ((sum(samples) / len(samples) if samples else 1.0) or 1.0)
    cooling = (1e-3) ** (1 / STEPS)
    radius = max(2, int(style.radius * max(rows, cols)))
    for _ in range(STEPS):
        for _ in range(moves // STEPS):
            p = propose(radius)
            if p is not None and (p[3] < 0 or uniform() < math.exp(-p[3] / temperature)):
                apply(*p[:3])
        refresh()
        temperature *= cooling
        radius = max(2, int(radius * 0.85))
    return {g.key: cells[index[g.key]] for g in groups}


# --- routing ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _hilbert(rows: int, cols: int) -> dict[Cell, int]:
    """Position of every cell along a Hilbert curve over the grid (a space-filling order: consecutive
    cells are neighbours, so an even share of it is a compact patch)."""
    n = 1
    while n < max(rows, cols):
        n *= 2
    out = {}
    for r in range(rows):
        for c in range(cols):
            x, y, d, s = c, r, 0, n // 2
            while s > 0:
                rx, ry = int(x & s > 0), int(y & s > 0)
                d += s * s * ((3 * rx) ^ ry)
                if ry == 0:
                    if rx == 1:
                        x, y = n - 1 - x, n - 1 - y
                    x, y = y, x
                s //= 2
            out[r, c] = d
    return out


def pair_indices(machine: Machine, a: list[Cell], b: list[Cell]) -> list[tuple[int, int]]:
    """How a flow between two groups splits into unit pairs: both groups in Hilbert order, the larger
    one cut into equal consecutive shares, each share paired with one unit of the smaller."""
    order = _hilbert(*machine.grid)
    ia = sorted(range(len(a)), key=lambda i: order[a[i]])
    ib = sorted(range(len(b)), key=lambda j: order[b[j]])
    k = max(len(a), len(b))
    return [(ia[i * len(a) // k], ib[i * len(b) // k]) for i in range(k)]


def unit_pairs(machine: Machine, a: list[Cell], b: list[Cell]) -> tuple[np.ndarray, np.ndarray]:
    """Source and destination cells of a flow's unit pairs, as [k, 2] arrays."""
    pairs = pair_indices(machine, a, b)
    return np.array([a[i] for i, _ in pairs]), np.array([b[j] for _, j in pairs])


def route_loads(shape: tuple[int, int], src: np.ndarray, dst: np.ndarray, w: float) -> np.ndarray:
    """Per-link bytes of X-then-Y routes, as a [4, rows, cols] array: east, west, south, north. Entry
    [d, r, c] is the link leaving (r, c) in direction d (west and north are indexed by their far end)."""
    rows, cols = shape
    diff = np.zeros((4, rows + 1, cols + 1))
    r1, c1, r2, c2 = src[:, 0], src[:, 1], dst[:, 0], dst[:, 1]
    east, west = c2 > c1, c2 < c1
    np.add.at(diff[0], (r1[east], c1[east]), w)
    np.add.at(diff[0], (r1[east], c2[east]), -w)
    np.add.at(diff[1], (r1[west], c2[west]), w)
    np.add.at(diff[1], (r1[west], c1[west]), -w)
    south, north = r2 > r1, r2 < r1
    np.add.at(diff[2], (r1[south], c2[south]), w)
    np.add.at(diff[2], (r2[south], c2[south]), -w)
    np.add.at(diff[3], (r2[north], c2[north]), w)
    np.add.at(diff[3], (r1[north], c2[north]), -w)
    out = np.empty((4, rows, cols))
    out[:2] = np.cumsum(diff[:2], axis=2)[:, :rows, :cols]
    out[2:] = np.cumsum(diff[2:], axis=1)[:, :rows, :cols]
    return out


def route(machine: Machine, cells: dict[str, list[Cell]], flows: list[tuple[str, str, int]]) -> Routing:
    shape = machine.grid
    total = np.zeros((4, *shape))
    per_flow, hops = [], []
    weighted = 0.0
    for src, dst, size in flows:
        if size <= 0 or not cells[src] or not cells[dst]:
            per_flow.append(None)
            hops.append(0.0)
            continue
        a, b = unit_pairs(machine, cells[src], cells[dst])
        w = size / len(a)
        loads = route_loads(shape, a, b, w)
        total += loads
        per_flow.append(loads > 0)
        h = float(np.abs(a - b).sum()) * w
        weighted += h
        hops.append(h / size)
    flow_max = tuple(int(round(total[m].max())) if m is not None and m.any() else 0 for m in per_flow)
    return Routing(weighted, tuple(hops), flow_max, _busiest(total))


def weighted_hops(machine: Machine, cells: dict[str, list[Cell]], flows: list[tuple[str, str, int]]) -> float:
    """Sum over flows of bytes x hops (no link loads): the placement-quality measure."""
    out = 0.0
    for src, dst, size in flows:
        if size > 0 and cells[src] and cells[dst]:
            a, b = unit_pairs(machine, cells[src], cells[dst])
            out += float(np.abs(a - b).sum()) * size / len(a)
    return out


DIRECTIONS = ((0, 1), (0, -1), (1, 0), (-1, 0))   # east, west, south, north


def _busiest(total: np.ndarray) -> tuple[Cell, Cell, int]:
    if not total.any():
        return ((0, 0), (0, 0), 0)
    d, r, c = (int(x) for x in np.unravel_index(int(np.argmax(total)), total.shape))
    load = int(round(total[d, r, c]))
    dr, dc = DIRECTIONS[d]
    if d in (1, 3):  # west/north entries are indexed by the far end of the link
        return ((r - dr, c - dc), (r, c), load)
    return ((r, c), (r + dr, c + dc), load)


def link_list(machine: Machine, cells: dict[str, list[Cell]], flows: list[tuple[str, str, int]]
              ) -> list[tuple[Cell, Cell, float]]:
    """(from, to, bytes per call) of every loaded link, busiest first."""
    total = np.zeros((4, *machine.grid))
    for src, dst, size in flows:
        if size > 0 and cells.get(src) and cells.get(dst):
            a, b = unit_pairs(machine, cells[src], cells[dst])
            total += route_loads(machine.grid, a, b, size / len(a))
    out = []
    for d, r, c in zip(*np.nonzero(total)):
        dr, dc = DIRECTIONS[d]
        start = (int(r) - dr, int(c) - dc) if d in (1, 3) else (int(r), int(c))
        out.append((start, (start[0] + dr, start[1] + dc), float(total[d, r, c])))
    return sorted(out, key=lambda x: (-x[2], x[0], x[1]))
