"""An indented source writer that can place a statement at any open loop level.

Generated kernels ask for values deep inside loop nests; a value whose index does not depend on the inner
loops (a row's sum, a constant, a reciprocal) is written at the outermost level where it is valid, before
the loop it would otherwise be recomputed in. That is loop-invariant code motion by construction: the
writer keeps the tree of open blocks and inserts a statement at level L just before the block that is
open inside level L.

The level of a statement is the deepest level at which anything it reads is defined: loop variables
(bound by `block`) and every variable written inside a loop (registered with `define`, e.g. a row index
or an embedding row number loaded inside a reduction loop). A name is forgotten when its block closes.
"""
from __future__ import annotations

from contextlib import contextmanager


class Block:
    def __init__(self, header: str | None):
        self.header = header
        self.items: list = []          # lines (str) and nested Blocks
        self.open_child: Block | None = None
        self.names: list[str] = []     # variables defined at this level (see Writer.define)

    def insert(self, item) -> None:
        """Append, but before the child block that is still open (statements there come first)."""
        if self.open_child is not None:
            self.items.insert(self.items.index(self.open_child), item)
        else:
            self.items.append(item)

    def render(self, depth: int, out: list[str]) -> None:
        if self.header is not None:
            out.append("    " * depth + self.header + ":")
            depth += 1
            if not self.items:
                out.append("    " * depth + "pass")
        for item in self.items:
            if isinstance(item, Block):
                item.render(depth, out)
            else:
                out.append("    " * depth + item)


class Writer:
    """`line` writes at the innermost open level (or at `level`); `block` opens a nested block;
    `loop_level(vars)` is the level where an expression over those loop variables is valid."""

    def __init__(self):
        self.root = Block(None)
        self.stack: list[Block] = [self.root]
        self.var_level: dict[str, int] = {}
        self.floor = 0  # statements never move above this level (the inside of a branch)

    @property
    def depth(self) -> int:
        return len(self.stack) - 1

    def line(self, text: str, level: int | None = None) -> None:
        level = self.depth if level is None else max(level, self.floor)
        self.stack[level].insert(text)

    @contextmanager
    def block(self, header: str, binds: tuple[str, ...] = (), barrier: bool = False):
        """Open `header:`; `binds` are the loop variables it defines; a barrier (an if/else branch)
        keeps statements written inside from being hoisted out of it."""
        child = Block(header)
        parent = self.stack[-1]
        parent.insert(child)
        previous = parent.open_child  # set when writing above an open block (see `at`)
        parent.open_child = child
        self.stack.append(child)
        for v in binds:
            self.define(v)
        old_floor = self.floor
        if barrier:
            self.floor = self.depth
        try:
            yield
        finally:
            self.floor = old_floor
            level = self.depth
            for v in child.names:  # defined in the block: out of scope after it
                if self.var_level.get(v) == level:
                    del self.var_level[v]
            self.stack.pop()
            parent.open_child = previous

    def define(self, name: str, level: int | None = None) -> None:
        """Record that `name` is assigned at `level` (default: the innermost open level), so that a
        statement reading it is never placed above it. The name is forgotten when that block closes."""
        level = self.depth if level is None else level
        self.var_level[name] = level
        self.stack[level].names.append(name)

    @contextmanager
    def at(self, level: int):
        """Write at `level` for a while (the deeper open blocks stay where they are)."""
        level = max(level, self.floor)
        saved = self.stack
        self.stack = self.stack[: level + 1]
        try:
            yield
        finally:
            self.stack = saved

    def level_of(self, names) -> int:
        """The outermost level where an expression reading `names` is valid: the deepest level at which
        one of them is defined (loop variables and `define`d variables), never above the floor."""
        return max([self.floor] + [self.var_level[n] for n in names if n in self.var_level])

    def text(self) -> str:
        out: list[str] = []
        self.root.render(0, out)
        return "\n".join(out) + "\n"
