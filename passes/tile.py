"""Tiling: choose the tile sizes of every fused kernel from the memory budget of one tile.

`tile(graph, machine=None)` expects a verified graph (usually fused) and guarantees the same graph with
every `kernel` node's `tiles` attr set to a tuple of (loop name, size) pairs sorted by name; nothing else
changes, so numerics are untouched (the reference backend ignores tiles) and a second run changes nothing
(tiles are recomputed from shapes alone). The default machine is `fusec.machines.cpu()`, the Numba
backend's host; `make_tile_pass(machine)` makes the pass for another machine (an RDU preset or file).

What a tile is, per kernel kind (the names the Numba backend reads):
- `matmul` (and an `op` kernel holding one `matmul`): A [M, K] times the horizontally fused right operands,
  concatenated to [K, N]. ("m", rows of A per tile), ("n", output columns per tile, over the concatenated
  N), ("k", reduction depth per step): the full K, unless not even a 32x32 output tile fits with it; then
  K is split into the fewest equal chunks (rounded up to a multiple of 8, the last one shorter) that let
  it fit. Batch axes of A are folded into M when the right operand is a rank-2 weight, and are outer
  (parallel) loops otherwise. On a cpu also ("rows", rows of A per parallel block of the prologue and
  epilogue): the Numba backend's GEMM kernels run those over blocks of this many rows (the GEMM itself
  is the BLAS call, which blocks for the caches on its own). Rows fit the budget with one row of A and
  one of the output streamed, 2*(K*|A| + N*|out|) bytes each, and are at most M / cores (rounded up to
  a multiple of 8) so every core gets a block.
- `attention`: S = Q.K^T over [Tq, Tk] per (batch, head), head depth D, value depth Dv.
  ("q", query rows per block), ("kv", key/value rows streamed per step of the online softmax). On a cpu
  the Numba backend runs exactly these loops: a parallel iteration per block of q query rows of one
  (batch, head), key blocks of kv outside its rows, so every row of the block reads the key/value block
  while it is in L1. There kv is the most keys whose key row, value row and score,
  kv*(D*|K| + Dv*|V| + |acc|) bytes, fit the L1 (`machine.l1_bytes`) (and one row's tile the budget); then q the most rows that fit the
  budget with that kv, at most an even share of a head's rows when there are fewer (batch, head) pairs
  than cores (rounded up to a multiple of 8), so that every core gets a block. Elsewhere (an RDU, a cpu of unknown L1) the pair is chosen together as below.
- `reduce`, `pointwise`, other `op`: the domain (the largest of the body's outputs and reduction operands)
  is viewed as rows = all axes but the last; ("rows", rows per parallel chunk).

On a cpu every kernel also carries the thresholds that choose between the Numba backend's loops
(`CPU_LOOP_RULES`), so that one place decides and `fusec dump --stage tiled` shows what the code does:
("parallel_min", elements from which a loop nest is a parallel loop), on a matmul ("matvec_rows", up to
how many rows of A a product streams the weights itself instead of calling BLAS; "matvec_group", the
weight rows that loop hands a thread at a time) and on an attention
("gemm_rows", query rows from which a block's two products are MKL GEMMs). Each rule derives its value
from the machine (fork/join cost, clock, cores, SIMD lanes, memory bandwidth, L2) and the kernel's shape;
its docstring says how.

Budget: the working set of one tile must fit `machine.tile_budget`: the L2 per core on a cpu, and on an
RDU pmu_bytes x stage_pmus (the PMUs one pipeline stage may use). Streamed buffers (input and output
tiles) are double-buffered as the PMU stage buffers are (one fills while the other is used: SN40L §IV-B;
"double buffering doubles the capacity needed", docs/rdu-model.md); accumulators stay put. With |x| the
element size (accumulators 4 bytes, 8 for f64):
    matmul     2*(m*k*|A| + k*n*|B| + m*n*|out|) + m*n*|acc|
    attention  2*(q*D*|Q| + kv*D*|K| + kv*Dv*|V| + q*Dv*|out|) + |acc|*(q*kv + q*Dv + 2*q)
               (scores, output accumulator, running max and sum)
    rows       stationary + rows*(2*streamed_per_row + acc_per_row); an operand with no more elements
               than the rows or than one row (a norm's weight, a bias) is stationary, counted once;
               every other operand and output is streamed, nbytes / rows per row
Sizes: positive, at most the dimension, the full dimension when it fits, else a multiple of 8 (a smaller
size only when not even 8 fits). Among the (m, n) or (q, kv) pairs that fit, the pass takes the one with
the most reuse, a*b/(a+b) (a block does a*b*depth MACs on (a+b)*depth loaded values), then the larger
block, then the larger second size. If not even the smallest tile fits, the smallest tile is used.
"""
from __future__ import annotations

import math
from typing import Callable

from fusec.ir import Builder, Graph, Node
from fusec.machines import Machine, cpu, get_machine
from fusec.sizes import specialize, upper_sizes
# (the shapes are the pass's too: tests, benchmarks and placement import them from here)
from fusec.passes.tile_shapes import AttentionShape, MatmulShape, RowShape, ceil_div, kernel_shape

ALIGN = 8        # tile sizes are multiples of this where the dimension allows
MIN_BLOCK = 32   # the smallest output block (m, n) worth keeping the full K for

Tiles = tuple[tuple[str, int], ...]


def tile(graph: Graph, machine: Machine | str | None = None) -> Graph:
    """Set `tiles` on every kernel node for `machine` (default: this cpu). See the module docstring."""
    machine = cpu() if machine is None else get_machine(machine)
    b = Builder(graph.tensors)
    new: list[int] = []
    for n in graph.nodes:
        attrs = dict(n.attrs)
        if n.op == "kernel":
            attrs["tiles"] = choose_tiles(n, machine)
        new.append(b.add(n.op, [new[a] for a in n.args], attrs, type=n.type, origin=n.origin))
    return b.finish([new[o] for o in graph.outputs])


def make_tile_pass(machine: Machine | str) -> Callable[[Graph], Graph]:
    """The tiling pass for `machine` (a Machine, preset name or machine file), as a Graph -> Graph."""
    m = get_machine(machine)

    def run(graph: Graph) -> Graph:
        return tile(graph, m)
    run.__name__ = run.__qualname__ = f"tile_{m.name}"
    run.__doc__ = f"`tile` for machine {m.name!r} (budget {m.tile_budget} bytes per tile)."
    return run


# --- one tile's working set (the loop nests: passes/tile_shapes.py) -----------------------------------

def working_set(node: Node, tiles: Tiles) -> int:
    """Bytes one tile of kernel `node` keeps on chip (in cache) with these tiles (sizes only: the loop
    thresholds hold no data)."""
    return kernel_shape(node).working_set(**{k: v for k, v in tiles if k not in LOOP_TILES})


# --- choosing sizes -----------------------------------------------------------------------------------

def choose_tiles(node: Node, machine: Machine) -> Tiles:
    """The tiles of kernel `node` on `machine`, sorted by name. A kernel with symbolic sizes is tiled for
    their upper bounds: the tiles hold for every size (a smaller one only fills fewer of them)."""
    body = node.attr("body")
    if body is not None and body.sizes:
        node = specialize(Graph((node,), ()), upper_sizes(body)).nodes[0]
    shape, budget = kernel_shape(node), machine.tile_budget
    if isinstance(shape, MatmulShape):
        k = _depth(shape, budget)
        m, n = _best_pair(shape.m, shape.n, lambda m, n: shape.working_set(m, n, k) <= budget)
        tiles = {"m": m, "n": n, "k": k}
        if machine.kind == "cpu":
            tiles["rows"] = _gemm_rows(shape, budget, machine.cores)
    elif isinstance(shape, AttentionShape):
        if machine.kind == "cpu" and machine.l1_bytes > 0:
            kv = _largest(_sizes(shape.kv), lambda kv: kv * shape.kv_row_bytes <= machine.l1_bytes
                          and shape.working_set(1, kv) <= budget)
            # every core gets a block: a head's rows split when there are fewer heads than cores
            share = ceil_div(shape.q, ceil_div(machine.cores, max(shape.entries, 1)))
            share = min(shape.q, ceil_div(share, ALIGN) * ALIGN) if shape.q > ALIGN else shape.q
            q = _largest(_sizes(share), lambda q: shape.working_set(q, kv) <= budget)
        else:
            q, kv = _best_pair(shape.q, shape.kv, lambda q, kv: shape.working_set(q, kv) <= budget)
        tiles = {"q": q, "kv": kv}
    else:
        tiles = {"rows": _largest(_sizes(shape.rows), lambda r: shape.working_set(r) <= budget)}
    if machine.kind == "cpu":
        tiles.update(loop_tiles(machine, shape))
    return tuple(sorted(tiles.items()))


# --- the thresholds of a cpu's loops ------------------------------------------------------------------
# Each is chosen from the machine's figures (caches, cores, clock, fork/join cost, memory bandwidth) and,
# where it matters, the kernel's shape; the emitter follows whatever the kernel carries. On the 2-core x86
# the project is measured on (48 KiB L1d and 2 MiB L2 per core, 2.3 GHz, AVX-512) they come to
# parallel_min 16384, matvec_rows 18 (fp32 weights), matvec_group 8 (16 for int8; 1 for bf16 and int8 at
# one row), gemm_rows 16 (docs/passes.md).

def _parallel_min(machine: Machine, shape=None) -> int:
    """Elements from which a loop nest runs parallel. Splitting n elements over c cores saves (1 - 1/c)
    of their serial time and costs one fork and join (`machine.fork_join_s`); at the cheapest loops' one
    element per clock cycle that pays from fork_join_s * clock * c / (c - 1) elements, rounded up to a
    power of two (a fork/join that meets a busy core costs more than its median). One core: never."""
    if machine.cores <= 1:
        return NEVER
    elements = machine.fork_join_s * machine.clock_hz * machine.cores / (machine.cores - 1)
    return 1 << max(math.ceil(math.log2(max(elements, 1))), 0)


def _matvec_rows(machine: Machine, shape: MatmulShape | None = None) -> int:
    """Up to how many rows of A a product streams its weights through the matrix-vector loop (matvec.py)
    instead of a BLAS GEMM. That loop reads each weight once and does one vector FMA per cycle with it per
    row of A: it is the faster while streaming a weight costs more than the row's arithmetic on it,
    rows <= |W| * lanes * clock / (a core's share of the memory bandwidth), beyond which a GEMM's higher
    arithmetic rate wins. And the rows of A, read again for every group of weight rows, must stay in the
    L2 (the rows x K x |A| bytes). At least 1: one row (decode) is always a matrix-vector product.
    Weights narrower than float32 (bf16, int8) compare against GEMMs that do not run at MKL's float32
    rate (int8: Numba loops; bf16: MKL's emulation without AVX512-BF16), which that formula assumes: they
    keep the measured LOWP_MATVEC_ROWS (at 18 rows a 32-token bf16 prefill ran 100x slower than at 64)."""
    weight = shape.b if shape is not None else 4
    per_core_bw = machine.ddr_bw * machine.ddr_efficiency / max(machine.cores, 1)
    rows = int(weight * machine.lanes * machine.clock_hz / per_core_bw) if weight >= 4 else LOWP_MATVEC_ROWS
    if shape is not None:
        rows = min(rows, machine.l2_bytes // max(shape.k * shape.a, 1))
    return max(rows, 1)


def _matvec_group(machine: Machine, shape: MatmulShape | None = None) -> int:
    """Weight rows per group of the matrix-vector loop (matvec.py): the unit a thread takes, whose rows
    share every load of the activations and whose successor is prefetched while it is summed. 8, but 16
    for int8 weights where the vectors are 512 bits (lanes 16, 32 vector registers): their dot products
    prepare each 64-byte chunk of activations once for the group (VNNI's offset, the scales) and keep one
    accumulator per row, so twice the rows halve that work per row and still fit the registers. Measured
    side by side on the kernels alone (2 threads, stories110M's shapes, weights cycled over 60-120 MB, much
    of it held by a large L3): int8 took 0.6-0.75x the time of 8 rows (32 rows spill: 1.5-2x); fp32 ran
    alike or up to 7% slower at 16, and bf16 (one accumulator a row too, but only a permutation of the
    activations to share) 0-5% slower at 16 and alike at 4, so both keep 8. In whole decode steps the gain
    shows where the weights come from cache (stories15M int8, one thread: its matrix-vector kernels 5-10%
    faster) and not where one core's DRAM stream bounds them (stories110M: alike).

    Against one activation row (decode, batch 1) bf16 and int8 take 1 row: there is no activation load to
    share, and a row after another is one stream per thread. Measured 2026-12-03 on an Intel Xeon with
    AVX-512 and a 480 MB L3 (2 threads, weights in huge pages cycled over 512 MB, alternating, medians; 768 x 768 to
    32000 x 768 and 768 x 2048): bf16 1.04-1.19x the bytes per second of 8 rows, int8 1.28-1.41x those of
    16 rows (4 rows in between); in whole stories110M bf16 decode steps its kernels measured alike within
    the noise (the W1/W3 kernel 2.76 against 2.91 ms). fp32 reads one activation row a row after another
    whatever the group (`matvec.rows_one_stream`)."""
    if shape is not None and shape.m == 1 and shape.b < 4:
        return 1
    if shape is not None and shape.b == 1 and machine.lanes >= 16:
        return 16
    return 8


def _attention_gemm_rows(machine: Machine, shape=None) -> int:
    """Query rows from which an attention block's two products are MKL GEMMs: below it (decode) a GEMM
    call costs more than the scalar loops. Not a cache figure but MKL's call overhead against those
    loops, measured on the 2-core x86 (no machine figure predicts it yet)."""
    return 16


LOWP_MATVEC_ROWS = 64  # matvec_rows of bf16 and int8 weights, measured (see _matvec_rows)
NEVER = 1 << 62  # a loop size no program reaches: the loop never runs parallel

CPU_LOOP_RULES: tuple[tuple[str, tuple[type, ...], Callable[..., int]], ...] = (
    ("parallel_min", (MatmulShape, AttentionShape, RowShape), _parallel_min),
    ("matvec_rows", (MatmulShape,), _matvec_rows),
    ("matvec_group", (MatmulShape,), _matvec_group),
    ("gemm_rows", (AttentionShape,), _attention_gemm_rows),
)
LOOP_TILES = tuple(name for name, _, _ in CPU_LOOP_RULES)


def loop_tiles(machine: Machine, shape: MatmulShape | AttentionShape | RowShape | None = None) -> dict[str, int]:
    """{threshold: value} of the rules for a kernel of `shape` on cpu `machine` (None: every rule, with
    the values that do not depend on a shape)."""
    return {name: rule(machine, shape) for name, kinds, rule in CPU_LOOP_RULES
            if shape is None or isinstance(shape, kinds)}


def _sizes(dim: int) -> list[int]:
    """Candidate sizes for a dimension, ascending: 1..7 (fallbacks), multiples of 8 below it, itself."""
    return sorted({*range(1, min(dim, ALIGN)), *range(ALIGN, dim, ALIGN), max(dim, 1)})


def _largest(sizes: list[int], fits: Callable[[int], bool]) -> int:
    """The largest size that fits (fits is monotone); the smallest when none does."""
    lo, hi = 0, len(sizes) - 1
    if not fits(sizes[0]):
        return sizes[0]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(sizes[mid]) else (lo, mid - 1)
    return sizes[lo]


def _best_pair(dim_a: int, dim_b: int, fits: Callable[[int, int], bool]) -> tuple[int, int]:
    """The (a, b) that fits with the most reuse a*b/(a+b), then the larger a*b, then the larger b."""
    sizes_b = _sizes(dim_b)
    best, best_key = (1, 1), None
    for a in _sizes(dim_a):
        if not fits(a, sizes_b[0]):
            break  # a larger a fits even less
        b = _largest(sizes_b, lambda b: fits(a, b))
        key = (a * b / (a + b), a * b, b)
        if best_key is None or key > best_key:
            best, best_key = (a, b), key
    return best


def _gemm_rows(shape: MatmulShape, budget: int, cores: int) -> int:
    """Rows of A per parallel block of a GEMM's prologue and epilogue on a cpu: as many as fit the budget
    with a row of A and a row of the output streamed (double-buffered), but no more than an even share
    of M per core (rounded up to a multiple of 8), so that every core gets a block; then, when the blocks
    do not come out a multiple of the cores, the most rows (a multiple of 8, more than half as many) that
    make them one (5 blocks on 2 cores take 3 blocks' time, 6 smaller blocks 3 smaller ones)."""
    cores = max(cores, 1)
    share = ceil_div(shape.m, cores)
    share = min(shape.m, ceil_div(share, ALIGN) * ALIGN) if shape.m > ALIGN else shape.m
    rows = _largest(_sizes(share), lambda r: r * shape.row_bytes <= budget)
    if ceil_div(shape.m, rows) % cores:
        even = [r for r in range(rows // ALIGN * ALIGN, rows // 2, -ALIGN) if ceil_div(shape.m, r) % cores == 0]
        rows = even[0] if even else rows
    return rows


def _depth(shape: MatmulShape, budget: int) -> int:
    """The full K, unless a MIN_BLOCK x MIN_BLOCK output tile does not fit with it: then the fewest equal
    chunks of K (each a multiple of 8) that let it fit."""
    m, n = min(shape.m, MIN_BLOCK), min(shape.n, MIN_BLOCK)
    k, chunks = shape.k, 1
    while k > ALIGN and shape.working_set(m, n, k) > budget:
        chunks += 1
        k = min(shape.k, ceil_div(ceil_div(shape.k, chunks), ALIGN) * ALIGN)
    return k
