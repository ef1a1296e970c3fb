"""The thresholds that choose a cpu kernel's loops are tiles: the tiling pass sets them from its rules
(`passes.tile.CPU_LOOP_RULES`), `fusec dump --stage tiled` prints them, and the generated Numba code
follows whatever values a kernel carries (computing the same outputs either way)."""
from __future__ import annotations

import re

import numpy as np
import pytest

from fusec.backends.numba_cpu.mkl import blas_choice
from fusec.backends.numba_cpu.runtime import Program
from fusec.backends.reference import run_graph
from fusec.cli import dump
from fusec.ir import Builder, Graph
from fusec.machines import cpu
from fusec.models import load_model
from fusec.passes.pipeline import run_pipeline
from fusec.passes.tile import CPU_LOOP_RULES, loop_tiles
from fusec.tracing import trace

SEQ = 24  # prefill rows: matrix-vector sized (<= 64) and enough query rows for attention GEMMs (>= 16)


def test_the_tiled_dump_shows_each_kernels_loop_thresholds():
    rules = loop_tiles(cpu())
    assert rules == {"parallel_min": 1 << 14, "matvec_rows": 64, "gemm_rows": 16}
    kernels = [line for line in dump("llama-block", "tiled", "text", seq_len=SEQ).splitlines() if " = kernel " in line]
    assert kernels
    for line in kernels:
        kind = re.search(r'kind="(\w+)"', line).group(1)
        assert f'["parallel_min",{rules["parallel_min"]}]' in line, line
        assert (f'["matvec_rows",{rules["matvec_rows"]}]' in line) == (kind == "matmul"), line
        assert (f'["gemm_rows",{rules["gemm_rows"]}]' in line) == (kind == "attention"), line
    assert {name for name, _, _ in CPU_LOOP_RULES} == set(rules)


def retiled(graph: Graph, **changes: int) -> Graph:
    """`graph` with the tiles named in `changes` set to those values on every kernel that has them."""
    b, new = Builder(graph.tensors), []
    for n in graph.nodes:
        attrs = dict(n.attrs)
        if n.op == "kernel":
            tiles = dict(attrs["tiles"])
            tiles.update((k, v) for k, v in changes.items() if k in tiles)
            attrs["tiles"] = tuple(sorted(tiles.items()))
        new.append(b.add(n.op, [new[a] for a in n.args], attrs, type=n.type, origin=n.origin))
    return b.finish([new[o] for o in graph.outputs])


@pytest.fixture(scope="module")
def tiled():
    module, args = load_model("llama-block", seq_len=SEQ)
    graph = run_pipeline(trace(module, args).graph, until="tiled", target="cpu")
    inputs = [np.ascontiguousarray(a.detach().numpy()) for a in args]
    return graph, inputs, run_graph(graph, inputs)


def _sources(program: Program, loop: str) -> list[str]:
    return [c.source for c in program.codes if c.loop.startswith(loop)]


def test_the_generated_code_follows_changed_thresholds(tiled):
    """At the pass's thresholds, 24 rows are matrix-vector products, the attention blocks are MKL GEMMs
    and no other loop is big enough to run parallel; with matvec_rows 8, gemm_rows 32 and parallel_min 1 the
    products are GEMMs, the attention blocks scalar loops and the loops parallel."""
    graph, inputs, want = tiled
    assert blas_choice()[0] == "mkl", "the attention GEMMs are MKL's"
    as_tiled = Program(graph)
    changed = Program(retiled(graph, matvec_rows=8, gemm_rows=32, parallel_min=1))
    for program in (as_tiled, changed):
        for got, expected in zip(program.run(inputs), want):
            np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-5)
    assert _sources(as_tiled, "matvec") and not _sources(as_tiled, "gemm")
    assert _sources(changed, "gemm") and not _sources(changed, "matvec")
    assert all("gemm_tile_mkl(" in s for s in _sources(as_tiled, "attention"))
    assert not any("gemm_tile_mkl(" in s for s in _sources(changed, "attention"))
    # (the attention's own rule is parallel_min x 4 of its work: its 4 heads run parallel either way)
    assert not any("prange(" in c.source for c in as_tiled.codes if not c.loop.startswith("attention"))
    # (a projection plus residual is one call whose column blocks are the parallel loop, `mkl.gemm_add_mkl`)
    assert all("prange(" in c.source or "gemm_add_mkl(" in c.source for c in changed.codes)
