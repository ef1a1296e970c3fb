"""The stage graph of a kernel program: every kernel node split into pipeline stages with FLOPs and bytes.

A kernel becomes the stages its loop nest streams through (SN40L §III-A, Fig 4), each a compute stage on
PCUs fed by a PMU input buffer:
- `matmul`: [prologue (e.g. RMSNorm)] -> gemm (every horizontally fused matmul) -> [epilogue]
- `attention`: qk (S = Q.K^T, with any prologue) -> softmax (the row region) -> pv (P.V) -> [epilogue]
- `reduce`, `pointwise`, and `op` kernels: one stage (`gemm` when the op is a matmul, else `vector`)
FLOPs per body node: matmul 2*M*N*K (batched), elementwise one per output element, a reduction one per
input element; layout and source ops are free. Bytes come from the tensors a stage reads (kernel
operands, weights, stored constants) and writes (the kernel's outputs), and what it passes to the next
stage. Sizes use the traced dtypes, or `dtype` for every float tensor (e.g. "bf16", the SN40L datatype).
Tiles are the tiling pass's choice for the target machine (`passes.tile.choose_tiles`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from fusec.errors import IRError
from fusec.ir import FLOAT_DTYPES, Graph, Node, TensorType, dtype_size
from fusec.kernels import kernel_outputs
from fusec.machines import Machine
from fusec.opset import OPS
from fusec.passes.tile import AttentionShape, MatmulShape, choose_tiles, kernel_shape, working_set
from fusec.passes.weights import dequantized

PREVIOUS = "<stage>"  # "<stage>j": the source name of what a stage receives from stage j of its kernel


@dataclass(frozen=True)
class Sizer:
    """Bytes of a tensor type, counting floats at `dtype`'s size when given."""

    dtype: str | None = None

    def __call__(self, t: TensorType) -> int:
        if self.dtype is not None and t.dtype in FLOAT_DTYPES:
            return t.numel * dtype_size(self.dtype)
        return t.nbytes


@dataclass(frozen=True)
class Gemm:
    """The geometry of a stage's matmuls, to count how often each operand is re-read."""

    m: int          # rows of the output per batch
    n: int          # columns (horizontally fused matmuls side by side)
    batch: int
    mt: int         # one PCU's output tile: rows and columns
    nt: int


@dataclass(frozen=True)
class StageSpec:
    role: str
    mode: str                                   # systolic | simd
    flops: float
    cap: int                                    # the most PCUs it can use (output vectors of `lanes`)
    reads: tuple[tuple[str, int, str], ...]     # (source, bytes read once, side "a"/"b"/"" of a matmul)
    writes: tuple[tuple[str, int], ...]         # (tensor, bytes)
    capacity: int                               # bytes of its input buffer (double-buffered tiles)
    gemm: Gemm | None


@dataclass(frozen=True)
class KernelSpec:
    kernel: int
    name: str                                   # matmul, attention, reduce, pointwise, op:<op>
    stages: tuple[StageSpec, ...]
    tiles: int                                  # iterations of its outer (parallel) tile loops


def tensor_name(graph: Graph, value: int) -> str:
    """The memory-plan name of an outer value: its root through `reshape` and `slice` views."""
    while graph.nodes[value].op in ("reshape", "slice"):  # views (an outer slice: passes.hoist_slices)
        value = graph.nodes[value].args[0]
    n = graph.nodes[value]
    if n.op == "param":
        return n.attr("name")
    if n.op == "const" and n.attr("key") is not None:
        return n.attr("key")
    return f"%{value}"


def kernel_name(node: Node) -> str:
    kind = node.attr("kind")
    if kind != "op":
        return kind
    ops = [n.op for n in node.attr("body").nodes if OPS[n.op] != "source"]
    main = [op for op in ops if OPS[op] != "layout"] or ops or ["copy"]
    return f"op:{main[-1]}"


def analyze(graph: Graph, machine: Machine, sizer: Sizer) -> list[KernelSpec]:
    """The stages of every kernel node, in graph order. IRError if a compute node sits outside kernels."""
    for i, n in enumerate(graph.nodes):
        if n.op == "extern":
            raise IRError(f"%{i} = extern runs in PyTorch on the host (a torch fallback): a program with "
                          f"fallbacks has no RDU placement")
        if OPS[n.op] not in ("source", "kernel") and n.op not in ("reshape", "slice"):
            raise IRError(f"place expects a graph of kernels (fused or unfused), but %{i} = {n.op} is not "
                          f"inside a kernel; run the 'fused' and 'tiled' stages first")
    return [_kernel(graph, i, machine, sizer) for i, n in enumerate(graph.nodes) if n.op == "kernel"]


# --- one kernel -----------------------------------------------------------------------------------------

def node_flops(body: Graph, n: Node) -> float:
    kind = OPS[n.op]
    if n.op == "matmul":
        return 2.0 * n.type.numel * body.nodes[n.args[0]].shape[-1]
    if kind == "elementwise":
        return float(n.type.numel)
    if kind == "reduce":
        return float(body.nodes[n.args[0]].type.numel)
    return 0.0


def _is_compute(n: Node) -> bool:
    return OPS[n.op] in ("elementwise", "reduce", "matmul", "gather")


def _widening(body: Graph) -> set[int]:
    """The nodes that widen a stored weight to float32 (a bf16 weight's cast; an int8 weight's cast and
    scaling, `passes.weights.dequantized`). They are not stages: the weight streams from memory at its
    stored size into the stage that reads it, whose pipeline widens it on the way (as the CPU kernels do
    in their loads), so they count neither bytes passed between stages nor FLOPs of their own."""
    out = set()
    for i, n in enumerate(body.nodes):
        if n.op == "cast" and n.dtype == "f32" and body.nodes[n.args[0]].op == "param":
            out.add(i)
        elif dequantized(body, i) is not None:
            out.add(i)
    return out


def _computes(body: Graph, widening: set[int], i: int) -> bool:
    return i not in widening and _is_compute(body.nodes[i])


def _ancestors(body: Graph, start: set[int]) -> set[int]:
    """Every node the `start` nodes depend on, directly or not."""
    seen, stack = set(), list(start)
    while stack:
        i = stack.pop()
        for j in body.nodes[i].args:
            if j not in seen:
                seen.add(j)
                stack.append(j)
    return seen


def _roles(node: Node) -> dict[int, str]:
    """Stage role of every compute node of the kernel's body."""
    body, kind = node.attr("body"), node.attr("kind")
    widening = _widening(body)
    compute = [i for i in range(len(body.nodes)) if _computes(body, widening, i)]
    matmuls = [i for i in compute if body.nodes[i].op == "matmul"]
    anchors = tuple(node.attr("anchors") or ())
    if kind == "attention" and len(anchors) == 2:
        s, o = anchors
        before_s, before_o = _ancestors(body, {s}), _ancestors(body, {o})
        return {i: "qk" if i == s or i in before_s else "pv" if i == o else
                "softmax" if i in before_o else "epilogue" for i in compute}
    if matmuls and kind in ("matmul", "op"):
        before = _ancestors(body, set(matmuls))
        return {i: "gemm" if i in matmuls else "prologue" if i in before else "epilogue" for i in compute}
    return {i: "vector" for i in compute}


ORDER = ("prologue", "qk", "softmax", "gemm", "pv", "epilogue", "vector")


def _kernel(graph: Graph, k: int, machine: Machine, sizer: Sizer) -> KernelSpec:
    node = graph.nodes[k]
    body: Graph = node.attr("body")
    roles = _roles(node)
    names = [r for r in ORDER if r in roles.values()] or ["vector"]
    index = {r: j for j, r in enumerate(names)}
    home = _homes(body, {i: index[r] for i, r in roles.items()})
    widening = _widening(body)
    reads = _reads(graph, node, home, len(names), sizer, widening)
    writes: list[list[tuple[str, int]]] = [[] for _ in names]
    for o, v in zip(body.outputs, kernel_outputs(graph, k)):
        if v >= 0:
            writes[home.get(o, 0)].append((f"%{v}", sizer(graph.nodes[v].type)))
    shape, tiles = kernel_shape(node), dict(choose_tiles(node, machine))
    capacity = working_set(node, tuple(tiles.items()))
    total_read = sum(sum(r.values()) for r in reads) or 1
    stages = []
    for j, role in enumerate(names):
        members = [i for i, h in home.items() if h == j and _computes(body, widening, i)]
        widest = max((_width(body, body.nodes[i]) for i in members),
                     default=max(body.nodes[o].type.numel for o in body.outputs))
        share = sum(reads[j].values()) / total_read
        stages.append(StageSpec(
            role, "systolic" if role in ("gemm", "qk", "pv") else "simd",
            sum(node_flops(body, body.nodes[i]) for i in members), max(1, math.ceil(widest / machine.lanes)),
            _merge_reads(reads[j]), tuple(writes[j]),
            max(1, math.ceil(capacity * share)) if len(names) > 1 else capacity,
            _gemm(body, [i for i in members if body.nodes[i].op == "matmul"], role, shape, tiles)))
    return KernelSpec(k, kernel_name(node), tuple(stages), _outer_tiles(body, node, shape, tiles))


def _reads(graph: Graph, node: Node, home: dict[int, int], n_stages: int, sizer: Sizer, widening: set[int]
           ) -> list[dict[tuple[str, str, int], int]]:
    """Per stage: (source, matmul side, value id) -> bytes. A kernel operand, weight or stored constant is
    read by every stage that uses it (as much of it as the view it is read through shows); a value one
    stage computes and a later one uses is sent to that stage ("<stage>j")."""
    body: Graph = node.attr("body")
    users, outputs = body.users(), set(body.outputs)
    reads: list[dict[tuple[str, str, int], int]] = [{} for _ in range(n_stages)]

    def consumers(i: int) -> list[tuple[int, int, int]]:
        """(consumer, operand position, the node it reads) reached from i through views of i's stage."""
        out = [(i, 0, i)] if i in outputs and i not in home else []  # copied out as it is (a layout op kernel)
        for u in users[i]:
            if _computes(body, widening, u):
                out.extend((u, pos, i) for pos, a in enumerate(body.nodes[u].args) if a == i)
            elif home.get(u) == home.get(i):
                out.extend(consumers(u))
            else:
                out.append((u, 0, i))
        return out

    operands = [tensor_name(graph, a) for a in node.args]
    for i, n in enumerate(body.nodes):
        source = (operands[n.attr("index")] if n.op == "input" else n.attr("name") if n.op == "param" else
                  n.attr("key") if n.op == "const" else None)
        if source is not None:
            size = sizer(graph.nodes[node.args[n.attr("index")]].type) if n.op == "input" else sizer(n.type)
            for u, pos, via in consumers(i):
                seen = min(size, sizer(body.nodes[via].type))  # a slice reads part of it
                _add_read(reads[home.get(u, 0)], (source, _side(body, u, pos), -1), seen)
        elif _computes(body, widening, i):
            for u, pos, _ in consumers(i):
                if home.get(u, home[i]) != home[i]:
                    _add_read(reads[home[u]], (f"{PREVIOUS}{home[i]}", _side(body, u, pos), i), sizer(n.type))
    return reads


def _width(body: Graph, n: Node) -> int:
    """Elements a node produces in parallel (a reduction: the elements it reads)."""
    return body.nodes[n.args[0]].type.numel if OPS[n.op] == "reduce" else n.type.numel


def _add_read(reads: dict[tuple[str, str, int], int], key: tuple[str, str, int], size: int) -> None:
    reads[key] = max(reads.get(key, 0), size)  # several views of one value: read once


def _merge_reads(reads: dict[tuple[str, str, int], int]) -> tuple[tuple[str, int, str], ...]:
    """(source, bytes, side), the values passed on by one earlier stage summed."""
    out: dict[tuple[str, str], int] = {}
    for (source, side, _), size in reads.items():
        out[source, side] = out.get((source, side), 0) + size
    return tuple(sorted((source, size, side) for (source, side), size in out.items()))


def _side(body: Graph, consumer: int, pos: int) -> str:
    """Which operand of a matmul a value feeds ("a" rows, "b" columns); "" for other consumers."""
    return ("a" if pos == 0 else "b") if body.nodes[consumer].op == "matmul" else ""


def _homes(body: Graph, stage_of: dict[int, int]) -> dict[int, int]:
    """Stage of every node that computes or views computed data: compute nodes their own, views the
    latest stage among their operands. Views of sources only (weights seen transposed) have none."""
    home = dict(stage_of)
    for i, n in enumerate(body.nodes):
        if i not in home and OPS[n.op] == "layout":
            found = [home[a] for a in n.args if a in home]
            if found:
                home[i] = max(found)
    return home


def _gemm(body: Graph, matmuls: list[int], role: str, shape, tiles: dict[str, int]) -> Gemm | None:
    if not matmuls:
        return None
    first = body.nodes[matmuls[0]]
    a, b = (body.nodes[x] for x in first.args)
    n = sum(body.nodes[i].shape[-1] for i in matmuls)
    if b.type.rank == 2:
        m, batch = a.type.numel // a.shape[-1], 1
    else:
        m, batch = a.shape[-2], math.prod(first.shape[:-2])
    if isinstance(shape, AttentionShape):
        mt, nt = tiles["q"], tiles["kv"] if role == "qk" else shape.dv
    elif isinstance(shape, MatmulShape):
        mt, nt = tiles["m"], tiles["n"]
    else:
        mt, nt = m, n
    return Gemm(m, n, batch, max(1, min(mt, m)), max(1, min(nt, n)))


def _outer_tiles(body: Graph, node: Node, shape, tiles: dict[str, int]) -> int:
    """Iterations of the kernel's parallel tile loops: the N of the metapipeline formula."""
    if isinstance(shape, MatmulShape):
        anchors = [a for a in (node.attr("anchors") or ()) if body.nodes[a].op == "matmul"]
        mm = body.nodes[anchors[0]] if anchors else next(n for n in body.nodes if n.op == "matmul")
        batch = 1 if body.nodes[mm.args[1]].type.rank == 2 else math.prod(mm.shape[:-2])
        return batch * math.ceil(shape.m / tiles["m"]) * math.ceil(shape.n / tiles["n"])
    if isinstance(shape, AttentionShape):
        s = body.nodes[node.attr("anchors")[0]]
        return math.prod(s.shape[:-2]) * math.ceil(shape.q / tiles["q"])
    return math.ceil(shape.rows / tiles["rows"])


def operand_traffic(st: StageSpec, pcus: int, a_resident: bool) -> tuple[list[tuple[str, int, str]], int]:
    """What a stage fetches from each source per call (re-reads included), and what its PCUs read from
    its input buffer. Other stages read every input once. A GEMM stage's PCUs hold an output block of
    pcus x (m_tile x n_tile) accumulators (output-stationary; per batch when batched):
    - `a_resident`: the whole A operand sits in the input buffer; sources send A and B once, the PCUs
      read A again for every block of columns (block // M wide, at least n_tile) and B once.
    - otherwise a block of A rows (block // N tall, at least m_tile) stays while B streams past it: B is
      fetched from its source once per row block (weights re-read from HBM), A once."""
    if st.gemm is None:
        return list(st.reads), sum(size for _, size, _ in st.reads)
    g = st.gemm
    block = max(g.mt * g.nt, pcus * g.mt * g.nt // max(g.batch, 1))
    if a_resident:
        source_b, buffer_a = 1, math.ceil(g.n / min(g.n, max(g.nt, block // g.m)))
    else:
        source_b, buffer_a = math.ceil(g.m / min(g.m, max(g.mt, block // g.n))), 1
    sources = [(src, size * (source_b if side == "b" else 1), side) for src, size, side in st.reads]
    buffer = sum(size * (buffer_a if side == "a" else source_b if side == "b" else 1) for _, size, side in st.reads)
    return sources, buffer


def a_bytes(st: StageSpec) -> int:
    """Bytes of a GEMM stage's A operand (0 for other stages)."""
    return sum(size for _, size, side in st.reads if side == "a") if st.gemm is not None else 0
