"""Expanding a lowered program of a model's first two decoder layers to all N of them.

`fusec.expand_layers` repeats layer 1 of a two-layer trace in the traced IR; the passes then take ~25 ms
a layer (0.55 s of tinyllama_1b's 22-layer decode program, a tenth of its cold start), and in the end
fold every layer into one `loop` node whose iterations differ only in the weights they read and the row
of the KV caches they take (`passes.loop`). Lowering the two-layer graph instead and then giving its loop
N trips yields the same program in a tenth of the time: the weight names of layers 2..N-1 follow layer
1's (`...layers.1.` -> `...layers.<l>.`), stored as layer 1's are (bf16, int8 with scales, or the module's
float32 tensor), and the values with one row per layer (the caches the loop slices, the rows it stacks and
their reshapes) get N rows. Anything else that reads those values, or a program not of that form, is an
`ExpandError`: the caller then lowers the expanded traced IR (`fusec.build`). The result is verified; a
test checks it equals the other path's program node for node.
"""
from __future__ import annotations

from typing import Any, Mapping

from fusec.expand_layers import LAYER_PARAM, ExpandError, checked_tensor
from fusec.ir import Builder, Graph, Node, TensorType, make_attrs, output_types
from fusec.passes.weights import SCALE, stored_tensors
from fusec.verify import verify

__all__ = ["expand_loop"]


def expand_loop(graph: Graph, n_layers: int, tensors: Mapping[str, Any]) -> Graph:
    """`graph` (a lowered program of a two-layer model, its layers one loop of two trips) with its loop
    over `n_layers` layers; `tensors` holds (at least) the float32 parameters of layers 2..n_layers-1 by
    name. ExpandError when the graph is not of that form."""
    loops = [i for i, n in enumerate(graph.nodes) if n.op == "loop"]
    if len(loops) != 1 or graph.nodes[loops[0]].attr("trips") != 2:
        raise ExpandError(f"expected one loop of two trips over the layers, found {len(loops)} loop(s)")
    at = loops[0]
    loop = graph.nodes[at]
    rows = _layer_rows(graph, loop, n_layers)
    stored = dict(graph.tensors)
    types = {m.attr("name"): m.type for m in loop.attr("body").walk() if m.op == "param"}
    for row in rows[2:]:
        for first, name in zip(rows[0], row):
            stored.update(_stored(tensors, name, first, types[first], row))
    sliced = {loop.args[k] for k in loop.attr("sliced")}
    carried = len(loop.attr("carried"))
    b = Builder(stored)
    remap: dict[int, int] = {}
    layered: set[int] = set()  # new ids of values with one row per layer
    for i, n in enumerate(graph.nodes):
        args = [remap[a] for a in n.args]
        attrs, kind = dict(n.attrs), n.type
        if any(a in sliced for a in n.args) and i != at:
            raise ExpandError(f"%{i} = {n.op} reads a value the loop slices by layer")
        if i in sliced:
            if n.op != "input" or n.shape[:1] != (2,):
                raise ExpandError(f"the loop slices %{i} = {n.op} {n.type}, expected an input of two rows")
            kind = _rows(n.type, n_layers)
        elif i == at:
            attrs.update(trips=n_layers, weights=rows)
            kind = output_types(Node("loop", (), make_attrs(attrs), n.type))[0]
        elif n.op == "result" and n.args[0] == at and n.attr("index") >= carried:
            kind = _rows(n.type, n_layers)
        elif any(a in layered for a in args):
            if n.op != "reshape" or n.attr("shape")[:1] != (2,) or n.shape[:1] != (2,):
                raise ExpandError(f"%{i} = {n.op} reads the rows of every layer (only reshapes keeping them may)")
            attrs["shape"] = (n_layers, *n.attr("shape")[1:])
            kind = _rows(n.type, n_layers)
        remap[i] = b.add(n.op, args, attrs, kind, n.origin)
        if kind != n.type and i != at:
            layered.add(remap[i])
    out = b.finish([remap[o] for o in graph.outputs])
    verify(out)
    return out


def _layer_rows(graph: Graph, loop: Node, n_layers: int) -> list[tuple[str, ...]]:
    """The loop's weight names for every layer: layer 1's with its index replaced; ExpandError unless its
    two rows name layers 0 and 1 of one list, alike, and no other node reads a layer's parameter."""
    first, second = loop.attr("weights")
    matches = [[LAYER_PARAM.match(name) for name in row] for row in (first, second)]
    if not all(matches[0]) or not all(matches[1]):
        raise ExpandError("the loop reads weights that are not a layer's")
    keys = [[(m[1], m[3]) for m in row] for row in matches]
    if keys[0] != keys[1] or {m[2] for m in matches[0]} != {"0"} or {m[2] for m in matches[1]} != {"1"}:
        raise ExpandError("the loop's two iterations do not read layers 0 and 1 alike")
    for n in graph.walk():
        if n.op == "param" and LAYER_PARAM.match(n.attr("name")) and n.attr("name") not in first:
            raise ExpandError(f"{n.attr('name')} is read outside the loop's body")
    return [first, second] + [tuple(f"{prefix}{layer}.{suffix}" for prefix, suffix in keys[1])
                              for layer in range(2, n_layers)]


def _stored(tensors: Mapping[str, Any], name: str, first: str, kind: TensorType, row: tuple[str, ...]) -> dict[str, Any]:
    """{name: tensor} of parameter `name` as the passes store layer 0's `first` (of type `kind`): the
    module's float32 tensor, or its bf16 / int8 copy (with the scales, which the weight's entry brings)."""
    if name.endswith(SCALE) and name.removesuffix(SCALE) in row:
        return {}
    if kind.dtype not in ("bf16", "i8"):
        return {name: checked_tensor(tensors, name, kind)}
    if first not in tensors:
        raise ExpandError(f"no tensor for the parameter {first}")
    tensor = checked_tensor(tensors, name, TensorType(tuple(tensors[first].shape), "f32"))  # shaped as layer 0's
    return stored_tensors(name, tensor, kind.dtype)


def _rows(kind: TensorType, n_layers: int) -> TensorType:
    return TensorType((n_layers, *kind.shape[1:]), kind.dtype)
