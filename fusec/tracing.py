"""Tracing: nn.Module + example inputs -> torch.fx graph (torch.export's, or in core ATen) -> fusec IR.

torch.export captures the module; each fx node is then lowered through the table in `fusec.lowering`.
When every op of the captured program has a lowering that gives what its core-ATen decomposition would
(`fusec.lowering_direct`), it is lowered as captured; otherwise `run_decompositions` first brings it to
core ATen (that retrace costs about as much as the export). This is the only module that touches torch.fx.

Constant subgraphs (masks from `arange`/comparisons, rotary tables from buffers and constant positions)
are evaluated here with torch on their real values and enter the IR as constants, so any ATen op may
appear in them. An op that depends on an input and has no lowering (or whose lowering rejects its
arguments) becomes an `extern` node run by PyTorch (`fusec.fallback`); with `strict=True` it raises
`UnsupportedOpError` instead. Parameters become `param` nodes referring to the module's own tensors
(the program follows them, `fusec.binding.Follow`); buffers and constant tensors are copied when traced, so
the program keeps their traced values and never reads the module's memory for them.
"""
from __future__ import annotations

import copy
import operator
import os
import sys
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.export.graph_signature import InputKind

import fusec.lowering_tensor  # noqa: F401 - registers the tensor lowerings
from fusec.debug import debug
from fusec.dtypes import from_torch
from fusec.errors import FusecError, UnsupportedOpError
from fusec.fallback import EXTERN, encode_call, is_random, qualified_name
from fusec.ir import Builder, Graph, TensorType
from fusec.lowering import IGNORED, LOWERINGS, TV, Lowerer, packet_name as _packet_name
from fusec.lowering_direct import NotDirect, direct_ok  # also registers torch.export's own ops' lowerings
from fusec.symbolic import Sym
from fusec.tracing_sym import SizeMap, dynamic_spec

FOLD_LIMIT = 1 << 24  # largest constant (elements) evaluated at trace time
DIRECT = os.environ.get("FUSEC_DIRECT", "1") != "0"  # 0: always decompose to core ATen first (for comparing)


@dataclass
class Traced:
    """The IR of a module plus what the runtime needs to call it with the module's signature."""

    graph: Graph
    fx_graph: Any          # the torch.fx GraphModule lowered (for `fusec dump --stage fx`)
    in_spec: Any           # pytree spec of (args, kwargs)
    out_spec: Any          # pytree spec of the outputs
    input_leaves: list     # per flat input leaf: "tensor" or the constant the trace specialized on
    input_names: list[str]
    module_name: str = ""
    output_constants: dict = field(default_factory=dict)  # flat output position -> a non-tensor output
    # (the IR of two layers, the number of layers, the module's tensors by name) when `graph` was expanded
    # from a trace of two layers (`fusec.trace_layers`): the passes may run on the two (`fusec.expand_loop`)
    two_layers: tuple | None = None


_EXPORT_LOCK = threading.RLock()  # re-entered, it is no deadlock: torch.export raises instead


@contextmanager
def exporting():
    """Held while torch.export runs. Two threads exporting at once break each other's global state, and
    while it traces, torch.export swaps the builtins min and max (and math.pow) for tensor-aware versions:
    Numba, typing a function in another thread meanwhile, would find those instead of the builtins and
    fail. So the export also holds Numba's compiler lock, keeping out every Numba compile of this process
    (fusec's kernels or a user's own) for that time. Where Numba is not loaded yet (the reference backend),
    nothing compiles with it, and loading it here would bring SciPy into every cold trace."""
    numba_lock = sys.modules.get("numba.core.compiler_lock")
    with _EXPORT_LOCK, (numba_lock.global_compiler_lock if numba_lock else nullcontext()):
        yield


def export(module: torch.nn.Module, args: tuple, kwargs: dict | None = None, dynamic_shapes: Any = None,
           decompose: bool = True):
    """torch.export the module (`dynamic_shapes`: see `fusec.tracing_sym`) and, with `decompose`,
    decompose it to core ATen (`decompose(program)` does that later)."""
    kwargs = kwargs or {}
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"fusec.compile expects a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(args, tuple):
        args = (args,)
    with _export_errors(module, dynamic_shapes), exporting():
        with torch.no_grad():
            program = torch.export.export(module, args, kwargs, strict=False, dynamic_shapes=dynamic_shapes)
    return decompose(program, module, dynamic_shapes) if decompose else program


def decompose(program, module: Any = None, dynamic_shapes: Any = None):
    """The exported `program` in core ATen."""
    with _export_errors(module, dynamic_shapes), exporting():
        with torch.no_grad():
            return program.run_decompositions()


@contextmanager
def _export_errors(module: Any, dynamic_shapes: Any):
    """torch.export's errors as a FusecError naming the module (its own messages are long: the first line
    and the type are kept, and the bounds it suggests for a dynamic size)."""
    try:
        yield
    except FusecError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        fixes = [ln.strip() for ln in str(e).splitlines() if "= Dim(" in ln or "must be" in ln][:3]
        if dynamic_shapes is not None and fixes:  # torch.export's suggested bounds for a dynamic size
            asked = ", ".join(f"{d.__name__} in {d.min}..{d.max}" for d in _dims(dynamic_shapes))
            first += " (" + "; ".join(fixes) + ")" + (f"; dynamic asked for {asked}" if asked else "")
        raise FusecError(f"torch.export could not capture {type(module).__name__}: {first}") from e


def _dims(dynamic_shapes: Any) -> list:
    """The named sizes (torch.export `Dim`s) in a `dynamic_shapes` tree, each once."""
    if isinstance(dynamic_shapes, torch.export.ShapesCollection):
        dynamic_shapes = dynamic_shapes._shapes  # tensor id -> its sizes (no public view of them)
    if isinstance(dynamic_shapes, dict):
        dynamic_shapes = list(dynamic_shapes.values())
    if isinstance(dynamic_shapes, (list, tuple)):
        found = [d for part in dynamic_shapes for d in _dims(part)]
        return list({d.__name__: d for d in found}.values())
    return [dynamic_shapes] if isinstance(dynamic_shapes, torch.export.Dim) else []


def trace(module: torch.nn.Module, args: tuple, kwargs: dict | None = None, strict: bool = False,
          dynamic: Any = None) -> Traced:
    """Trace `module` on example inputs into fusec IR (`strict`: unsupported ops raise, see the module
    docstring; `dynamic`: symbolic sizes, see `fusec.tracing_sym`)."""
    if not isinstance(args, tuple):
        args = (args,)
    shapes, _ = dynamic_spec(module, args, kwargs or {}, dynamic)
    program = export(module_tree_copy(module), args, kwargs, shapes, decompose=False)
    why = direct_ok(program) if DIRECT else "FUSEC_DIRECT=0"
    traced = None
    if why is None:
        try:
            traced = lower_program(program, module, strict, direct=True)
        except NotDirect as e:
            why = str(e)
    if traced is None:
        debug(2, f"[fusec] {type(module).__name__}: decomposed to core ATen first ({why})")
        program = decompose(program, module, shapes)
        traced = lower_program(program, module, strict)
    traced.module_name = type(module).__name__
    return traced


def module_tree_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module`'s tree of submodules holding the very same parameter and buffer tensors.

    torch.export swaps a module's parameters for fake tensors while it traces (and patches attributes):
    tracing this copy leaves the user's modules untouched, so another thread can keep calling them in
    eager meanwhile. The parameter names, and the tensors the program reads and follows, are the same."""
    if not isinstance(module, torch.nn.Module):
        return module  # `export` says what it expects
    copies: dict[int, torch.nn.Module] = {}

    def copy_of(m: torch.nn.Module) -> torch.nn.Module:
        if id(m) not in copies:  # a submodule used twice stays one module
            twin = copies[id(m)] = copy.copy(m)  # a new object with a shallow copy of the attributes
            twin._parameters = dict(m._parameters)
            twin._buffers = dict(m._buffers)
            twin._modules = {k: None if c is None else copy_of(c) for k, c in m._modules.items()}
            for name, value in vars(m).items():  # hooks registered while tracing stay on the copy too
                if "hook" in name and isinstance(value, dict):
                    setattr(twin, name, copy.copy(value))
        return copies[id(m)]
    return copy_of(module)


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


def lower_program(program, module: torch.nn.Module, strict: bool = False, direct: bool = False) -> Traced:
    """The IR of an exported `program`: in core ATen, or (`direct`) as torch.export gave it, where an op
    that would fall back to PyTorch raises NotDirect instead (its decomposition may lower)."""
    sig = program.graph_signature
    b = Builder()
    cx = Lowerer(b)
    cx.size = SizeMap(program)  # torch's symbolic sizes -> fusec.symbolic (ints stay ints)
    cx.strict = strict
    cx.direct = direct
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
            ttype = TensorType(cx.size.shape(val.shape), from_torch(val.dtype))
            env[node] = TV(b.add("input", (), {"index": user_index, "name": node.name}, ttype))
            input_names.append(node.name)
            user_index += 1
        elif spec.kind == InputKind.PARAMETER:
            tensor = state[spec.target]
            b.tensors[spec.target] = tensor
            ttype = TensorType(tuple(tensor.shape), from_torch(tensor.dtype))
            env[node] = TV(b.add("param", (), {"name": spec.target}, ttype))
        elif spec.kind in (InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            # a constant: folded where used. A copy, so that the program never reads the module's own
            # memory (share_memory() frees it), and a buffer keeps its value as traced
            env[node] = state[spec.target].detach().clone()
        else:
            raise UnsupportedOpError(f"input kind {spec.kind.name}", node.name)
    for node in program.graph.nodes:
        if node.op == "call_function":
            env[node] = _lower_node(cx, node, env)
        elif node.op == "output":
            flat = list(pytree.tree_leaves(node.args[0]))
    outputs, constants = [], {}
    for k, (spec, out) in enumerate(zip(sig.output_specs, flat)):
        if spec.kind.name != "USER_OUTPUT":
            raise UnsupportedOpError(f"output kind {spec.kind.name} (in-place update of a buffer)", out.name)
        value = env[out] if isinstance(out, torch.fx.Node) else out
        if isinstance(value, (TV, torch.Tensor)):
            outputs.append(cx.tensor(value).id)
        else:  # None, a number, a string: returned as traced
            constants[k] = value
    graph = b.finish(outputs)
    in_leaves = pytree.tree_leaves(program.example_inputs) if program.example_inputs else []
    leaves = ["tensor" if isinstance(x, torch.Tensor) else x for x in in_leaves]
    return Traced(graph, program.graph_module, program.call_spec.in_spec, program.call_spec.out_spec,
                  leaves, input_names, output_constants=constants)


def _is_const(x: Any) -> bool:
    return not any(isinstance(v, (TV, Sym)) for v in pytree.tree_leaves(x))


def _lower_node(cx: Lowerer, node, env: dict) -> Any:
    target = node.target
    args = pytree.tree_map(lambda a: env[a] if isinstance(a, torch.fx.Node) else a, node.args)
    kwargs = pytree.tree_map(lambda a: env[a] if isinstance(a, torch.fx.Node) else a, dict(node.kwargs))
    val = node.meta.get("val")
    if isinstance(val, torch.SymInt):  # a size computed from a symbolic one (x.size(1), T + past)
        return cx.size(val)
    if target is operator.getitem:
        return args[0][args[1]]
    name = _packet_name(target)
    if name in IGNORED:
        return None
    if _is_const((args, kwargs)) and _numel(val) <= FOLD_LIMIT:
        with torch.no_grad():
            return target(*args, **kwargs)  # a shape/value-only computation: fold it now
    lower = LOWERINGS.get(name)
    cx.out, cx.origin, cx.current, cx.node = val, _origin(node), name, node
    if lower is None:
        return _fallback(cx, target, args, kwargs, UnsupportedOpError(str(target), cx.origin), "no lowering")
    call_kwargs = {k: v for k, v in kwargs.items() if k not in ("device", "layout", "pin_memory",
                                                                 "memory_format", "non_blocking")}
    if name in ("aten._to_copy", "aten.to"):
        call_kwargs = {}
    try:
        result = lower(cx, *args, **call_kwargs)
    except UnsupportedOpError as e:
        return _fallback(cx, target, args, kwargs, e, f"the lowering does not support {_what(e)}", cause=e)
    except FusecError:
        raise
    except TypeError as e:
        error = UnsupportedOpError(str(target), cx.origin, f"arguments not supported: {e}")
        return _fallback(cx, target, args, kwargs, error, f"the lowering does not support {_what(error)}", e)
    _check_matches(cx, node, result, val)
    return result


def _what(error: UnsupportedOpError) -> str:
    """The op and detail of an UnsupportedOpError's message, without its prefix and origin."""
    text = str(error).removeprefix("fusec does not support the op ")
    return text.removesuffix(f", used at {error.origin}") if error.origin else text


def _fallback(cx: Lowerer, target, args, kwargs: dict, error: UnsupportedOpError, reason: str,
              cause: Exception | None = None) -> Any:
    """One `extern` node per tensor the op returns (see `fusec.fallback`), or `error` when strict or
    when the op cannot run as a fallback (a random op, an argument JSON cannot carry, an odd result)."""
    if getattr(cx, "direct", False):
        raise NotDirect(f"{target} would run in PyTorch") from cause
    if cx.strict:
        raise error from cause
    qualified = qualified_name(target)
    why = ("random ops do not run as a torch fallback (a compiled program is deterministic)"
           if qualified and is_random(target) else None if qualified else "not an ATen op")
    if why:
        raise UnsupportedOpError(str(target), cx.origin, why) from cause
    operands: list[int] = []

    def operand(x: Any) -> int | None:
        if not isinstance(x, (TV, torch.Tensor)):
            return None
        operands.append(cx.tensor(x).id)  # a constant tensor becomes a const node
        return len(operands) - 1

    try:
        spec = encode_call(tuple(args), kwargs, operand)
    except TypeError as e:
        raise UnsupportedOpError(str(target), cx.origin, str(e)) from e
    leaves, out_spec = pytree.tree_flatten(cx.out)
    results = []
    for k, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor):
            results.append(leaf)
            continue
        try:
            ttype = TensorType(cx.size.shape(leaf.shape), from_torch(leaf.dtype))
        except FusecError as e:
            raise UnsupportedOpError(str(target), cx.origin, f"it returns a {leaf.dtype} tensor") from e
        attrs = {"target": qualified, "args": spec, "output": k, "reason": reason}
        results.append(TV(cx.b.add(EXTERN, operands, attrs, ttype, origin=cx.origin)))
    if not any(isinstance(r, TV) for r in results):
        raise UnsupportedOpError(str(target), cx.origin, "it returns no tensor") from cause
    return pytree.tree_unflatten(results, out_spec)


def _numel(val) -> int:
    return max((int(v.numel()) for v in pytree.tree_leaves(val) if isinstance(v, torch.Tensor)), default=0)


def _check_matches(cx: Lowerer, node, result, val) -> None:
    """A lowering must produce exactly the shape and dtype torch.export recorded."""
    results = result if isinstance(result, tuple) else (result,)
    vals = val if isinstance(val, (tuple, list)) else (val,)
    for r, v in zip(results, vals):
        if isinstance(r, TV) and isinstance(v, torch.Tensor):
            got = cx.type(r)
            want = TensorType(cx.size.shape(v.shape), from_torch(v.dtype))
            if got != want:
                raise FusecError(f"internal: lowering {node.target} at {cx.origin} gave {got}, expected {want}")
