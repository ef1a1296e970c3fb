"""Kernel looping: a run of identical layers becomes one `loop` node, so a backend can run every layer of
a decode step from one call into compiled code.

A decoder's fused program repeats the same few kernels per layer. They differ only in the weights they
read and in which piece of a stacked input they take (layer l's slice of the KV cache, an outer view since
`passes.hoist_slices`); the activations flow from one layer to the next. This pass finds the longest run
of consecutive, equal call sequences (kernels equal but for their parameter names, operands related alike
in every iteration) and replaces it by a `loop` node (see `fusec.verify` for its form):

- an operand computed by the previous iteration is *carried* (its value before the first iteration is
  the operand of the first);
- an operand that is row `c + l` of one outer value in iteration l is *sliced* (the loop reads rows
  c..c+trips of it);
- an operand that is the same outer value in every iteration is passed as it is;
- a value of an iteration that is used after the run is a per-iteration output, stacked on a new axis 0
  (users read its row, a free view), or the final carried value when it is carried and of the last
  iteration. A kernel that only stacks all those rows again (a `torch.stack` of every layer's keys)
  becomes a reshape of the stacked output.

Where layers differ (other widths, activations or kernels), the calls are not equal and nothing is
formed. `loop_kernels` expects a verified fused (or tiled) graph and guarantees one that computes the same
outputs; a graph with a loop already, or without a run of two equal iterations, is returned unchanged (so
a second run changes nothing).
"""
from __future__ import annotations

from fusec.ir import Builder, Graph, Node, TensorType

__all__ = ["loop_kernels"]

MIN_TRIPS = 2


def loop_kernels(graph: Graph) -> Graph:
    """Replace the longest run of equal consecutive layers by a loop node (see the module docstring)."""
    if any(n.op == "loop" for n in graph.nodes):
        return graph
    kernels = [i for i, n in enumerate(graph.nodes) if n.op == "kernel"]
    index: dict = {}
    sigs = [index.setdefault(_signature(graph.nodes[i]), len(index)) for i in kernels]
    for start, period, trips in _candidates(sigs):
        plan = _plan(graph, kernels[start: start + period * trips], period, trips)
        if plan is not None:
            return _fold_stacks(_rewrite(graph, plan))
    return graph


def _signature(n: Node) -> tuple:
    """What must be equal for two kernels to be one iteration's and another's: everything but the names
    of the params their bodies read (the operands are compared by `_plan`)."""
    body = n.attr("body")
    names: dict[str, str] = {}
    nodes = []
    for m in body.nodes:
        if m.op == "param":
            name = names.setdefault(m.attr("name"), f"w{len(names)}")
            m = Node(m.op, m.args, tuple((k, name if k == "name" else v) for k, v in m.attrs), m.type)
        nodes.append(m)
    return (tuple(nodes), body.outputs, tuple((k, v) for k, v in n.attrs if k != "body"), n.type)


def _candidates(sigs: list) -> list[tuple[int, int, int]]:
    """(start, period, trips) of every run of at least MIN_TRIPS equal call sequences, the ones covering
    the most kernels first (then the most trips)."""
    out = []
    n = len(sigs)
    for period in range(1, n // MIN_TRIPS + 1):
        for start in range(n - period * MIN_TRIPS + 1):
            trips = 1
            while (start + (trips + 1) * period <= n and
                   sigs[start + trips * period: start + (trips + 1) * period] == sigs[start: start + period]):
                trips += 1
            for t in range(trips, MIN_TRIPS - 1, -1):
                out.append((start, period, t))
    return sorted(out, key=lambda c: (-c[1] * c[2], -c[2], c[0]))


def _plan(graph: Graph, run: list[int], period: int, trips: int) -> dict | None:
    """How each operand of each kernel of the run relates to the iterations, or None when the run is not
    a loop (an operand that is neither internal, carried, invariant nor a row view)."""
    nodes = graph.nodes
    where: dict[int, tuple[int, int, int]] = {}  # outer id -> (iteration, kernel position, output index)
    for k, i in enumerate(run):
        t, j = divmod(k, period)
        where[i] = (t, j, 0)
    for i, n in enumerate(nodes):
        if n.op == "result" and n.args[0] in where:
            t, j, _ = where[n.args[0]]
            where[i] = (t, j, n.attr("index"))
    members = set(where)
    kinds: dict[tuple[int, int], tuple] = {}  # (kernel position, operand position) -> how
    for j in range(period):
        for a in range(len(nodes[run[j]].args)):
            ops = [nodes[run[t * period + j]].args[a] for t in range(trips)]
            kind = _classify(graph, where, ops, trips)
            if kind is None:
                return None
            kinds[j, a] = kind
    inits: dict[tuple[int, int], int] = {}
    for kind in kinds.values():  # one carried value has one initial value
        if kind[0] == "carried" and inits.setdefault(kind[1], kind[2]) != kind[2]:
            return None
    if not inits:  # nothing flows from one iteration to the next: not a chain of layers
        return None
    first = weights_of(graph, run[:period])
    rows = [weights_of(graph, run[t * period:(t + 1) * period]) for t in range(trips)]
    if any(_pattern(r) != _pattern(first) for r in rows):
        return None
    # nodes outside the run that read it (transitively) go after the loop; none may feed the run
    after = set()
    for i, n in enumerate(nodes):
        if i not in members and any(a in members or a in after for a in n.args):
            after.add(i)
    if any(a in after for i in run for a in nodes[i].args):
        return None
    return {"run": run, "period": period, "trips": trips, "where": where, "kinds": kinds, "inits": inits,
            "weights": [tuple(dict.fromkeys(r)) for r in rows], "after": after}


def weights_of(graph: Graph, kernels: list[int]) -> list[str]:
    """Param names the kernels read, in walk order, repeats included."""
    return [m.attr("name") for i in kernels for m in graph.nodes[i].attr("body").walk() if m.op == "param"]


def _pattern(names: list[str]) -> list[int]:
    first: dict[str, int] = {}
    return [first.setdefault(x, len(first)) for x in names]


def _classify(graph: Graph, where: dict, ops: list[int], trips: int) -> tuple | None:
    """How operand values `ops` (one per iteration) relate to the iterations."""
    at = [where.get(v) for v in ops]
    if all(w is not None and w[0] == t for t, w in enumerate(at)) and len({w[1:] for w in at}) == 1:
        return ("internal", at[0][1:])
    if at[0] is None and all(w is not None and w[0] == t - 1 for t, w in enumerate(at) if t) and \
            len({w[1:] for w in at[1:]}) == 1:
        return ("carried", at[1][1:], ops[0])
    if any(w is not None for w in at):
        return None
    if len(set(ops)) == 1:
        return ("invariant", ops[0])
    rows = [_row_view(graph, v) for v in ops]
    if any(r is None for r in rows) or len({(r[0], r[1] - t) for t, r in enumerate(rows)}) != 1:
        return None
    if len({graph.nodes[v].type for v in ops}) != 1:
        return None
    root, c = rows[0]
    if c + trips > graph.nodes[root].shape[0]:
        return None
    return ("sliced", root, c, graph.nodes[ops[0]].type)


def _row_view(graph: Graph, v: int) -> tuple[int, int] | None:
    """(root, row) when `v` is reshapes of the row `row` of `root` on axis 0 (slice of size 1, step 1)."""
    n = graph.nodes[v]
    while n.op == "reshape":
        v = n.args[0]
        n = graph.nodes[v]
    if n.op != "slice" or n.attr("axis") != 0 or n.attr("stop") != n.attr("start") + 1 or n.attr("step") != 1:
        return None
    return n.args[0], n.attr("start")


def _rewrite(graph: Graph, plan: dict) -> Graph:
    run, period, trips, where = plan["run"], plan["period"], plan["trips"], plan["where"]
    nodes = graph.nodes
    carried = list(plan["inits"])  # (kernel position, output index) of each carried value
    invariant = list(dict.fromkeys(k[1] for k in plan["kinds"].values() if k[0] == "invariant"))
    sliced = list(dict.fromkeys(k[1:3] for k in plan["kinds"].values() if k[0] == "sliced"))
    # values of an iteration read after the run: final carried values, or rows of stacked outputs
    used_after = set()
    for i, n in enumerate(nodes):
        if i not in where:
            used_after |= {where[a] for a in n.args if a in where}
    used_after |= {where[o] for o in graph.outputs if o in where}
    stacked = sorted({w[1:] for w in used_after if not (w[0] == trips - 1 and w[1:] in carried)})
    body, types = _body(graph, plan, carried, invariant, sliced, stacked)
    b = Builder(graph.tensors)
    new: dict[int, int] = {}
    last = run[-1]

    def copy(i: int) -> None:
        n = nodes[i]
        new[i] = b.add(n.op, [value(a) for a in n.args], dict(n.attrs), n.type, n.origin)

    outs: list[int] = []
    views: dict[int, int] = {}

    def value(v: int) -> int:
        if v not in where:
            return new[v]
        if v not in views:
            t, j, r = where[v]
            if t == trips - 1 and (j, r) in carried:
                views[v] = outs[carried.index((j, r))]
            else:
                k = len(carried) + stacked.index((j, r))
                t_type = nodes[v].type
                row = b.add("slice", [outs[k]], {"axis": 0, "start": t, "stop": t + 1, "step": 1},
                            TensorType((1,) + t_type.shape, t_type.dtype))
                views[v] = b.add("reshape", [row], {"shape": t_type.shape}, t_type)
        return views[v]

    for i in range(last):
        if i not in where and i not in plan["after"]:
            copy(i)
    operands = [new[plan["inits"][c]] for c in carried] + [new[v] for v in invariant]
    for root, c in sliced:
        r, shape = new[root], nodes[root].shape
        if c != 0 or shape[0] != trips:
            r = b.add("slice", [r], {"axis": 0, "start": c, "stop": c + trips, "step": 1},
                      TensorType((trips,) + shape[1:], nodes[root].dtype))
        operands.append(r)
    nc, ni = len(carried), len(invariant)
    attrs = {"trips": trips, "carried": list(range(nc)), "sliced": list(range(nc + ni, len(operands))),
             "weights": [list(r) for r in plan["weights"]], "body": body}
    loop = b.add("loop", operands, attrs, types[0], nodes[run[0]].origin)
    outs.extend(b.add("result", [loop], {"index": k}, t) for k, t in enumerate(types))
    for i in range(len(nodes)):
        if i not in where and (i > last or i in plan["after"]):
            copy(i)
    return b.finish([value(o) for o in graph.outputs])


def _fold_stacks(graph: Graph) -> Graph:
    """A kernel that only stacks every row of one stacked loop output, in order (the `torch.stack` of each
    layer's new keys), computes that output again: it becomes a reshape of it, a view with no copy and
    no call."""
    folded: dict[int, int] = {}
    for i, n in enumerate(graph.nodes):
        if n.op != "kernel" or not n.args or not _is_stack(n.attr("body")):
            continue
        rows = [_row_view(graph, a) for a in n.args]
        if any(r is None for r in rows) or len({r[0] for r in rows}) != 1:
            continue
        root = rows[0][0]
        if [r[1] for r in rows] == list(range(len(rows))) == list(range(graph.nodes[root].shape[0])):
            folded[i] = root
    if not folded:
        return graph
    b = Builder(graph.tensors)
    new: dict[int, int] = {}
    for i, n in enumerate(graph.nodes):
        if i in folded:
            new[i] = b.add("reshape", [new[folded[i]]], {"shape": n.type.shape}, n.type, n.origin)
        else:
            new[i] = b.add(n.op, [new[a] for a in n.args], dict(n.attrs), n.type, n.origin)
    return b.finish([new[o] for o in graph.outputs])


def _is_stack(body: Graph) -> bool:
    """Is the body one output that concatenates its inputs, in order, on axis 0 (with reshapes around)?
    Then its value, flattened, is the inputs flattened one after the other."""
    def under_reshapes(v: int) -> int:
        while body.nodes[v].op == "reshape":
            v = body.nodes[v].args[0]
        return v
    if len(body.outputs) != 1:
        return False
    concat = body.nodes[under_reshapes(body.outputs[0])]
    return (concat.op == "concat" and concat.attr("axis") == 0 and
            [under_reshapes(a) for a in concat.args] == list(body.inputs) and
            len({body.nodes[i].dtype for i in body.inputs} | {concat.dtype}) == 1)


def _body(graph: Graph, plan: dict, carried: list, invariant: list, sliced: list, stacked: list
          ) -> tuple[Graph, list[TensorType]]:
    """Iteration 0's kernels as the body graph, and the loop's output types."""
    nodes, run, period, trips = graph.nodes, plan["run"], plan["period"], plan["trips"]
    bb = Builder(graph.tensors)
    inputs: dict = {}
    types = ([nodes[plan["inits"][c]].type for c in carried] + [nodes[v].type for v in invariant] +
             [TensorType(nodes[root].shape[1:], nodes[root].dtype) for root, _ in sliced])
    for k, t in enumerate(types):
        inputs[k] = bb.add("input", (), {"index": k, "name": f"a{k}"}, t)
    value: dict[tuple[int, int], int] = {}  # (kernel position, output index) -> body id
    for j in range(period):
        n = nodes[run[j]]
        args = []
        for a in range(len(n.args)):
            kind = plan["kinds"][j, a]
            if kind[0] == "internal":
                args.append(value[kind[1]])
            elif kind[0] == "carried":
                args.append(inputs[carried.index(kind[1])])
            elif kind[0] == "invariant":
                args.append(inputs[len(carried) + invariant.index(kind[1])])
            else:
                x = inputs[len(carried) + len(invariant) + sliced.index(kind[1:3])]
                if bb.type(x) != kind[3]:
                    x = bb.add("reshape", [x], {"shape": kind[3].shape}, kind[3])
                args.append(x)
        k = bb.add("kernel", args, dict(n.attrs), n.type, n.origin)
        body_outs = n.attr("body").outputs
        value[j, 0] = k
        if len(body_outs) > 1:
            for r, o in enumerate(body_outs):
                value[j, r] = bb.add("result", [k], {"index": r}, n.attr("body").nodes[o].type)
    outputs = [value[c] for c in carried] + [value[s] for s in stacked]
    body = bb.finish(outputs)
    out_types = [body.nodes[o].type for o in body.outputs]
    nc = len(carried)
    return body, out_types[:nc] + [TensorType((trips,) + t.shape, t.dtype) for t in out_types[nc:]]
