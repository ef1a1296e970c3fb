"""The package's import graph, function-local imports included: no import cycle, and `import fusec`
loads no optional library."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# folder -> import name: passes/ and backends/ install as fusec.passes and fusec.backends (setup.py)
PACKAGES = {"fusec": "fusec", "passes": "fusec.passes", "backends": "fusec.backends"}
# The layering (IR types <- op set <- graph <- printer/verifier <- passes <- backends <- API <- CLI) leaves
# no cycle: a new one fails here.
KNOWN: set[frozenset[str]] = set()


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            name = ".".join((package, *path.relative_to(ROOT / folder).with_suffix("").parts))
            found[name.removesuffix(".__init__")] = path
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    edges: dict[str, set[str]] = {name: set() for name in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names]
                targets = [t for t in targets if t in mods] or [node.module]
            else:
                continue
            edges[name] |= {t for t in targets if t in mods and t != name}
    return edges


def cycles(edges: dict[str, set[str]]) -> set[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: set[frozenset[str]] = set()

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.add(frozenset(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    new = cycles(import_graph()) - KNOWN
    assert not new, "import cycles: " + "; ".join(" <-> ".join(sorted(c)) for c in new)


def test_the_ir_and_the_passes_import_no_backend():
    """One direction: the IR and the passes sit below the backends (the reference semantics, which
    constant folding evaluates with, is `fusec.semantics`, not a backend)."""
    graph = import_graph()
    below = [m for m in graph if m.startswith("fusec.passes") or m in ("fusec.ir", "fusec.opset", "fusec.semantics")]
    upward = {m: sorted(t for t in graph[m] if t.startswith("fusec.backends")) for m in below}
    assert not {m: t for m, t in upward.items() if t}


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {frozenset("abc")}


def test_import_fusec_loads_no_optional_library():
    code = ("import sys, fusec; "
            "print(sorted(m for m in ('gguf', 'safetensors', 'tokenizers', 'transformers', 'ray', "
            "'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=ROOT, check=True).stdout.strip()
    assert out == "[]"
