"""Fused kernels: the contract between the fusion pass (which builds them) and the backends (which run them).

A fused kernel is a `kernel` node of the outer graph:

    %12 = kernel %3, %9 {kind="matmul", tiles=[["m",64],["n",256]]} : f32[1,4,16,16]
      body {
        %0 = input {index=0, name="a0"} : f32[1,16,64]     <- the kernel's operand 0 (%3 outside)
        %1 = param {name="attention.wq.weight"} : f32[64,64]
        ...
        return %20, %25
      }
    %13 = result %12 {index=0} : f32[1,4,16,16]
    %14 = result %12 {index=1} : f32[1,2,16,16]

- `args` are the kernel's activation operands (graph inputs or values of other kernels), in the order of
  the body's `input` nodes. Weights and constants are not operands: the body holds `param` and `const`
  nodes of its own (`body.tensors` refers to the same tensors as the outer graph, never copies).
- The body is a graph of primitive ops; running it with the reference backend defines what the kernel
  computes, whatever its kind. Its outputs are the kernel's outputs.
- A kernel with one output is used directly. A kernel with several outputs has the type of its output 0,
  and every use goes through a `result {index=i}` node.
- `tiles` is a tuple of `(loop name, size)` pairs chosen by the tiling pass (empty before it runs).

Kinds (`kind` attr) say which loop nest runs the body; each kind's body has this form:
- `pointwise`: elementwise, layout (reshape/permute/expand/slice/concat), `take` and source ops only.
  All outputs share one shape, the kernel's domain; views are index arithmetic, never copies.
- `reduce`: a pointwise prologue, then reductions that all reduce the same `axes` of operands of one shape
  (the domain) with the same keepdim (True for norms and softmax; a keepdim=False reduction drops the
  axes from the reduced shape), then a pointwise epilogue. Outputs are domain- or reduced-shaped.
  RMSNorm, LayerNorm and softmax are one `reduce` kernel each.
- `matmul`: one or more `matmul` nodes that share their left operand A (horizontal fusion: Q/K/V,
  gate/up); A may be computed by a row-wise prologue over its [M, K] domain (elementwise + reductions of
  the K axis, e.g. RMSNorm); each right operand is a weight (`param` through views) or an input; a
  pointwise epilogue (bias, activation, RoPE, SiLU*mul, residual add, layout) reads the products.
- `attention`: S = matmul(Q, K^T) of views of inputs (possibly scaled on load by splat constants, as
  SDPA scales q and k by sqrt(scale)), a row region over S (scale, mask, softmax: elementwise ops and
  at least one reduction of the key axis), then O = matmul(P, V), then a pointwise epilogue.
  Grouped-query heads and past/new K/V concatenation stay views (index arithmetic), never copies.
- `op`: exactly one primitive op on activations (the unfused program: every intermediate goes to
  memory), plus the params and consts it reads and views of them (a weight read transposed in place).

The `anchors` attr names body node ids that fix the loop nest: the matmul nodes for `matmul`, (S, O) for
`attention`, the reductions for `reduce`, the op itself (when a matmul or reduction) for `op`; none for
`pointwise`.
"""
from __future__ import annotations

from fusec.ir import Builder, Graph, Node

KINDS = ("pointwise", "reduce", "matmul", "attention", "op")


def kernel_outputs(graph: Graph, kernel_id: int) -> list[int]:
    """Ids of the values a kernel node produces in `graph`: itself, or its `result` nodes by index."""
    body: Graph = graph.nodes[kernel_id].attr("body")
    if len(body.outputs) == 1:
        return [kernel_id]
    found = {n.attr("index"): i for i, n in enumerate(graph.nodes) if n.op == "result" and n.args == (kernel_id,)}
    return [found.get(k, -1) for k in range(len(body.outputs))]


def add_kernel(b: Builder, kind: str, body: Graph, args: list[int], anchors: tuple[int, ...] = (),
               tiles: tuple = (), origin: str = "") -> list[int]:
    """Append a kernel node (and its `result` nodes) to `b`; return the ids of its outputs in order."""
    if kind not in KINDS:
        raise ValueError(f"unknown kernel kind {kind!r}; expected one of {', '.join(KINDS)}")
    out_types = [body.nodes[o].type for o in body.outputs]
    attrs = {"kind": kind, "body": body, "anchors": tuple(anchors), "tiles": tuple(tiles)}
    k = b.add("kernel", args, attrs, type=out_types[0], origin=origin)
    if len(out_types) == 1:
        return [k]
    return [b.add("result", [k], {"index": i}, type=t) for i, t in enumerate(out_types)]


def is_kernel(node: Node) -> bool:
    return node.op == "kernel"
