"""`fusec.compile`: trace a module, run the pass pipeline, hand the graph to a backend, and wrap the
result in a callable with the module's signature that takes and returns torch tensors."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.utils._pytree as pytree

from fusec.dtypes import to_torch
from fusec.ir import Graph, TensorType

BACKENDS = ("numba", "reference")


class CompiledModule:
    """A compiled program. Call it like the module; `.graph` is the final IR, `.source` generated code."""

    def __init__(self, traced, graph: Graph, run: Callable, backend: str, source: str = "",
                 stats: dict | None = None):
        self.traced = traced
        self.graph = graph
        self.backend = backend
        self.source = source
        self.stats = stats or {}
        self._run = run

    def __call__(self, *args, **kwargs):
        arrays = self._check_inputs(args, kwargs)
        outs = self._run(arrays)
        tensors = [torch.from_numpy(np.array(o)) for o in outs]  # owned copies: outputs may be views of weights
        return pytree.tree_unflatten(tensors, self.traced.out_spec)

    def _check_inputs(self, args: tuple, kwargs: dict) -> list[np.ndarray]:
        """Flatten the call's inputs like the traced ones; raise TypeError/ValueError on a mismatch."""
        leaves, spec = pytree.tree_flatten((args, kwargs))
        expected = self.traced.input_leaves
        if spec != self.traced.in_spec:
            n_tensors = sum(1 for x in expected if isinstance(x, str) and x == "tensor")
            raise TypeError(f"compiled {self.name} expects {n_tensors} input tensor(s) like the example inputs "
                            f"({self._signature()}); got {len(args)} positional and {len(kwargs)} keyword "
                            f"argument(s): {_describe(args, kwargs)}")
        arrays = []
        types = self.graph.input_types
        for leaf, want in zip(leaves, expected):
            if isinstance(want, str) and want == "tensor":
                arrays.append(self._check_tensor(len(arrays), leaf, types[len(arrays)]))
            elif leaf != want:
                raise ValueError(f"compiled {self.name} was traced with the constant {want!r} for this "
                                 f"argument; got {leaf!r} (compile again for another value)")
        return arrays

    def _check_tensor(self, i: int, x: Any, want: TensorType) -> np.ndarray:
        name = self.traced.input_names[i]
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input {i} ({name}) must be a torch.Tensor {want}, got {type(x).__name__}")
        if x.dtype != to_torch(want.dtype):
            raise TypeError(f"input {i} ({name}) must have dtype {to_torch(want.dtype)}, got {x.dtype}")
        if tuple(x.shape) != want.shape:
            raise ValueError(f"input {i} ({name}) must have shape {list(want.shape)}, got {list(x.shape)}")
        if x.device.type != "cpu":
            raise ValueError(f"input {i} ({name}) must be on the CPU, got {x.device}")
        return x.detach().numpy()

    @property
    def name(self) -> str:
        return self.traced.module_name

    def _signature(self) -> str:
        return ", ".join(f"{n}: {t}" for n, t in zip(self.traced.input_names, self.graph.input_types))

    def __repr__(self) -> str:
        return f"<fusec compiled {self.name} backend={self.backend} ({self._signature()})>"


def _describe(args: tuple, kwargs: dict) -> str:
    def one(x):
        return f"{x.dtype}{list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
    parts = [one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]
    return ", ".join(parts) or "nothing"


def compile(module: torch.nn.Module, example_inputs: Any = (), example_kwargs: dict | None = None, *,
            backend: str = "numba", fuse: bool = True) -> CompiledModule:
    """Compile `module` for inputs like `example_inputs` (a tuple of positional inputs, or one tensor).

    `backend="numba"` (default) generates one JIT-compiled function per fused kernel; `"reference"` runs
    the IR op by op with NumPy. `fuse=False` gives the unfused program (one kernel per primitive op).
    Returns a callable with the module's signature; it checks every call's inputs against the traced
    ones (count, shape, dtype) and raises TypeError/ValueError naming what was expected and given.
    """
    import time

    from fusec.tracing import trace
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    start = time.perf_counter()
    traced = trace(module, example_inputs, example_kwargs)
    graph = lower(traced.graph, fuse=fuse)
    if backend == "reference":
        from backends.reference import compile_graph
        return CompiledModule(traced, graph, compile_graph(graph), backend, stats=program_stats(graph))
    from backends.numba_cpu.runtime import Program
    program = Program(graph)
    compiled = CompiledModule(traced, graph, program.run, backend, program.source,
                              {**program_stats(graph), "intermediate_bytes": program.intermediate_bytes})
    compiled(*example_inputs, **(example_kwargs or {}))  # JIT-compile (or load from cache) every kernel now
    compiled.stats["compile_seconds"] = time.perf_counter() - start
    return compiled


def lower(graph: Graph, fuse: bool = True) -> Graph:
    """The pass pipeline from traced IR to the graph a backend runs: fused and tiled, or unfused."""
    from passes.pipeline import run_pipeline
    if fuse:
        return run_pipeline(graph)
    from passes.fuse import unfuse
    from passes.tile import tile
    return tile(unfuse(run_pipeline(graph, until="canonical")))


def program_stats(graph: Graph) -> dict:
    """Kernel launches per call and bytes of intermediate values (written by one kernel, read by another)."""
    from passes.fuse import fusion_stats
    return dict(fusion_stats(graph))
