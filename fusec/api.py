"""`fusec.compile`: trace a module, run the pass pipeline, hand the graph to a backend (`fusec.build`),
and wrap the result in a callable with the module's signature that takes and returns torch tensors.

The callable holds one compiled program per input signature (`Specialization`); `fusec.guards` says
what a signature is and when a new one compiles, recompiles or is an error.
"""
from __future__ import annotations

import os
import threading
import warnings
from typing import Any

import torch
import torch.utils._pytree as pytree

from fusec.build import Options, Specialization, build, build_started, lower, program_stats, summary  # noqa: F401
from fusec.debug import debug
from fusec.errors import FusecError
from fusec.guards import describe_leaves, kwarg_order, mismatch, parse_dynamic, signature_key
from fusec.ir import Graph

BACKENDS = ("numba", "reference")
CACHE_LIMIT = 8  # programs compiled for new signatures (recompile=True) before new ones run eagerly


class CompiledModule:
    """A compiled module. Call it like the module; `.graph` is the final IR, `.source` generated code.

    The attributes describe the program compiled for the example inputs; `.specializations` lists every
    program compiled so far (one per input signature, see `fusec.guards`)."""

    def __init__(self, module: torch.nn.Module, first: Specialization, options: Options, key: tuple,
                 dynamic: Any = None, recompile: bool = False, cache_limit: int = CACHE_LIMIT,
                 declared: dict | None = None):
        self.module = module
        self.options = options
        self.dynamic = parse_dynamic(dynamic, first.traced.input_names)
        self.declared = declared if declared is not None else {}  # (input, axis) -> bounds given (symbolic)
        self.recompile = recompile
        self.cache_limit = cache_limit
        self.recompiles = 0  # programs compiled for signatures outside the dynamic dimensions
        self._first = first
        self._programs: dict[tuple, Specialization] = {key: first}
        self._lock = threading.Lock()
        self._warned = False
        self._kwarg_order = kwarg_order(first.traced.in_spec)

    # -- the program of the example inputs ----------------------------------------------------------------
    @property
    def traced(self):
        return self._first.traced

    @property
    def graph(self) -> Graph:
        return self._first.graph

    @property
    def source(self) -> str:
        return self._first.source

    @property
    def stats(self) -> dict:
        """The example inputs' program's statistics, and `programs`: how many were compiled so far."""
        return {**self._first.stats, "programs": len({id(p) for p in self._programs.values()})}

    @property
    def program(self):
        return self._first.program

    @property
    def backend(self) -> str:
        return self.options.backend

    @property
    def specializations(self) -> list[Specialization]:
        return list(self._programs.values())

    def run_arrays(self, arrays: list, follow: bool = True) -> list:
        """The example inputs' program on NumPy arrays of exactly its signature: no guards, no torch
        conversions (the generator's decode loop builds its inputs itself); index bounds are still checked.
        `follow=False` skips looking for replaced module parameters (the decode loop looks once per
        generation: a look walks every parameter, ~20 us for stories15M, a seventieth of its step)."""
        if follow:
            self._first.follow_module()
        return self._first.run(arrays)

    def weight_types(self) -> dict:
        """{parameter name: TensorType} of the weights the program reads (`bind_weights` takes these)."""
        from fusec.binding import weight_types
        return weight_types(self.graph)

    def bind_weights(self, tensors: Any) -> None:
        """Run every compiled signature on `tensors` ({name: tensor} as in `weight_types()`) instead of the
        module's weights. Kernels take weights as arguments: nothing recompiles. Signatures compiled later
        start from the module's weights. WeightBindingError names every misfit, and nothing changes."""
        from fusec.binding import check_weights
        for program in self._programs.values():
            check_weights(program.graph, tensors)
        with self._lock:
            for program in self._programs.values():
                program.bind_weights(tensors)

    def rdu_report(self, machine: Any = "sn40l", **options: Any) -> dict:
        """The RDU model's estimate for this program on `machine` (`fusec.rdu.model.report`; options
        such as layers, tp, decode, dtype pass through), computed on first use and kept. Its placement is
        `report["placement"]`, the graph's own when the "placed" stage made it for that machine."""
        from fusec.rdu.model import report, tokens_per_call
        from fusec.passes.place import plan
        cache = self.__dict__.setdefault("_rdu_reports", {})
        key = (machine if isinstance(machine, str) else id(machine), tuple(sorted(options.items())))
        if key not in cache:
            own = self.graph.annotations.get("placement")
            seed, dtype = options.get("seed", 0), options.get("dtype")
            placement = (own if own is not None and own.machine.name == machine and own.seed == seed
                         and own.dtype == dtype else plan(self.graph, machine, seed, dtype))
            rest = {k: v for k, v in options.items() if k not in ("seed", "dtype", "tokens")}
            tokens = options.get("tokens") or tokens_per_call(self.graph)
            cache[key] = {**report(placement, placement.machine, tokens=tokens, **rest), "placement": placement}
        return cache[key]

    # -- calls --------------------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        if len(kwargs) > 1 and tuple(kwargs) != self._kwarg_order and set(kwargs) == set(self._kwarg_order):
            kwargs = {k: kwargs[k] for k in self._kwarg_order}  # keywords in any order, as in Python
        leaves, spec = pytree.tree_flatten((args, kwargs))
        key = signature_key(leaves, spec)
        program = self._programs.get(key)
        if program is None:
            program = self._miss(args, kwargs, leaves, spec, key)
            if program is None:
                with torch.no_grad():
                    return self.module(*args, **kwargs)
        return program.call(leaves)

    def _miss(self, args: tuple, kwargs: dict, leaves: list, spec: Any, key: tuple) -> Specialization | None:
        """The program for a signature not seen yet: the first one when compatible, a new one for new
        dynamic dimensions or (recompile=True) a new signature, None past the limit; else raise."""
        error, fatal = self._mismatch(args, kwargs, leaves, spec)
        if error is None and not self._dynamic_change(leaves):
            self._programs[key] = self._first  # a key that differs where the guards do not (NaN != NaN)
            return self._first
        if fatal or (error is not None and not self.recompile):
            raise error
        if any(isinstance(x, torch.Tensor) and x.numel() == 0 for x in leaves):
            return None  # an empty batch: eager gives its (empty) result; no program is compiled for it
        with self._lock:
            program = self._programs.get(key)
            if program is not None:
                return program
            if error is not None:
                if self.recompiles >= self.cache_limit:
                    if not self._warned:
                        self._warned = True
                        warnings.warn(f"fusec: {self.name} was compiled for {self.cache_limit} other input "
                                      f"signatures (cache_limit); calls with new signatures now run in "
                                      f"PyTorch eager. Last one: {describe_leaves(leaves)} ({error})",
                                      stacklevel=3)
                    return None
                self.recompiles += 1
                debug(1, f"[fusec] recompiling {self.name} for ({describe_leaves(leaves)}): {error}")
            try:
                program = build(self.module, args, kwargs, self.options)
            except FusecError as e:
                if isinstance(error, TypeError):  # other arguments the module cannot take: say what differs
                    raise error from e
                raise
            self._programs[key] = program
            return program

    def _dynamic_change(self, leaves: list) -> bool:
        """Whether a tensor's shape differs from the first program's (only in dynamic dimensions, since
        `_mismatch` found nothing else)."""
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        if self.graph.sizes:  # one symbolic program for every size in its bounds (`fusec.sizes`)
            from fusec.sizes import runs_symbolic
            return not runs_symbolic(self.graph, [tuple(x.shape) for x in tensors], self.traced.input_names,
                                     self.declared)
        return any(tuple(x.shape) != t.shape for x, t in zip(tensors, self.graph.input_types))

    def _mismatch(self, args: tuple, kwargs: dict, leaves: list, spec: Any) -> tuple[Exception | None, bool]:
        return mismatch(self.traced, self.graph.input_types, self.dynamic, self._signature(), args, kwargs,
                        leaves, spec)

    @property
    def name(self) -> str:
        return self.traced.module_name

    def _signature(self) -> str:
        return self._first.signature

    def __repr__(self) -> str:
        more = f", {len(self._programs) - 1} more signature(s)" if len(self._programs) > 1 else ""
        return f"<fusec compiled {self.name} backend={self.backend} ({self._signature()}){more}>"


def compile(module: torch.nn.Module, example_inputs: Any = (), example_kwargs: dict | None = None, *,
            backend: str = "numba", fuse: bool = True, strict: bool = False, dynamic: Any = None,
            recompile: bool = False, cache_limit: int = CACHE_LIMIT, weights: str = "fp32",
            loop: bool | None = None) -> CompiledModule:
    """Compile `module` for inputs like `example_inputs` (a tuple of positional inputs, or one tensor).

    `backend="numba"` (default) generates one JIT-compiled function per fused kernel; `"reference"` runs
    the IR op by op with NumPy. `fuse=False` gives the unfused program (one kernel per primitive op).
    `weights="bf16"` stores weight matrices as bfloat16 (half the bytes to stream; accumulation stays
    float32), `weights="int8"` as int8 with a float32 scale per block of 32 (weight-only quantization,
    `passes.weights`); the module's own parameters are not changed. `loop` (default: on, unless the environment
    variable FUSEC_LOOP=0) runs a run of equal layers as one loop node: the Numba backend then makes one
    call into compiled code for all of them (`passes.loop`); `loop=False` calls each kernel from Python.
    ATen ops fusec cannot lower run through PyTorch between the kernels; `strict=True` raises
    `UnsupportedOpError` for them instead.

    Returns a callable with the module's signature. Every call is checked against the signature it was
    compiled for (structure, and per tensor rank, shape, dtype, device, layout; see `fusec.guards`):
    - `dynamic`: dimensions that may change between calls, by input name or position among the tensor
      inputs, compiled once as symbolic sizes (`fusec.tracing_sym`): `{"x": {1: (1, 256)}}` serves every
      size in [1, 256] with one program (a call outside is a SizeError naming the dimension, bounds and
      size); `{"x": {1}}` (or True for every dimension) the range torch.export finds the module supports,
      and a size outside it (torch specializes 1) compiles a program of its own. `stats["programs"]`
      counts the programs compiled.
    - any other difference raises TypeError/ValueError naming what was expected and what was given, or,
      with `recompile=True`, compiles a program for the new signature; past `cache_limit` such programs
      it warns once and runs new signatures in PyTorch eager.
    Non-tensor arguments are constants of the program, matched by type and value (2 and 2.0 differ);
    keyword arguments may come in any order; non-tensor outputs (None, numbers) are returned as traced.
    Calls with an empty tensor (a 0 in a dynamic dimension) run in PyTorch eager; empty example inputs
    are a ValueError. Non-contiguous inputs are accepted (copied to contiguous arrays). Calls from
    several threads are safe: the numba program serializes them (its buffers belong to the program).
    The module is traced through a copy of its module tree, so it stays usable from other threads.

    The program reads the module's parameters in place (in-place updates show at once) and follows them:
    a parameter replaced after compiling (`load_state_dict(assign=True)`, a new Parameter, `.data = `,
    `share_memory()`) is rebound before the next call, without recompiling; one of another shape or dtype
    is a WeightBindingError. Buffers are constants, copied when traced. `bind_weights` stops the following.
    """
    return compile_started(module, example_inputs, example_kwargs, backend=backend, fuse=fuse, strict=strict,
                           dynamic=dynamic, recompile=recompile, cache_limit=cache_limit, weights=weights,
                           loop=loop)()


def compile_started(module: torch.nn.Module, example_inputs: Any = (), example_kwargs: dict | None = None, *,
                    backend: str = "numba", fuse: bool = True, strict: bool = False, dynamic: Any = None,
                    recompile: bool = False, cache_limit: int = CACHE_LIMIT, weights: str = "fp32",
                    loop: bool | None = None):
    """`compile` in two halves (`fusec.build.build_started`): traced, lowered and handed to the compile
    workers now; the function returned finishes it and returns the CompiledModule. Meanwhile the caller may
    trace another program, but not use Numba to compile; its `compiling_elsewhere()` says whether finishing
    would only wait for the workers (meanwhile programs already compiled may run)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    from fusec.passes.weights import FORMATS
    if weights not in FORMATS:
        raise ValueError(f"unknown weight format {weights!r}; expected one of {', '.join(FORMATS)}")
    if loop is None:
        loop = os.environ.get("FUSEC_LOOP", "1") != "0"
    options = Options(backend, fuse, strict, weights, bool(loop))
    tensors = [x for x in pytree.tree_leaves((example_inputs, example_kwargs or {})) if isinstance(x, torch.Tensor)]
    empty = next((i for i, x in enumerate(tensors) if x.numel() == 0), None)
    if empty is not None:
        raise ValueError(f"fusec.compile needs non-empty example inputs; input {empty} has shape "
                         f"{list(tensors[empty].shape)}. Compile with a non-empty example (calls with an "
                         f"empty batch, in a dynamic dimension, then run in PyTorch eager)")
    from fusec.tracing_sym import dynamic_spec
    _, declared = dynamic_spec(module, example_inputs, example_kwargs or {}, dynamic, dims=False)
    finish = build_started(module, example_inputs, example_kwargs or {}, options, dynamic)
    key = signature_key(*pytree.tree_flatten((example_inputs, example_kwargs or {})))

    def finished() -> CompiledModule:
        return CompiledModule(module, finish(), options, key, dynamic, recompile, cache_limit, declared)
    finished.compiling_elsewhere = finish.compiling_elsewhere  # True while only the workers have work left
    return finished
