"""Fusion, phase one (DECIDE): which primitive ops go into which fused kernel.

Groups are decided over the op-kind lattice of `fusec.opset`, heaviest kind first (`PHASES`):

1. attention  a matmul O whose left operand is a row region (elementwise ops, last-axis reductions) over
              another matmul S of two activations: S, the region and O, plus scale-like ops on their operands.
2. matmul     the remaining matmuls, those sharing a left operand horizontally in one group; then each
              group's pointwise epilogue (and trailing relayout to the consumer's layout), then its
              row-wise prologue over the left operand's [M, K] domain (RMSNorm).
3. reduce     the remaining reductions with their elementwise producers and consumers (a norm, a softmax).
4. pointwise  the rest, merged with their producers greedily while all outputs keep one shape.

Every merge asks `Plan.can_fuse(group, node)` (legal: the node is free, the kind's form is kept, and no
path leaves the group and comes back, so kernels stay a DAG) and greedy choices follow `Plan.score`
(bytes that stop going through memory). Layout nodes not claimed by a group *float*: the build phase
copies them as views into every body that reads them, so they are transparent here; `param`/`const`/
`iota` and views of them are copied the same way. Existing kernel nodes are left alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from heapq import heappop, heappush
from typing import Callable, Iterable

from fusec.ir import Graph
from fusec.opset import OPS, broadcast_shapes

PHASES = ("attention", "matmul", "reduce", "pointwise")  # the order groups are decided in: priority
COPIED = ("param", "const", "iota")                      # sources every body holds its own copy of
MAX_REDUCE_DEPTH = 2  # a reduce kernel passes over a row at most twice (softmax: max then sum; LayerNorm)


@dataclass
class Group:
    """Outer node ids that become one kernel of `kind`; `anchors` fix its loop nest."""

    kind: str
    members: set[int]
    anchors: tuple[int, ...] = ()
    epilogue: set[int] = field(default_factory=set)  # absorbed consumers, which `trim` may give back
    info: dict = field(default_factory=dict)          # kind-specific: "k" (matmul), reduce domain and axes

    @property
    def fixed(self) -> bool:
        return self.kind == "fixed"  # an existing kernel node and its results: copied as they are


class Plan:
    """The decide phase's state: the graph, its users and the groups decided so far."""

    def __init__(self, graph: Graph):
        self.graph, self.nodes = graph, graph.nodes
        self.users = graph.users()
        self.outputs = set(graph.outputs)
        self.groups: list[Group] = []
        self.group_of: dict[int, Group] = {}
        self.copied = [False] * len(self.nodes)  # params, consts and views of them only
        self.anc = [0] * len(self.nodes)          # ancestors of each node, as a bitset
        for i, n in enumerate(self.nodes):
            self.copied[i] = n.op in COPIED or (self.kind(i) == "layout" and all(self.copied[a] for a in n.args))
            for a in n.args:
                self.anc[i] |= self.anc[a] | (1 << a)

    # --- what a node is ---------------------------------------------------------------------------------

    def kind(self, i: int) -> str:
        return OPS[self.nodes[i].op]

    def transparent(self, i: int) -> bool:
        """Copied into every body that reads it: a floating view, or a param/const/iota (and views of them)."""
        return i not in self.group_of and (self.copied[i] or self.kind(i) == "layout")

    def compute(self, i: int) -> bool:
        """A node some kernel has to compute (not a source, not an existing kernel)."""
        return self.kind(i) not in ("source", "kernel") and not self.copied[i]

    def row_local(self, i: int, k: int) -> bool:
        """Computable one row of a [..., k] domain at a time: elementwise, a reduction of the last axis
        (keepdim), or a reshape that keeps the last axis."""
        n = self.nodes[i]
        last = n.shape[-1] if n.shape else 1
        if self.kind(i) == "elementwise":
            return last in (k, 1)
        src = self.nodes[n.args[0]] if n.args else n
        if self.kind(i) == "reduce":
            return bool(n.attr("keepdim")) and n.attr("axes") == (src.type.rank - 1,) and src.shape[-1:] == (k,)
        return n.op == "reshape" and last == k and src.shape[-1:] == (k,)

    # --- edges through transparent nodes ----------------------------------------------------------------

    def operands(self, i: int) -> set[int]:
        """The nodes `i` reads, looking through floating views; params and consts are left out."""
        out: set[int] = set()
        for a in self.nodes[i].args:
            if self.copied[a]:
                continue
            out |= self.operands(a) if self.transparent(a) else {a}
        return out

    def readers(self, i: int) -> set[int]:
        """The nodes reading `i`, looking through floating views; -1 stands for a graph output reached
        through a view."""
        out: set[int] = set()
        for u in self.users[i]:
            if self.transparent(u):
                out |= self.readers(u) | ({-1} if u in self.outputs else set())
            else:
                out.add(u)
        return out

    def escapes(self, i: int, members: set[int]) -> bool:
        return i in self.outputs or not self.readers(i) <= members

    def group_outputs(self, members: set[int]) -> list[int]:
        """Members whose value is needed outside: read by another kernel or returned."""
        return sorted(m for m in members if self.escapes(m, members))

    # --- legality and priority --------------------------------------------------------------------------

    def reaches(self, src: set[int], dst: set[int]) -> bool:
        """Is there a path from `src` to `dst` through a node that neither holds nor copies as a view?
        Entering a group continues from all its members: a kernel runs as a whole."""
        limit, stack, seen = max(dst), [], set()

        def push(ids: Iterable[int], through: bool) -> None:
            stack.extend((u, through) for m in ids for u in self.users[m] if u not in src and u <= limit)

        push(src, False)
        while stack:
            u, through = stack.pop()
            if u in dst:
                if through:
                    return True
                continue
            if (u, through) in seen:
                continue
            seen.add((u, through))
            group = self.group_of.get(u)
            push(group.members if group else (u,), through or not self.transparent(u))
        return False

    def can_fuse(self, group: Group, node: int) -> bool:
        """Legal to put `node` into `group`: it is in no group, the kind's body form is kept, and the
        merged kernel neither feeds itself through another kernel nor is fed by one it feeds."""
        if node in self.group_of or node in group.members or group.fixed:
            return False
        if not FORMS[group.kind](self, group, node):
            return False
        return not (self.reaches(group.members, {node}) or self.reaches({node}, group.members))

    def score(self, group: Group, node: int) -> int:
        """Bytes that stop going through memory when `node` joins `group`: the values flowing between them."""
        flows = {a for a in self.operands(node) if a in group.members}
        if self.readers(node) & group.members:
            flows.add(node)
        return sum(self.nodes[v].type.nbytes for v in flows)

    # --- changing the plan ------------------------------------------------------------------------------

    def new_group(self, kind: str, members: Iterable[int], anchors: tuple[int, ...] = (), **info) -> Group:
        group = Group(kind, set(), anchors, info=info)
        self.groups.append(group)
        for m in members:
            self.add(group, m)
        return group

    def add(self, group: Group, node: int, epilogue: bool = False) -> None:
        group.members.add(node)
        self.group_of[node] = group
        if epilogue:
            group.epilogue.add(node)

    def remove(self, group: Group, node: int) -> None:
        group.members.discard(node)
        group.epilogue.discard(node)
        del self.group_of[node]

    def ordered_groups(self) -> list[Group]:
        """The groups in an order where every kernel comes after the kernels it reads (Kahn's algorithm)."""
        index = {id(g): k for k, g in enumerate(self.groups)}
        deps = {id(g): {id(self.group_of[e]) for m in g.members for e in self.operands(m)
                        if e in self.group_of and self.group_of[e] is not g} for g in self.groups}
        ready = [(min(g.members), index[id(g)]) for g in self.groups if not deps[id(g)]]
        order: list[Group] = []
        while ready:
            _, k = heappop(ready)
            order.append(self.groups[k])
            for g in self.groups:
                if id(self.groups[k]) in deps[id(g)]:
                    deps[id(g)].discard(id(self.groups[k]))
                    if not deps[id(g)]:
                        heappush(ready, (min(g.members), index[id(g)]))
        assert len(order) == len(self.groups), "fusion decided a cycle of kernels"
        return order


# --- body forms per kernel kind (see fusec/kernels.py) ----------------------------------------------------

def _consumes(plan: Plan, group: Group, node: int) -> bool:
    return bool(plan.operands(node) & group.members)


def _matmul_form(plan: Plan, group: Group, node: int) -> bool:
    n = plan.nodes[node]
    if n.op == "matmul":  # horizontal: the same left operand
        return n.args[0] == group.info["lhs"]
    if _consumes(plan, group, node):  # the pointwise epilogue
        return plan.kind(node) == "elementwise" or (plan.kind(node) == "layout" and len(n.args) == 1)
    return plan.row_local(node, group.info["k"])  # the row-wise prologue over A's [M, K]


def _attention_form(plan: Plan, group: Group, node: int) -> bool:
    n = plan.nodes[node]
    return _consumes(plan, group, node) and (plan.kind(node) == "elementwise"
                                             or (plan.kind(node) == "layout" and len(n.args) == 1))


def _reduce_depth(plan: Plan, group: Group, node: int) -> int:
    """Reductions on the longest chain inside the group ending at `node`."""
    below = max((_reduce_depth(plan, group, e) for e in plan.operands(node) if e in group.members), default=0)
    return below + (plan.kind(node) == "reduce")


def _reduce_form(plan: Plan, group: Group, node: int) -> bool:
    n, domain, reduced = plan.nodes[node], group.info["domain"], group.info["reduced"]
    if plan.kind(node) == "reduce":
        return (plan.nodes[n.args[0]].shape == domain and n.attr("axes") == group.info["axes"]
                and n.attr("keepdim") == group.info["keepdim"]
                and 1 + max((_reduce_depth(plan, group, e) for e in plan.operands(node) if e in group.members),
                            default=0) <= MAX_REDUCE_DEPTH)
    if plan.kind(node) != "elementwise":
        return False
    if _consumes(plan, group, node):  # epilogue: domain- or reduced-shaped
        return n.shape in (domain, reduced)
    try:  # prologue: broadcasts into the domain
        return broadcast_shapes(n.shape, domain) == domain
    except Exception:
        return False


def _pointwise_form(plan: Plan, group: Group, node: int) -> bool:
    if plan.kind(node) not in ("elementwise", "layout", "gather") and not plan.copied[node]:
        return False
    plan.add(group, node)  # try it: a view that joins stops being transparent
    shapes = {plan.nodes[o].shape for o in plan.group_outputs(group.members)}
    plan.remove(group, node)
    return len(shapes) <= 1


FORMS: dict[str, Callable[[Plan, Group, int], bool]] = {
    "attention": _attention_form, "matmul": _matmul_form, "reduce": _reduce_form, "pointwise": _pointwise_form,
}
