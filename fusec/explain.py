"""`fusec explain`: what the compiler will do with a model, as a dry run (trace and passes, no Numba).

For every fused kernel: its kind, the primitive ops fused into it (counts), its tiles and the places in
the user's code they came from; for every op that falls back to PyTorch: the ATen op, why fusec did not
lower it and where it is used; and totals against the unfused program.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from fusec.api import lower, program_stats
from fusec.ir import Graph
from fusec.tracing import trace
from fusec.passes.pipeline import run_pipeline


@dataclass
class KernelInfo:
    node: int
    kind: str
    ops: dict[str, int]
    tiles: tuple
    origins: list[str]      # module paths the fused ops came from, in order of first appearance
    type: str


@dataclass
class FallbackInfo:
    node: int
    target: str
    reason: str
    origin: str
    type: str


@dataclass
class Explanation:
    name: str
    signature: str
    traced_ops: dict[str, int]
    kernels: list[KernelInfo]
    fallbacks: list[FallbackInfo]
    stats: dict
    unfused_stats: dict

    def __str__(self) -> str:
        lines = [f"{self.name} ({self.signature})",
                 f"traced: {sum(self.traced_ops.values())} primitive ops ({_counts(self.traced_ops)})",
                 f"fused: {self.stats['kernels']} kernels, {len(self.fallbacks)} ops run by PyTorch, "
                 f"{self.stats['intermediate_bytes']:,} bytes of intermediates "
                 f"(unfused: {self.unfused_stats['kernels']} kernels, "
                 f"{self.unfused_stats['intermediate_bytes']:,} bytes)", ""]
        for k, info in enumerate(self.kernels):
            tiles = " ".join(f"{name}={size}" for name, size in info.tiles)
            lines.append(f"k{k:<3} %{info.node:<4} {info.kind:<10} -> {info.type}   {tiles}")
            lines.append(f"       ops: {_counts(info.ops)}")
            if info.origins:
                lines.append(f"       from: {', '.join(info.origins)}")
        if self.fallbacks:
            lines += ["", "run by PyTorch (between kernels):"]
            for f in self.fallbacks:
                lines.append(f"  %{f.node:<4} {f.target:<28} -> {f.type}   {f.reason}")
                if f.origin:
                    lines.append(f"        at {f.origin}")
        return "\n".join(lines)


def _counts(ops: dict[str, int]) -> str:
    return ", ".join(f"{op} {n}" for op, n in sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))) or "none"


def _module_path(origin: str) -> str:
    return origin.split(" (")[0]


def explain_graph(traced: Graph, fused: Graph, unfused: Graph, name: str = "", signature: str = "") -> Explanation:
    """The explanation of a traced graph and the fused and unfused programs made from it."""
    kernels, fallbacks = [], []
    for i, n in enumerate(fused.nodes):
        if n.op == "kernel":
            body: Graph = n.attr("body")
            ops = {op: c for op, c in body.ops().items() if op not in ("input", "param", "const")}
            origins = list(dict.fromkeys(_module_path(b.origin) for b in body.nodes if b.origin))
            kernels.append(KernelInfo(i, n.attr("kind"), ops, tuple(n.attr("tiles") or ()), origins, str(n.type)))
        elif n.op == "extern":
            fallbacks.append(FallbackInfo(i, n.attr("target"), n.attr("reason"), n.origin, str(n.type)))
    traced_ops = dict(Counter(n.op for n in traced.nodes if n.op not in ("input", "param", "const")))
    return Explanation(name, signature, traced_ops, kernels, fallbacks, program_stats(fused), program_stats(unfused))


def explain(module: Any, example_inputs: Any = (), example_kwargs: dict | None = None) -> Explanation:
    """Trace `module` and run the passes up to tiling (no code generation); see the module docstring."""
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    traced = trace(module, example_inputs, example_kwargs)
    fused = run_pipeline(traced.graph, target="cpu-unlooped")  # every kernel, not loops of them
    unfused = lower(traced.graph, fuse=False)
    signature = ", ".join(f"{n}: {t}" for n, t in zip(traced.input_names, traced.graph.input_types))
    return explain_graph(traced.graph, fused, unfused, traced.module_name, signature)
