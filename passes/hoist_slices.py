"""Hoisting constant slices of kernel inputs out of kernel bodies, so that kernels differ only by operands.

Decode's attention kernel of layer i reads layer i of the stacked KV cache: inside its body,
`slice %a2 {axis=0, start=i, stop=i+1}` then a reshape. The layer index is then part of the body, so every
layer's kernel is another function to generate and compile. A slice with constant bounds whose result is
one contiguous piece of its operand (step 1, and the sliced axis is axis 0 or every axis before it has
size 1) is a free view outside the kernel, like a reshape: this pass moves such a slice, and the slices
and reshapes that follow it alone, into the outer graph, and the kernel takes the view as its operand.
Kernels that differ only in which piece they read then have equal bodies (see
`backends.numba_cpu.kernels`, which compiles each distinct body once).

A kernel whose whole body is such a view of its input (an unfused `slice` kernel) is replaced by the
outer view. `hoist_slices` expects a verified graph and guarantees one that computes the same outputs,
whose kernel bodies slice no input contiguously; a second run changes nothing.
"""
from __future__ import annotations

from typing import Callable

from fusec.ir import Builder, Graph, Node
from fusec.symbolic import upper

__all__ = ["hoist_slices", "hoist_product_rows", "is_contiguous_slice"]


def hoist_slices(graph: Graph) -> Graph:
    """Move contiguous constant slices of kernel inputs (and the views after them) out of every kernel."""
    if not any(n.op == "kernel" and _chain(n.attr("body")) for n in graph.nodes):
        return graph
    b = Builder(graph.tensors)
    new: dict[int, int] = {}
    for i, n in enumerate(graph.nodes):
        args = [new[a] for a in n.args]
        new[i] = (_hoisted(b, n, args, _chain, whole_view=True)[0] if n.op == "kernel" else
                  b.add(n.op, args, dict(n.attrs), n.type, n.origin))
    return b.finish(new[o] for o in graph.outputs)


def hoist_product_rows(graph: Graph) -> Graph:
    """Move a rank-2 reshape of a kernel input that only matmuls read as their rows (the attention output's
    heads, or the batch and token axes, reshaped to a matrix) out of every kernel, loop bodies included: a
    free view outside, and products that then differ only in K (the attention output's projection and the
    MLP's down projection) have one body (`backends.numba_cpu.kernels` compiles it once). Runs after
    `passes.loop`, which relates kernel operands to kernel outputs (not to views of them)."""
    b = Builder(graph.tensors)
    new: dict[int, int] = {}
    changed = False
    for i, n in enumerate(graph.nodes):
        args, attrs = [new[a] for a in n.args], dict(n.attrs)
        if n.op == "kernel":
            new[i], hoisted = _hoisted(b, n, args, _rows_chain)
            changed = changed or hoisted
            continue
        if n.op == "loop" and (body := hoist_product_rows(n.attr("body"))) is not n.attr("body"):
            attrs["body"], changed = body, True
        new[i] = b.add(n.op, args, attrs, n.type, n.origin)
    if not changed:
        return graph
    return Graph(tuple(b.nodes), tuple(new[o] for o in graph.outputs), b.tensors)


def _rows_chain(body: Graph) -> list[int] | None:
    """[the reshape] of the first input of the body reshaped to the rows of products (`hoist_product_rows`)."""
    users = body.users()
    for x in body.inputs:
        for r in users[x]:
            n = body.nodes[r]
            if (n.op == "reshape" and len(n.shape) == 2 and users[r]
                    and all(body.nodes[u].op == "matmul" and body.nodes[u].args[0] == r
                            and r not in body.nodes[u].args[1:] for u in users[r])):
                return [r]
    return None


def is_contiguous_slice(n: Node, operand_shape: tuple[int, ...]) -> bool:
    """A `slice` whose result is one contiguous piece of a contiguous operand (a view at an offset)."""
    if n.op != "slice":
        return False
    axis = n.attr("axis")
    return (n.attr("step") == 1 or upper(n.shape[axis]) <= 1) and all(d == 1 for d in operand_shape[:axis])


def _chain(body: Graph) -> list[int] | None:
    """The first hoistable chain of the body: a contiguous slice of an input, then the contiguous slices
    and reshapes that alone read it, as far as each has one reader. A chain never ends in one of several
    outputs (a kernel output is computed, never an operand)."""
    users = body.users()
    outputs = set(body.outputs)
    for x in body.inputs:
        for s in users[x]:
            if not is_contiguous_slice(body.nodes[s], body.nodes[x].shape):
                continue
            chain = [s]
            while chain[-1] not in outputs and len(users[chain[-1]]) == 1:
                u = users[chain[-1]][0]
                n = body.nodes[u]
                if n.op != "reshape" and not is_contiguous_slice(n, body.nodes[chain[-1]].shape):
                    break
                chain.append(u)
            if chain[-1] in outputs and len(body.outputs) > 1:
                chain.pop()
            if chain:
                return chain
    return None


def _hoisted(b: Builder, n: Node, args: list[int], find: Callable[[Graph], list[int] | None],
             whole_view: bool = False) -> tuple[int, bool]:
    """(id in `b`, whether anything moved) of kernel `n`, whose operands in `b` are `args`, rebuilt with
    every chain `find` finds in its body hoisted out (`_hoist`). With `whole_view`, a body that is all one
    chain (an unfused slice kernel) is replaced by the chain's view in the outer graph."""
    body, anchors, moved = n.attr("body"), n.attr("anchors") or (), False
    while (chain := find(body)) is not None:
        if whole_view and len(body.outputs) == 1 and chain[-1] == body.outputs[0]:
            return _outer_view(b, body, args, chain), True
        body, args, anchors = _hoist(b, body, args, anchors, chain)
        moved = True
    attrs = {**dict(n.attrs), "body": body}
    if "anchors" in attrs:
        attrs["anchors"] = tuple(anchors)
    return b.add("kernel", args, attrs, n.type, n.origin), moved


def _outer_view(b: Builder, body: Graph, args: list[int], chain: list[int]) -> int:
    """The chain's view, built in the outer graph from the kernel operand it starts at."""
    value = args[body.nodes[body.nodes[chain[0]].args[0]].attr("index")]
    for c in chain:
        n = body.nodes[c]
        value = b.add(n.op, [value], dict(n.attrs), n.type, n.origin)
    return value


def _hoist(b: Builder, body: Graph, args: list[int], anchors: tuple[int, ...], chain: list[int]
           ) -> tuple[Graph, list[int], tuple[int, ...]]:
    """The body without `chain`: its last node becomes an input, placed right after the input the chain
    reads (which goes when nothing else reads it). Returns the body, operands and anchors, renumbered."""
    root = body.nodes[chain[0]].args[0]
    end, inside = chain[-1], set(chain[:-1])
    users = body.users()
    root_used = any(u != chain[0] for u in users[root])
    order: list[tuple[int, int]] = []  # (body node that becomes an input, outer operand)
    for x in body.inputs:
        if x != root or root_used:
            order.append((x, args[body.nodes[x].attr("index")]))
        if x == root:
            order.append((end, _outer_view(b, body, args, chain)))
    index = {x: k for k, (x, _) in enumerate(order)}
    bb = Builder(body.tensors)
    local: dict[int, int] = {}
    for i, n in enumerate(body.nodes):
        if i in inside or (i == root and not root_used):
            continue
        if i in index:
            local[i] = bb.add("input", (), {"index": index[i], "name": f"a{index[i]}"}, n.type, n.origin)
        else:
            local[i] = bb.add(n.op, [local[a] for a in n.args], dict(n.attrs), n.type, n.origin)
    new_body = Graph(tuple(bb.nodes), tuple(local[o] for o in body.outputs), body.tensors)
    return new_body, [outer for _, outer in order], tuple(local[a] for a in anchors)
