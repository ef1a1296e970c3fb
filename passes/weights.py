"""Weight storage: keep large float32 weights as bfloat16 or int8 and widen them to float32 where read.

    %1 = param {name="w"} : f32[64,64]  ->  bf16:  %1 = param {name="w"} : bf16[64,64]
                                                  %2 = cast %1 {dtype="f32"} : f32[64,64]
                                        ->  int8:  %1 = param {name="w"} : i8[64,2,32]
                                                  %2 = param {name="w.scale"} : f32[64,2,1]
                                                  %3 = cast %1 {dtype="f32"} : f32[64,2,32]
                                                  %4 = mul %3, %2 : f32[64,2,32]
                                                  %5 = reshape %4 {shape=[64,64]} : f32[64,64]

bf16 halves the bytes streamed per token in matrix-vector work, int8 (llama.cpp's Q8_0) takes 1.125
bytes per weight; accumulation stays float32. int8 quantizes each block of 32 consecutive
weights of a row (along the input dimension of a Linear) with its own float32 scale, max|w| / 127, and
rounds w / scale to the nearest integer (ties to even). Blocks rather than one scale per row: one large
weight in a row (common in trained LLMs) then costs precision only in its block, for 4 bytes of scale per
32 weights; and a block is what the kernels reduce over anyway (`backends.numba_cpu.lowp`). The
dequantization is ordinary IR (cast, mul, reshape), so every backend computes exactly `q * scale`, and
backends that know the pattern (`dequantized`) stream q and the scales instead.

A matmul x @ W^T that reads an int8 weight gets attribute quantize="int8": its activations x are
quantized the same way (blocks of 32 along K, which meet W's blocks) before the product, so that kernels
multiply int8 by int8 and sum in int32 (`backends.numba_cpu.int8`); the reference backend defines the
exact values (`backends.reference.quantize_activations`). Measured with benchmarks/bench_accuracy.py
(random weights, 64 greedy steps): stories15M agrees with fp32 on 98.4% of the tokens with or without
quantized activations, its largest logit error growing from 1.3% to 1.8% of the largest logit;
stories110M 98.4% either way, 2.8% to 3.1%.

The stored copies live in the new graph's tensors (the module's own float32 parameters are untouched).
Small weights (norm scales, biases) stay float32: they cost nothing to stream and carry most of the
sensitivity; int8 also leaves matrices whose rows are not whole blocks (a row length not a multiple of
32) in float32.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from fusec.huge_pages import pack
from fusec.ir import Builder, Graph, TensorType

MIN_ELEMENTS = 4096  # weights smaller than this stay float32
FORMATS = ("fp32", "bf16", "int8")
BLOCK = 32           # int8 weights per scale
BYTES_PER_WEIGHT = {"fp32": 4, "bf16": 2, "int8": 1 + 4 / BLOCK}  # int8: one float32 scale per block
SCALE = ".scale"     # the int8 scales of weight `w` are param `w.scale` (never a module name: w is a tensor)


def store_weights(graph: Graph, weights: str = "bf16") -> Graph:
    """Return `graph` with its float32 matrices stored as `weights` ("fp32" leaves it unchanged)."""
    if weights not in FORMATS:
        raise ValueError(f"unknown weight format {weights!r}; expected one of {', '.join(FORMATS)}")
    if weights == "fp32":
        return graph
    b = Builder(graph.tensors)
    remap: dict[int, int] = {}
    int8: set[int] = set()        # new ids of dequantized int8 weights [N, K]
    transposed: set[int] = set()  # new ids of their transposes, [K, N]
    for i, n in enumerate(graph.nodes):
        if n.op == "param" and _stored(n.type, weights):
            name = n.attr("name")
            b.tensors.update(stored_tensors(name, graph.tensors[name], "bf16" if weights == "bf16" else "i8"))
            if weights == "bf16":
                stored = b.add("param", (), {"name": name}, TensorType(n.shape, "bf16"), origin=n.origin)
                remap[i] = b.add("cast", [stored], {"dtype": "f32"}, origin=n.origin)
            else:
                q, scale = b.tensors[name], b.tensors[name + SCALE]
                qn = b.add("param", (), {"name": name}, TensorType(tuple(q.shape), "i8"), origin=n.origin)
                sn = b.add("param", (), {"name": name + SCALE}, TensorType(tuple(scale.shape), "f32"),
                           origin=n.origin)
                wide = b.add("cast", [qn], {"dtype": "f32"}, origin=n.origin)
                scaled = b.add("mul", [wide, sn], {}, origin=n.origin)
                remap[i] = b.add("reshape", [scaled], {"shape": n.shape}, origin=n.origin)
                int8.add(remap[i])
            continue
        attrs = dict(n.attrs)
        if n.op == "matmul" and remap[n.args[1]] in transposed:
            attrs["quantize"] = "int8"  # x @ W^T: x's blocks along K meet W's (see the module docstring)
        remap[i] = b.add(n.op, [remap[a] for a in n.args], attrs, n.type, n.origin)
        if n.op == "permute" and n.attr("perm") == (1, 0) and remap[n.args[0]] in int8:
            transposed.add(remap[i])
    return b.finish([remap[o] for o in graph.outputs])


def _stored(t: TensorType, weights: str) -> bool:
    """Whether a float32 weight of type `t` is stored as `weights`."""
    if t.dtype != "f32" or t.numel < MIN_ELEMENTS or t.rank < 2:
        return False
    return weights != "int8" or t.shape[-1] % BLOCK == 0


def stored_bytes(t: TensorType, weights: str) -> float:
    """Bytes a float32 weight of type `t` occupies when the program stores weights as `weights`: bf16 two
    per element, int8 one plus its block's float32 scale; weights the pass leaves alone keep theirs."""
    if weights == "fp32" or not _stored(t, weights):
        return t.nbytes
    return t.numel * BYTES_PER_WEIGHT[weights]


def stored_tensors(name: str, t: Any, dtype: str) -> dict[str, Any]:
    """The tensors that hold float32 weight `name` (tensor t) stored as `dtype`: {name: its bfloat16 copy}
    for "bf16", {name: int8 blocks, name + SCALE: their scales} for "i8"."""
    if dtype == "bf16":
        return {name: to_bf16(t)}
    q, scale = quantize_int8(t)
    return {name: q, name + SCALE: scale}


def to_bf16(t: Any) -> Any:
    return t.detach().to(torch.bfloat16)


def quantize_int8(w: Any) -> tuple[Any, Any]:
    """(q, scale) of float32 tensor w[..., K]: q int8 [..., K/32, 32], scale float32 [..., K/32, 1] with
    w ~ q * scale; scale = max|block| / 127 (0 for an all-zero block), q = w / scale rounded to nearest
    (ties to even) and clipped to [-127, 127]. A block holding inf or NaN gets a NaN scale, so the
    non-finite value shows in every result that reads it instead of vanishing."""
    w = w.detach().to(torch.float32)
    if w.shape[-1] % BLOCK:
        raise ValueError(f"int8 weights need rows of whole blocks of {BLOCK}, given shape {list(w.shape)}")
    blocks = w.reshape(*w.shape[:-1], w.shape[-1] // BLOCK, BLOCK)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    scale = amax / 127.0
    finite = torch.isfinite(blocks).all(dim=-1, keepdim=True)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(torch.where(finite, blocks, torch.zeros_like(blocks)) / safe).clamp(-127, 127)
    scale = torch.where(finite, scale, torch.full_like(scale, float("nan")))
    return q.to(torch.int8).contiguous(), scale.contiguous()


def dequantized(graph: Graph, i: int) -> tuple[int, int] | None:
    """(q, scale) param ids when node `i` is the `mul` of an int8 weight's dequantization (see above)."""
    n = graph.nodes[i]
    if n.op != "mul" or len(n.args) != 2:
        return None
    wide, scale = (graph.nodes[a] for a in n.args)
    if wide.op != "cast" or scale.op != "param" or scale.dtype != "f32":
        return None
    q = graph.nodes[wide.args[0]]
    if q.op != "param" or q.dtype != "i8" or q.attr("name") + SCALE != scale.attr("name"):
        return None
    return wide.args[0], n.args[1]


WIDENING = ("cast", "permute", "reshape", "mul")  # the ops between a stored weight and its product


def stored_weight(graph: Graph, i: int) -> int:
    """The node a weight operand `i` widens (what `store_weights` built: a cast, int8 block scales
    multiplied in, a reshape and transpose): its stored bf16/int8 param, or `i` itself."""
    while graph.nodes[i].op in WIDENING and graph.nodes[i].args:
        i = graph.nodes[i].args[0]
    return i


def stored_form(types: Mapping[str, TensorType], tensors: Mapping[str, Any]) -> dict[str, Any]:
    """`tensors` ({name: float32 module tensor}) in the form a program with weight types `types` reads:
    float32 tensors of bf16 weights rounded to bfloat16, of int8 weights quantized (with their scales
    added); anything else as given (checked later by `fusec.binding.check_weights`)."""
    out, converted = dict(tensors), {}
    for name, t in tensors.items():
        want = types.get(name)
        if want is None or getattr(t, "dtype", None) is None or str(t.dtype) != "torch.float32":
            continue
        if want.dtype == "bf16" or want.dtype == "i8" and name + SCALE in types and t.dim() >= 2:
            converted.update(stored_tensors(name, t, want.dtype))
    # the converted weights in one block of huge pages, in the module's order (`fusec.huge_pages`)
    out.update(zip(converted, pack(list(converted.values()))))
    return out


def module_names(types: Mapping[str, TensorType]) -> list[str]:
    """The parameter names of `types` that name module tensors (not the int8 scales the pass made)."""
    return [name for name, t in types.items()
            if not (name.endswith(SCALE) and types.get(name.removesuffix(SCALE), t).dtype == "i8"
                    and name.removesuffix(SCALE) in types)]
