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
        fixed = {u for i, n in enumerate(self.nodes) if n.op == "kernel" for u in [i] + self.users[i]}
        # views and weights whose value must exist in memory: returned, or read by an existing kernel
        self.pinned = {i for i, n in enumerate(self.nodes) if (self.copied[i] or self.kind(i) == "layout")
                       and (i in self.outputs or any(u in fixed for u in self.users[i]))}

    # --- what a node is ---------------------------------------------------------------------------------

    def kind(self, i: int) -> str:
        return OPS[self.nodes[i].op]

    def transparent(self, i: int) -> bool:
        """Copied into every body that reads it: a floating view, or a param/const/iota (and views of them)."""
        return i not in self.group_of and i not in self.pinned and (self.copied[i] or self.kind(i) == "layout")

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
        """The nodes reading `i`, looking through floating views."""
        out: set[int] = set()
        for u in self.users[i]:
            out |= self.readers(u) if self.transparent(u) else {u}
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
        stack = [(u, False) for m in src for u in self.users[m] if u not in src]
        seen: set[tuple[int, bool]] = set()
        while stack:
            u, through = stack.pop()
            if u in dst:
                if through:
                    return True
                continue
            group = self.group_of.get(u)
            key = (min(group.members) if group else u, through)  # a group is entered once
            if key in seen:
                continue
            seen.add(key)
            through = through or not self.transparent(u)
            stack.extend((w, through) for m in (group.members if group else (u,)) for w in self.users[m]
                         if w not in src)
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
    if n.op == "matmul":  # horizontal: the same left operand, a right operand not computed here
        return n.args[0] == group.info["lhs"] and not _consumes(plan, group, node)
    if _consumes(plan, group, node):  # the pointwise epilogue
        return plan.kind(node) in ("elementwise", "layout")
    return plan.row_local(node, group.info["k"])  # the row-wise prologue over A's [M, K]


def _attention_form(plan: Plan, group: Group, node: int) -> bool:
    return _consumes(plan, group, node) and plan.kind(node) in ("elementwise", "layout")  # the epilogue


def _reduce_depth(plan: Plan, group: Group, node: int, memo: dict[int, int]) -> int:
    """Reductions on the longest chain inside the group that ends at `node`."""
    if node not in memo:
        below = [_reduce_depth(plan, group, e, memo) for e in plan.operands(node) if e in group.members]
        memo[node] = max(below, default=0) + (plan.kind(node) == "reduce")
    return memo[node]


def _reduce_form(plan: Plan, group: Group, node: int) -> bool:
    n, domain, reduced = plan.nodes[node], group.info["domain"], group.info["reduced"]
    if plan.kind(node) == "reduce":
        return (plan.nodes[n.args[0]].shape == domain and n.attr("axes") == group.info["axes"]
                and n.attr("keepdim") == group.info["keepdim"]
                and _reduce_depth(plan, group, node, {}) <= MAX_REDUCE_DEPTH)
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


# --- the rules, in priority order -------------------------------------------------------------------------

def decide(graph: Graph) -> Plan:
    """Phase one of fusion: put every node some kernel must compute into exactly one group."""
    plan = Plan(graph)
    for i, n in enumerate(graph.nodes):  # existing kernels (a graph fused before) stay as they are
        if n.op == "kernel":
            plan.new_group("fixed", [i] + [u for u in plan.users[i] if plan.nodes[u].op == "result"])
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
    region = {i for i in range(s + 1, lhs + 1) if plan.anc[i] >> s & 1 and (i == lhs or plan.anc[lhs] >> i & 1)}
    if any(i in plan.group_of or not plan.row_local(i, S.shape[-1]) for i in region):
        return None
    inside = region | {s, o}
    if any(i in plan.outputs or not set(plan.users[i]) <= inside for i in region | {s}):  # probabilities used elsewhere
        return None
    members = inside | _operand_closure(plan, (S.args[0], S.args[1], O.args[1]), inside)
    return None if plan.reaches(members, members) else members


def _operand_closure(plan: Plan, roots: Iterable[int], inside: set[int]) -> set[int]:
    """Scale-like ops on the way to Q, K and V (one activation operand, the rest constants): applied to
    each tile as it is loaded, rather than written out, expanded for every query head."""
    closure: set[int] = set()
    stack = list(roots)
    while stack:
        x = stack.pop()
        n = plan.nodes[x]
        if x in inside or x in closure or x in plan.group_of or plan.copied[x] or n.op == "input":
            continue
        live = [a for a in n.args if not plan.copied[a]]
        if plan.kind(x) == "layout":
            stack.extend(live)
        elif plan.kind(x) == "elementwise" and len(live) == 1 and not plan.escapes(x, inside | closure):
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
            by_lhs[n.args[0]] = plan.new_group("matmul", [m], (m,), lhs=n.args[0], k=plan.nodes[n.args[0]].shape[-1])


def absorb_epilogue(plan: Plan, group: Group) -> None:
    """Greedily take elementwise readers of the group's values: bias, activation, RoPE, gating, residual."""
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
            if sum(plan.nodes[a].type.nbytes for a in new) < plan.nodes[c].type.nbytes:
                plan.remove(group, c)
                changed = True
                break


def absorb_prologue(plan: Plan, group: Group) -> None:
    """Take the producers of the shared left operand A that are row-local over A's [M, K] domain (a norm)
    and read by nothing outside the group; consumers before producers, so each sees all its readers."""
    heap, seen = [-group.info["lhs"]], set()
    while heap:
        x = -heappop(heap)
        if x in seen or plan.copied[x] or x in plan.group_of or not plan.compute(x):
            continue
        seen.add(x)
        if not plan.row_local(x, group.info["k"]):
            continue
        if plan.transparent(x) or (not plan.escapes(x, group.members) and plan.can_fuse(group, x)):
            if not plan.transparent(x):
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
                             and (not plan.escapes(e, group.members) or _consumes(plan, group, e))),
                            key=lambda e: (-plan.score(group, e), e))
            taken = next((e for e in ranked if plan.can_fuse(group, e)), None)
            if taken is None:
                break
            plan.add(group, taken, epilogue=plan.kind(taken) == "elementwise" and _consumes(plan, group, taken))
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
            plan.new_group("pointwise", [i])
        else:
            plan.add(group, i)
