"""Weight storage: keep large float32 weights as bfloat16 and widen them to float32 where they are read.

    %1 = param {name="w"} : f32[64,64]      ->      %1 = param {name="w"} : bf16[64,64]
                                                     %2 = cast %1 {dtype="f32"} : f32[64,64]

Halves the bytes streamed per token in matrix-vector work; accumulation stays float32. The bf16 copies
live in the new graph's tensors (the module's own float32 parameters are untouched). Small weights (norm
scales, biases) stay float32: they cost nothing to stream and carry most of the sensitivity.
"""
from __future__ import annotations

from fusec.ir import Builder, Graph, TensorType

MIN_ELEMENTS = 4096  # weights smaller than this stay float32
FORMATS = ("fp32", "bf16")


def store_weights(graph: Graph, weights: str = "bf16") -> Graph:
    """Return `graph` with its float32 matrices stored as `weights` ("fp32" leaves it unchanged)."""
    if weights not in FORMATS:
        raise ValueError(f"unknown weight format {weights!r}; expected one of {', '.join(FORMATS)}")
    if weights == "fp32":
        return graph
    import torch
    b = Builder(graph.tensors)
    remap: dict[int, int] = {}
    for i, n in enumerate(graph.nodes):
        if n.op == "param" and n.dtype == "f32" and n.type.numel >= MIN_ELEMENTS and len(n.shape) >= 2:
            name = n.attr("name")
            b.tensors[name] = graph.tensors[name].detach().to(torch.bfloat16)
            stored = b.add("param", (), {"name": name}, TensorType(n.shape, "bf16"), origin=n.origin)
            remap[i] = b.add("cast", [stored], {"dtype": "f32"}, origin=n.origin)
            continue
        remap[i] = b.add(n.op, [remap[a] for a in n.args], dict(n.attrs), n.type, n.origin)
    return b.finish([remap[o] for o in graph.outputs])
