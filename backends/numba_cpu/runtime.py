"""Run a fused graph with Numba: generate one module per distinct kernel body (`kernels.py`), cache it on
disk, plan buffers, and call the kernels in order.

Each generated module is written to the cache directory (`FUSEC_CACHE_DIR`, default ~/.cache/fusec) under
a hash of its text and of the versions and CPU it compiles for; Numba's own on-disk cache (`cache=True`)
sits beside it, so a second compile of the same kernel, in this program, another one or a new process,
loads machine code instead of compiling. `fusec.cache` verifies both before use and rebuilds what is damaged. Ops run by PyTorch
(`extern`, `fusec.fallback`) are steps between the kernels.
Intermediate buffers are allocated once per program and reused across calls (two values whose lifetimes
do not overlap share storage); outputs are fresh arrays owned by the caller. Calls are serialized by a
lock, because the intermediate buffers belong to the program, not to a call.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from typing import Callable

import numba
import numpy as np
import torch

from fusec.backends.numba_cpu.codegen import KernelCode
from fusec.backends.numba_cpu.compile_pool import array_type, load_cached, pending
from fusec.backends.numba_cpu.compile_batch import start as start_compiling
from fusec.backends.numba_cpu.driver import build as build_driver
from fusec.backends.numba_cpu.kernels import build as build_kernels
from fusec.backends.numba_cpu.kernels import FUNCTION, raise_bad_index
from fusec.backends.numba_cpu.generated import HEADER, blas_used, load_module
from fusec.binding import check_weights
from fusec.cache import recorded, recover
from fusec.debug import debug
from fusec.dtypes import to_numpy
from fusec.errors import FusecError
from fusec.fallback import call_extern
from fusec.guards import check_indices, take_index_checks
from fusec.ir import Graph, output_types, param_types
from fusec.sizes import bind_sizes, size_slots, specialize, upper_sizes

VIEWS = ("reshape", "slice")  # outer nodes that are views of their operand's buffer (no kernel runs them)


@dataclass
class Step:
    fn: object
    kernel: int            # the kernel node's id
    inputs: list[int]      # outer value ids
    weights: list          # arrays
    outputs: list[int]
    module: object = None  # the cached module of its function (shared by the steps of equal kernels)


class Program:
    """The compiled program: `run(inputs) -> outputs` on NumPy arrays."""

    def __init__(self, graph: Graph, defer: bool = False):
        """Generate and load the kernels of `graph` and start compiling the bodies in no cache yet; unless
        `defer`, wait for them (`finish`, which must come before anything else is used)."""
        self.graph = graph
        calls = [i for i, n in enumerate(graph.nodes) if n.op in ("kernel", "loop")]
        kernels = [i for i in calls if graph.nodes[i].op == "kernel"]
        built = build_kernels(graph, kernels, HEADER, load_module)  # each distinct body compiled once
        # a loop node runs all its iterations in one call of its generated driver (`driver.py`)
        self.drivers = {i: build_driver(graph, i, HEADER, load_module, upper_sizes(graph))
                        for i in calls if i not in kernels}
        self.source, self.modules = built.source, list(built.distinct)
        for d in self.drivers.values():
            self.source += "\n\n" + d.code.source
            self.modules += [m for m in d.modules if m not in self.modules]
        by_node = dict(zip(kernels, zip(built.codes, built.functions, built.modules)))
        by_node.update((i, (d.code, d.fn, d.module)) for i, d in self.drivers.items())
        self.codes: list[KernelCode] = [by_node[i][0] for i in calls]
        self.blas = blas_used(self.source)  # stats: the library its GEMMs call (docs/numba-backend.md)
        if "blas_note" in self.blas:
            debug(1, f"[fusec] GEMMs call NumPy's OpenBLAS, not MKL ({self.blas['blas_note']})")
        self.outputs_of = _kernel_outputs(graph)
        # symbolic sizes: the kernels above read them from their arrays; buffers are planned for the upper
        # bounds and viewed at each call's sizes (`_resize`); what follows sees the graph at those sizes
        self.symbolic, self._sizes = (graph, None) if graph.sizes else (None, {})
        if self.symbolic is not None:
            self._slots, self._bounds = size_slots(graph), graph.sizes
            self._sizes = upper_sizes(graph)
            graph = self.graph = specialize(graph, self._sizes)
        self.weights = {name: _weight(graph.tensors[name]) for name in param_types(graph)}
        # a kernel that checks gather indices it computes reports a bad one in its error slot (`kerr`)
        self.errors = [np.zeros(2, np.int64) if code.gathers else None for code in self.codes]
        # bodies in no cache yet compile at once, in worker processes too (`compile_pool`), before the
        # steps below load the loop's kernels and the first run the others
        self._calls = self._signatures(calls, by_node)
        self._batch, self._made = start_compiling(pending(self._calls)), (calls, by_node)
        if not defer:
            self.finish()

    def compiling_elsewhere(self) -> bool:
        """True while worker processes compile this program's kernel bodies and `finish` would only wait
        for them (`compile_batch.Batch.compiling_elsewhere`)."""
        return self._batch is not None and self._batch.compiling_elsewhere()

    def finish(self, observe: Callable[[], None] = lambda: None) -> None:
        """Wait for the kernel bodies this program started compiling (compiling here those no worker took;
        `observe()` as each is done), then set up its steps and buffers. Once; nothing to do after that."""
        if self._batch is None:
            return
        self.compile_counts, self._batch = self._batch.finish(observe), None
        (calls, by_node), graph = self._made, self.graph
        self.steps = [Step(by_node[i][1], i, list(graph.nodes[i].args),
                           self._extra(i, code, err), self.outputs_of[i], by_node[i][2])
                      for code, i, err in zip(self.codes, calls, self.errors)]
        self.index_checks = [take_index_checks(graph.nodes[i]) for i in calls]  # (none for a loop: in its driver)
        # Torch fallbacks (`extern` nodes) run between kernels, before the kernel that follows them in the
        # graph. The values they read are planned like outputs (fresh per call), so no later kernel
        # reuses their buffer before they ran.
        self.torch_steps: dict[int, list[int]] = {}
        for i, n in enumerate(graph.nodes):
            if n.op == "extern":
                self.torch_steps.setdefault(sum(1 for k in calls if k < i), []).append(i)
        read = tuple(a for ids in self.torch_steps.values() for i in ids for a in graph.nodes[i].args)
        self.graph = replace(graph, outputs=graph.outputs + read)
        self._plan()
        self.graph = graph
        self._lock = threading.Lock()
        self._loaded: set[int] = set()  # steps whose machine code is loaded (they ran once)
        self._plan_steps()

    @property
    def bodies_compiling(self) -> int:
        """The kernel bodies `finish` will complete (0 once finished, or with all of them cached)."""
        return 0 if self._batch is None else self._batch.size

    def load_cached(self) -> bool:
        """Load every kernel's machine code from the cache without running anything; False when some is
        not there (then the first run compiles it, see `compile_pool.load_cached`). After `finish` this
        holds for a new program too: its bodies were compiled, here or in workers, and their checksums
        recorded, so it is not run on its example (for a 1B model's decode program that run was a whole
        step, 0.2 s of a cold start)."""
        if not load_cached(self._calls):
            return False
        self._loaded.update(range(len(self.steps)))
        return True

    def _signatures(self, calls: list[int], by_node: dict) -> list[tuple[object, str, tuple]]:
        """[(module, function, Numba signature)] of every kernel call, for the arrays `run` will pass: weights and
        constants as they are, computed values and inputs C-contiguous and writable (`_writable`)."""
        g, out = self.graph, []
        for i, code, err in zip(calls, self.codes, self.errors):
            operands = [numba.typeof(self._value({}, a)) if g.nodes[_root(g, a)].op in ("param", "const")
                        else array_type(g.nodes[a].type) for a in g.nodes[i].args]
            outputs = [array_type(t) for t in output_types(g.nodes[i])]
            if i in self.drivers:
                d = self.drivers[i]
                out += [(module, FUNCTION, sig) for module, sig in d.signatures(self.weights)]
                out.append((d.module, "driver", d.signature(self.weights, operands, outputs)))
                continue
            extra = [numba.typeof(x) for x in self._extra(i, code, err)]
            out.append((by_node[i][2], FUNCTION, tuple(operands + extra + outputs)))
        return out

    def _extra(self, i: int, code: KernelCode, err) -> list:
        """The arguments of call `i` after its operands: weights, constants, error slot (a kernel), or
        the driver's weight tuples, constants, slots and buffers (a loop)."""
        if i in self.drivers:
            return self.drivers[i].args(self.weights)
        return ([self.weights[p] for p in code.params] +
                [np.ascontiguousarray(self.graph.tensors[c]) for c in code.consts] + ([err] if err is not None else []))

    def _plan(self) -> None:
        """Give every intermediate value a buffer; values whose lifetimes do not overlap share one.
        Graph outputs are allocated per call instead (the caller owns them)."""
        g = self.graph
        last_use: dict[int, int] = {}
        for s, step in enumerate(self.steps):
            for v in step.inputs:
                last_use[_root(g, v)] = s
        self.fresh = {_root(g, o) for o in g.outputs}
        free: list[np.ndarray] = []
        storage_of: dict[int, np.ndarray] = {}
        self.buffers: dict[tuple[int, int], np.ndarray] = {}  # (step, output position) -> buffer
        self.storage: dict[tuple[int, int], np.ndarray] = {}  # its bytes (for symbolic sizes: the upper bound's)
        for s, step in enumerate(self.steps):
            for k, v in enumerate(step.outputs):
                if v in self.fresh:
                    continue
                t = output_types(self.graph.nodes[step.kernel])[k]
                size = max(t.numel * to_numpy(t.dtype).itemsize, 1)
                fit = [b for b in free if b.nbytes >= size]
                storage = min(fit, key=lambda b: b.nbytes) if fit else np.empty(size, np.uint8)
                if fit:
                    free = [b for b in free if b is not storage]
                self.storage[s, k] = storage
                self.buffers[s, k] = storage[:t.numel * to_numpy(t.dtype).itemsize].view(to_numpy(t.dtype)).reshape(t.shape)
                if v >= 0 and v in last_use:
                    storage_of[v] = storage
                else:
                    free.append(storage)  # an output nobody reads: scratch, reusable at once
            for v in step.inputs:
                r = _root(g, v)
                if last_use.get(r) == s and r in storage_of:
                    free.append(storage_of.pop(r))
        self.intermediate_bytes = sum(g.nodes[v].type.nbytes for v in last_use
                                      if g.nodes[v].op in ("kernel", "result", "loop"))

    def bind_weights(self, tensors) -> None:
        """Run on `tensors` ({parameter name: tensor or array}, see `fusec.binding.check_weights`) from the
        next call on, instead of the weights the program was compiled with. Nothing recompiles: the
        kernels take weights as arguments, and binding only swaps the arrays passed to them. Waits for a
        running call to finish."""
        arrays = {name: _weight(t) for name, t in check_weights(self.graph, tensors).items()}
        read_only = [name for name, a in arrays.items() if not a.flags.writeable]
        if read_only:  # a read-only array is another Numba type: every kernel would compile again
            raise FusecError(f"weights must be writable arrays (read-only ones would recompile every kernel), "
                             f"given read-only: {', '.join(read_only[:4])}")
        with self._lock:
            self.weights = arrays
            for code, step in zip(self.codes, self.steps):
                if step.kernel in self.drivers:  # new tuples of per-iteration weights
                    step.weights = self.drivers[step.kernel].args(arrays)
                else:
                    step.weights[:len(code.params)] = [arrays[p] for p in code.params]
            self._plan_steps()

    def run(self, inputs: list[np.ndarray], observe: Callable | None = None) -> list[np.ndarray]:
        """Run the program. Inputs are made contiguous and writable (a copy only when they are not).
        Calls are serialized by a lock: intermediate buffers belong to the program. `observe(node_id,
        args, outs)` is called after every kernel and torch step (for `fusec check`; buffers are reused,
        so copy)."""
        g = self.graph
        with self._lock:
            if self.symbolic is not None:
                sizes = bind_sizes(self.symbolic, [np.shape(x) for x in inputs], slots=self._slots,
                                   bounds=self._bounds)
                if sizes != self._sizes:
                    self._resize(sizes)
                g = self.graph
            values = {i: _writable(x) for i, x in zip(g.inputs, inputs)}
            memo: dict = {}
            for s, (step, (arg_plan, out_plan, checks)) in enumerate(zip(self.steps, self._plans)):
                self._run_torch(s, values, memo, observe)
                args = [x if fixed else values[x] if x in values else self._value(values, x) for fixed, x in arg_plan]
                outs = []
                for buf, shape, dtype, v in out_plan:
                    if buf is None:  # a graph output: the caller's, fresh per call
                        buf = np.empty(shape, dtype)
                    if v >= 0:
                        values[v] = buf
                    outs.append(buf)
                for k, bound, what in checks:
                    check_indices(args[k], bound, what)
                self._call(s, step, args, outs)
                if observe is not None:
                    observe(step.kernel, args, outs)
            self._run_torch(len(self.steps), values, memo, observe)
            results = [self._output(values, o) for o in g.outputs]
            if len(self._loaded) == len(self.steps) and not getattr(self, "_recorded", False):
                self._recorded = True
                for module in self.modules:
                    recorded(module)  # checksums of the machine code that just ran
            return results

    def _resize(self, sizes: dict) -> None:
        """Run at other symbolic sizes: the graph at those sizes, and every planned buffer a view of its
        storage (planned for the upper bounds) at the new shape; the kernels stay as compiled."""
        self.graph, self._sizes = specialize(self.symbolic, sizes), sizes
        for (s, k), storage in self.storage.items():
            t = output_types(self.graph.nodes[self.steps[s].kernel])[k]
            dtype = to_numpy(t.dtype)
            self.buffers[s, k] = storage[:t.numel * dtype.itemsize].view(dtype).reshape(t.shape)
        self.index_checks = [take_index_checks(self.graph.nodes[step.kernel]) for step in self.steps]
        for step in self.steps:
            if step.kernel in self.drivers:  # its buffers and size arguments at the new sizes
                self.drivers[step.kernel].resize(sizes)
                step.weights = self.drivers[step.kernel].args(self.weights)
        self._plan_steps()

    def _plan_steps(self) -> None:
        """What `run` needs per step, resolved once (the bookkeeping is a fifth of a small decode step's
        time otherwise): the arrays that are the same on every call (weights, constants, planned buffers
        and reshapes of them), how to get the others, and each output's buffer or type."""
        g, static = self.graph, {}
        for (s, k), buf in self.buffers.items():
            if self.steps[s].outputs[k] >= 0:
                static[self.steps[s].outputs[k]] = buf
        for i, n in enumerate(g.nodes):
            if n.op in ("param", "const") or (n.op in VIEWS and n.args[0] in static):
                static[i] = self._value(static, i)
        self._plans = []
        for s, step in enumerate(self.steps):
            args = [(True, static[v]) if v in static else (False, v) for v in step.inputs]
            outs = []
            for k, v in enumerate(step.outputs):
                t = output_types(g.nodes[step.kernel])[k]
                outs.append((self.buffers.get((s, k)), t.shape, to_numpy(t.dtype), v))
            self._plans.append((args, outs, self.index_checks[s]))

    def _call(self, s: int, step: Step, args: list, outs: list) -> None:
        """Call a kernel; on its first call, a failure to load damaged cached code is repaired once."""
        if s in self._loaded:
            step.fn(*args, *step.weights, *outs)
        else:
            try:
                step.fn(*args, *step.weights, *outs)
            except Exception as e:
                if not recover(step.module, step.fn.__name__, e):
                    raise
                step.fn(*args, *step.weights, *outs)
            self._loaded.add(s)
        if step.kernel in self.drivers:
            self.drivers[step.kernel].check()
            return
        if self.errors[s] is not None:  # a gather index computed in the kernel may have been out of range
            raise_bad_index(self.errors[s], self.codes[s].gathers)

    def _run_torch(self, s: int, values: dict, memo: dict, observe: Callable | None) -> None:
        """The torch fallbacks scheduled before kernel step `s` (see `fusec.fallback`)."""
        for i in self.torch_steps.get(s, ()):
            args = [self._value(values, a) for a in self.graph.nodes[i].args]
            values[i] = call_extern(self.graph.nodes[i], args, memo)
            if observe is not None:
                observe(i, args, [values[i]])

    def _output(self, values: dict, v: int) -> np.ndarray:
        x = self._value(values, v)
        owned = self.graph.nodes[_root(self.graph, v)].op in ("kernel", "result", "loop")
        return x if owned and list(self.graph.outputs).count(v) == 1 else np.array(x)

    def _value(self, values: dict, v: int) -> np.ndarray:
        if v in values:
            return values[v]
        n = self.graph.nodes[v]
        if n.op == "reshape":
            values[v] = self._value(values, n.args[0]).reshape(n.shape)
        elif n.op == "slice":  # contiguous (passes.hoist_slices): a view at an offset, never a copy
            where = (slice(None),) * n.attr("axis") + (slice(n.attr("start"), n.attr("stop"), n.attr("step")),)
            values[v] = self._value(values, n.args[0])[where]
        elif n.op == "param":
            values[v] = self.weights[n.attr("name")]
        elif n.op == "const":
            values[v] = (np.asarray(self.graph.tensors[n.attr("key")]) if n.attr("key") is not None
                         else np.full(n.shape, n.attr("value"), to_numpy(n.dtype)))
        else:
            raise FusecError(f"internal: value %{v} ({n.op}) is not produced by any kernel")
        return values[v]


def _writable(x) -> np.ndarray:
    """An input as a C-contiguous writable array (a copy only when it is not one): a read-only array is
    another Numba type, which a loop driver's kernels, compiled for one type, do not take."""
    x = np.ascontiguousarray(x)
    return x if x.flags.writeable else x.copy()


def _root(g: Graph, v: int) -> int:
    """The value whose buffer `v` lives in (a reshape or an outer slice is a view of its operand)."""
    while g.nodes[v].op in VIEWS:
        v = g.nodes[v].args[0]
    return v


def _kernel_outputs(g: Graph) -> dict[int, list[int]]:
    outs: dict[int, list[int]] = {}
    for i, n in enumerate(g.nodes):
        if n.op in ("kernel", "loop"):
            count = len(output_types(n))
            outs[i] = [i] if count == 1 else [-1] * count
        elif n.op == "result":
            outs[n.args[0]][n.attr("index")] = i
    return outs


def _weight(t) -> np.ndarray:
    """A weight as a NumPy array sharing the module's storage (a NumPy array is taken as it is)."""
    if hasattr(t, "detach"):
        # bfloat16 travels as its bits (uint16); generated code widens it with `bf16()`
        t = t.detach().view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.detach().numpy()
    if not t.flags.c_contiguous:
        raise FusecError(f"weight of shape {list(t.shape)} is not contiguous; fusec reads weights in place")
    return t
