"""Rule-table rewriting (tinygrad's style): a table of `(pattern, fn)` rules applied to a fixed point.

A pattern is an op name or a tuple of op names. `fn(ctx, *args)` receives the rewrite context and the
ids of the node's operands in the graph being built, and returns the id of a replacement node (built
through `ctx.b` / `ctx.add`) or None when the rule does not apply. Rules are one-liners where possible:

    ("mul", lambda c, x, y: x if c.is_const(y, 1) and c.same_type(x) else None),  # x*1 -> x

`rewrite(graph, rules)` copies the nodes in order into a new `Builder` (so identical nodes are shared),
rewrites each new node until no rule applies, and prunes what the outputs no longer need.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence, Union

from fusec.errors import IRError
from fusec.ir import Builder, Graph, Node, TensorType

Pattern = Union[str, tuple[str, ...]]
RuleFn = Callable[..., "int | None"]
Rule = tuple[Pattern, RuleFn]

MAX_STEPS = 100  # rewrites of one node before we call the rule table cyclic


class Ctx:
    """What a rule sees: the builder `b`, the node being rewritten (`id`, `n`) and small helpers."""

    def __init__(self, b: Builder):
        self.b = b
        self.id = -1

    @property
    def n(self) -> Node:
        return self.b.nodes[self.id]

    def node(self, i: int) -> Node:
        return self.b.nodes[i]

    def type(self, i: int) -> TensorType:
        return self.b.nodes[i].type

    def same_type(self, i: int) -> bool:
        """True when node `i` has exactly the type of the node being rewritten (so it can replace it)."""
        return self.b.nodes[i].type == self.n.type

    def is_const(self, i: int, value: Any = None) -> bool:
        """True when node `i` is a splat constant (equal to `value`, when given)."""
        n = self.b.nodes[i]
        if n.op != "const" or n.attr("value") is None:
            return False
        return value is None or n.attr("value") == value

    def is_op(self, i: int, op: str) -> bool:
        return self.b.nodes[i].op == op

    def add(self, op: str, args: Iterable[int] = (), attrs: Mapping[str, Any] | None = None) -> int:
        """Add a node with its type inferred, keeping the origin of the node being rewritten."""
        return self.b.add(op, args, attrs, origin=self.n.origin)

    def const(self, value: Any, dtype: str, shape: tuple[int, ...]) -> int:
        return self.b.const(value, dtype, shape)


def _index(rules: Sequence[Rule]) -> dict[str, list[RuleFn]]:
    table: dict[str, list[RuleFn]] = {}
    for pattern, fn in rules:
        for op in (pattern,) if isinstance(pattern, str) else pattern:
            table.setdefault(op, []).append(fn)
    return table


def _apply(ctx: Ctx, table: dict[str, list[RuleFn]], node_id: int) -> int:
    """Rewrite node `node_id` until no rule applies; return the id of the final node."""
    for _ in range(MAX_STEPS):
        ctx.id = node_id
        n = ctx.n
        for fn in table.get(n.op, ()):
            new = fn(ctx, *n.args)
            if new is not None and new != node_id:
                if ctx.type(new) != n.type:
                    raise IRError(f"rewrite: a rule for {n.op} ({fn.__name__}) replaced a {n.type} by "
                                  f"%{new} = {ctx.node(new).op} : {ctx.type(new)}; a replacement keeps the type")
                node_id = new
                break
        else:
            return node_id
    raise IRError(f"rewrite: %{node_id} = {ctx.n.op} still changes after {MAX_STEPS} rewrites; "
                  "the rule table cycles")


def rewrite(graph: Graph, rules: Sequence[Rule]) -> Graph:
    """Copy `graph` through a Builder, rewriting every node to a fixed point of `rules`; prune the rest.

    Nodes keep their type and origin when copied. Since nodes are visited in topological order and each
    is rewritten after its operands reached their fixed point, one call reaches the fixed point of rules
    whose replacements are built from existing operands.
    """
    b = Builder(graph.tensors)
    ctx = Ctx(b)
    table = _index(rules)
    remap: list[int] = []
    for n in graph.nodes:
        new = b.add(n.op, (remap[a] for a in n.args), dict(n.attrs), n.type, n.origin)
        remap.append(_apply(ctx, table, new))
    return b.finish(remap[o] for o in graph.outputs)
