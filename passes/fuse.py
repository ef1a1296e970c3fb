"""Fusion: group primitive ops into fused kernel nodes (TVM's decide-then-build; Inductor's can_fuse/score).

DECIDE (`passes.fusion_rules.decide`) assigns every compute node to one group over the op-kind lattice:
attention, then matmul (horizontal, epilogue, prologue), then reduce, then pointwise. BUILD (`build`)
turns each group into one `kernel` node following the contract in `fusec.kernels`: a self-contained
body whose `input` nodes a0, a1, ... are the kernel's operands (graph inputs and other kernels' values),
with its own copies of params, consts and of every floating view it reads, and whose outputs are the
group's values read outside it or returned.

`fuse` expects a verified (canonical) graph and guarantees a graph of `input`, `kernel` and `result`
nodes only, computing the same outputs; kernel nodes already present are left as they are, so a second
run changes nothing. `unfuse` is the unfused program (`fuse=False`): one `op` kernel per primitive op.
"""
from __future__ import annotations

from fusec.errors import FusecError
from typing import Callable

from fusec.ir import Builder, Graph, prune
from fusec.kernels import add_kernel, kernel_outputs
from fusec.opset import OPS
from passes.fusion_rules import Group, Plan, decide

__all__ = ["build", "decide", "fuse", "fusion_stats", "unfuse", "Plan", "Group"]


def fuse(graph: Graph) -> Graph:
    """Group every compute node of `graph` into fused kernels (see the module docstring)."""
    if all(OPS[n.op] in ("source", "kernel") and n.op not in ("param", "const", "iota") for n in graph.nodes):
        return graph  # nothing outside kernels: already fused
    return build(graph, decide(graph))


def build(graph: Graph, plan: Plan) -> Graph:
    """Phase two: one kernel node per group, in an order where each reads only what came before."""
    b = Builder(graph.tensors)
    new = {i: b.add("input", (), dict(graph.nodes[i].attrs), graph.nodes[i].type, graph.nodes[i].origin)
           for i in graph.inputs}
    for group in plan.ordered_groups():
        if group.fixed:
            for i in sorted(group.members):
                n = graph.nodes[i]
                new[i] = b.add(n.op, [new[a] for a in n.args], dict(n.attrs), n.type, n.origin)
            continue
        body, args, outs, anchors = _body(plan, group)
        origin = graph.nodes[min(group.anchors or group.members)].origin
        for o, k in zip(outs, add_kernel(b, group.kind, body, [new[a] for a in args], anchors, origin=origin)):
            new[o] = k
    return b.finish(new[o] for o in graph.outputs)


def _body(plan: Plan, group: Group, copy: Callable[[int], bool] | None = None
          ) -> tuple[Graph, list[int], list[int], tuple[int, ...]]:
    """The group's body graph, the outer ids of its operands and outputs, and its anchors in the body.
    `copy(x)` says which outside nodes the body recomputes (default: params, consts, floating views)."""
    copy = copy or (lambda x: plan.copied[x] or plan.transparent(x))
    nodes = plan.nodes
    bb = Builder(plan.graph.tensors)
    local: dict[int, int] = {}
    args: list[int] = []

    def get(x: int) -> int:
        if x not in local:
            n = nodes[x]
            if not copy(x):  # an activation: the kernel's next operand
                local[x] = bb.add("input", (), {"index": len(args), "name": f"a{len(args)}"}, n.type)
                args.append(x)
            else:  # a param/const/iota or a floating view: this body's own copy
                local[x] = bb.add(n.op, [get(a) for a in n.args], dict(n.attrs), n.type, n.origin)
        return local[x]

    for m in sorted(group.members):
        n = nodes[m]
        local[m] = bb.add(n.op, [get(a) for a in n.args], dict(n.attrs), n.type, n.origin)
    outs = plan.group_outputs(group.members)
    body = prune(Graph(tuple(bb.nodes), tuple(local[o] for o in outs), bb.tensors))
    if len(body.nodes) != len(bb.nodes):
        raise FusecError(f"fuse: the body of a {group.kind} kernel computes values it never uses")
    return body, args, outs, tuple(local[a] for a in group.anchors)


# --- the unfused program ----------------------------------------------------------------------------------

def unfuse(graph: Graph) -> Graph:
    """One `op` kernel per primitive op, every intermediate written to memory (the `fuse=False` program).

    A `reshape` stays a view node of the outer graph (reshaping a contiguous buffer is free); params,
    consts and views of them are copied into the bodies that read them (a weight read transposed in
    place is not an intermediate); existing kernel nodes are left alone.
    """
    plan = Plan(graph)
    b = Builder(graph.tensors)
    new: dict[int, int] = {}
    for i, n in enumerate(graph.nodes):
        if plan.copied[i] and i not in plan.outputs:
            continue
        if n.op in ("input", "kernel", "result") or (n.op == "reshape" and not plan.copied[i]):
            new[i] = b.add(n.op, [new[a] for a in n.args], dict(n.attrs), n.type, n.origin)
        else:
            group = Group("op", {i}, (i,) if OPS[n.op] in ("matmul", "reduce") else ())
            body, args, _, anchors = _body(plan, group, copy=lambda x: plan.copied[x])
            new[i] = add_kernel(b, "op", body, [new[a] for a in args], anchors, origin=n.origin)[0]
    return b.finish(new[o] for o in graph.outputs)


# --- what fusion saves ------------------------------------------------------------------------------------

def fusion_stats(graph: Graph) -> dict:
    """`kernels`: the number of kernel nodes. `intermediate_bytes`: the bytes of kernel outputs that
    another kernel reads (directly or through outer view nodes), each value counted once: what goes to
    memory only to be read back. Graph outputs nobody reads again and graph inputs do not count."""
    kernels = [i for i, n in enumerate(graph.nodes) if n.op == "kernel"]
    produced = {v for k in kernels for v in kernel_outputs(graph, k)}

    def source(i: int) -> int:  # through outer views (`reshape` in the unfused program)
        n = graph.nodes[i]
        return source(n.args[0]) if OPS[n.op] == "layout" and len(n.args) == 1 else i

    read = {source(a) for k in kernels for a in graph.nodes[k].args} & produced
    return {"kernels": len(kernels), "intermediate_bytes": sum(graph.nodes[v].type.nbytes for v in read)}


def describe(graph: Graph) -> list[tuple[str, dict[str, int]]]:
    """(kind, op counts of the body without its inputs) per kernel node, for summaries and tests."""
    out = []
    for n in graph.nodes:
        if n.op == "kernel":
            ops = {k: v for k, v in n.attr("body").ops().items() if k != "input"}
            out.append((n.attr("kind"), ops))
    return out

