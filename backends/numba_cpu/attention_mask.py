"""Which keys a row of scores can see: the bound a causal mask (constant, or a comparison of the key index
with a run-time position) puts on the key loop. Read by both attention paths (`attention.py`,
`attention_gemm.py`)."""

from __future__ import annotations

import numpy as np

from fusec.backends.numba_cpu.expr import Emitter


def key_limit(em: Emitter, x_id: int, row_idx: tuple[str, ...]) -> str | None:
    """The number of keys a row can see, as an expression, when X = where(mask, -inf, ...) hides every key
    after a row-dependent position: a constant causal mask (keys j > i + off), or a comparison of the key
    index with a runtime value (`key > pos`: keys after the decode position). None when no bound is known."""
    g = em.g
    x = g.nodes[x_id]
    if x.op != "where":
        return None
    cond_id, fill_id = x.args[:2]
    cond, fill = g.nodes[cond_id], g.nodes[fill_id]
    if fill.op != "const" or fill.attr("value") != float("-inf"):
        return None
    tq, tk = x.shape[-2], x.shape[-1]
    i = row_idx[-2]
    if cond.op == "const":
        off = causal_offset(g, cond, tq, tk)
        return None if off is None else f"min({tk}, {i} + {off + 1})"
    position = _position(em, cond, tk, row_idx)
    if position is None:
        return None
    bound, strict = position
    return f"max(0, min({tk}, int({bound}) {'+ 1' if strict else ''}))"


def last_seen_key(em: Emitter, x_id: int, row_idx: tuple[str, ...]) -> str | None:
    """The position p, as an expression, when X = where(key > p, -inf, ...) hides exactly the keys after an
    integer p (a decode step's position: key p is the last one a row sees when 0 <= p < keys), else None."""
    g = em.g
    x = g.nodes[x_id]
    if x.op != "where" or key_limit(em, x_id, row_idx) is None:
        return None
    cond = g.nodes[x.args[0]]
    position = _position(em, cond, x.shape[-1], row_idx)
    if position is None or not position[1] or not integer(g, cond.args[0 if cond.op == "lt" else 1]):
        return None
    return position[0]


def integer(g, nid: int) -> bool:
    return g.nodes[nid].dtype in ("i64", "i32", "i16", "i8", "u8")


def _position(em: Emitter, cond, tk, row_idx: tuple[str, ...]) -> tuple[str, bool] | None:
    """(b's value, strict) when `cond` compares the key index with b: key > b (strict) or key >= b."""
    g = em.g
    if cond.op not in ("gt", "lt", "ge", "le"):
        return None
    a, b = cond.args
    if cond.op in ("lt", "le"):  # b > a  is  a < b
        a, b = b, a
    if not is_key_index(g, a, tk) or g.nodes[b].shape[-1:] not in ((), (1,)):
        return None
    rank = len(g.nodes[b].shape)
    b_idx = tuple("0" if d == 1 else ix for d, ix in zip(g.nodes[b].shape, row_idx[len(row_idx) - rank:]))
    return em.value(b, b_idx), cond.op in ("gt", "lt")


def is_key_index(g, nid: int, tk: int) -> bool:
    """Node `nid` holds the key index j at every position (an iota or a constant arange on the last axis)."""
    n = g.nodes[nid]
    if n.shape[-1:] != (tk,) or any(d != 1 for d in n.shape[:-1]):
        return False
    if n.op == "reshape":  # an arange viewed as [1, T] (a causal mask built at run time: symbolic sizes)
        return is_key_index(g, n.args[0], tk)
    return key_index_axis(g, nid, tk) == len(n.shape) - 1


def key_index_axis(g, nid: int, tk: int) -> int | None:
    """The axis along which node `nid` holds the key index 0..tk-1 (an iota or a constant arange, every
    other axis of size 1), else None."""
    n = g.nodes[nid]
    axes = [ax for ax, d in enumerate(n.shape) if d != 1] or [len(n.shape) - 1]
    if not n.shape or len(axes) != 1 or n.shape[axes[0]] != tk:
        return None
    if n.op == "iota" and n.attr("axis") == axes[0] and n.attr("start", 0) == 0 and n.attr("step", 1) == 1:
        return axes[0]
    if n.op == "const" and n.attr("key") is not None and np.array_equal(
            np.asarray(g.tensors[n.attr("key")]).reshape(-1), np.arange(tk)):
        return axes[0]
    return None


def causal_offset(g, cond, tq: int, tk: int) -> int | None:
    """`off` when a constant mask hides exactly the keys j > i + off of every query row i."""
    mask = np.asarray(g.tensors[cond.attr("key")]) if cond.attr("key") is not None else None
    if mask is None or mask.ndim < 2 or mask.shape[-2:] != (tq, tk) or mask.size != tq * tk:
        return None
    mask = mask.reshape(tq, tk)
    off = int(np.argmax(mask[0])) - 1 if mask[0].any() else tk - 1
    want = np.arange(tk)[None, :] > (np.arange(tq)[:, None] + off)
    return off if np.array_equal(mask, want) else None
