"""Fusion: group primitive ops into fused kernel nodes (TVM's decide-then-build; Inductor's can_fuse/score).

DECIDE (`decide`) puts every compute node into one group, over the op-kind lattice, heaviest kind first:

1. attention  a matmul O whose left operand is a row region (elementwise ops, last-axis reductions, at
              least one: the softmax) over another matmul S of two activations: S, the region and O, plus
              constant scalings of their operands. GQA expands and K/V concats stay views in the body.
2. matmul     the remaining matmuls, those sharing a left operand horizontally in one group (Q/K/V,
              gate/up); then each group's pointwise epilogue (RoPE, SiLU*mul, residual) and the relayout
              its reader wants, then its row-wise prologue over the left operand's [M, K] domain (RMSNorm).
3. reduce     the remaining reductions with their elementwise producers and readers (a norm, a softmax).
4. pointwise  the rest, joining their producers' kernels greedily while all outputs keep one shape.

Every merge asks `Plan.can_fuse` and ranks by `Plan.score` (`passes.fusion_rules`). BUILD (`build`) turns
each group into one `kernel` node following the contract in `fusec.kernels`: a self-contained body whose
`input` nodes a0, a1, ... are the kernel's operands (graph inputs and other kernels' values), with its
own copies of params, consts and of every floating view it reads, and whose outputs are the group's
values read outside it or returned.

`fuse` expects a verified (canonical) graph and guarantees a graph of `input`, `kernel` and `result`
nodes only, computing the same outputs; kernel nodes already present are left as they are, so a second
run changes nothing. `unfuse` is the unfused program (`fuse=False`): one `op` kernel per primitive op.
"""
from __future__ import annotations

from heapq import heappop, heappush
from typing import Callable, Iterable

from fusec.errors import FusecError
from fusec.ir import Builder, Graph, prune
from fusec.kernels import add_kernel, kernel_outputs
from fusec.opset import OPS
from fusec.symbolic import upper
from fusec.passes.fusion_rules import COPIED, Group, Plan

__all__ = ["build", "decide", "describe", "fuse", "fusion_stats", "unfuse"]


def fuse(graph: Graph) -> Graph:
    """Group every compute node of `graph` into fused kernels (see the module docstring)."""
    if all(OPS[n.op] in ("source", "kernel") and n.op not in COPIED for n in graph.nodes):
        return graph  # nothing outside kernels: already fused
    graph = prune(graph)  # a dead node would make a kernel without outputs
    return build(graph, decide(graph))


# --- DECIDE: the rules, in priority order ----------------------------------------------------------------

def decide(graph: Graph) -> Plan:
    """Phase one of fusion: put every node some kernel must compute into exactly one group."""
    plan = Plan(graph)
    for i, n in enumerate(graph.nodes):  # existing kernels (a graph fused before) stay as they are
        if n.op == "kernel":
            plan.new_group("fixed", [i] + [u for u in plan.users[i] if plan.nodes[u].op == "result"])
        elif n.op == "extern":  # an op run by PyTorch (fusec.fallback): opaque, never fused
            plan.new_group("fixed", [i])
    attention_groups(plan)
    matmul_groups(plan)
    anchored = sorted((g for g in plan.groups if g.kind in ("attention", "matmul")), key=lambda g: g.anchors)
    for group in anchored:
        absorb_epilogue(plan, group)
        absorb_trailing_views(plan, group)
        trim(plan, group)
    for group in anchored:
        if group.kind == "matmul":
            absorb_prologue(plan, group)
    reduce_groups(plan)
    pointwise_groups(plan)
    left = [i for i in range(len(graph.nodes)) if plan.compute(i) and not plan.transparent(i)
            and i not in plan.group_of]
    assert not left, f"fusion left nodes outside every kernel: {left}"
    return plan


def attention_groups(plan: Plan) -> None:
    """O = matmul(P, V) where P is a row region over S = matmul(Q, K^T): one attention kernel."""
    for o, n in enumerate(plan.nodes):
        if n.op != "matmul" or o in plan.group_of:
            continue
        above = plan.anc[n.args[0]] | (1 << n.args[0])
        for s in range(n.args[0], -1, -1):  # the nearest matmul first
            if above >> s & 1 and plan.nodes[s].op == "matmul" and s not in plan.group_of:
                members = _attention_members(plan, s, o)
                if members is not None:
                    plan.new_group("attention", members, (s, o))
                    break


def _attention_members(plan: Plan, s: int, o: int) -> set[int] | None:
    S, O = plan.nodes[s], plan.nodes[o]
    if plan.copied[S.args[1]] or plan.copied[O.args[1]]:  # a weight: a chain of projections, not attention
        return None
    lhs = O.args[0]
    on_path = (i for i in range(s + 1, lhs + 1) if plan.anc[i] >> s & 1)  # after S and before O's operand
    region = {i for i in on_path if i == lhs or plan.anc[lhs] >> i & 1}
    if any(i in plan.group_of or not plan.row_local(i, S.shape[-1]) for i in region):
        return None
    if not any(plan.kind(i) == "reduce" for i in region):  # no softmax: two matmul kernels
        return None
    inside = region | {s, o}
    if any(i in plan.outputs or not set(plan.users[i]) <= inside for i in region | {s}):
        return None  # the probabilities are used elsewhere
    members = inside | _operand_closure(plan, (S.args[0], S.args[1], O.args[1]), inside)
    return None if plan.reaches(members, members) else members


def _operand_closure(plan: Plan, roots: Iterable[int], inside: set[int]) -> set[int]:
    """Scalings on the way to Q, K and V (an elementwise op of one activation and splat constants, like
    SDPA's q*sqrt(scale)): applied to each tile as it is loaded, rather than written out, expanded for
    every query head. A bias (a tensor) stays in the projection's epilogue."""
    closure: set[int] = set()
    stack = list(roots)
    while stack:
        x = stack.pop()
        n = plan.nodes[x]
        if x in inside or x in closure or x in plan.group_of or plan.copied[x] or n.op == "input":
            continue
        live = [a for a in n.args if plan.nodes[a].op != "const" or plan.nodes[a].attr("value") is None]
        if n.op == "where":  # a select of K/V rows by an index mask (decode's new row): as cheap to load
            live = [a for a in n.args if not plan.copied[a]]
        if plan.kind(x) == "layout":
            stack.extend(live)
        elif (plan.kind(x) == "elementwise" and (len(live) == 1 or n.op == "where")
              and not plan.escapes(x, inside | closure)):
            closure.add(x)
            stack.extend(live)
    return closure


def matmul_groups(plan: Plan) -> None:
    """The remaining matmuls, one group per shared left operand (Q/K/V, gate/up)."""
    by_lhs: dict[int, Group] = {}
    for m, n in enumerate(plan.nodes):
        if n.op != "matmul" or m in plan.group_of:
            continue
        group = by_lhs.get(n.args[0])
        if group is not None and plan.can_fuse(group, m):
            plan.add(group, m)
            group.anchors += (m,)
        else:
            lhs = n.args[0]
            by_lhs[lhs] = plan.new_group("matmul", [m], (m,), lhs=lhs, k=plan.nodes[lhs].shape[-1])


def absorb_epilogue(plan: Plan, group: Group) -> None:
    """Greedily take elementwise readers of the group's values (bias, activation, RoPE, gating, residual)
    and views of them that are returned; a view read by another kernel floats into that kernel instead."""
    while True:
        readers = {r for m in group.members for r in plan.readers(m)
                   if r not in plan.group_of and plan.kind(r) in ("elementwise", "layout")}
        ranked = sorted(readers, key=lambda r: (-plan.score(group, r), r))
        taken = next((r for r in ranked if plan.can_fuse(group, r)), None)
        if taken is None:
            return
        plan.add(group, taken, epilogue=True)


def absorb_trailing_views(plan: Plan, group: Group) -> None:
    """Write a value in the layout its reader wants: take the reshapes and permutes its only reader
    starts, up to the last permute (all of them when they end in a graph output). Expands, slices and
    concats stay views in the reader, so a GQA expand is never materialized."""
    for m in plan.group_outputs(group.members):
        chain, x = [], m
        while len(plan.users[x]) == 1 and x not in plan.outputs:
            x = plan.users[x][0]
            if x in plan.group_of or plan.nodes[x].op not in ("reshape", "permute"):
                break
            chain.append(x)
        ends = [k for k, v in enumerate(chain) if plan.nodes[v].op == "permute" or v in plan.outputs]
        for v in chain[: ends[-1] + 1] if ends else ():
            plan.add(group, v, epilogue=True)


def trim(plan: Plan, group: Group) -> None:
    """Give back absorbed readers that only cost: a leaf read outside whose operands are read outside
    anyway adds an output and saves none (the `x*x` of the next RMSNorm belongs to that norm)."""
    changed = True
    while changed:
        changed = False
        outputs = set(plan.group_outputs(group.members))
        for c in sorted(group.epilogue, reverse=True):
            if c in plan.outputs or plan.readers(c) & group.members:
                continue
            new = {a for a in plan.operands(c) if a in group.members and a not in outputs}
            if upper(sum(plan.nodes[a].type.nbytes for a in new)) < upper(plan.nodes[c].type.nbytes):
                plan.remove(group, c)
                changed = True
                break


def absorb_prologue(plan: Plan, group: Group) -> None:
    """Take the producers of the shared left operand A that are row-local over A's [M, K] domain (a norm)
    and read by nothing outside the group; consumers before producers, so each sees all its readers."""
    heap, seen = [-group.info["lhs"]], set()
    while heap:
        x = -heappop(heap)
        if x in seen or x in plan.group_of or not plan.compute(x) or not plan.row_local(x, group.info["k"]):
            continue
        seen.add(x)
        if not plan.transparent(x):  # a floating view on the way is copied, not taken
            if plan.escapes(x, group.members) or not plan.can_fuse(group, x):
                continue
            plan.add(group, x)
        for a in plan.nodes[x].args:
            heappush(heap, -a)


def reduce_groups(plan: Plan) -> None:
    """Each remaining reduction with its elementwise producers and readers, and reductions of the same
    rows (softmax's max and sum, LayerNorm's mean and variance)."""
    for r, n in enumerate(plan.nodes):
        if plan.kind(r) != "reduce" or r in plan.group_of:
            continue
        group = plan.new_group("reduce", [r], (r,), domain=plan.nodes[n.args[0]].shape, reduced=n.shape,
                               axes=n.attr("axes"), keepdim=n.attr("keepdim"))
        while True:
            near = {e for m in group.members for e in plan.operands(m) | plan.readers(m)}
            ranked = sorted((e for e in near if e not in plan.group_of and plan.compute(e)
                             and (not plan.escapes(e, group.members) or plan.consumes(group, e))),
                            key=lambda e: (-plan.score(group, e), e))
            taken = next((e for e in ranked if plan.can_fuse(group, e)), None)
            if taken is None:
                break
            plan.add(group, taken, epilogue=plan.kind(taken) == "elementwise" and plan.consumes(group, taken))
        trim(plan, group)
        group.anchors = tuple(sorted(m for m in group.members if plan.kind(m) == "reduce"))


def _needs_pointwise(plan: Plan, i: int) -> bool:
    return i not in plan.group_of and (i in plan.pinned or plan.kind(i) in ("elementwise", "gather"))


def pointwise_groups(plan: Plan) -> None:
    """The rest, each joining the best-scoring pointwise group of its producers when legal."""
    for i in range(len(plan.nodes)):
        if not _needs_pointwise(plan, i):
            continue
        producers = {id(g): g for e in sorted(plan.operands(i)) if (g := plan.group_of.get(e)) is not None
                     and g.kind == "pointwise"}
        ranked = sorted(producers.values(), key=lambda g: -plan.score(g, i))
        group = next((g for g in ranked if plan.can_fuse(g, i)), None)
        if group is None:
            group = plan.new_group("pointwise", [i])
        else:
            plan.add(group, i)
        for other in ranked:  # `i` may join its other producers' kernels to this one
            if other is not group:
                _merge_pointwise(plan, group, other)


def _merge_pointwise(plan: Plan, into: Group, other: Group) -> None:
    """Move `other`'s members into `into` when the union stays acyclic with one output shape."""
    if plan.reaches(into.members, other.members) or plan.reaches(other.members, into.members):
        return
    if len({plan.nodes[o].shape for o in plan.group_outputs(into.members | other.members)}) > 1:
        return
    plan.groups.remove(other)
    for m in other.members:
        plan.add(into, m)


# --- BUILD -----------------------------------------------------------------------------------------------

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
        ids = add_kernel(b, group.kind, body, [new[a] for a in args], anchors, origin=origin)
        new.update(zip(outs, ids))
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


# --- the unfused program ---------------------------------------------------------------------------------

def unfuse(graph: Graph) -> Graph:
    """One `op` kernel per primitive op, every intermediate written to memory (the `fuse=False` program).

    A `reshape` stays a view node of the outer graph (reshaping a contiguous buffer is free); params,
    consts and views of them are copied into the bodies that read them (a weight read transposed in
    place is not an intermediate); existing kernel nodes are left alone.
    """
    graph = prune(graph)
    plan = Plan(graph)
    b = Builder(graph.tensors)
    new: dict[int, int] = {}
    for i, n in enumerate(graph.nodes):
        if plan.copied[i] and i not in plan.outputs and i not in plan.pinned:  # pinned: read by an extern
            continue
        if n.op in ("input", "kernel", "result", "extern") or (n.op == "reshape" and not plan.copied[i]):
            new[i] = b.add(n.op, [new[a] for a in n.args], dict(n.attrs), n.type, n.origin)
        else:
            group = Group("op", {i}, (i,) if OPS[n.op] in ("matmul", "reduce") else ())
            body, args, _, anchors = _body(plan, group, copy=lambda x: plan.copied[x])
            new[i] = add_kernel(b, "op", body, [new[a] for a in args], anchors, origin=n.origin)[0]
    return b.finish(new[o] for o in graph.outputs)


# --- what fusion saves -----------------------------------------------------------------------------------

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
    return {"kernels": len(kernels),  # (symbolic sizes count at their upper bounds)
            "intermediate_bytes": upper(sum(graph.nodes[v].type.nbytes for v in read))}


def describe(graph: Graph) -> list[tuple[str, dict[str, int]]]:
    """(kind, op counts of the body without its inputs) per kernel node, for summaries and tests."""
    out = []
    for n in graph.nodes:
        if n.op == "kernel":
            ops = {k: v for k, v in n.attr("body").ops().items() if k != "input"}
            out.append((n.attr("kind"), ops))
    return out

