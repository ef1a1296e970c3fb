"""Torch fallback: ATen ops fusec cannot lower run through PyTorch inside a compiled program.

Tracing turns such an op (when its inputs are not all constants, which are folded instead) into one
`extern` node per tensor it returns:

    %7 = extern %3 {args="[[{\"$\": 0}, -1], {}]", output=0, reason="no lowering", target="aten.cumsum.default"}
           : f32[2,8]      (one line)

- `target`: the ATen overload's qualified name (`torch.ops.aten.cumsum.default`).
- `args`: the call's `[args, kwargs]` as JSON, where `{"$": k}` stands for the node's operand k (every tensor,
  constants included, is an operand) and dtypes, devices, layouts and memory formats are tagged objects.
- `output`: which tensor of the op's result this node is (position among the result's tensor leaves).
- `reason`: why fusec did not lower it (shown by `fusec explain`).

Fusion treats `extern` as opaque: it is never fused, and kernels stop at its inputs and outputs. The
reference backend and the Numba runtime both call `call_extern`, which runs the op on torch tensors
made from the NumPy operands (no copies for contiguous operands) and returns an owned NumPy array.
Random ops (`nondeterministic_seeded`) are not taken: a compiled program is deterministic.
"""
from __future__ import annotations

import functools
import json
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.utils._pytree as pytree

from fusec.dtypes import to_numpy
from fusec.errors import FusecError

EXTERN = "extern"


# --- encoding a call (tracing) ----------------------------------------------------------------------

def qualified_name(target: Any) -> str | None:
    """'aten.cumsum.default' for an ATen OpOverload; None for anything else (a Python function)."""
    if not isinstance(target, torch._ops.OpOverload):
        return None
    return f"{target.namespace}.{target._opname}.{target._overloadname}"


def is_random(target: Any) -> bool:
    return torch.Tag.nondeterministic_seeded in getattr(target, "tags", ())


def encode_call(args: tuple, kwargs: Mapping[str, Any], operand: Callable[[Any], int | None]) -> str:
    """The JSON spec of `(args, kwargs)`; `operand(x)` returns the operand index of a tensor-like leaf
    (or None when `x` is not one). Raises TypeError for a value that JSON cannot carry."""

    def enc(x: Any) -> Any:
        k = operand(x)
        if k is not None:
            return {"$": k}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, (list, tuple)):
            return [enc(v) for v in x]
        if isinstance(x, torch.dtype):
            return {"dtype": str(x).removeprefix("torch.")}
        if isinstance(x, torch.device):
            return {"device": str(x)}
        if isinstance(x, torch.layout):
            return {"layout": str(x).removeprefix("torch.")}
        if isinstance(x, torch.memory_format):
            return {"memory_format": str(x).removeprefix("torch.")}
        raise TypeError(f"an argument of type {type(x).__name__} cannot be passed to a torch fallback")

    return json.dumps([enc(list(args)), {k: enc(v) for k, v in kwargs.items()}], sort_keys=True)


def decode_call(spec: str, operands: list) -> tuple[list, dict]:
    """`(args, kwargs)` from a spec, with `operands` (torch tensors) in place of `{"$": k}`."""

    def dec(x: Any) -> Any:
        if isinstance(x, list):
            return [dec(v) for v in x]
        if isinstance(x, dict):
            if "$" in x:
                return operands[x["$"]]
            if "dtype" in x:
                return getattr(torch, x["dtype"])
            if "device" in x:
                return torch.device(x["device"])
            if "layout" in x:
                return getattr(torch, x["layout"])
            if "memory_format" in x:
                return getattr(torch, x["memory_format"])
        return x

    args, kwargs = json.loads(spec)
    return dec(args), {k: dec(v) for k, v in kwargs.items()}


# --- running a call (backends) ----------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def resolve(target: str):
    """The torch op named by `target` ('aten.cumsum.default')."""
    namespace, name, overload = target.split(".")
    try:
        return getattr(getattr(getattr(torch.ops, namespace), name), overload)
    except (AttributeError, RuntimeError) as e:
        raise FusecError(f"extern: torch has no op {target} (was the program traced with another torch?)") from e


def _as_tensor(x: np.ndarray):
    x = np.asarray(x)
    if not (x.flags.c_contiguous and x.flags.writeable):  # broadcast views are read-only
        x = np.array(x, order="C")
    return torch.from_numpy(x)


def run_op(target: str, spec: str, operands: list[np.ndarray]) -> list[np.ndarray]:
    """Call the op on the operands; every tensor it returns, as owned NumPy arrays, in leaf order."""
    args, kwargs = decode_call(spec, [_as_tensor(x) for x in operands])
    with torch.no_grad():
        result = resolve(target)(*args, **kwargs)
    outs = []
    for leaf in pytree.tree_leaves(result):
        if isinstance(leaf, torch.Tensor):
            leaf = leaf.detach()
            if leaf.dtype == torch.bfloat16:
                leaf = leaf.float()
            outs.append(np.array(leaf.numpy(), order="C"))  # owned: the result may alias an operand
        else:
            outs.append(leaf)
    return outs


def call_extern(node, operands: list[np.ndarray], memo: dict | None = None) -> np.ndarray:
    """The value of one `extern` node. `memo` (one dict per program run) lets the nodes of one call's
    several outputs share the call."""
    target, spec = node.attr("target"), node.attr("args")
    key = (target, spec, tuple(id(x) for x in operands))
    outs = memo.get(key) if memo is not None else None
    if outs is None:
        outs = run_op(target, spec, operands)
        if memo is not None:
            memo[key] = outs
    out = outs[node.attr("output", 0)]
    want = to_numpy(node.dtype)
    out = np.asarray(out)
    return out.astype(want) if out.dtype != want else out


def externs(graph) -> list[int]:
    """Ids of the `extern` nodes of a graph (outer level: externs are never inside kernels)."""
    return [i for i, n in enumerate(graph.nodes) if n.op == EXTERN]
