"""`fusec check`: run a model fused, unfused, on the reference backend and in PyTorch, report each output's
error, and on a mismatch find the first fused kernel that computes something else than its definition.

Errors are max |got - want| and that divided by max |want| (the output's magnitude); NaN where both
have NaN and equal infinities count as equal, anything else against a NaN or an infinity is an infinite
error. A result is OK when the scaled error is at most `tol` (1e-4 for float32, the tolerance the tests
hold float32 results to).

The bisection runs the fused numba program once, kernel by kernel, and evaluates each kernel node with
the reference backend on the very arrays the numba kernel read: the first kernel whose outputs differ
is the culprit (earlier ones agree, so its inputs are right), printed with its IR and generated source.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.utils._pytree as pytree

from fusec.semantics import eval_node
import fusec
from fusec.printer import format_graph, format_node
TOL = 1e-4


@dataclass
class Error:
    max_abs: float
    scaled: float

    def __str__(self) -> str:
        return f"{self.max_abs:.3e} ({self.scaled:.2e})"


def compare(got: Any, want: Any) -> Error:
    """The error of `got` against `want` (arrays or tensors), see the module docstring."""
    got, want = _numpy(got).astype(np.float64), _numpy(want).astype(np.float64)
    if got.shape != want.shape:
        return Error(float("inf"), float("inf"))
    both_nan = np.isnan(got) & np.isnan(want)
    same_inf = np.isinf(got) & (got == want)
    ok = both_nan | same_inf
    with np.errstate(invalid="ignore"):
        diff = np.where(ok, 0.0, np.abs(got - want))
    diff = np.where(np.isnan(diff), np.inf, diff)
    finite = want[np.isfinite(want)]
    scale = max(float(np.abs(finite).max()) if finite.size else 0.0, 1e-30)
    err = float(diff.max()) if diff.size else 0.0
    return Error(err, err / scale if err else 0.0)


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach()
        return (x.float() if str(x.dtype) == "torch.bfloat16" else x).numpy()
    return np.asarray(x)


@dataclass
class KernelMismatch:
    """The first fused kernel whose numba result differs from the reference backend's."""

    node: int
    step: int               # position among the program's kernels (k<step> in the source)
    kind: str
    errors: list[Error]
    ir: str
    source: str

    def __str__(self) -> str:
        errs = ", ".join(str(e) for e in self.errors)
        return (f"first differing kernel: k{self.step} (%{self.node}, {self.kind}), output errors {errs}\n"
                f"--- its IR\n{self.ir}\n--- its generated source\n{self.source}")


@dataclass
class Report:
    name: str
    baseline: str                                  # what the errors are measured against
    rows: dict[str, list[Error]] = field(default_factory=dict)
    tol: float = TOL
    mismatch: KernelMismatch | None = None

    @property
    def ok(self) -> bool:
        checked = [r for label, r in self.rows.items() if not label.startswith("torch")]
        return all(e.scaled <= self.tol for errors in checked for e in errors) and self.mismatch is None

    def __str__(self) -> str:
        n = max((len(v) for v in self.rows.values()), default=0)
        head = f"{'':<12}" + "".join(f"{f'output {k}':>24}" for k in range(n))
        lines = [f"{self.name}: max abs error (scaled) against {self.baseline}", head]
        for label, errors in self.rows.items():
            lines.append(f"{label:<12}" + "".join(f"{str(e):>24}" for e in errors))
        if self.mismatch is not None:
            lines += ["", str(self.mismatch)]
        lines.append("result: " + ("OK" if self.ok else f"MISMATCH (tolerance {self.tol:g} scaled)"))
        return "\n".join(lines)


def _flat(out: Any) -> list:
    return [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]


def check(module: Any, example_inputs: Any = (), example_kwargs: dict | None = None, *, float64: bool = False,
          tol: float = TOL) -> Report:
    """Compare fused, unfused and reference fusec and PyTorch on one input (see the module docstring).
    With `float64`, errors are measured against PyTorch in float64 (and PyTorch float32 is a row)."""

    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    kwargs = example_kwargs or {}
    with torch.no_grad():
        eager = _flat(module(*example_inputs, **kwargs))
        if float64:
            wide = copy.deepcopy(module).double()
            args64, kwargs64 = torch.utils._pytree.tree_map(_to_float64, (example_inputs, kwargs))
            want = _flat(wide(*args64, **kwargs64))
    report = Report(type(module).__name__, "PyTorch float64" if float64 else "PyTorch eager", tol=tol)
    if not float64:
        want = eager
    runs = {"fused": dict(), "unfused": dict(fuse=False), "reference": dict(backend="reference")}
    compiled = {}
    for label, options in runs.items():
        compiled[label] = fusec.compile(module, example_inputs, kwargs, **options)
        got = _flat(compiled[label](*example_inputs, **kwargs))
        report.rows[label] = [compare(g, w) for g, w in zip(got, want)]
    if float64:
        report.rows["torch f32"] = [compare(g, w) for g, w in zip(eager, want)]
    fused = compiled["fused"]
    reference = _flat(compiled["reference"](*example_inputs, **kwargs))
    fused_out = _flat(fused(*example_inputs, **kwargs))
    differs = any(compare(g, w).scaled > tol for g, w in zip(fused_out, reference))
    if (differs or not report.ok) and fused.program is not None:
        leaves = [x for x in torch.utils._pytree.tree_leaves((example_inputs, kwargs)) if isinstance(x, torch.Tensor)]
        # kernel by kernel: the unlooped program (a loop's driver calls its kernels from compiled code)
        unlooped = fused if fused.options.loop is False else fusec.compile(module, example_inputs, kwargs, loop=False)
        report.mismatch = first_bad_kernel(unlooped.program, [_numpy(x) for x in leaves], tol)
    return report


def _to_float64(x: Any) -> Any:
    return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def first_bad_kernel(program: Any, inputs: list[np.ndarray], tol: float = TOL) -> KernelMismatch | None:
    """Run the numba `program` kernel by kernel and compare each kernel's outputs with the reference
    backend's evaluation of the same kernel node on the same input arrays; the first that differs."""
    graph = program.graph
    steps = {step.kernel: s for s, step in enumerate(program.steps)}
    found: list[KernelMismatch] = []

    def observe(node_id: int, args: list, outs: list) -> None:
        node = graph.nodes[node_id]
        if found or node.op != "kernel":
            return
        want = eval_node(node, [np.array(a) for a in args], graph.tensors)
        want = list(want) if isinstance(want, tuple) else [want]
        errors = [compare(o, w) for o, w in zip(outs, want)]
        if any(e.scaled > tol for e in errors):
            s = steps[node_id]
            found.append(KernelMismatch(node_id, s, node.attr("kind"), errors, kernel_ir(graph, node_id),
                                        program.codes[s].source))

    program.run(inputs, observe=observe)
    return found[0] if found else None


def kernel_ir(graph: Any, node_id: int) -> str:
    """One kernel node of `graph` as IR text, with its body."""
    node = graph.nodes[node_id]
    return f"{format_node(node_id, node)}\n  body {{\n{format_graph(node.attr('body'), '    ')}\n  }}"
