"""The compiler pipeline: named stages of named passes, run in order, the graph verified after each pass.

    STAGES = {"canonical": (("dce", eliminate_dead_code), ("cse", ...), ...), "fused": (...), ...}

Later stages join with `register_stage("fused", passes, after="canonical")`. `run_pipeline(graph,
until="canonical")` runs every stage up to and including `until`. FUSEC_DEBUG=1 prints each pass with its
time and node count, FUSEC_DEBUG=2 also the IR after it (see `fusec.debug`).
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

from fusec.debug import debug, debug_level
from fusec.errors import FusecError, IRError
from fusec.ir import Graph, verify
from passes.canonicalize import (canonicalize, eliminate_common_subexpressions, eliminate_dead_code,
                                 fold_constants, simplify_algebra, simplify_views)
from passes.fuse import fuse
from passes.hoist_slices import hoist_slices
from passes.place import place
from passes.tile import tile

Pass = tuple[str, Callable[[Graph], Graph]]
Callback = Callable[[str, Graph], None]  # called after every pass with its name and the verified graph

STAGES: dict[str, tuple[Pass, ...]] = {}


def register_stage(name: str, passes: Sequence[Pass], after: str | None = None) -> None:
    """Add stage `name` after stage `after` (default: last). Registering a name again replaces that
    stage in place, unless `after` moves it."""
    passes = tuple(passes)
    if after is None and name in STAGES:
        STAGES[name] = passes
        return
    if after is not None and after not in STAGES:
        raise FusecError(f"cannot add stage {name!r} after {after!r}: the stages are {', '.join(STAGES)}")
    items = [(k, v) for k, v in STAGES.items() if k != name]
    at = len(items) if after is None else [k for k, _ in items].index(after) + 1
    items.insert(at, (name, passes))
    STAGES.clear()
    STAGES.update(items)


def _fail(stage: str, name: str, ran: list[str], error: Exception) -> str:
    before = f"the passes run before it: {', '.join(ran)}" if ran else "it was the first pass"
    return f"pass {name!r} (stage {stage!r}) broke the IR: {error}\n  ({before})"


def run_pipeline(graph: Graph, until: str | None = None, callback: Callback | None = None,
                 after: str | None = None) -> Graph:
    """Run the stages in order up to and including `until` (default: the last one), starting after
    stage `after` when given (the graph is then expected to be that stage's output).

    The input graph and the graph after every pass are verified; a broken one raises IRError naming the
    pass and the passes that ran before it. `callback(pass_name, graph)` runs after each pass.
    """
    names = list(STAGES)
    until = until or (names[-1] if names else None)
    for name in (until, after):
        if name is not None and name not in STAGES:
            raise FusecError(f"unknown stage {name!r}; the stages are {', '.join(names)}")
    try:
        verify(graph)
    except IRError as e:
        raise IRError(f"the input graph is broken before any pass ran: {e}") from e
    if debug_level() >= 2:
        debug(2, f"--- input ({len(graph.nodes)} nodes)\n{graph!r}")
    ran: list[str] = []
    selected = names[: names.index(until) + 1] if until else []
    if after is not None:
        selected = selected[names.index(after) + 1:]
    for stage in selected:
        for name, run in STAGES[stage]:
            start = time.perf_counter()
            try:
                graph = run(graph)
                verify(graph)
            except IRError as e:
                raise IRError(_fail(stage, name, ran, e)) from e
            except Exception as e:
                e.add_note(f"in pass {name!r} (stage {stage!r}), after: {', '.join(ran) or 'no other pass'}")
                raise
            ms = (time.perf_counter() - start) * 1e3
            ran.append(name)
            debug(1, f"[fusec] {stage}/{name:<20} {ms:9.2f} ms {len(graph.nodes):6d} nodes")
            if debug_level() >= 2:
                debug(2, f"--- after {stage}/{name}\n{graph!r}")
            if callback is not None:
                callback(name, graph)
    return graph


# The single passes first, so that a verify failure names the rule table that broke the graph; then
# `canonicalize` repeats them to the fixed point (one pass can expose work for an earlier one).
register_stage("canonical", (
    ("dce", eliminate_dead_code),
    ("cse", eliminate_common_subexpressions),
    ("fold_constants", fold_constants),
    ("simplify_algebra", simplify_algebra),
    ("simplify_views", simplify_views),
    ("canonicalize", canonicalize),
))
register_stage("fused", (("fuse", fuse), ("hoist_slices", hoist_slices)), after="canonical")
register_stage("tiled", (("tile", tile),))
register_stage("placed", (("place", place),), after="tiled")
