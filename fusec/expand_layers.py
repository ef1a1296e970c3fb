"""Expanding the traced IR of a model's first two decoder layers to all N of them.

torch.export's time grows with the number of layers, yet fusec's own generation programs (`DecodeStep`,
`Prefill` over a `CausalLM`) build every layer from the same module class and config, so every layer's
ops are the same but for the parameters they read (`...layers.<i>.`) and the slice of the KV caches
(`slice %k_cache {axis=0, start=i, stop=i+1}`). `expand_layers` takes the IR traced from a 2-layer
view of such a model and repeats layer 1 for layers 2..N-1:

- layer 0's and layer 1's nodes are found from their parameters and cache slices: layer 0's input x0
  and output x1 where layer 1's ops first differ from layer 0's (tracing back from the stacked
  keys/values, `torch.stack(keys)`: `reshape(concat(k0, k1))`), then layer 0's nodes (what its
  parameters, cache slices and x0 lead to before x1) are matched one by one with layer 1's;
- nothing is taken on trust: the two layers must be the same ops on the same shared values, layer 1's nodes
  must be exactly the images of layer 0's, and only x2 (layer 1's output) and the stacked rows may be
  read after them; anything else is an `ExpandError` (the caller then traces the whole model);
- the copies go where a direct trace puts them (parameters after layer 1's, nodes after layer 1's), the
  stacks take every layer's rows, the caches N rows; types are inferred again and the result verified.
  It is the IR a trace of the whole model gives, node for node; only stored constants' keys differ
  (the tracer numbers them after the parameters: `c21` with 2 layers is `c39` with 4).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from fusec.errors import FusecError
from fusec.ir import Builder, Graph, Node, TensorType
from fusec.opset import infer
from fusec.verify import verify

LAYER_PARAM = re.compile(r"^(.*\blayers\.)(\d+)\.(.+)$")


class ExpandError(FusecError):
    """The traced two layers are not two copies of one layer (so they cannot be repeated)."""


@dataclass
class Layers:
    """What the 2-layer graph shows of its layers (node ids)."""

    prefix: str                   # parameter names are prefix + index + "." + suffix
    params: list[dict[str, int]]  # per layer: {suffix: param node}
    caches: list[int]             # the inputs holding one row per layer (leading axis 2)
    body: list[list[int]]         # per layer, in id order: its nodes (cache slices included, params not)
    image: dict[int, int]         # layer-0 node (x0, params and body) -> its layer-1 counterpart
    x: tuple[int, int, int]       # layer 0's input, layer 1's input (layer 0's output), layer 1's output
    stacks: list[int]             # concat nodes stacking a value of every layer: concat(v0, v1, axis=0)


def expand_layers(graph: Graph, n_layers: int, tensors: Mapping[str, Any]) -> Graph:
    """The IR of the same program with `n_layers` layers, from `graph` traced with two. `tensors` holds
    (at least) the parameters of layers 2..n_layers-1 by name. ExpandError when the graph's two layers
    are not two copies of one layer."""
    if n_layers < 2:
        raise ValueError(f"expand_layers: expected n_layers >= 2, got {n_layers}")
    if n_layers == 2:
        return graph
    return _rebuild(graph, find_layers(graph), n_layers, tensors)


def find_layers(graph: Graph) -> Layers:
    """The two layers of `graph` and how they correspond; ExpandError when they do not."""
    nodes, users = graph.nodes, graph.users()
    prefix, params = _layer_params(graph)
    caches, slices = _cache_slices(graph, users)
    seeds = {params[0][s]: params[1][s] for s in params[0]}
    seeds.update(slices)
    stacks = [i for i, n in enumerate(nodes) if _is_stack(graph, users, i)]
    x0, x1 = _boundary(graph, seeds, [nodes[i].args for i in stacks])
    image = {**seeds, x0: x1}
    body0 = [*slices]
    after_x1 = {x1}  # x1 and what reads it: layer 1 and after
    index = {(n.op, n.args, n.attrs, n.type): i for i, n in enumerate(nodes)}
    for i, n in enumerate(nodes):  # image's keys: layer 0's params, cache slices, x0 and nodes so far
        if any(a in after_x1 for a in n.args):
            after_x1.add(i)
            continue
        if i in image or not any(a in image for a in n.args):
            continue
        mapped = tuple(image.get(a, a) for a in n.args)
        twin = index.get((n.op, mapped, n.attrs, n.type))
        if twin is None:
            raise ExpandError(f"layer 0's %{i} = {n.op} has no counterpart in layer 1")
        image[i] = twin
        body0.append(i)
    if x1 not in image:
        raise ExpandError(f"layer 0's output %{x1} is not computed from layer 0's nodes")
    body0.sort()
    body1 = sorted(image[i] for i in body0)
    _check_closed(graph, users, [body0, body1], params, image, x1, image[x1], stacks)
    return Layers(prefix, params, caches, [body0, body1], image, (x0, x1, image[x1]), stacks)


def _layer_params(graph: Graph) -> tuple[str, list[dict[str, int]]]:
    """The parameters of layer 0 and layer 1 by suffix; ExpandError unless those are the only layers
    and they have the same parameters of the same types."""
    found: dict[tuple[str, int], dict[str, int]] = {}
    for i, n in enumerate(graph.nodes):
        match = LAYER_PARAM.match(n.attr("name")) if n.op == "param" else None
        if match:
            found.setdefault((match[1], int(match[2])), {})[match[3]] = i
    prefixes = {p for p, _ in found}
    if len(prefixes) != 1 or {k for _, k in found} != {0, 1}:
        raise ExpandError(f"expected the parameters of layers 0 and 1 of one list, found {sorted(found)}")
    prefix = prefixes.pop()
    params = [found[prefix, 0], found[prefix, 1]]
    types = [{s: graph.nodes[i].type for s, i in p.items()} for p in params]
    if types[0] != types[1]:
        raise ExpandError("layers 0 and 1 have different parameters")
    return prefix, params


def _cache_slices(graph: Graph, users: list[list[int]]) -> tuple[list[int], dict[int, int]]:
    """The inputs with a row per layer (read only as rows 0 and 1, each a `slice` of axis 0) and
    {row 0's slice: row 1's slice}."""
    caches, pairs = [], {}
    for i, n in enumerate(graph.nodes):
        rows = {_row(graph.nodes[u]): u for u in users[i]}
        if n.op != "input" or None in rows or not rows:
            continue
        if set(rows) != {0, 1} or n.shape[0] != 2 or len(users[i]) != 2:
            raise ExpandError(f"input {n.attr('name')} is read as rows {sorted(rows)} of {n.shape[0]}, "
                              f"expected one row per layer")
        caches.append(i)
        pairs[rows[0]] = rows[1]
    return caches, pairs


def _row(n: Node) -> int | None:
    """k when `n` reads row k (alone) of axis 0 of its operand, else None."""
    start, stop = n.attr("start"), n.attr("stop")
    if n.op == "slice" and n.attr("axis") == 0 and n.attr("step") == 1 and isinstance(start, int) \
            and stop == start + 1:
        return start
    return None


def _is_stack(graph: Graph, users: list[list[int]], i: int) -> bool:
    """Whether %i is `torch.stack([a, b])` of two layers' values: concat(a, b, axis=0) viewed as [2, ...a]."""
    n = graph.nodes[i]
    if n.op != "concat" or n.attr("axis") != 0 or len(n.args) != 2 or len(users[i]) != 1:
        return False
    a, b = (graph.nodes[x].type for x in n.args)
    view = graph.nodes[users[i][0]]
    return a == b and view.op == "reshape" and view.shape == (2,) + a.shape


def _boundary(graph: Graph, seeds: dict[int, int], pairs: list[tuple[int, int]]) -> tuple[int, int]:
    """(x0, x1): layer 0's input and layer 1's, where the two layers' ops, traced back from the values
    they stack, first differ (layer 1's input is layer 0's output, layer 0's comes from before)."""
    image = dict(seeds)
    found: set[tuple[int, int]] = set()
    work = list(pairs)
    while work:
        a0, a1 = work.pop()
        if a0 in image:
            if image[a0] != a1:
                raise ExpandError(f"layer 0's %{a0} corresponds to both %{image[a0]} and %{a1} in layer 1")
            continue
        if a0 == a1:
            continue  # a value both layers read (a constant, a mask, the RoPE rows)
        n0, n1 = graph.nodes[a0], graph.nodes[a1]
        image[a0] = a1
        if (n0.op, n0.attrs, n0.type, len(n0.args)) == (n1.op, n1.attrs, n1.type, len(n1.args)):
            work.extend(zip(n0.args, n1.args))
        else:
            found.add((a0, a1))
    if len(found) != 1:
        raise ExpandError(f"expected the two layers to differ in their input only, they differ at "
                          f"{sorted(found) or 'no node'}")
    return found.pop()


def _check_closed(graph: Graph, users: list[list[int]], body: list[list[int]], params: list[dict[str, int]],
                  image: dict[int, int], x1: int, x2: int, stacks: list[int]) -> None:
    """ExpandError unless each layer reads only itself, its parameters, values every layer reads and its
    input (layer 1: x1), and outside the layers only the stacks read their values and only the program
    after layer 1 (where the copies of the later layers go) reads layer 1's output x2."""
    inside = [set(body[0]), set(body[1])]
    if inside[0] & inside[1]:
        raise ExpandError("layers 0 and 1 share nodes")
    end = body[1][-1]
    for layer in (0, 1):
        for i in inside[layer] | set(params[layer].values()):
            for u in users[i]:
                if (u in inside[layer] or layer == 0 and i == x1 and u in inside[1]
                        or u > end and (i == x2 or u in stacks and i in inside[layer])):
                    continue
                raise ExpandError(f"%{u} reads layer {layer}'s %{i} (only that layer, the next one its output, "
                                  f"and after the layers the stacks and layer 1's output may)")
    for s in stacks:
        a, b = graph.nodes[s].args
        if a not in inside[0] or image.get(a) != b:
            raise ExpandError(f"%{s} stacks %{a} and %{b}, which are not one value of layers 0 and 1")


def _rebuild(graph: Graph, layers: Layers, n_layers: int, tensors: Mapping[str, Any]) -> Graph:
    """`graph` with layers 2..n_layers-1 copied from layer 1 (see the module docstring)."""
    nodes = graph.nodes
    b = Builder(graph.tensors)
    new: dict[int, int] = {}
    _, x1, x2 = layers.x
    body1 = layers.body[1]
    last_param = max(layers.params[1].values())
    params1 = sorted(layers.params[1].items(), key=lambda item: item[1])
    copies: list[dict[int, int]] = []  # per layer k >= 2: layer-1 node or param -> layer k's node

    def add(n: Node, args: list[int], attrs: Mapping, declared: TensorType, origin: str) -> int:
        return b.add(n.op, args, attrs, infer(n.op, [b.type(a) for a in args], dict(attrs), declared), origin)

    for i, n in enumerate(nodes):
        attrs, declared = dict(n.attrs), n.type
        if i in layers.caches:
            declared = TensorType((n_layers,) + n.shape[1:], n.dtype)
        args = [new[a] for a in n.args]
        if i in layers.stacks:
            args += [copy[n.args[1]] for copy in copies]
        elif n.op == "reshape" and n.args and n.args[0] in layers.stacks:
            attrs["shape"] = (n_layers,) + tuple(attrs["shape"][1:])
        new[i] = add(n, args, attrs, declared, n.origin)
        if i == last_param:  # the later layers' parameters, where a direct trace has them
            for k in range(2, n_layers):
                copies.append({})
                for suffix, p in params1:
                    name = f"{layers.prefix}{k}.{suffix}"
                    tensor = checked_tensor(tensors, name, nodes[p].type)
                    b.tensors[name] = tensor
                    copies[-1][p] = b.add("param", (), {"name": name}, nodes[p].type)
        if i == body1[-1]:  # the later layers' nodes, after layer 1's
            for k, copy in enumerate(copies, start=2):
                copy[x1] = copies[k - 3][x2] if k > 2 else new[x2]
                for j in body1:
                    m = nodes[j]
                    attrs = dict(m.attrs)
                    if _row(m) == 1 and m.args[0] in layers.caches:
                        attrs.update(start=k, stop=k + 1)
                    args = [copy[a] if a in copy else new[a] for a in m.args]
                    copy[j] = add(m, args, attrs, m.type, re.sub(r"\blayers\.1\b", f"layers.{k}", m.origin))
            new[x2] = copies[-1][x2]  # what follows the layers reads the last one's output
    result = b.finish([new[o] for o in graph.outputs])
    verify(result)
    return result


def checked_tensor(tensors: Mapping[str, Any], name: str, expected: TensorType) -> Any:
    """tensors[name], checked to be of type `expected` (layer 1's parameter's)."""
    from fusec.dtypes import from_torch  # (the tensors are the module's: torch is loaded)
    if name not in tensors:
        raise ExpandError(f"no tensor for the parameter {name}")
    tensor = tensors[name]
    got = TensorType(tuple(tensor.shape), from_torch(tensor.dtype))
    if got != expected:
        raise ExpandError(f"parameter {name} is {got}, expected {expected} like layer 1's")
    return tensor
