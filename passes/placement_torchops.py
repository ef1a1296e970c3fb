"""Which kernels of a program run as one RDU kernel (one section), for the placement's section modes.

The SN40L paper's unfused baseline (§VI-A) runs "each PyTorch op as at least one kernel" with its
intermediates in HBM. fusec's unfused program is finer: its IR decomposes some PyTorch ops into several
primitives (softmax into amax, sub, exp, sum, div; mean into sum and a scale; SiLU into sigmoid and mul),
and a PyTorch view (transpose, reshape, slice) costs no kernel in PyTorch while fusec's unfused program
copies it. `torch_op_groups` recovers PyTorch-level kernels from the unfused program: the primitives of one
decomposed op (consecutive kernels from one source line spelling the op) form one group, and a kernel
that is only a view joins the kernel after it when that one reads the view (a view read elsewhere stays
a copy: an overcount of PyTorch's kernels). Kernels of a group share a section,
so values used only inside it stay on chip, as inside one PyTorch kernel.
"""
from __future__ import annotations

from fusec.ir import Graph

SECTION_MODES = ("packed", "kernel", "torch")
VIEWS = frozenset({"permute", "reshape", "slice"})
DECOMPOSED = (("amax", "sub", "exp", "sum", "div"),   # softmax
              ("sum", "mul"), ("sum", "div"),           # mean
              ("sigmoid", "mul"))                       # silu
FREE = ("input", "param", "const")


def kernel_ops(graph: Graph, kernel: int) -> tuple[str, ...]:
    """The ops of a kernel's body, without its inputs, params and constants."""
    return tuple(m.op for m in graph.nodes[kernel].attr("body").nodes if m.op not in FREE)


def section_groups(graph: Graph, mode: str) -> dict[int, int] | None:
    """kernel -> group for a section mode: "packed" None (kernels fill sections while they fit),
    "kernel" one group per kernel, "torch" `torch_op_groups`."""
    if mode not in SECTION_MODES:
        raise ValueError(f"section mode must be one of {', '.join(SECTION_MODES)}, got {mode!r}")
    kernels = [i for i, n in enumerate(graph.nodes) if n.op == "kernel"]
    if mode == "packed":
        return None
    if mode == "kernel":
        return {k: k for k in kernels}
    return torch_op_groups(graph)


def torch_op_groups(graph: Graph) -> dict[int, int]:
    """kernel -> group: one group per PyTorch-level op (see the module docstring). Fused kernels (not
    `op` kernels) are groups of their own."""
    kernels = [i for i, n in enumerate(graph.nodes) if n.op == "kernel"]
    ops = {k: kernel_ops(graph, k) for k in kernels}
    group: dict[int, int] = {}
    g, i, pending_view = -1, 0, False
    while i < len(kernels):
        run = _decomposed_run(graph, kernels, ops, i)
        if not pending_view:
            g += 1
        for k in kernels[i:i + run]:
            group[k] = g
        nxt = kernels[i + run] if i + run < len(kernels) else None
        pending_view = (run == 1 and set(ops[kernels[i]]) <= VIEWS and nxt is not None
                        and kernels[i] in _kernels_read(graph, nxt))
        i += run
    return group


def _kernels_read(graph: Graph, kernel: int) -> set[int]:
    """The kernels whose outputs `kernel` reads, through the view nodes between kernels."""
    out, todo = set(), list(graph.nodes[kernel].args)
    while todo:
        v = todo.pop()
        n = graph.nodes[v]
        if n.op == "kernel":
            out.add(v)
        elif n.op not in FREE:
            todo.extend(n.args)
    return out


def _decomposed_run(graph: Graph, kernels: list[int], ops: dict, i: int) -> int:
    """How many kernels from position i spell one decomposed PyTorch op (1 when none does)."""
    for pattern in DECOMPOSED:
        run = kernels[i:i + len(pattern)]
        if (len(run) == len(pattern) and all(ops[k] == (p,) for k, p in zip(run, pattern))
                and len({graph.nodes[k].origin for k in run}) == 1):
            return len(pattern)
    return 1
