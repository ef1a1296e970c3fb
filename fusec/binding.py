"""Weights as arguments: a compiled program's parameters, and checked sets of tensors to bind to them.

A compiled program reads its weights through arguments (the generated kernels take them like inputs),
so one program serves every model of the same architecture: `bind_weights` swaps the arrays it passes,
and nothing recompiles. This module names what a graph expects (`weight_types`) and checks what a caller
offers (`check_weights`) so that a wrong set fails before anything runs, naming the weight at fault.
"""
from __future__ import annotations

import threading
from typing import Any, Mapping

import numpy as np
import torch

from fusec.dtypes import to_numpy
from fusec.errors import FusecError
from fusec.ir import Graph, TensorType, param_types
from fusec.passes.weights import stored_form

_TORCH_DTYPES = {"f32": "torch.float32", "f64": "torch.float64", "f16": "torch.float16",
                 "bf16": "torch.bfloat16", "i64": "torch.int64", "i32": "torch.int32", "i8": "torch.int8"}


class WeightBindingError(FusecError, ValueError):
    """A set of weights that does not match what a compiled program reads."""


def weight_types(graph: Graph) -> dict[str, TensorType]:
    """{parameter name: type} of every weight `graph` reads (bf16 after the weight-storage pass); kept in
    the graph's annotations, since binding asks for it at every expert switch."""
    types = graph.annotations.get("weight_types")
    if types is None:
        types = param_types(graph)
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


class Follow:
    """The module parameters a compiled program reads, as it last bound them, so that the program follows
    the module like eager does: a parameter replaced since (`load_state_dict(assign=True)`, a new
    Parameter or submodule, `param.data = ...`, `share_memory()`, which frees the old memory) is rebound
    before the next call, without recompiling. In-place updates need nothing: weights are read in place.

    `changed()` is the per-call check, a dictionary lookup and a data pointer per parameter (plus one
    lookup per submodule on their paths): a few microseconds for a small model."""

    def __init__(self, module: Any, names: list[str]):
        self.module, self.names = module, list(names)
        self.lock = threading.Lock()
        self._record()

    def _record(self) -> None:
        """Remember how each parameter is reached now: the submodule dictionaries on its path with the
        child each holds, and the parameter dictionary with the tensor and its data pointer."""
        edges, entries = {}, []
        for name in self.names:
            *path, attr = name.split(".")
            owner = self.module
            for key in path:
                child = getattr(owner, "_modules", {}).get(key)
                if child is None:
                    break
                edges[id(owner), key] = (owner._modules, key, child)
                owner = child
            else:
                params = getattr(owner, "_parameters", {})
                if isinstance(params.get(attr), _tensor_type()):  # else not followed (not a Parameter)
                    entries.append((params, attr, params[attr], params[attr].data_ptr()))
        self.edges, self.entries = list(edges.values()), entries

    def changed(self) -> bool:
        for modules, key, child in self.edges:
            if modules.get(key) is not child:
                return True
        for params, attr, tensor, ptr in self.entries:
            t = params.get(attr)
            if t is not tensor or t.data_ptr() != ptr:
                return True
        return False

    def current(self, graph: Graph) -> dict[str, Any]:
        """{name: the module's tensor now} in the form `graph` reads it (float32 weights the program keeps
        as bfloat16 or int8 are converted: `passes.weights.stored_form`), checked like `check_weights`;
        WeightBindingError when a parameter is gone or changed its shape or dtype (compile again)."""
        types, found, missing = weight_types(graph), {}, []
        for name in self.names:
            try:
                t = self.module.get_parameter(name)
            except AttributeError:
                try:  # a plain tensor attribute in its place is fine too
                    *path, attr = name.split(".")
                    t = getattr(self.module.get_submodule(".".join(path)), attr)
                except AttributeError:
                    t = None
            if not isinstance(t, torch.Tensor):
                missing.append(name)
                continue
            found[name] = t
        try:
            if missing:
                raise WeightBindingError(f"{', '.join(missing[:4])}: no longer a tensor of the module")
            return check_weights(graph, stored_form(types, found))
        except WeightBindingError as e:
            raise WeightBindingError(f"a parameter of the module changed since it was compiled, and the "
                                     f"compiled program cannot take it (compile the module again): {e}") from None

    def refresh(self, graph: Graph, bind: Any) -> None:
        """If the module's parameters changed, `bind(current tensors)` and remember them (once, under the
        lock, when several threads notice the change together)."""
        with self.lock:
            if self.changed():
                bind(self.current(graph))
                self._record()


def _tensor_type():
    return torch.Tensor
