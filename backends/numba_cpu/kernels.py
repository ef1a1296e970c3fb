"""Kernels by body: each distinct kernel of a program is generated, cached and compiled once.

Kernels of one program often differ only in the weights they read (every decoder layer's projections, and,
once `passes.hoist_slices` moved the KV-cache slice out of it, its attention). Generated code takes weights
as arguments (`codegen.generate`), so such kernels have one source apart from the function's name and the
`# weights:` comment. Here each kernel's source is generated under the fixed name `kernel`, without that
comment and with a line of its argument types, and becomes its own module, loaded through
`fusec.cache.load_source`: the module's name is a hash of its text, so every program with that kernel
(decode and each prefill length, other batch sizes, experts of one architecture) shares its compiled code,
in this process and in the on-disk cache. Each call site passes its own operands and weights.

The readable program text (`Program.source`) lists the calls, then each distinct kernel once, named k0,
k1, ... in the order of its first call.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from fusec.backends.numba_cpu.codegen import KernelCode, generate
from fusec.errors import TakeIndexError
from fusec.ir import Graph

FUNCTION = "kernel"  # the name of the function in every kernel module (the module's name says which)


@dataclass
class Kernels:
    codes: list[KernelCode]   # per kernel node: its distinct kernel's readable name and source, own weights
    functions: list           # per kernel node: the compiled function (shared between equal bodies)
    modules: list             # per kernel node: the module holding that function
    distinct: list            # the distinct modules, in the order of their first call
    source: str               # the readable text of the program


def build(graph: Graph, kernels: list[int], header: str, load) -> Kernels:
    """Generate the kernel nodes `kernels` of `graph` and load one module per distinct body with
    `load(module_source)`. `header` starts every module (imports)."""
    codes, functions, modules, distinct = [], [], [], []
    by_text: dict[str, int] = {}   # module text -> distinct number
    readable: list[str] = []
    calls: list[list[int]] = []
    for i in kernels:
        code = generate(FUNCTION, graph.nodes[i])
        text = header + "\n\n" + _argument_types(graph.nodes[i].attr("body")) + _without_weights(code.source)
        d = by_text.get(text)
        if d is None:
            d = by_text[text] = len(distinct)
            distinct.append(load(text))
            readable.append(_named(_without_weights(code.source), f"k{d}"))
            calls.append([])
        calls[d].append(i)
        codes.append(replace(code, name=f"k{d}", source=readable[d]))
        modules.append(distinct[d])
        functions.append(getattr(distinct[d], FUNCTION))
    source = header + "\n" + _call_table(graph, kernels, codes, distinct, calls, readable)
    return Kernels(codes, functions, modules, distinct, source)


def raise_bad_index(slot, gathers: list[tuple[int, str]]) -> None:
    """After a call: raise TakeIndexError for the out-of-range index a kernel recorded in its error slot
    (`[which gather + 1, index]`, see `codegen.generate`), clearing the slot; nothing when it is clear."""
    if slot[0]:
        (bound, what), bad = gathers[slot[0] - 1], int(slot[1])
        slot[:] = 0
        raise TakeIndexError(f"index {bad} is out of range for a {what} (indices must be in [0, {bound}))")


def _without_weights(source: str) -> str:
    """The source without its `# weights:` line: which tensors a call passes is the call site's business."""
    return "".join(line for line in source.splitlines(keepends=True) if not line.startswith("# weights:"))


def _argument_types(body: Graph) -> str:
    """A comment line of the dtypes and ranks of the function's arguments, in `generate`'s order (inputs,
    weights, stored constants, outputs): what Numba compiles a specialization for, so equal text means one
    compiled specialization, never two dtypes sharing a module. Not the sizes: every size the code uses is
    in its text (a constant, or read from an array), so kernels that differ only in sizes the code reads
    from its arrays (a matrix-vector product's K) share one compiled function."""
    inputs = [body.nodes[i].type for i in body.inputs]
    params = [n.type for n in body.nodes if n.op == "param"]
    consts = [n.type for n in body.nodes if n.op == "const" and n.attr("key") is not None]
    outputs = [body.nodes[o].type for o in body.outputs]
    return "# arguments: " + ", ".join(f"{t.dtype}[{len(t.shape)}d]" for t in inputs + params + consts + outputs) + "\n"


def _named(source: str, name: str) -> str:
    """The source with the function called `name` (for the readable text; the module keeps `kernel`)."""
    return (source.replace(f"# kernel {FUNCTION}:", f"# kernel {name}:", 1)
            .replace(f"def {FUNCTION}(", f"def {name}(", 1))


def _call_table(graph: Graph, kernels: list[int], codes: list[KernelCode], distinct: list,
                calls: list[list[int]], readable: list[str]) -> str:
    lines = [f"# {len(kernels)} kernel calls, {len(distinct)} distinct kernels (each compiled once, in its "
             "own cached module)"]
    for i, code in zip(kernels, codes):
        operands = ", ".join(f"%{a}" for a in graph.nodes[i].args)
        weights = f"  weights: {', '.join(code.params)}" if code.params else ""
        lines.append(f"#   %{i} = {code.name}({operands}){weights}")
    parts = ["\n".join(lines) + "\n"]
    for d, module in enumerate(distinct):
        parts.append(f"# k{d}: module {module.__name__}, called by "
                     f"{', '.join(f'%{i}' for i in calls[d])}\n{readable[d]}")
    return "\n\n".join(parts)
