"""Fusion's lattice and legality: the groups the decide phase builds and what may join them.

`Plan` holds the graph, its users and the groups decided so far. `Plan.can_fuse(group, node)` says
whether a merge is legal: the node is in no group, the kernel kind's body form is kept (`FORMS`, after
`fusec.kernels`), and no path leaves the group and comes back through another kernel, so kernels stay a
DAG. `Plan.score(group, node)` says how good it is: the bytes that stop going through memory.

Layout nodes no group has claimed *float*: the build phase copies them as views into every body that
reads them, so they are transparent here (`operands`/`readers` look through them), as are `param`,
`const` and `iota` nodes and views of them. A view whose value must exist (returned, or read by an
existing kernel) is *pinned*: some kernel writes it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from heapq import heapify, heappop, heappush
from typing import Callable, Iterable

from fusec.ir import Graph
from fusec.opset import OPS, broadcast_shapes
from fusec.symbolic import upper
from fusec.passes.weights import dequantized

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


SMALL_INDEX_EXPRESSION = 1 << 16  # elements


class Plan:
    """The decide phase's state: the graph, its users and the groups decided so far."""

    def __init__(self, graph: Graph):
        self.graph, self.nodes = graph, graph.nodes
        self.users = graph.users()
        self.outputs = set(graph.outputs)
        self.groups: list[Group] = []
        self.group_of: dict[int, Group] = {}
        self._spans: list[tuple[int, int]] | None = None  # the groups' (first, last) member, sorted
        self.copied = [False] * len(self.nodes)  # params, consts and views (or casts) of them only
        self.weight = [False] * len(self.nodes)   # a param, or a view or cast of one
        self.index_only = [False] * len(self.nodes)  # computed from iotas and splat constants alone
        self.anc = [0] * len(self.nodes)          # ancestors of each node, as a bitset
        for i, n in enumerate(self.nodes):
            # a view, a cast (a bf16 weight widened as it is read) or an int8 weight's dequantization of
            # copied nodes is copied too
            view = self.kind(i) == "layout" or n.op == "cast" or dequantized(graph, i) is not None
            self.weight[i] = n.op == "param" or (view and bool(n.args) and all(self.weight[a] for a in n.args))
            self.index_only[i] = (n.op == "iota" or n.op == "const" and n.attr("value") is not None
                                  or OPS[n.op] == "elementwise" and bool(n.args)
                                  and all(self.index_only[a] for a in n.args))
            self.copied[i] = (n.op in COPIED or (view and all(self.copied[a] for a in n.args))
                              or self._small_index_expression(i))
            for a in n.args:
                self.anc[i] |= self.anc[a] | (1 << a)
        fixed = {u for i, n in enumerate(self.nodes) if n.op == "kernel" for u in [i] + self.users[i]}
        fixed |= {i for i, n in enumerate(self.nodes) if n.op == "extern"}  # torch fallbacks stay outside
        # views and weights whose value must exist in memory: returned, or read by an existing kernel
        self.pinned = {i for i, n in enumerate(self.nodes) if (self.copied[i] or self.kind(i) == "layout")
                       and (i in self.outputs or any(u in fixed for u in self.users[i]))}

    def _small_index_expression(self, i: int) -> bool:
        """A small elementwise function or lookup of index tables, weights and runtime inputs, like a decode
        step's `key_index == pos` or its rotary row `cos[pos]`: recomputed where it is read (a compare or a
        load per element) instead of being a kernel whose output every reader would load back."""
        n = self.nodes[i]
        if self.index_only[i] and n.args:
            # of any size: a mask of indices (causal, at run-time sizes) costs a compare per element where
            # it is read, never memory; and its reader sees what it hides (attention skips masked keys)
            return True
        if OPS[n.op] not in ("elementwise", "gather") or upper(n.type.numel) > SMALL_INDEX_EXPRESSION or not n.args:
            return False
        if OPS[n.op] == "gather" and self.weight[n.args[0]]:
            # rows of a weight (an embedding lookup) are data, the first layer's input: computed once by
            # a kernel of their own. Recomputed in their readers, they would make the first layer's kernels
            # differ from every other layer's, and keep that layer out of the loop (passes.loop).
            return False
        stored = [a for a in n.args if self.copied[a] and self.nodes[a].attr("value") is None]
        return bool(stored) and all(self.copied[a] or self.nodes[a].op == "input" for a in n.args)

    # --- what a node is ---------------------------------------------------------------------------------

    def kind(self, i: int) -> str:
        return OPS[self.nodes[i].op]

    def transparent(self, i: int) -> bool:
        """Copied into every body that reads it: a floating view, a param/const/iota or a view of one."""
        free = i not in self.group_of and i not in self.pinned
        return free and (self.copied[i] or self.kind(i) == "layout")

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
            last_axis = n.attr("axes") == (src.type.rank - 1,)
            return bool(n.attr("keepdim")) and last_axis and src.shape[-1:] == (k,)
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

    def consumes(self, group: Group, i: int) -> bool:
        """Does `i` read a value of `group` (an epilogue candidate, rather than a prologue one)?"""
        return bool(self.operands(i) & group.members)

    def escapes(self, i: int, members: set[int]) -> bool:
        return i in self.outputs or not self.readers(i) <= members

    def group_outputs(self, members: set[int]) -> list[int]:
        """Members whose value is needed outside: read by another kernel or returned."""
        return sorted(m for m in members if self.escapes(m, members))

    # --- legality and priority --------------------------------------------------------------------------

    def reaches(self, src: set[int], dst: set[int]) -> bool:
        """Is there a path from `src` to `dst` through a node that neither holds nor copies as a view?
        Entering a group continues from all its members: a kernel runs as a whole."""
        last = self._last_on_path(max(dst))
        stack = [(u, False) for m in src for u in self.users[m] if u not in src and u <= last]
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
                         if w not in src and w <= last)
        return False

    def _last_on_path(self, target: int) -> int:
        """The largest node id a path to `target` can pass through. Users come after their operands, so a
        path only goes back to smaller ids by entering a group with a member before where it entered;
        a node after the returned id (and every group it is in) lies wholly after `target` then, and no
        path from it comes back. Without this bound each `reaches` walked the rest of the graph: quadratic
        in the layers of a model."""
        if self._spans is None:  # (kept until a group changes: `add`, `remove`)
            self._spans = sorted((min(g.members), max(g.members)) for g in self.groups if g.members)
        last = target
        for lo, hi in self._spans:
            if lo > last:
                break
            last = max(last, hi)
        return last

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
        return upper(sum(self.nodes[v].type.nbytes for v in flows))  # a symbolic size: its upper bound

    # --- changing the plan ------------------------------------------------------------------------------

    def new_group(self, kind: str, members: Iterable[int], anchors: tuple[int, ...] = (), **info) -> Group:
        group = Group(kind, set(), anchors, info=info)
        self.groups.append(group)
        for m in members:
            self.add(group, m)
        return group

    def add(self, group: Group, node: int, epilogue: bool = False) -> None:
        self._spans = None
        group.members.add(node)
        self.group_of[node] = group
        if epilogue:
            group.epilogue.add(node)

    def remove(self, group: Group, node: int) -> None:
        self._spans = None
        group.members.discard(node)
        group.epilogue.discard(node)
        del self.group_of[node]

    def ordered_groups(self) -> list[Group]:
        """The groups in an order where every kernel comes after the kernels it reads (Kahn's algorithm)."""
        index = {id(g): k for k, g in enumerate(self.groups)}
        # `operands` leaves weights out (bodies copy them), but a pinned weight is written by its own
        # kernel, and a fixed node (an extern reading a conv weight) reads that value from the outer graph
        deps = {id(g): {id(self.group_of[e]) for m in g.members
                        for e in self.operands(m) | set(self.nodes[m].args)
                        if e in self.group_of and self.group_of[e] is not g} for g in self.groups}
        ready = [(min(g.members), index[id(g)]) for g in self.groups if not deps[id(g)]]
        heapify(ready)
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


# --- body forms per kernel kind (see fusec/kernels.py) ---------------------------------------------------

def joins_other_kernels(plan: Plan, group: Group, node: int) -> bool:
    """A view that also reads activations other kernels compute (a torch.stack of every layer's keys: a
    concat, floating or not) is no epilogue of one of them. Its other pieces go through memory anyway, and
    taking it would make the last layer's kernel differ from every other layer's, keeping that layer out
    of the loop (passes.loop)."""
    return plan.kind(node) == "layout" and not plan.operands(node) <= group.members


def _matmul_form(plan: Plan, group: Group, node: int) -> bool:
    n = plan.nodes[node]
    if n.op == "matmul":  # horizontal: the same left operand, a right operand not computed here
        return n.args[0] == group.info["lhs"] and not plan.consumes(group, node)
    if plan.consumes(group, node):  # the pointwise epilogue
        return plan.kind(node) in ("elementwise", "layout") and not joins_other_kernels(plan, group, node)
    return plan.row_local(node, group.info["k"])  # the row-wise prologue over A's [M, K]


def _attention_form(plan: Plan, group: Group, node: int) -> bool:
    return (plan.consumes(group, node) and plan.kind(node) in ("elementwise", "layout")  # the epilogue
            and not joins_other_kernels(plan, group, node))


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
    if plan.consumes(group, node):  # epilogue: domain- or reduced-shaped
        return plan.kind(node) == "elementwise" and n.shape in (domain, reduced)
    if plan.kind(node) not in ("elementwise", "gather"):
        return False
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
    "attention": _attention_form, "matmul": _matmul_form, "reduce": _reduce_form,
    "pointwise": _pointwise_form,
}
