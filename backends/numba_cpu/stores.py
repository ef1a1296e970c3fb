"""The loop nests that write a kernel's outputs element by element, shared by every kernel kind's emitter
(`codegen` for pointwise and row kernels, `gemm` and `attention` for their prologues and epilogues).

Below all of them in the import order: it needs only the scalar `Emitter`.
"""
from __future__ import annotations

import math

from fusec.backends.numba_cpu.expr import Emitter
from fusec.symbolic import upper


def emit_outputs(em: Emitter, outs: list[str], only: list[int] | None = None, parallel: bool = True) -> None:
    """Write each output element by element: a parallel loop over all but the last axis (flattened)."""
    body = em.g
    for k, o in enumerate(body.outputs):
        if only is not None and k not in only:
            continue
        emit_store(em, o, outs[k], body.nodes[o].shape, parallel=parallel)


def emit_store(em: Emitter, nid: int, out: str, shape: tuple[int, ...], fixed: dict[int, str] | None = None,
               parallel: bool = True, block: int = 0, convert: str = "", share: tuple[str, int] | None = None) -> None:
    """`out[idx] = convert(value(nid, idx))` over `shape`; axes in `fixed` take the given index expression.
    The outer loop is parallel when `parallel` and the loop nest is big enough to pay for the threads;
    with `block` (rows, a tile of the tiling pass) it runs over blocks of that many rows of the flattened
    outer axes, each block a parallel iteration (a row at a time otherwise). With `share` = (b, n), the
    store is emitted inside a parallel loop `for b in prange(n)` of the caller's and writes its b-th of n
    equal shares of the outer rows (`shared_stores`)."""
    fixed = fixed or {}
    free = [ax for ax in range(len(shape)) if ax not in fixed and shape[ax] != 1]
    idx = ["0" if shape[ax] == 1 else fixed.get(ax, "") for ax in range(len(shape))]
    store = (lambda v: f"{convert}({v})") if convert else (lambda v: v)
    if not free:
        em.w.line(f"{out}[{', '.join(idx)}] = {store(em.value(nid, tuple(idx)))}" if idx else
                  f"{out}[()] = {store(em.value(nid, ()))}")
        return
    *outer, last = free
    total = 1
    for ax in outer:
        total *= shape[ax]
    # small loops run on the calling thread (the tiling pass's `parallel_min`; a symbolic size counts at
    # its upper bound: prange over a few rows costs little)
    parallel = parallel and upper(total * shape[last]) >= em.tiles["parallel_min"]
    opened = []
    if outer:
        r = em.tmp("p")
        if share is not None:
            size = _share_size(em, total, share[1])
            opened.append(em.loop(f"for {r} in range({share[0]} * {size}, min({total}, {share[0]} * {size} + {size}))", (r,)))
        elif parallel and isinstance(total, int) and 0 < block < total:  # row blocks (a symbolic size: rows)
            b = em.tmp("b")
            opened.append(em.loop(f"for {b} in prange({-(-total // block)})", (b,)))
            opened[-1].__enter__()
            opened.append(em.loop(f"for {r} in range({b} * {block}, min({total}, {b} * {block} + {block}))", (r,)))
        else:
            loop = "prange" if upper(total) > 1 and parallel else "range"
            opened.append(em.loop(f"for {r} in {loop}({total})", (r,)))
        opened[-1].__enter__()
        stride = total
        for ax in outer:
            stride //= shape[ax]
            var = em.tmp("i")
            expr = f"({r} // {stride})" if stride != 1 else r
            em.w.line(f"{var} = {expr} % {shape[ax]}" if ax != outer[0] else f"{var} = {expr}")
            em.w.define(var)
            idx[ax] = var
    loop = "range" if outer or not parallel else "prange"
    # one loop over the last axis, a concat along it read through a branch: RoPE's rotate-half split into
    # two branch-free loops ran no faster and cost a QKV kernel ~0.5 s more of LLVM (the halves unrolled)
    j = em.tmp("j")
    with em.loop(f"for {j} in {loop}({shape[last]})", (j,)):
        idx[last] = j
        em.w.line(f"{out}[{', '.join(idx)}] = {store(em.value(nid, tuple(idx)))}")
    for blk in reversed(opened):
        blk.__exit__(None, None, None)


def shared_stores(em: Emitter, stores: list[tuple[int, str]], blocks: int | str) -> bool:
    """The outputs `stores` ((node, output array)) written by one parallel loop over `blocks` iterations (a
    number, or an expression of the size variables), each writing a share of every output's outer rows,
    instead of a parallel loop per output: the threads meet once after all of them (the Q, K and V of an
    attention projection with their RoPE). False, emitting nothing, unless there are two or more such
    outputs, each with outer rows and enough elements for the threads (the tiling pass's `parallel_min`; a
    symbolic size counts at its upper bound)."""
    shapes = [em.g.nodes[o].shape for o, _ in stores]
    if len(stores) < 2 or (isinstance(blocks, int) and blocks < 2):
        return False
    if any(len([d for d in shape[:-1] if d != 1]) == 0 or upper(math.prod(shape)) < em.tiles["parallel_min"]
           for shape in shapes):
        return False
    if not isinstance(blocks, int):
        count = em.tmp("n")
        em.w.line(f"{count} = {blocks}")
        em.w.define(count)
        blocks = count
    b = em.tmp("b")
    with em.loop(f"for {b} in prange({blocks})", (b,)):
        for (o, out), shape in zip(stores, shapes):
            emit_store(em, o, out, shape, share=(b, blocks))
    return True


def _share_size(em: Emitter, total, blocks: int | str) -> int | str:
    """Rows in each of `blocks` equal shares of `total` outer rows (the last share maybe short): a number,
    or a variable computed at run time when either is symbolic."""
    if isinstance(total, int) and isinstance(blocks, int):
        return -(-total // blocks)
    size = em.tmp("n")
    em.w.line(f"{size} = ({total} + {blocks} - 1) // {blocks}")
    em.w.define(size)
    return size


def emit_rows(em: Emitter, outs: list[str]) -> str:
    """A `reduce` kernel: a parallel loop over rows (the outer axes) and an inner loop over the last axis;
    each row's reductions do not depend on the inner index, so the writer computes them once per row."""
    emit_outputs(em, outs)
    return "rows"
