"""fusec behind `torch.compile`: `torch.compile(model, backend="fusec")`.

The backend is registered through the `torch_dynamo_backends` entry point (setup.py), so it works right
after `pip install`, without importing fusec. Dynamo hands over one torch.fx graph per region between
graph breaks; each becomes a `DynamoGraph`, which compiles it with fusec's own tracing (torch.export of
the graph module, core-ATen decompositions) on the first call, for the shapes of that call.

- Inference only: a graph Dynamo captured with autograd enabled and inputs that require grad runs in
  PyTorch eager (with a warning); call the model under `torch.no_grad()` or `torch.inference_mode()`.
- Parameters (inputs Dynamo passes as `nn.Parameter`) stay parameters: fusec reads them in place, as
  weights. A call with other parameter objects (another instance of the same module) compiles again.
- Shapes: Dynamo guards its graphs. A graph captured with dynamic shapes (`torch.compile(...,
  dynamic=True)`, or after Dynamo saw a second size) compiles once, with those dimensions symbolic
  (`fusec.tracing_sym`): the size arguments Dynamo passes alongside are read from the tensors' shapes
  instead. Other shapes (and sizes outside the range torch.export finds) compile a program each.
- A graph fusec cannot compile (torch.export fails on it, or fusec itself fails) runs in PyTorch eager,
  with a warning naming the error; ops without a lowering run through PyTorch inside the fusec program as
  usual.

Options: `torch.compile(model, backend="fusec", options={"fuse": False, "backend": "reference",
"strict": True})`.
"""
from __future__ import annotations

import threading
import warnings
import weakref
from typing import Any, Callable, Sequence

import torch

import fusec
from fusec.errors import FusecError, UnsupportedOpError

OPTIONS = ("backend", "fuse", "strict", "cache_limit")
CACHE_LIMIT = 64  # programs per graph: Dynamo has guarded the inputs, so each new one is legitimate
_LIVE: weakref.WeakSet = weakref.WeakSet()


def graphs() -> list[DynamoGraph]:
    """The graphs handed to the fusec backend that are still in use (for tests and debugging)."""
    return list(_LIVE)


def fusec_backend(gm: torch.nn.Module, example_inputs: Sequence[Any], options: dict | None = None,
                  **kwargs) -> Callable:
    """The Dynamo backend: returns the callable that runs `gm` (see the module docstring)."""
    options = {**(options or {}), **kwargs}
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise ValueError(f"unknown fusec backend option(s) {sorted(unknown)}; expected {', '.join(OPTIONS)}")
    if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs):
        warnings.warn("fusec compiles inference graphs; this graph was captured with autograd enabled and "
                      "inputs that require grad, so it runs in PyTorch eager. Call the model under "
                      "torch.no_grad() or torch.inference_mode() to use fusec.", stacklevel=2)
        return gm.forward
    return DynamoGraph(gm, example_inputs, options)


class _Graph(torch.nn.Module):
    """Dynamo's graph module as a module fusec can trace: the parameters it receives as inputs are
    registered as this module's parameters (the same objects: no copies), the rest are its inputs."""

    def __init__(self, gm: torch.nn.Module, params: dict[int, torch.nn.Parameter], arity: int,
                 derived: dict[int, tuple[int, int]] | None = None, scalars: dict[int, torch.Tensor] | None = None):
        super().__init__()
        self.gm = gm
        self.arity = arity
        self.derived = derived or {}  # size argument -> (argument, axis) whose size it is
        self.positions = sorted(params)
        for i, p in params.items():
            self.register_parameter(f"p{i}", p)
        self.scalars = sorted(scalars or {})  # rank-0 tensors Dynamo made of float attributes: constants
        for i, t in (scalars or {}).items():
            self.register_buffer(f"c{i}", t.detach().clone())

    def forward(self, *inputs):
        it = iter(inputs)
        args = [getattr(self, f"p{i}") if i in self.positions else getattr(self, f"c{i}") if i in self.scalars
                else None if i in self.derived else next(it) for i in range(self.arity)]
        for i, (j, axis) in self.derived.items():
            args[i] = args[j].shape[axis]
        return self.gm(*args)


class DynamoGraph:
    """One graph Dynamo captured, compiled by fusec on first use (per set of parameter objects)."""

    def __init__(self, gm: torch.nn.Module, example_inputs: Sequence[Any], options: dict):
        self.gm = gm
        self.options = options
        self.arity = len(example_inputs)
        self.positions = [i for i, x in enumerate(example_inputs) if isinstance(x, torch.nn.Parameter)]
        self.derived, self.dynamic = _symbolic_sizes(gm, self.positions)
        # rank-0 float tensors (float attributes, e.g. a norm's eps, under dynamic=True): constants of the
        # program, their values part of the key of the compiled program
        self.scalars = [i for i, x in enumerate(example_inputs) if i not in self.positions and i not in self.derived
                        and isinstance(x, torch.Tensor) and x.dim() == 0 and x.is_floating_point()] if self.dynamic else []
        self._compiled: dict[tuple[int, ...], tuple[list, Any]] = {}
        self._eager = False
        self._lock = threading.Lock()
        _LIVE.add(self)

    @property
    def compiled(self) -> list:
        """The fusec CompiledModules made for this graph so far (one per set of parameter objects)."""
        return [c for _, c in self._compiled.values()]

    @property
    def eager(self) -> bool:
        """True when fusec could not compile this graph and it runs in PyTorch."""
        return self._eager

    def __call__(self, *args):
        if self._eager:
            return self.gm(*args)
        params = [args[i] for i in self.positions]
        compiled = self._compiled_for(params, args)
        if compiled is None:
            return self.gm(*args)
        skip = set(self.positions) | set(self.derived) | set(self.scalars)
        return compiled(*[a for i, a in enumerate(args) if i not in skip])

    def _known(self, key: tuple, params: list):
        found = self._compiled.get(key)
        if found is not None and all(ref() is p for ref, p in zip(found[0], params)):
            return found[1]
        return None

    def _compiled_for(self, params: list, args: tuple):
        key = tuple(id(p) for p in params) + tuple(float(args[i]) for i in self.scalars)
        known = self._known(key, params)
        if known is not None:
            return known
        with self._lock:
            known = self._known(key, params)  # another thread may have compiled it meanwhile
            if known is not None or self._eager:
                return known
            module = _Graph(self.gm, dict(zip(self.positions, params)), self.arity, self.derived,
                            {i: args[i] for i in self.scalars})
            skip = set(self.positions) | set(self.derived) | set(self.scalars)
            user = tuple(a for i, a in enumerate(args) if i not in skip)
            try:
                compiled = fusec.compile(module, user, backend=self.options.get("backend", "numba"),
                                         fuse=self.options.get("fuse", True),
                                         strict=self.options.get("strict", False),
                                         dynamic=self.dynamic or None,
                                         recompile=True,
                                         cache_limit=self.options.get("cache_limit", CACHE_LIMIT))
            except Exception as e:  # noqa: BLE001 - an internal error too: eager still gives the right answer
                if isinstance(e, UnsupportedOpError) and self.options.get("strict"):
                    raise
                what = e if isinstance(e, FusecError) else f"{type(e).__name__}: {e} (a fusec bug: please report it)"
                warnings.warn(f"fusec could not compile a graph torch.compile captured; it runs in PyTorch "
                              f"eager: {what}", stacklevel=3)
                self._eager = True
                return None
            if len(self._compiled) >= 8:  # parameter sets seen before: keep a few
                self._compiled.pop(next(iter(self._compiled)))
            self._compiled[key] = ([weakref.ref(p) for p in params], compiled)
            return compiled


def _symbolic_sizes(gm: torch.nn.Module, params: list[int]) -> tuple[dict, dict]:
    """(size arguments Dynamo passes that are a dimension of a tensor argument: {position: (tensor
    position, axis)}, the symbolic dimensions of the tensor arguments by position among them (what
    `fusec.compile`'s `dynamic` takes)), read from the placeholders' example values."""
    holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = [n.meta.get("example_value") for n in holders]
    where: dict[str, tuple[int, int]] = {}
    dynamic: dict[int, set[int]] = {}
    tensors = [i for i, v in enumerate(values) if isinstance(v, torch.Tensor) and i not in params]
    for k, i in enumerate(tensors):
        for axis, d in enumerate(values[i].shape):
            if isinstance(d, torch.SymInt):
                where.setdefault(str(d.node.expr), (i, axis))
                dynamic.setdefault(k, set()).add(axis)
    derived = {i: where[str(v.node.expr)] for i, v in enumerate(values)
               if isinstance(v, torch.SymInt) and str(v.node.expr) in where}
    return derived, dynamic
