"""Weights as arguments: a compiled program's parameters, and checked sets of tensors to bind to them.

A compiled program reads its weights through arguments (the generated kernels take them like inputs),
so one program serves every model of the same architecture: `bind_weights` swaps the arrays it passes,
and nothing recompiles. This module names what a graph expects (`weight_types`) and checks what a caller
offers (`check_weights`) so that a wrong set fails before anything runs, naming the weight at fault.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from fusec.dtypes import to_numpy
from fusec.errors import FusecError
from fusec.ir import Graph, TensorType

_TORCH_DTYPES = {"f32": "torch.float32", "f64": "torch.float64", "f16": "torch.float16",
                 "bf16": "torch.bfloat16", "i64": "torch.int64", "i32": "torch.int32"}


class WeightBindingError(FusecError, ValueError):
    """A set of weights that does not match what a compiled program reads."""


def weight_types(graph: Graph) -> dict[str, TensorType]:
    """{parameter name: type} of every weight `graph` reads (bf16 after the weight-storage pass); kept in
    the graph's annotations, since binding asks for it at every expert switch."""
    types = graph.annotations.get("weight_types")
    if types is None:
        types = {n.attr("name"): n.type for n in graph.walk() if n.op == "param"}
        if isinstance(graph.annotations, dict):
            graph.annotations["weight_types"] = types
    return types


def check_weights(graph: Graph, tensors: Mapping[str, Any]) -> dict[str, Any]:
    """The tensors of `tensors` that `graph` reads, by name, after checking each one's shape and dtype
    (torch tensors, or NumPy arrays; a bf16 weight as a NumPy array is its bits, uint16). Extra entries
    are ignored. WeightBindingError names every missing or mismatched weight."""
    chosen, problems = {}, []
    for name, want in weight_types(graph).items():
        if name not in tensors:
            problems.append(f"{name}: missing (expected {want})")
            continue
        t = tensors[name]
        shape, dtype = tuple(getattr(t, "shape", ())), str(getattr(t, "dtype", type(t).__name__))
        expected = _TORCH_DTYPES.get(want.dtype) if hasattr(t, "detach") else str(
            np.dtype(np.uint16) if want.dtype == "bf16" else to_numpy(want.dtype))
        if shape != want.shape or dtype != expected:
            problems.append(f"{name}: expected {list(want.shape)} {expected}, given {list(shape)} {dtype}")
            continue
        chosen[name] = t
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise WeightBindingError(f"weights do not fit this program ({len(problems)} problem(s)): {shown}")
    return chosen
