"""Layout: which side of a transpose is stored, decided once, so that attention's inner loops are contiguous.

The Numba backend's attention kernel runs S = Q.K^T as a dot product over the head depth d for every key
j, and O = P.V as a sum over keys of p_j * V[j, :] for every output column e: its innermost loops walk d
in K and e in V. Both are contiguous when K and V are stored [.., key, depth] row-major. A model that
transposes K before the score matmul (GPT-2 style `k.permute(0, 2, 3, 1)` then `q @ k`) gets, after
fusion, a projection kernel that stores K^T [.., d, t] (its writes stride by T along the innermost loop)
and an attention kernel that reads it back with stride T inside the dot product: both sides strided, for
a transpose that was never needed in memory.

`choose_layout(graph)` expects a verified fused graph and guarantees one that computes the same outputs,
where every attention kernel has a `layout` attr: ((operand, decision), ...) for "k" and "v", decision
one of
- "as stored": the operand's read axis is already its stored last axis (nothing changes);
- "transposed at store": the operand is a kernel's output that only kernels read; that kernel now stores
  it permuted so the read axis is last (a `permute` ends its body), and every kernel reading it undoes
  the permute as a free view at its input (a `permute` right after the `input` in its body);
- "strided: <why>": it stays strided (a graph input or output, whose layout the caller owns; a value read
  outside kernels; or a view this pass cannot follow).
Only the layout of intermediates between kernels changes; the outer types of those values follow. A
second run changes nothing (every decision is then "as stored").
"""
from __future__ import annotations

import math

import numpy as np

from fusec.ir import Builder, Graph, Node, TensorType, output_types
from fusec.opset import OPS
from fusec.symbolic import upper

VIEWS = ("reshape", "permute", "expand", "slice")  # a slice keeps its axes (and their strides)


def choose_layout(graph: Graph) -> Graph:
    """Store the K and V operands of every attention kernel with their read axis last (module docstring)."""
    users = graph.users()
    outputs = set(graph.outputs)
    plans: dict[tuple[int, int], tuple[int, ...]] = {}   # (producer kernel, output index) -> stored perm
    decisions: dict[int, tuple[tuple[str, str], ...]] = {}
    for i, n in enumerate(graph.nodes):
        if n.op != "kernel" or n.attr("kind") != "attention" or len(n.attr("anchors") or ()) != 2:
            continue
        body = n.attr("body")
        s_id, o_id = n.attr("anchors")
        wanted = (("k", body.nodes[s_id].args[1], -2), ("v", body.nodes[o_id].args[1], -1))
        decided = []
        for name, rhs, axis in wanted:
            decided.append((name, _decide(graph, users, outputs, plans, n, rhs, axis)))
        decisions[i] = tuple(decided)
    if not decisions:
        return graph
    return _rebuild(graph, plans, decisions)


def _decide(graph: Graph, users, outputs, plans, kernel: Node, rhs: int, axis: int) -> str:
    """The decision for the operand(s) body node `rhs` reads, along its axis `axis`; records the permute
    each producer should store its output with in `plans`."""
    body = kernel.attr("body")
    reads = _stored_axes(body, rhs, axis, [])
    if not reads or None in reads:
        return "strided: a view this pass cannot follow"
    verdicts = set()
    for x, ax in reads:
        rank = len(body.nodes[x].shape)
        if ax == rank - 1:
            verdicts.add("as stored")
            continue
        operand = kernel.args[body.nodes[x].attr("index")]
        perm = tuple(a for a in range(rank) if a != ax) + (ax,)
        source = _producer(graph, operand)
        if source is None or operand in outputs:
            verdicts.add("strided: a graph input or output, or a view of one (its layout is the caller's)")
        elif any(graph.nodes[u].op != "kernel" for u in users[operand]):
            verdicts.add("strided: read outside kernels")
        elif plans.setdefault(source, perm) != perm:
            verdicts.add("strided: another kernel reads it along another axis")
        else:
            verdicts.add("transposed at store")
    return "; ".join(sorted(verdicts))


def _producer(graph: Graph, value: int) -> tuple[int, int] | None:
    """(kernel, output index) that computes outer value `value`, when a kernel does."""
    n = graph.nodes[value]
    if n.op == "kernel":
        return value, 0
    if n.op == "result" and graph.nodes[n.args[0]].op == "kernel":
        return n.args[0], n.attr("index")
    return None


def _stored_axes(body: Graph, node: int, axis: int, chain: list[Node]) -> list:
    """(body input, its axis) for every input whose values axis `axis` of body node `node` walks, through
    views (reshape, permute, expand, slice), concats and same-shape elementwise ops (operands broadcast along the axis, a
    mask or a scale, are not walked); None in the list for a read this cannot follow."""
    n = body.nodes[node]
    if n.op in VIEWS:
        return _stored_axes(body, n.args[0], axis, chain + [n])
    if n.op == "input":
        return [_input_axis(body, node, axis, chain)]
    if n.op == "concat":  # every operand keeps the axes (past and new keys of a decode step)
        return [r for a in n.args for r in _stored_axes(body, a, axis, chain)]
    if OPS[n.op] == "elementwise":
        return [r for a in n.args if body.nodes[a].shape == n.shape for r in _stored_axes(body, a, axis, chain)]
    if n.op in ("const", "iota"):
        return []
    return [None]


def _input_axis(body: Graph, x: int, axis: int, chain: list[Node]) -> tuple[int, int] | None:
    """(x, axis of input x) that axis `axis` of `chain` (views, outermost first) applied to x walks, when
    it is one whole axis of x all the way down; else None. A reshape keeps an axis whole when some axis of
    its operand has the same size and the same number of elements after it (sizes at their upper bounds:
    a wrong guess would only cost speed, never change a result, since the rewrite is exact)."""
    for n in chain:
        src = body.nodes[n.args[0]].shape
        if n.op == "permute":
            axis = n.attr("perm")[axis]
        elif n.op == "reshape":
            axis = _whole_axis(n.shape, axis, src)
            if axis is None:
                return None
    return x, axis % max(len(body.nodes[x].shape), 1)


def _whole_axis(shape: tuple, axis: int, src: tuple) -> int | None:
    """The axis of `src` that axis `axis` of its reshape to `shape` is, when it is one whole axis."""
    def after(dims, a):
        return math.prod(max(int(upper(d)), 1) for d in dims[a + 1:])
    axis %= len(shape)
    size, inner = max(int(upper(shape[axis])), 1), after(shape, axis)
    for b, d in enumerate(src):
        if max(int(upper(d)), 1) == size and after(src, b) == inner:
            return b
    return None


def _rebuild(graph: Graph, plans, decisions) -> Graph:
    """The graph with the planned producers storing permuted outputs, their readers undoing the permute
    at their inputs, and the attention kernels' `layout` attrs."""
    b = Builder(graph.tensors)
    new: list[int] = []
    stored: dict[int, tuple[int, ...]] = {}  # outer value -> perm it is now stored with
    for i, n in enumerate(graph.nodes):
        args = [new[a] for a in n.args]
        attrs, type = dict(n.attrs), n.type
        if i in decisions:
            attrs["layout"] = decisions[i]
        if n.op == "kernel":
            perms = {k: p for (src, k), p in plans.items() if src == i}
            views = {x: stored[a] for x, a in enumerate(n.args) if a in stored}
            if perms or views:
                body, anchors = _rewrite_body(n.attr("body"), n.attr("anchors") or (), perms, views)
                attrs["body"] = body
                if "anchors" in attrs:
                    attrs["anchors"] = anchors
                type = body.nodes[body.outputs[0]].type
                if 0 in perms:
                    stored[i] = perms[0]
        if n.op == "result" and (n.args[0], n.attr("index")) in plans:
            kernel = b.nodes[args[0]]
            type = output_types(kernel)[n.attr("index")]
            stored[i] = plans[(n.args[0], n.attr("index"))]
        new.append(b.add(n.op, args, attrs, type=type, origin=n.origin))
    return b.finish([new[o] for o in graph.outputs])


def _rewrite_body(body: Graph, anchors, perms: dict[int, tuple[int, ...]], views: dict[int, tuple[int, ...]]
                  ) -> tuple[Graph, tuple[int, ...]]:
    """`body` with output k stored through permute perms[k], and input x (stored permuted by views[x])
    viewed back through the inverse permute."""
    bb = Builder(body.tensors)
    local: dict[int, int] = {}
    for i, n in enumerate(body.nodes):
        if n.op == "input" and n.attr("index") in views:
            perm = views[n.attr("index")]
            stored = TensorType(tuple(n.shape[p] for p in perm), n.dtype)
            x = bb.add("input", (), dict(n.attrs), stored, n.origin)
            local[i] = bb.add("permute", [x], {"perm": tuple(int(a) for a in np.argsort(perm))}, n.type, n.origin)
        else:
            local[i] = bb.add(n.op, [local[a] for a in n.args], dict(n.attrs), n.type, n.origin)
    outs = [local[o] for o in body.outputs]
    for k, perm in perms.items():
        outs[k] = bb.add("permute", [outs[k]], {"perm": perm}, origin=body.nodes[body.outputs[k]].origin)
    return Graph(tuple(bb.nodes), tuple(outs), body.tensors), tuple(local[a] for a in anchors)
