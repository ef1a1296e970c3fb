"""The compiler pipeline: named stages of named passes, run in order, the graph verified after each pass.

    STAGES = {"canonical": (("dce", eliminate_dead_code), ("cse", ...), ...), "fused": (...), ...}
    TARGETS = {"cpu": ("canonical", "weights", "fused", "tiled", "looped"), ..., "rdu": (..., "tiled", "placed")}

A target is the list of stages its backend needs: the CPU (Numba and reference backends) stops at the
tiled program with its equal layers looped (`looped`; `cpu-unlooped` without); the RDU target also
places it on the chip (`placed`), which only `fusec dump --stage placed`, `fusec rdu` and the RDU model
ask for. `run_pipeline(graph, until="canonical", target="cpu")`
runs the target's stages up to and including `until`. The `weights` stage stores weights in another format
(`weights="bf16"`) and is skipped for fp32. Later stages join with `register_stage("fused", passes,
after="canonical")` (a registered stage outside every target runs when no target is given).
FUSEC_DEBUG=1 prints each pass with its time and node count, FUSEC_DEBUG=2 also the IR after it.
"""
from __future__ import annotations

import time
from functools import partial
from typing import Callable, Sequence

from fusec.debug import debug, debug_level
from fusec.errors import FusecError, IRError
from fusec.ir import Graph
from fusec.verify import verify
from fusec.passes.canonicalize import (canonicalize, eliminate_common_subexpressions, eliminate_dead_code,
                                 fold_constants, simplify_algebra, simplify_views)
from fusec.passes.fuse import fuse, unfuse
from fusec.passes.hoist_slices import hoist_product_rows, hoist_slices
from fusec.passes.layout import choose_layout
from fusec.passes.loop import loop_kernels
from fusec.passes.place import place
from fusec.passes.tile import tile
from fusec.passes.weights import store_weights

Pass = tuple[str, Callable[[Graph], Graph]]
Callback = Callable[[str, Graph], None]  # called after every pass with its name and the verified graph

STAGES: dict[str, tuple[Pass, ...]] = {}

# The stages each target runs, in order. Variants of one stage (fused/unfused) are alternatives: a run with
# no target takes every registered stage but the alternatives (`unfused`).
TARGETS: dict[str, tuple[str, ...]] = {
    "cpu": ("canonical", "weights", "fused", "tiled", "looped"),
    "cpu-unlooped": ("canonical", "weights", "fused", "tiled"),
    "cpu-unfused": ("canonical", "weights", "unfused", "tiled"),
    "rdu": ("canonical", "weights", "fused", "tiled", "placed"),
    "rdu-unfused": ("canonical", "weights", "unfused", "tiled", "placed"),
}
ALTERNATIVES = ("unfused", "looped")  # `looped` runs only in the targets that name it


def target_for(target: str, fuse: bool = True, loop: bool = True) -> str:
    """The target name of `target` ("cpu" or "rdu") fused or unfused, with its layers looped or not (only
    the fused CPU target loops: see `passes.loop`)."""
    name = target if fuse else f"{target}-unfused"
    if fuse and not loop and f"{target}-unlooped" in TARGETS:
        name = f"{target}-unlooped"
    if name not in TARGETS:
        raise FusecError(f"unknown target {target!r}; expected one of cpu, rdu")
    return name


def _stage_passes(stage: str, weights: str) -> tuple[Pass, ...]:
    """The passes of `stage`; the weights stage takes its format from the run."""
    if stage == "weights":
        return () if weights == "fp32" else (("store_weights", partial(store_weights, weights=weights)),)
    return STAGES[stage]


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
                 after: str | None = None, target: str | None = None, weights: str = "fp32") -> Graph:
    """Run the stages of `target` (see TARGETS; default: every registered stage but the alternatives) in
    order up to and including `until` (default: the last one), starting after stage `after` when given
    (the graph is then expected to be that stage's output). `weights` is the weights' storage format.

    The input graph and the graph after every pass are verified; a broken one raises IRError naming the
    pass and the passes that ran before it. `callback(pass_name, graph)` runs after each pass.
    """
    if target is not None and target not in TARGETS:
        raise FusecError(f"unknown target {target!r}; expected one of {', '.join(TARGETS)}")
    names = list(TARGETS[target]) if target else [n for n in STAGES if n not in ALTERNATIVES]
    until = until or (names[-1] if names else None)
    for name in (until, after):
        if name is not None and name not in names:
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
        for name, run in _stage_passes(stage, weights):
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
register_stage("weights", ())  # filled per run from its `weights` (see _stage_passes)
register_stage("fused", (("fuse", fuse), ("hoist_slices", hoist_slices), ("layout", choose_layout)))
register_stage("unfused", (("unfuse", unfuse), ("hoist_slices", hoist_slices)))
register_stage("tiled", (("tile", tile),))
register_stage("looped", (("loop_kernels", loop_kernels), ("hoist_product_rows", hoist_product_rows)),
               after="tiled")
register_stage("placed", (("place", place),))

# the pipeline as written here: the trace cache (`fusec.trace_key.passes_key`) keys lowered programs on
# any change from it (a stage registered or replaced later)
BUILT_IN = ({k: tuple(v) for k, v in STAGES.items()}, {k: tuple(v) for k, v in TARGETS.items()})
