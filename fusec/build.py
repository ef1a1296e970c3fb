"""Building one program: trace (or take from the trace cache), run the passes, hand the graph to a
backend, and run it once; `Specialization` is the result, one per input signature of a `CompiledModule`
(`fusec.api`). `lower` is the pass pipeline from traced IR to the graph a backend runs.
"""
from __future__ import annotations

import gc
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np
import torch
import torch.utils._pytree as pytree

from fusec.debug import DebugDump, Progress, debug
from fusec.ir import Graph


@dataclass(frozen=True)
class Options:
    backend: str = "numba"
    fuse: bool = True
    strict: bool = False
    weights: str = "fp32"  # "bf16"/"int8": matrices stored so, widened to float32 in the kernels
    loop: bool = True      # equal layers run as one loop (passes.loop): one call into compiled code


@dataclass
class Specialization:
    """The program compiled for one input signature: traced IR, final graph, and the backend's run."""

    traced: Any
    graph: Graph
    run: Callable[[list[np.ndarray]], list[np.ndarray]]
    source: str = ""
    stats: dict | None = None
    program: Any = None  # the numba Program (None on the reference backend)
    follow: Any = None   # fusec.binding.Follow: the module's parameters, rebound when replaced; None once bound

    @property
    def signature(self) -> str:
        return ", ".join(f"{n}: {t}" for n, t in zip(self.traced.input_names, self.graph.input_types))

    def bind_weights(self, tensors: Any) -> None:
        """Run on `tensors` ({parameter name: tensor}) instead of the module's weights from now on (they no
        longer follow the module's parameters); no recompile."""
        follow = self.follow
        if follow is None:
            self._bind(tensors)
            return
        with follow.lock:  # not while a call rebinds the module's own
            self.follow = None
            self._bind(tensors)

    def follow_module(self) -> None:
        """Rebind the module's parameters if they were replaced since the last call (see `Follow`)."""
        follow = self.follow
        if follow is not None and follow.changed():
            follow.refresh(self.graph, lambda tensors: self.follow is follow and self._bind(tensors))

    def _bind(self, tensors: Any) -> None:
        if self.program is not None:
            self.program.bind_weights(tensors)
            return
        from fusec.backends.reference import compile_graph
        from fusec.binding import check_weights
        self.graph = replace(self.graph, tensors={**self.graph.tensors, **check_weights(self.graph, tensors)})
        self.run = compile_graph(self.graph)

    def call(self, leaves: list) -> Any:
        self.follow_module()
        outs = self.run([_array(x) for x in leaves if isinstance(x, torch.Tensor)])
        # the numba program already returns arrays it allocated for this call (Program._output); the
        # reference backend may return views of weights or inputs, so those are copied
        owned = self.program is not None
        tensors = [_tensor(o if owned else np.array(o), self.graph.nodes[v].dtype)
                   for o, v in zip(outs, self.graph.outputs)]
        constants = self.traced.output_constants
        if constants:  # non-tensor outputs (None, numbers) are the traced constants, as eager returns them
            it = iter(tensors)
            tensors = [constants[k] if k in constants else next(it) for k in range(len(outs) + len(constants))]
        return pytree.tree_unflatten(tensors, self.traced.out_spec)


def _tensor(x: np.ndarray, dtype: str) -> torch.Tensor:
    """An output array as a tensor of the traced dtype: a bf16 value arrives as float32 holding a bf16
    number (NumPy has no bfloat16), so the conversion back is exact."""
    t = torch.from_numpy(x)
    return t.to(torch.bfloat16) if dtype == "bf16" else t


def _array(x: torch.Tensor) -> np.ndarray:
    """A NumPy view of an input tensor (the runtimes make it contiguous if it is not)."""
    x = x.detach()
    if x.is_conj() or x.is_neg():
        x = x.resolve_conj().resolve_neg()
    return (x.float() if x.dtype == torch.bfloat16 else x).numpy()


def build(module: torch.nn.Module, args: tuple, kwargs: dict, options: Options,
          dynamic: Any = None) -> Specialization:
    """Trace, lower and compile `module` for exactly these inputs, or with `dynamic` for every size in its
    ranges (`fusec.tracing_sym`); run it once (JIT-compiling the kernels), unless all of their machine code
    loads from the cache."""
    return build_started(module, args, kwargs, options, dynamic)()


def build_started(module: torch.nn.Module, args: tuple, kwargs: dict, options: Options,
                  dynamic: Any = None) -> Callable[[], Specialization]:
    """`build` in two halves: trace, lower and generate the program now, its kernel bodies handed to the
    compile workers; the function returned waits for them, runs the example and returns the
    Specialization. Between the two, this thread may trace another program while the workers compile
    (`Generator.compile_programs`); nothing else may use Numba meanwhile."""
    with young_gc():
        finish = _build(module, args, kwargs, options, dynamic)

    def finished() -> Specialization:
        with young_gc():
            return finish()
    finished.compiling_elsewhere = getattr(finish, "compiling_elsewhere", lambda: False)
    return finished


@contextmanager
def young_gc():
    """Collect only objects made inside: a build allocates many small objects (IR nodes, Numba's types),
    and each full collection walks every object of the process (torch's and Numba's modules: ~0.1 s
    each, a third of a warm start). Objects that existed before are moved out of the collector's sight
    (`gc.freeze`) and put back afterwards, so nothing is collected less in the end: only later. Not when
    something else froze objects (a server before it forks, or another build): unfreezing would undo it."""
    if not gc.isenabled() or gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _build(module: torch.nn.Module, args: tuple, kwargs: dict, options: Options,
           dynamic: Any = None) -> Callable[[], Specialization]:
    from fusec.expand_layers import ExpandError
    from fusec.expand_loop import expand_loop
    from fusec.trace_cache import trace_and_lower
    from fusec.trace_layers import trace_program
    from fusec.tracing import trace
    start = time.perf_counter()
    dump = DebugDump.start(type(module).__name__ if isinstance(module, torch.nn.Module) else "module")

    phase = Phases()

    def run_trace():
        if options.backend == "numba":  # traced: its kernels are likely cold, compiled by workers
            from fusec.backends.numba_cpu.compile_pool import prestart
            prestart()
        with phase("trace"):  # fusec's own decode/prefill programs through two layers, unless dumping
            # (the dump's torch.fx graph is then the one lowered)
            traced = (trace if dump else trace_program)(module, args, kwargs, strict=options.strict,
                                                        dynamic=dynamic)
        if dump:
            dump.traced(traced.graph, getattr(traced.fx_graph, "code", ""))
        return traced

    def run_passes(traced):
        with phase("passes"):
            if traced.two_layers is not None and options.fuse and options.loop and not dump:
                try:  # the passes over two layers, their loop then run over all (`fusec.expand_loop`)
                    return expand_loop(lower(traced.two_layers[0], weights=options.weights), *traced.two_layers[1:])
                except ExpandError as e:
                    debug(1, f"[fusec] {traced.module_name}: the passes run on every layer ({e})")
            return lower(traced.graph, fuse=options.fuse, callback=dump.stage if dump else None,
                         weights=options.weights, loop=options.loop)
    if dump:  # every stage is written out: nothing comes from the trace cache
        traced = run_trace()
        graph, how = run_passes(traced), "uncached: FUSEC_DEBUG_DIR"
    else:
        passes = {"fuse": options.fuse, "weights": options.weights, "loop": options.loop}
        traced, graph, how = trace_and_lower(module, args, kwargs, dynamic, options.strict, passes, run_trace,
                                             run_passes)
    stats = program_stats(graph)
    stats["trace_cache"] = how
    stats["phase_seconds"] = phase.seconds
    if options.backend == "reference":
        from fusec.backends.reference import compile_graph
        return lambda: _finish(Specialization(traced, graph, compile_graph(graph), "", stats), module, dump, options)
    from fusec.backends.numba_cpu.runtime import Program
    with phase("generate"):
        program = Program(graph, defer=True)

    def finish() -> Specialization:
        with phase("finish"):  # compiling what no worker took, waiting for the workers, planning the steps
            progress = Progress(traced.module_name, program.bodies_compiling)
            try:
                program.finish(progress.step)
            finally:
                progress.close()
        debug(3, f"--- generated code of {traced.module_name} ({len(program.steps)} kernels)\n{program.source}")
        stats["intermediate_bytes"] = program.intermediate_bytes
        stats["distinct_kernels"] = len(program.modules)  # kernels with equal bodies share one function
        stats["compiled_in_workers"] = program.compile_counts["in_workers"]  # (backends.numba_cpu.compile_pool)
        stats.update(program.blas)  # {"blas": the library its GEMMs call[, "blas_note": why not MKL]}
        spec = Specialization(traced, graph, program.run, program.source, stats, program)
        # machine code that all loads from the cache (compiled for this program in `finish`, or before,
        # its checksums recorded): nothing to run; else run the example once, JIT-compiling every kernel
        with phase("run"):
            stats["example_run"] = bool(dump) or not program.load_cached()
            if stats["example_run"]:
                steps = len(program.steps) + sum(len(v) for v in program.torch_steps.values())
                progress = Progress(traced.module_name, steps)
                leaves = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
                try:
                    program.run([_array(x) for x in leaves], observe=lambda *_: progress.step())
                finally:
                    progress.close()
        stats["compile_seconds"] = time.perf_counter() - start
        phase.report(traced.module_name, how)
        return _finish(spec, module, dump, options)
    finish.compiling_elsewhere = program.compiling_elsewhere
    return finish


class Phases:
    """Wall seconds of a build's phases (`stats["phase_seconds"]`: trace, passes, generate, finish, run),
    and with FUSEC_DEBUG=1 a line with them and their CPU seconds in this thread (a compile worker's are
    not counted: "finish" is what this process compiled plus its wait for them)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - wall
            self.cpu[name] = self.cpu.get(name, 0.0) + time.thread_time() - cpu

    def report(self, module_name: str, how: str) -> None:
        parts = ", ".join(f"{k} {s:.2f} s ({self.cpu[k]:.2f} CPU)" for k, s in self.seconds.items())
        debug(1, f"[fusec] built {module_name} (trace cache: {how}): {parts}")


def _finish(spec: Specialization, module: Any, dump: Any, options: Options) -> Specialization:
    from fusec.binding import Follow, weight_types
    from fusec.passes.weights import module_names
    spec.follow = Follow(module, module_names(weight_types(spec.graph)))
    if dump:
        dump.write("numba.py", spec.source or "# reference backend: no generated code")
        dump.summary(summary(spec, options))
    return spec


def lower(graph: Graph, fuse: bool = True, callback: Callable[[str, Graph], None] | None = None,
          weights: str = "fp32", target: str = "cpu", loop: bool = True) -> Graph:
    """The pass pipeline from traced IR to the graph a backend runs (`passes.pipeline.TARGETS`): fused
    or unfused, tiled, and placed on the chip for the "rdu" target. `callback(pass_name, graph)` runs
    after every pass; `weights` picks the weights' storage format."""
    from fusec.passes.pipeline import run_pipeline, target_for
    return run_pipeline(graph, callback=callback, target=target_for(target, fuse, loop), weights=weights)


def program_stats(graph: Graph) -> dict:
    """Kernel launches per call, calls from Python per call, bytes of intermediate values (written by one
    kernel, read by another, outside loops) and ops run by PyTorch (`torch_ops`, see `fusec.fallback`)."""
    from fusec.passes.fuse import fusion_stats
    fused = fusion_stats(graph)
    loops = [n for n in graph.nodes if n.op == "loop"]
    looped = sum(n.attr("trips") * n.attr("body").ops().get("kernel", 0) for n in loops)
    # kernel_calls: kernels run per call, every iteration's counted; python_calls: calls from Python into
    # compiled code (a loop's driver runs all its iterations in one)
    return {**fused, "kernel_calls": fused["kernels"] + looped, "python_calls": fused["kernels"] + len(loops),
            "torch_ops": sum(1 for n in graph.nodes if n.op == "extern")}


def summary(spec: Specialization, options: Options) -> dict:
    """A JSON-able description of one compiled program (FUSEC_DEBUG_DIR's summary.json)."""
    from fusec.passes.fuse import describe
    program = spec.program
    kernels = [{"kind": kind, "ops": ops} for kind, ops in describe(spec.graph)]
    if program is not None:
        for k, code in zip(kernels, program.codes):
            k.update(name=code.name, loop=code.loop)
    fallbacks = [{"target": n.attr("target"), "reason": n.attr("reason"), "origin": n.origin}
                 for n in spec.graph.nodes if n.op == "extern"]
    return {"module": spec.traced.module_name, "signature": spec.signature,
            "options": {"backend": options.backend, "fuse": options.fuse, "strict": options.strict,
                        "loop": options.loop},
            "kernels": kernels, "torch_fallbacks": fallbacks, "stats": spec.stats,
            "cache_modules": [m.__name__ for m in getattr(program, "modules", ())]}
