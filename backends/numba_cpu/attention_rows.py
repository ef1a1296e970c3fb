"""The decode attention loops' rows (`attention.py`, the non-GEMM path): where a query, key or value row
lies in the kernel's operand arrays, so that Q.K and P.V run as explicit vector row operations
(`rowops.row_dot`, `rowops.row_axpy`); and Q.K in lane partial sums in the generated source where the
rows are not plain arrays."""
from __future__ import annotations

from fusec.backends.numba_cpu.expr import Emitter, reshape_index


def lane_dot(em: Emitter, depth: int, lanes: int, q_at, k_at) -> None:
    """`s` = the dot product of a query and a key row over the head dimension, in `lanes` partial sums
    (lane l sums the elements d = l mod lanes, in order), then halved pairwise: a vector FMA per chunk
    of the head dimension, where one running sum cannot vectorize without `reassoc` (left out of
    generated kernels on purpose: see `generated.FASTMATH`)."""
    w = em.w
    with em.loop(f"for l in range({lanes})", ("l",)):
        w.line("slane[l] = np.float32(0.0)")
    with em.loop(f"for d0 in range(0, {depth}, {lanes})", ("d0",)):
        with em.loop(f"for l in range({lanes})", ("l",)):
            w.line("d = d0 + l")
            w.define("d")
            w.line(f"slane[l] += {q_at('d')} * {k_at('d')}")
    half = lanes // 2
    while half:
        with em.loop(f"for l in range({half})", ("l",)):
            w.line(f"slane[l] += slane[l + {half}]")
        half //= 2
    w.line("s = slane[0]")


def array_row(em: Emitter, nid: int, idx: tuple[str, ...], condition=None, through: frozenset = frozenset()):
    """Where the row that node `nid` reads along the axis marked ":" in `idx` lies: ("row", aN, "i, j, ..."),
    an operand array and the index of its leading axes, the row its last axis; or (cond, a, b), row a when
    `cond` holds else row b, for a choice per row (a concat of past and new keys, `where(is_new, k, cache)`).
    When `nid` is float32 arrays seen through permutes, expands, reshapes that keep the row whole and such
    choices, and the row is a multiple of 16 long (`simd.row_intrinsics`); else None (the caller's loop
    reads the node element by element). `condition(node, index)` writes a choice's condition (default
    `em.value`: into the kernel). A choice in `through` (node ids) is read as its second operand, the
    caller having accounted for its first (`attention_flash.decode_keys`: values zeroed after a position)."""
    g = em.g
    n = g.nodes[nid]
    mark = idx.index(":")
    if nid in em.arrays:
        if n.dtype != "f32" or mark != len(idx) - 1 or len(n.shape) < 2:
            return None
        if not isinstance(n.shape[-1], int) or n.shape[-1] % 16:
            return None
        return "row", em.arrays[nid], ", ".join("0" if d == 1 else i for d, i in zip(n.shape[:-1], idx[:-1]))
    if n.op in ("permute", "expand", "reshape"):
        src = g.nodes[n.args[0]].shape
        if n.op == "permute":
            inner = ["0"] * len(idx)
            for out_axis, in_axis in enumerate(n.attr("perm")):
                inner[in_axis] = idx[out_axis]
            return array_row(em, n.args[0], tuple(inner), condition, through)
        if n.op == "expand":
            return None if src[mark] == 1 else array_row(em, n.args[0], _operand_index(src, idx), condition, through)
        tail = len(idx) - mark  # a reshape of the axes before the row's, the row's axis and those after kept
        if len(src) < tail or tuple(src[-tail:]) != tuple(n.shape[-tail:]):
            return None
        lead = tuple(reshape_index(idx[:-tail], n.shape[:-tail], src[:-tail]))
        return array_row(em, n.args[0], lead + idx[-tail:], condition, through)
    if n.op == "concat" and len(n.args) == 2 and n.attr("axis") != mark:
        ax, split = n.attr("axis"), g.nodes[n.args[0]].shape[n.attr("axis")]
        after = idx[:ax] + (f"({idx[ax]}) - {split}",) + idx[ax + 1:]
        a, b = array_row(em, n.args[0], idx, condition, through), array_row(em, n.args[1], after, condition, through)
        return (f"({idx[ax]}) < {split}", a, b) if a and b else None
    if n.op == "where" and nid in through:
        return array_row(em, n.args[2], _operand_index(g.nodes[n.args[2]].shape, idx), condition, through)
    if n.op == "where":
        cond, x, y = (g.nodes[a] for a in n.args)
        rank = len(n.shape)
        if any(len(o.shape) < rank - mark or o.shape[mark - rank] == 1 for o in (x, y)):
            return None  # an operand broadcast along the row: not a row
        if len(cond.shape) >= rank - mark and cond.shape[mark - rank] != 1:
            return None  # the choice changes along the row
        a, b = (array_row(em, o, _operand_index(g.nodes[o].shape, idx), condition, through) for o in n.args[1:])
        if not (a and b):
            return None
        at = _operand_index(cond.shape, tuple("0" if i == ":" else i for i in idx))
        return (condition or em.value)(n.args[0], at), a, b
    return None


def row_leaves(row) -> list[tuple[str, str, str]]:
    """The plain rows ("row", aN, index) a row of `array_row` may be, whatever its choices."""
    if row[0] == "row":
        return [row]
    return row_leaves(row[1]) + row_leaves(row[2])


def _operand_index(shape, idx: tuple[str, ...]) -> tuple[str, ...]:
    """The index into an operand of `shape` broadcast to an index `idx` of its user (trailing axes)."""
    sub = idx[len(idx) - len(shape):] if shape else ()
    return tuple(i if i == ":" or d != 1 else "0" for d, i in zip(shape, sub))


def row_call(row, call) -> str:
    """`call(args)` for the rows of `row` (`_array_row`), a conditional expression where they are chosen."""
    if row[0] == "row":
        return call(f"{row[1]}, ({row[2]},)")
    return f"({row_call(row[1], call)} if {row[0]} else {row_call(row[2], call)})"
