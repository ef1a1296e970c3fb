"""The key of a traced program in the trace cache (`fusec.trace_cache`), or why it has none.

A key stands for everything the traced and lowered IR depends on, so that a stale hit is impossible:
fusec's own source (every .py file of fusec, passes and backends, hashed once per process), the versions
of torch, NumPy and Python, the module tree (each module's class, its non-tensor attributes, the names,
shapes, dtypes, requires_grad and sharing of its parameters, the values of its buffers), the example
inputs (tensor shapes, dtypes and devices, the values of non-tensor inputs, their structure), the
`dynamic` spec and `strict`.

Only modules whose code fusec owns have a key: every module of the tree is of a class defined in a
`fusec.` module or exactly one of torch.nn's standard modules (STANDARD), with no hook registered
(on it or globally), and every attribute a plain value (numbers, strings, containers of them, dtypes,
tensors, dataclasses of fusec). A user's module, a subclass, a transformers model, a function stored on a
module: no key, and the module is traced every time (its forward is code fusec cannot hash).
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import importlib.util
import json
import os
import platform
import sys
from typing import Any

import numpy
import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.nn.modules import module as torch_module

from fusec import tracing
from fusec.lowering import LOWERINGS

FORMAT = 1  # the layout of a cache entry (`fusec.trace_cache`); a new layout means new keys

# torch.nn modules whose forward depends only on their attributes, parameters and torch's version
STANDARD = (nn.Linear, nn.Embedding, nn.ModuleList, nn.ModuleDict, nn.Sequential, nn.Identity, nn.Dropout,
            nn.LayerNorm, nn.RMSNorm, nn.SiLU, nn.GELU, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Softmax)


class NoKey(Exception):
    """The module (or its inputs) cannot be cached; the message says why."""


@functools.lru_cache(maxsize=None)
def source_digest() -> str:
    """A hash of fusec's own Python files (the package fusec with its passes and backends), once per process."""
    digest = hashlib.sha256()
    for package in ("fusec", "fusec.passes", "fusec.backends"):
        spec = importlib.util.find_spec(package)
        for root in sorted(spec.submodule_search_locations or ()):
            for path in sorted(_python_files(root)):
                digest.update(os.path.relpath(path, root).encode() + b"\0")
                with open(path, "rb") as f:
                    digest.update(f.read() + b"\0")
    return digest.hexdigest()


def _python_files(root: str):
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        yield from (os.path.join(folder, f) for f in files if f.endswith(".py"))


def trace_key(module: nn.Module, args: tuple, kwargs: dict, dynamic: Any, strict: bool) -> str:
    """The key of tracing `module` on these inputs; NoKey says why there is none."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    try:
        structure = pytree.treespec_dumps(spec)
    except Exception as e:  # a container type torch cannot write down
        raise NoKey(f"the inputs' structure cannot be written ({type(e).__name__})") from None
    seen: dict[int, str] = {}
    described = {
        "lowerings": _functions(LOWERINGS, "lowering"), "fold_limit": tracing.FOLD_LIMIT,
        "format": FORMAT, "fusec": source_digest(), "torch": torch.__version__, "numpy": numpy.__version__,
        "python": platform.python_version(), "default_dtype": str(torch.get_default_dtype()),
        "strict": bool(strict), "module": _module(module, "", seen, {}),
        "inputs": [_input(x, k, seen) for k, x in enumerate(leaves)], "structure": structure,
        "dynamic": _dynamic(dynamic),
    }
    _check_global_hooks()
    text = json.dumps(described, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def passes_key() -> dict:
    """What the passes depend on besides the traced IR and their options: the pipeline's stages and
    passes (NoKey when one is not fusec's) and the machine the tiles are chosen for."""
    from fusec.machines import cpu
    # not imported yet: nobody registered a stage or replaced the machine, and the source digest covers
    # them (importing them costs a warm start 0.1 s)
    pipeline, tile = sys.modules.get("fusec.passes.pipeline"), sys.modules.get("fusec.passes.tile")
    stages: Any = "as written"
    if pipeline is not None and (pipeline.STAGES, pipeline.TARGETS) != pipeline.BUILT_IN:
        stages = [[[stage, _functions(dict(passes), "pass")] for stage, passes in pipeline.STAGES.items()],
                  pipeline.TARGETS]
    return {"stages": stages, "machine": repr((tile.cpu if tile else cpu)())}


def _functions(table: dict, what: str) -> list:
    """[name, module.qualname] of each function of `table`; NoKey for one fusec does not own (a lowering
    or pass registered from outside: its code is not in `source_digest`)."""
    out = []
    for name, fn in table.items():
        where = f"{getattr(fn, '__module__', None)}.{getattr(fn, '__qualname__', type(fn).__name__)}"
        if not where.startswith("fusec."):
            raise NoKey(f"the {what} {name} is {where}, not fusec's")
        out.append([name, where])
    return out


def _module(m: Any, path: str, seen: dict, modules: dict) -> Any:
    if id(m) in modules:  # one module in two places
        return ["same module as", modules[id(m)]]
    modules[id(m)] = path
    cls = type(m)
    if cls not in STANDARD and not cls.__module__.startswith("fusec."):
        raise NoKey(f"{path or 'the module'} is a {cls.__module__}.{cls.__qualname__}, not a module of fusec "
                    f"or a standard torch.nn module")
    out = {"class": f"{cls.__module__}.{cls.__qualname__}"}
    for name, value in vars(m).items():
        where = f"{path}.{name}" if path else name
        if name == "_modules":
            out[name] = [[k, None if c is None else _module(c, f"{path}.{k}" if path else k, seen, modules)]
                         for k, c in value.items()]
        elif name in ("_parameters", "_buffers"):
            out[name] = [[k, _tensor(t, f"{path}.{k}" if path else k, seen, name == "_buffers")]
                         for k, t in value.items()]
        elif "hook" in name:
            if value:
                raise NoKey(f"{where}: a hook is registered (fusec cannot see what it does)")
        else:
            out[name] = _value(value, where, seen)
    return out


def _tensor(t: Any, where: str, seen: dict, values: bool) -> Any:
    """A parameter's or buffer's description: its type, shape, dtype, requires_grad and layout; the value
    too for a buffer (`values`: tracing copies it into the program), or the name of the tensor it is."""
    if t is None:
        return None
    if type(t) not in (torch.Tensor, nn.Parameter):
        raise NoKey(f"{where} is a {type(t).__name__}")
    if id(t) in seen:
        return ["same tensor as", seen[id(t)]]
    seen[id(t)] = where
    if t.layout != torch.strided or t.device.type != "cpu" or t.requires_grad and t.grad_fn is not None:
        raise NoKey(f"{where} is not a plain CPU tensor")
    out = [type(t).__name__, list(t.shape), str(t.dtype), t.requires_grad, t.is_contiguous()]
    if values:
        out.append(_digest(t))
    return out


def _digest(t: torch.Tensor) -> str:
    data = t.detach().contiguous().reshape(-1)
    if data.is_conj() or data.is_neg():
        data = data.resolve_conj().resolve_neg()
    return hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest()


def _value(v: Any, where: str, seen: dict) -> Any:
    """A non-tensor attribute's value as JSON data that tells apart any two values that differ (and
    their types: 2, 2.0 and True differ); NoKey for a value it cannot describe."""
    if v is None or type(v) in (bool, int, str):
        return [type(v).__name__, v]
    if type(v) is float:
        return ["float", repr(v)]
    if type(v) in (tuple, list):
        return [type(v).__name__, [_value(x, f"{where}[{k}]", seen) for k, x in enumerate(v)]]
    if type(v) in (set, frozenset):
        return [type(v).__name__, sorted(json.dumps(_value(x, where, seen)) for x in v)]
    if type(v) is dict:
        return ["dict", [[_value(k, where, seen), _value(x, f"{where}[{k!r}]", seen)] for k, x in v.items()]]
    if isinstance(v, (torch.dtype, torch.device)):
        return [type(v).__name__, str(v)]
    if isinstance(v, torch.Tensor):  # a plain tensor attribute: a constant of the trace, like a buffer
        return ["tensor", _tensor(v, where, seen, values=True)]
    cls = type(v)
    if cls.__module__.startswith("fusec.") and (dataclasses.is_dataclass(v) or isinstance(v, enum.Enum)):
        if isinstance(v, enum.Enum):
            return [f"{cls.__module__}.{cls.__qualname__}", v.name]
        return [f"{cls.__module__}.{cls.__qualname__}",
                [[k, _value(x, f"{where}.{k}", seen)] for k, x in vars(v).items()]]
    raise NoKey(f"{where} holds a {cls.__module__}.{cls.__qualname__}")


def _input(x: Any, k: int, seen: dict) -> Any:
    if isinstance(x, torch.Tensor):
        if type(x) is not torch.Tensor or x.layout != torch.strided:
            raise NoKey(f"input {k} is a {type(x).__name__}")
        alias = seen.get(id(x))
        seen[id(x)] = f"input {k}"
        return ["tensor", list(x.shape), str(x.dtype), str(x.device), x.requires_grad, alias]
    return _value(x, f"input {k}", seen)


def _dynamic(dynamic: Any) -> Any:
    """The `dynamic` spec (see `fusec.tracing_sym`): None, a bool, or {input: axes}, where a bound is
    (lo, hi) or a torch.export Dim."""
    if dynamic is None or type(dynamic) is bool:
        return dynamic
    if not isinstance(dynamic, dict):
        raise NoKey(f"dynamic is a {type(dynamic).__name__}")
    out = []
    for key, axes in dynamic.items():
        if isinstance(axes, dict):
            axes = [[a, _dim(b)] for a, b in axes.items()]
        else:
            axes = _value(axes, "dynamic", {})
        out.append([_value(key, "dynamic", {}), axes])
    return out


def _dim(bounds: Any) -> Any:
    if bounds is None or isinstance(bounds, tuple):
        return _value(bounds, "dynamic", {})
    if type(bounds).__name__ == "Dim" and type(bounds).__module__.startswith("torch.export"):
        return ["Dim", bounds.__name__, bounds.min, bounds.max]  # a named Dim (not one derived from another)
    raise NoKey(f"dynamic holds {bounds!r}")


def _check_global_hooks() -> None:
    for name in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_forward_hooks_always_called",
                 "_global_forward_hooks_with_kwargs"):
        if getattr(torch_module, name, None):
            raise NoKey("a global module hook is registered")
