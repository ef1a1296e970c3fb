"""Tracing: nn.Module + example inputs -> torch.fx graph in core ATen -> fusec IR.

torch.export captures the module and `run_decompositions` brings it to core ATen; each fx node is then
lowered through the table in `fusec.lowering`. This is the only module that touches torch.fx.

Constant subgraphs (masks from `arange`/comparisons, rotary tables from buffers and constant positions)
are evaluated here with torch on their real values and enter the IR as constants, so any ATen op may
appear in them; what depends on an input must lower to primitives or raise `UnsupportedOpError`.
Parameters become `param` nodes referring to the module's own tensors (no copies).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

import fusec.lowering_tensor  # noqa: F401 - registers the tensor lowerings
from fusec.dtypes import from_torch
from fusec.errors import FusecError, UnsupportedOpError
from fusec.ir import Builder, Graph, TensorType
from fusec.lowering import LOWERINGS, TV, Lowerer

# fx nodes that only check metadata at run time; they produce nothing the graph needs
IGNORED = {"aten._assert_tensor_metadata", "aten._assert_scalar", "aten.sym_constrain_range_for_size",
           "aten._assert_async", "aten.sym_constrain_range"}
FOLD_LIMIT = 1 << 24  # largest constant (elements) evaluated at trace time


@dataclass
class Traced:
    """The IR of a module plus what the runtime needs to call it with the module's signature."""

    graph: Graph
    fx_graph: Any          # the core-ATen torch.fx GraphModule (for `fusec dump --stage fx`)
    in_spec: Any           # pytree spec of (args, kwargs)
    out_spec: Any          # pytree spec of the outputs
    input_leaves: list     # per flat input leaf: "tensor" or the constant the trace specialized on
    input_names: list[str]
    module_name: str = ""


def export(module: torch.nn.Module, args: tuple, kwargs: dict | None = None):
    """torch.export the module and decompose it to core ATen."""
    kwargs = kwargs or {}
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"fusec.compile expects a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(args, tuple):
        args = (args,)
    try:
        with torch.no_grad():
            program = torch.export.export(module, args, kwargs, strict=False)
            return program.run_decompositions()
    except FusecError:
        raise
    except Exception as e:  # export's own errors are long; keep the first line and the type
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FusecError(f"torch.export could not capture {type(module).__name__}: {first}") from e


def trace(module: torch.nn.Module, args: tuple, kwargs: dict | None = None) -> Traced:
    """Trace `module` on example inputs into fusec IR."""
    if not isinstance(args, tuple):
        args = (args,)
    program = export(module, args, kwargs)
    traced = lower_program(program, module)
    traced.module_name = type(module).__name__
    return traced


def _origin(node) -> str:
    """'module.path (file.py:line)' of the user code an fx node came from, for error messages."""
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else ""
    trace = (node.meta.get("stack_trace") or "").strip().splitlines()
    where = ""
    for line in reversed(trace):
        line = line.strip()
        if line.startswith("File "):
            parts = line.split('"')
            lineno = line.split("line ")[-1].split(",")[0] if "line " in line else "?"
            where = f"{parts[1] if len(parts) > 1 else line}:{lineno}"
            break
    if path and where:
        return f"{path} ({where})"
    return path or where or node.name


def lower_program(program, module: torch.nn.Module) -> Traced:
    from torch.export.graph_signature import InputKind
    sig = program.graph_signature
    b = Builder()
    cx = Lowerer(b)
    env: dict[Any, Any] = {}
    state = dict(program.state_dict)
    state.update(getattr(program, "constants", {}) or {})
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    user_index = 0
    input_names = []
    for node, spec in zip(placeholders, sig.input_specs):
        if spec.kind == InputKind.USER_INPUT:
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor):
                env[node] = getattr(spec.arg, "value", None)
                continue
            ttype = TensorType(tuple(int(d) for d in val.shape), from_torch(val.dtype))
            env[node] = TV(b.add("input", (), {"index": user_index, "name": node.name}, ttype))
            input_names.append(node.name)
            user_index += 1
        elif spec.kind == InputKind.PARAMETER:
            tensor = state[spec.target]
            b.tensors[spec.target] = tensor
            ttype = TensorType(tuple(tensor.shape), from_torch(tensor.dtype))
            env[node] = TV(b.add("param", (), {"name": spec.target}, ttype))
        elif spec.kind in (InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            env[node] = state[spec.target]  # a constant: folded where used
        else:
            raise UnsupportedOpError(f"input kind {spec.kind.name}", node.name)
    for node in program.graph.nodes:
        if node.op == "call_function":
            env[node] = _lower_node(cx, node, env)
        elif node.op == "output":
            flat = list(pytree.tree_leaves(node.args[0]))
    outputs = []
    for spec, out in zip(sig.output_specs, flat):
        if spec.kind.name != "USER_OUTPUT":
            raise UnsupportedOpError(f"output kind {spec.kind.name} (in-place update of a buffer)", out.name)
        value = env[out]
        outputs.append(cx.tensor(value).id)
    graph = b.finish(outputs)
    in_leaves = pytree.tree_leaves(program.example_inputs) if program.example_inputs else []
    leaves = ["tensor" if isinstance(x, torch.Tensor) else x for x in in_leaves]
    return Traced(graph, program.graph_module, program.call_spec.in_spec, program.call_spec.out_spec,
                  leaves, input_names)


def _is_const(x: Any) -> bool:
    return not any(isinstance(v, TV) for v in pytree.tree_leaves(x))


def _lower_node(cx: Lowerer, node, env: dict) -> Any:
    target = node.target
    args = pytree.tree_map(lambda a: env[a] if isinstance(a, torch.fx.Node) else a, node.args)
    kwargs = pytree.tree_map(lambda a: env[a] if isinstance(a, torch.fx.Node) else a, dict(node.kwargs))
    if target is operator.getitem:
        return args[0][args[1]]
    name = _packet_name(target)
    if name in IGNORED:
        return None
    val = node.meta.get("val")
    if _is_const((args, kwargs)) and _numel(val) <= FOLD_LIMIT:
        with torch.no_grad():
            return target(*args, **kwargs)  # a shape/value-only computation: fold it now
    lower = LOWERINGS.get(name)
    cx.out, cx.origin, cx.current = val, _origin(node), name
    if lower is None:
        raise UnsupportedOpError(str(target), cx.origin)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("device", "layout", "pin_memory", "memory_format",
                                                            "non_blocking")}
    if name in ("aten._to_copy", "aten.to"):
        kwargs = {}
    try:
        result = lower(cx, *args, **kwargs)
    except FusecError:
        raise
    except TypeError as e:
        raise UnsupportedOpError(str(target), cx.origin, f"arguments not supported: {e}") from e
    _check_matches(cx, node, result, val)
    return result


def _packet_name(target) -> str:
    name = getattr(target, "name", None)
    text = name() if callable(name) else str(target)
    text = text.replace("::", ".")
    return ".".join(text.split(".")[:2])


def _numel(val) -> int:
    return max((int(v.numel()) for v in pytree.tree_leaves(val) if isinstance(v, torch.Tensor)), default=0)


def _check_matches(cx: Lowerer, node, result, val) -> None:
    """A lowering must produce exactly the shape and dtype torch.export recorded."""
    results = result if isinstance(result, tuple) else (result,)
    vals = val if isinstance(val, (tuple, list)) else (val,)
    for r, v in zip(results, vals):
        if isinstance(r, TV) and isinstance(v, torch.Tensor):
            got = cx.type(r)
            want = TensorType(tuple(int(d) for d in v.shape), from_torch(v.dtype))
            if got != want:
                raise FusecError(f"internal: lowering {node.target} at {cx.origin} gave {got}, expected {want}")
