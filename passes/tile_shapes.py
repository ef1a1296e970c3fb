"""The loop nest each kind of kernel runs, as the tiling pass (`passes.tile`) sizes it.

`kernel_shape(node)` reads a kernel node's body and returns the nest with the sizes and element widths its
working set depends on: a `MatmulShape` (a GEMM, its right operands horizontally fused), an
`AttentionShape` (the online-softmax loops of one attention) or a `RowShape` (any other kernel, as rows
of its domain). Each shape's `working_set(...)` is the bytes one tile keeps in cache, by the formulas of
`passes.tile`'s docstring; choosing the sizes and the cpu loop thresholds stays there.
"""
from __future__ import annotations

from dataclasses import dataclass

from fusec.ir import Graph, Node, dtype_size
from fusec.opset import REDUCE
from fusec.passes.weights import stored_weight


@dataclass(frozen=True)
class MatmulShape:
    m: int
    n: int
    k: int
    a: int      # element sizes in bytes
    b: int
    out: int
    acc: int

    def working_set(self, m: int, n: int, k: int, rows: int = 0) -> int:
        """Bytes of one (m, n, k) GEMM tile, or of one block of `rows` prologue/epilogue rows (the
        larger: they are not in cache at the same time)."""
        gemm = 2 * (m * k * self.a + k * n * self.b + m * n * self.out) + m * n * self.acc
        return max(gemm, rows * self.row_bytes)

    @property
    def row_bytes(self) -> int:
        """One row of A and one of the output, streamed (double-buffered)."""
        return 2 * (self.k * self.a + self.n * self.out)


@dataclass(frozen=True)
class AttentionShape:
    q: int
    kv: int
    d: int
    dv: int
    qs: int     # element sizes in bytes
    ks: int
    vs: int
    out: int
    acc: int
    entries: int = 1  # (batch, head) pairs: the blocks of rows a cpu can run in parallel besides q

    @property
    def kv_row_bytes(self) -> int:
        """One key and one value row and the key's score, as the inner loops of a cpu walk them."""
        return self.d * self.ks + self.dv * self.vs + self.acc

    def working_set(self, q: int, kv: int) -> int:
        streamed = q * self.d * self.qs + kv * self.d * self.ks + kv * self.dv * self.vs + q * self.dv * self.out
        return 2 * streamed + self.acc * (q * kv + q * self.dv + 2 * q)


@dataclass(frozen=True)
class RowShape:
    rows: int
    stationary: int   # bytes loaded once for all rows
    per_row: int      # streamed bytes per row (double-buffered)
    acc_per_row: int

    def working_set(self, rows: int) -> int:
        return self.stationary + rows * (2 * self.per_row + self.acc_per_row)


def kernel_shape(node: Node) -> MatmulShape | AttentionShape | RowShape:
    """The loop nest a kernel node runs, with the sizes its working set depends on."""
    body: Graph = node.attr("body")
    kind, anchors = node.attr("kind"), tuple(node.attr("anchors") or ())
    matmuls = [a for a in anchors if body.nodes[a].op == "matmul"] or \
        [i for i, n in enumerate(body.nodes) if n.op == "matmul"]
    if kind == "attention" and len(anchors) == 2:
        return _attention_shape(node, body, anchors)
    if matmuls and (kind == "matmul" or (kind == "op" and len(matmuls) == 1)):
        return _matmul_shape(node, body, matmuls)
    return _row_shape(body)


def _acc_size(*dtypes: str) -> int:
    return 8 if "f64" in dtypes else 4


def _prod(dims) -> int:
    out = 1
    for d in dims:
        out *= d
    return out


def _matmul_shape(node: Node, body: Graph, matmuls: list[int]) -> MatmulShape:
    a_id, b_id = body.nodes[matmuls[0]].args
    a, b = body.nodes[a_id], body.nodes[b_id]
    rows = _prod(a.shape[:-1]) if len(b.shape) == 2 else a.shape[-2]
    n = sum(body.nodes[mm].shape[-1] for mm in matmuls)
    # B as its loop streams it: a bf16 or int8 weight reaches the product widened to float32
    stored = min(dtype_size(body.nodes[stored_weight(body, b_id)].dtype), dtype_size(b.dtype))
    return MatmulShape(rows, n, a.shape[-1], dtype_size(a.dtype), stored, dtype_size(node.dtype),
                       _acc_size(a.dtype, b.dtype))


def _attention_shape(node: Node, body: Graph, anchors: tuple[int, ...]) -> AttentionShape:
    s, o = (body.nodes[x] for x in anchors)
    q, k = (body.nodes[x] for x in s.args)
    v = body.nodes[o.args[1]]
    return AttentionShape(s.shape[-2], s.shape[-1], q.shape[-1], o.shape[-1], dtype_size(q.dtype),
                          dtype_size(k.dtype), dtype_size(v.dtype), dtype_size(node.dtype),
                          _acc_size(q.dtype, k.dtype, v.dtype), _prod(s.shape[:-2]))


def _row_shape(body: Graph) -> RowShape:
    reductions = [n for n in body.nodes if n.op in REDUCE]
    candidates = [body.nodes[o].type for o in body.outputs] + [body.nodes[r.args[0]].type for r in reductions]
    domain = max(candidates, key=lambda t: t.numel).shape
    rows = max(_prod(domain[:-1]), 1)
    row_len = domain[-1] if domain else 1
    stationary = per_row = 0
    operands = [n.type for n in body.nodes if n.op in ("input", "param") or (n.op == "const" and n.attr("key"))]
    for t in operands + [body.nodes[o].type for o in body.outputs]:
        if t.numel <= max(rows, row_len):
            stationary += t.nbytes
        else:
            per_row += ceil_div(t.nbytes, rows)
    acc = sum(ceil_div(r.type.numel, rows) * _acc_size(r.dtype) for r in reductions)
    return RowShape(rows, stationary, per_row, acc)


def ceil_div(a: int, b: int) -> int:
    """a / b rounded up (b > 0)."""
    return -(-a // b)
