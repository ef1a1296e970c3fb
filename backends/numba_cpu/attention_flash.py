"""The generated side of the attention library call (`attention_block.flash_block_rows` / `_gemm`): what
differs per model, written into the kernel's thin parallel loop, the recurrence itself in the library.

Per (batch, head, query block) the kernel computes each row's key limit (the causal or decode-position
mask) into `lims`, hands the library the block's query rows and the keys' and values' rows, read in place
where they lie in one array row after row (`attention_gemm._in_place`) and else packed through their
views (grouped-query heads, past and new keys chosen per key), and the score's scale; the library writes
the block's output rows into `oacc`, which the kernel then stores through the output's views. Packed
values are only the seen keys': the kernel then checks the masked ones itself (`attention.py`).

Only a score expression the library computes takes this path: X = S / c, S * c (c a scalar constant) or S,
possibly under a mask that hides exactly the keys past each row's limit (a constant causal mask, or a
comparison of the key index with an integer position); other expressions keep the generated loops."""
from __future__ import annotations

from dataclasses import dataclass

from fusec.backends.numba_cpu.attention_gemm import KEY, _in_place
from fusec.backends.numba_cpu.attention_mask import integer, key_index_axis, key_limit, last_seen_key
from fusec.backends.numba_cpu.attention_rows import _operand_index, array_row
from fusec.backends.numba_cpu.expr import Emitter, _broadcast, literal
from fusec.symbolic import upper


def library_scale(em: Emitter, x_id: int, s_id: int, row_idx: tuple[str, ...]) -> tuple[str, bool] | None:
    """(the scale c as a float32 literal, whether X = S / c rather than S * c) when the library computes the
    score expression X from the scores S below each row's key limit (see the module's doc), else None."""
    g = em.g
    x = g.nodes[x_id]
    if x.op == "where":
        if not _mask_is_the_limit(em, x_id, row_idx):
            return None
        x_id, x = x.args[2], g.nodes[x.args[2]]
    if x.dtype != "f32" or tuple(x.shape[-2:]) != tuple(g.nodes[s_id].shape[-2:]):
        return None
    if _scores(g, x_id, s_id):
        return literal(1.0, "f32"), False
    if x.op not in ("div", "mul") or not any(_scores(g, a, s_id) for a in x.args):
        return None
    if x.op == "div" and not _scores(g, x.args[0], s_id):
        return None
    c = g.nodes[x.args[1] if _scores(g, x.args[0], s_id) else x.args[0]]
    if c.op != "const" or c.attr("key") is not None or c.shape not in ((), (1,) * len(c.shape)):
        return None
    return literal(c.attr("value"), "f32"), x.op == "div"


def _scores(g, nid: int, s_id: int) -> bool:
    """Whether node `nid` is the scores S, possibly seen through reshapes of the (batch, head) axes."""
    while nid != s_id and g.nodes[nid].op == "reshape" and g.nodes[nid].shape[-2:] == g.nodes[s_id].shape[-2:]:
        nid = g.nodes[nid].args[0]
    return nid == s_id


def _mask_is_the_limit(em: Emitter, x_id: int, row_idx: tuple[str, ...]) -> bool:
    """Whether X = where(mask, -inf, Y) masks exactly the keys at and past the row's key limit, so that the
    library, which stops each row at its limit, need not read the mask: a constant causal mask, or a
    comparison of the key index with an integer (a float position would round where the limit is taken)."""
    g = em.g
    cond = g.nodes[g.nodes[x_id].args[0]]
    if key_limit(em, x_id, row_idx) is None:
        return False
    if cond.op == "const":
        return True
    return integer(g, cond.args[1] if cond.op in ("gt", "ge") else cond.args[0])


@dataclass(frozen=True)
class NewKey:
    """A decode step's keys and values: key j's row is the new one where j == `position`, else the cache's
    row j, and the mask hides the keys after `position`. The library then reads the cache's rows in place
    and takes the new key and value as its extra ones (`attention_block.flash_block_new`): the recurrence
    is not generated in the kernel (a decode attention kernel's compile went from ~2 s to ~0.5 s), and
    nothing is packed (packing the keys chosen per key made a stories15M step 5-20% slower)."""
    position: str
    keys: tuple      # (the new row, the cache's row of key KEY), `attention_rows.array_row` rows
    values: tuple
    zeroed: bool     # the values after the position are zeros (`_zeroed_after`): no row there to check


def decode_keys(em: Emitter, anchors: tuple[int, int], x_row: int, row_idx: tuple[str, ...], bidx) -> NewKey | None:
    """The decode step's keys of the attention `anchors` for the (batch, head) `bidx` (see `NewKey`), or
    None when K and V are not a choice per key between one new row and a cache row under that mask."""
    g = em.g
    s_id, o_id = anchors
    kv, vv, tk = g.nodes[s_id].args[1], g.nodes[o_id].args[1], g.nodes[s_id].shape[-1]
    position = last_seen_key(em, x_row, row_idx) if x_row is not None else None
    if position is None:
        return None
    lead = lambda nid: _broadcast(bidx, g.nodes[nid].shape[:-2])  # noqa: E731
    zeroed = _zeroed_after(em, vv, position, tk)
    through = frozenset(() if zeroed is None else (zeroed,))
    keys = _new_or_cached(em, lambda c: array_row(em, kv, lead(kv) + (":", KEY), c), position, tk)
    values = _new_or_cached(em, lambda c: array_row(em, vv, lead(vv) + (KEY, ":"), c, through), position, tk)
    return NewKey(position, keys, values, zeroed is not None) if keys and values else None


def _zeroed_after(em: Emitter, vv: int, position: str, tk) -> int | None:
    """The node where(key > position, 0, V') under the values `vv` (seen through reshapes and expands that
    keep its last two axes, keys and columns), when there is one: the keys after the position are masked,
    and their values zero, so no inf or nan there can reach the output (the generator's `DecodeStep`)."""
    g = em.g
    n = g.nodes[vv]
    while n.op in ("reshape", "expand") and g.nodes[n.args[0]].shape[-2:] == n.shape[-2:]:
        vv, n = n.args[0], g.nodes[n.args[0]]
    if n.op != "where" or len(n.shape) < 2:
        return None
    cond, zero = g.nodes[n.args[0]], g.nodes[n.args[1]]
    if zero.op != "const" or zero.attr("key") is not None or zero.attr("value") != 0.0 or cond.op not in ("gt", "lt"):
        return None
    key, other = cond.args if cond.op == "gt" else cond.args[::-1]
    axis = key_index_axis(g, key, tk)
    shape = g.nodes[key].shape
    if axis is None or len(shape) - axis != 2 or not integer(g, other) or any(d != 1 for d in g.nodes[other].shape):
        return None
    return vv if em.value(other, tuple("0" for _ in g.nodes[other].shape)) == position else None


def _new_or_cached(em: Emitter, row_of, position: str, tk) -> tuple | None:
    """(new row, cached row) when `row_of(condition)` (the row of key KEY) is the new row where the key
    index equals `position` and else the key's row of one array (`_in_place`), else None."""
    g = em.g
    chosen: list = []
    row = row_of(lambda nid, index: chosen.append((nid, index)) or "chosen")  # the choice, not written
    if not row or row[0] == "row" or len(chosen) != 1:
        return None
    _, new, cached = row
    if new[0] != "row" or KEY in new[2] or cached[0] != "row" or not _in_place(lambda _: cached):
        return None
    nid, index = chosen[0]
    cond = g.nodes[nid]
    if cond.op != "eq":
        return None
    for key, other in (cond.args, cond.args[::-1]):
        axis = key_index_axis(g, key, tk)
        if axis is None or not integer(g, other):
            continue
        shape = g.nodes[key].shape
        at = _operand_index(g.nodes[other].shape, index)
        if index[len(index) - len(shape) + axis].strip("()") == KEY and em.value(other, at) == position:
            return new, cached
    return None


def _one_row(row, count: str) -> str:
    """Row `row` (`array_row`'s ("row", array, index)) as a 2-d slice of `count` (0 or 1) rows."""
    lead, _, last = row[2].rpartition(", ")
    return f"{row[1]}[{lead + ', ' if lead else ''}{last}:{last} + {count}]"


def emit_library_call(em: Emitter, anchors: tuple[int, int], scale: tuple[str, bool], bidx, blocks: tuple,
                      limit, gemms: bool, new_key: NewKey | None = None) -> None:
    """The call of the library for rows i0..i1 of the (batch, head) `bidx`: `lims` each row's key limit,
    `oacc` its output rows. `blocks` = (q_block, kv_block). With `new_key`, the new key and value are the
    library's extra ones (`nx`: 1 when the mask keeps the new key, 0 when the position is past the keys)."""
    g, w = em.g, em.w
    (s_id, o_id), (q_block, kv_block) = anchors, blocks
    qv, kv = g.nodes[s_id].args
    vv = g.nodes[o_id].args[1]
    tk, depth, dv = g.nodes[s_id].shape[-1], g.nodes[qv].shape[-1], g.nodes[o_id].shape[-1]
    lead = lambda nid: _broadcast(bidx, g.nodes[nid].shape[:-2])  # noqa: E731
    w.line(f"lims = np.empty({q_block}, np.int64)")
    w.define("lims")
    if new_key is not None:
        w.line(f"nx = 1 if 0 <= int({new_key.position}) < {tk} else 0")
        w.define("nx")
    w.line("klim = 0")
    with em.loop("for i in range(i0, i1)", ("i",)):
        w.line(f"lims[i - i0] = {limit('i')}{' - nx' if new_key is not None else ''}")
        w.line("klim = max(klim, lims[i - i0])")
    q = _rows(em, qv, "qbuf", (q_block, depth), ("i0", "i1"),
              lambda r: array_row(em, qv, lead(qv) + (r, ":")), lambda r, d: em.value(qv, lead(qv) + (r, d)))
    if new_key is not None:
        (k_new, k_cached), (v_new, v_cached) = new_key.keys, new_key.values
        # the values' rows after the limit: all of them, checked for infs, unless they are zeroed
        k = _in_place(lambda _: k_cached, "0:klim")
        v = _in_place(lambda _: v_cached, "0:klim" if new_key.zeroed else f"0:{tk}")
        w.line(f"flash_block_new({q}, {k}, {v}, {_one_row(k_new, 'nx')}, {_one_row(v_new, 'nx')}, lims[:i1 - i0], "
               f"{scale[0]}, {scale[1]}, {kv_block}, oacc[:i1 - i0])")
        return
    k = _rows(em, kv, "kbuf", (upper(tk), depth), ("0", "klim"),
              lambda j: array_row(em, kv, lead(kv) + (":", j)), lambda j, d: em.value(kv, lead(kv) + (d, j)))
    # in place, every key's value row (the library checks the masked ones, `_masked_values`); packed, only
    # those of the keys a row sees (the kernel checks the others: a decode step's cache is mostly masked)
    span = ("0", str(tk)) if values_in_place(em, vv, bidx) else ("0", "klim")
    v = _rows(em, vv, "vbuf", (upper(tk), dv), span,
              lambda j: array_row(em, vv, lead(vv) + (j, ":")), lambda j, e: em.value(vv, lead(vv) + (j, e)))
    fn = "flash_block_gemm" if gemms else "flash_block_rows"
    w.line(f"{fn}({q}, {k}, {v}, lims[:i1 - i0], {scale[0]}, {scale[1]}, {kv_block}, oacc[:i1 - i0])")


def values_in_place(em: Emitter, vv: int, bidx) -> bool:
    """Whether the value rows lie in one array key after key (the library reads them in place)."""
    lead = _broadcast(bidx, em.g.nodes[vv].shape[:-2])
    return _views_of_an_array(em, vv) and bool(_in_place(lambda j: array_row(em, vv, lead + (j, ":"))))


def _rows(em: Emitter, node: int, buf: str, shape: tuple, span: tuple[str, str], row_of, at) -> str:
    """The rows span[0]..span[1] of an operand as a 2-d array expression: a slice of its array where they
    lie in one, row after row (`_in_place`); else packed into `buf` (allocated per parallel iteration)."""
    lo, hi = span
    inplace = _in_place(row_of, f"{lo}:{hi}") if _views_of_an_array(em, node) else ""
    if inplace:
        return inplace
    w = em.w
    w.line(f"{buf} = np.empty({shape}, np.float32)")
    w.define(buf)
    with em.loop(f"for x in range({lo}, {hi})", ("x",)):
        with em.loop(f"for d in range({shape[1]})", ("d",)):
            w.line(f"{buf}[x - {lo}, d] = {at('x', 'd')}")
    return f"{buf}[:{hi} - {lo}]"


def _views_of_an_array(em: Emitter, nid: int) -> bool:
    """Whether node `nid` is an operand array seen through views only (no choice per row): asking
    `array_row` where a row of a choice lies would write the choice's condition into the kernel."""
    while nid not in em.arrays:
        if em.g.nodes[nid].op not in ("permute", "expand", "reshape"):
            return False
        nid = em.g.nodes[nid].args[0]
    return True
