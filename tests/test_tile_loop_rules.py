"""The thresholds that choose a cpu kernel's loops are tiles: the tiling pass derives them from the
machine's figures and the kernel's shape (`passes.tile.CPU_LOOP_RULES`), `fusec dump --stage tiled`
prints them, and the generated Numba code follows whatever values a kernel carries (computing the same
outputs either way): another machine gives other thresholds and other loops."""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

import fusec.passes.tile
from fusec.backends.numba_cpu.mkl import blas_choice
from fusec.backends.numba_cpu.runtime import Program
from fusec.backends.reference import run_graph
from fusec.cli import dump
from fusec.ir import Builder, Graph
from fusec.machines import KiB, get_machine
from fusec.models import load_model
from fusec.passes.pipeline import run_pipeline
from fusec.passes.tile import CPU_LOOP_RULES, LOOP_TILES, MatmulShape, kernel_shape, loop_tiles, tile
from fusec.tracing import trace

SEQ = 16  # prefill rows: matrix-vector sized (<= matvec_rows, 18 here) and enough query rows for attention GEMMs (>= 16)
REFERENCE_CPU = get_machine("test_cpu")  # the 2-core x86 the thresholds were measured on (its figures)
# A cpu with more cores, a smaller L2 and the same clock: other thresholds, and other tiles
SMALL_L2 = dataclasses.replace(REFERENCE_CPU, name="small_l2", cores=8, pcus=8, pmus=8, grid=(1, 8),
                               l1_bytes=2 * KiB, l2_bytes=4 * KiB, pmu_bytes=4 * KiB)


def test_the_rules_reproduce_the_measured_thresholds_and_follow_the_machine():
    """On the machine they were measured on the rules give the measured crossovers (parallel_min 16384,
    gemm_rows 16) and a matvec_rows (18) measured at least as fast as the old 64; more cores make a fork
    and join pay sooner and give each core less memory bandwidth, one core never forks, a small L2
    bounds the rows of A the matrix-vector loop keeps in it."""
    assert loop_tiles(REFERENCE_CPU) == {"parallel_min": 1 << 14, "matvec_rows": 18, "matvec_group": 8,
                                         "gemm_rows": 16}
    assert loop_tiles(SMALL_L2) == {"parallel_min": 1 << 13, "matvec_rows": 73, "matvec_group": 8, "gemm_rows": 16}
    assert loop_tiles(dataclasses.replace(REFERENCE_CPU, cores=1))["parallel_min"] > 1 << 60
    projection = MatmulShape(m=SEQ, n=64, k=64, a=4, b=4, out=4, acc=4)
    assert loop_tiles(REFERENCE_CPU, projection)["matvec_rows"] == 18
    assert loop_tiles(SMALL_L2, projection)["matvec_rows"] == 4 * KiB // (64 * 4)  # 16 rows of A fill its L2
    assert {name for name, _, _ in CPU_LOOP_RULES} == set(loop_tiles(REFERENCE_CPU))


def test_narrow_weights_keep_the_measured_matvec_rows():
    """bf16 and int8 weights are not weighed against an fp32 MKL GEMM (theirs are slower): a 32-token
    prefill over them streams the weights (at 9 or 4 rows it took their GEMM paths and ran 100x slower)."""
    for weight in (2, 1):
        shape = MatmulShape(m=32, n=768, k=768, a=4, b=weight, out=4, acc=4)
        assert loop_tiles(REFERENCE_CPU, shape)["matvec_rows"] == fusec.passes.tile.LOWP_MATVEC_ROWS >= 32
    small = MatmulShape(m=32, n=64, k=64, a=4, b=2, out=4, acc=4)  # the L2 still bounds the rows of A
    assert loop_tiles(SMALL_L2, small)["matvec_rows"] == 4 * KiB // (64 * 4)


def test_int8_weights_stream_in_groups_of_16_rows_where_vectors_are_512_bits():
    """The matrix-vector loop hands a thread 16 int8 weight rows at a time on AVX-512 (their per-chunk work
    on the activations shared by twice the rows; 16 accumulators fit its 32 registers), 8 on narrower
    vectors and for fp32 and bf16 weights; against one activation row, bf16 and int8 one row at a time
    (nothing to share: one stream per thread)."""
    def group(m, b, machine=REFERENCE_CPU):
        return loop_tiles(machine, MatmulShape(m=m, n=768, k=768, a=4, b=b, out=4, acc=4))["matvec_group"]
    assert {b: group(4, b) for b in (4, 2, 1)} == {4: 8, 2: 8, 1: 16}
    assert {b: group(1, b) for b in (4, 2, 1)} == {4: 8, 2: 1, 1: 1}
    assert group(4, 1, dataclasses.replace(REFERENCE_CPU, lanes=8)) == 8


@pytest.mark.parametrize("weights, group", [("fp32", 8), ("int8", 1)])
def test_the_decode_code_streams_weights_in_the_groups_the_tiles_show(weights, group, monkeypatch):
    """`fusec dump --stage tiled` shows each matmul's matvec_group; the generated matrix-vector calls pass
    that number (the loop's rows per group), and the program computes the reference's outputs."""
    monkeypatch.setattr(fusec.passes.tile, "cpu", lambda: REFERENCE_CPU)
    module, args = load_model("llama-block", seq_len=1)
    graph = run_pipeline(trace(module, args).graph, until="tiled", target="cpu", weights=weights)
    groups = {dict(n.attr("tiles"))["matvec_group"] for n in graph.nodes
              if n.op == "kernel" and n.attr("kind") == "matmul"}
    assert groups == {group}
    program = Program(graph)
    calls = [line.strip() for line in program.source.splitlines() if re.match(r"\s*matvec\w*\(", line)]
    assert calls and all(c.endswith(f", {group})") for c in calls), calls
    inputs = [a.numpy() for a in args]
    np.testing.assert_allclose(program.run(inputs)[0], run_graph(graph, inputs)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("weights, stored", [("fp32", 4), ("bf16", 2), ("int8", 1)])
def test_a_kernel_shape_sees_the_weights_as_stored(weights, stored, monkeypatch):
    """A bf16 or int8 weight reaches its product widened (cast, scales, transpose): the tiles are chosen
    for the bytes its loop streams, so a bf16 or int8 prefill keeps LOWP_MATVEC_ROWS. The fp32 rows follow
    from the caches' sizes: tiled for the reference CPU, not for the machine running the test."""
    monkeypatch.setattr(fusec.passes.tile, "cpu", lambda: REFERENCE_CPU)
    module, args = load_model("llama-block", seq_len=SEQ)
    graph = run_pipeline(trace(module, args).graph, until="tiled", target="cpu", weights=weights)
    matmuls = [n for n in graph.nodes if n.op == "kernel" and n.attr("kind") == "matmul"]
    assert matmuls and {kernel_shape(n).b for n in matmuls} == {stored}
    rows = {dict(n.attr("tiles"))["matvec_rows"] for n in matmuls}
    assert rows == ({18} if weights == "fp32" else {fusec.passes.tile.LOWP_MATVEC_ROWS})


def kernel_thresholds(machine, monkeypatch) -> list[tuple[str, dict, dict]]:
    """(kind, the loop thresholds `fusec dump --stage tiled` prints, those the rules give for its shape)
    per kernel of the tiny block's prefill tiled for `machine`."""
    monkeypatch.setattr(fusec.passes.tile, "cpu", lambda: machine)
    module, args = load_model("llama-block", seq_len=SEQ)
    graph = run_pipeline(trace(module, args).graph, until="tiled", target="cpu")
    kernels = [n for n in graph.nodes if n.op == "kernel"]
    lines = [line for line in dump("llama-block", "tiled", "text", seq_len=SEQ).splitlines() if " = kernel " in line]
    assert len(lines) == len(kernels) > 0
    out = []
    for line, node in zip(lines, kernels):
        printed = {k: int(v) for k, v in re.findall(r'\["(\w+)",(\d+)\]', line) if k in LOOP_TILES}
        out.append((node.attr("kind"), printed, loop_tiles(machine, kernel_shape(node))))
    return out


@pytest.mark.parametrize("machine", [REFERENCE_CPU, SMALL_L2], ids=lambda m: m.name)
def test_the_tiled_dump_shows_each_kernels_loop_thresholds(machine, monkeypatch):
    for kind, printed, rules in kernel_thresholds(machine, monkeypatch):
        assert printed == rules, kind
        assert ("matvec_rows" in printed) == (kind == "matmul") and ("gemm_rows" in printed) == (kind == "attention")


def test_a_smaller_l2_gives_other_tiles_in_the_dump(monkeypatch):
    """The small-L2 cpu's tiled dump differs from the reference cpu's in its thresholds: a lower
    parallel_min everywhere, and on the down projection (K = 128) fewer matrix-vector rows than SEQ."""
    reference, small = (kernel_thresholds(m, monkeypatch) for m in (REFERENCE_CPU, SMALL_L2))
    assert all(r[1]["parallel_min"] == 1 << 14 and s[1]["parallel_min"] == 1 << 13 for r, s in zip(reference, small))
    rows = [(r[1]["matvec_rows"], s[1]["matvec_rows"]) for r, s in zip(reference, small) if r[0] == "matmul"]
    assert all(r == 18 for r, _ in rows) and sorted({s for _, s in rows}) == [8, 16]


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
    """The tiny block's prefill, fused (tiles are set per test), its inputs and the reference outputs."""
    module, args = load_model("llama-block", seq_len=SEQ)
    fused = run_pipeline(trace(module, args).graph, until="fused", target="cpu")
    inputs = [np.ascontiguousarray(a.detach().numpy()) for a in args]
    return fused, inputs, run_graph(fused, inputs)


def _sources(program: Program, loop: str) -> list[str]:
    return [c.source for c in program.codes if c.loop.startswith(loop)]


def test_the_generated_code_follows_changed_thresholds(tiled):
    """At the reference cpu's thresholds, 16 rows are matrix-vector products, the attention blocks are
    MKL GEMMs and no other loop is big enough to run parallel; with matvec_rows 8, gemm_rows 32 and
    parallel_min 1 the products are GEMMs, the attention blocks vector rows and the loops parallel."""
    fused, inputs, want = tiled
    graph = tile(fused, REFERENCE_CPU)
    assert blas_choice()[0] == "mkl", "the attention GEMMs are MKL's"
    as_tiled = Program(graph)
    changed = Program(retiled(graph, matvec_rows=8, gemm_rows=32, parallel_min=1))
    for program in (as_tiled, changed):
        for got, expected in zip(program.run(inputs), want):
            np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-5)
    assert _sources(as_tiled, "matvec") and not _sources(as_tiled, "gemm")
    assert _sources(changed, "gemm") and not _sources(changed, "matvec")
    # (the attention library's blocks: MKL GEMMs, `flash_block_gemm`, or vector rows, `flash_block_rows`)
    assert all("flash_block_gemm(" in s for s in _sources(as_tiled, "attention"))
    assert not any("flash_block_gemm(" in s for s in _sources(changed, "attention"))
    assert all("flash_block_rows(" in s for s in _sources(changed, "attention"))
    # (the attention's own rule is parallel_min x 4 of its work: its 4 heads run parallel either way)
    assert not any("prange(" in c.source for c in as_tiled.codes if not c.loop.startswith("attention"))
    # (a projection plus residual is one call whose column blocks are the parallel loop, `mkl.gemm_add_mkl`)
    assert all("prange(" in c.source or "gemm_add_mkl(" in c.source for c in changed.codes)


def test_the_generated_code_follows_a_smaller_l2(tiled):
    """Tiled for the small-L2 cpu, the down projection (K = 128: 8 rows of A fill its L2) is a GEMM and
    the other products (K = 64: 16 rows) matrix-vector streams, where the reference cpu streams them all;
    the outputs equal the reference backend's either way."""
    fused, inputs, want = tiled
    programs = {m.name: Program(tile(fused, m)) for m in (REFERENCE_CPU, SMALL_L2)}
    for program in programs.values():
        for got, expected in zip(program.run(inputs), want):
            np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-5)
    reference, small = programs[REFERENCE_CPU.name], programs[SMALL_L2.name]
    assert len(_sources(reference, "matvec")) == len(_sources(small, "matvec")) + 1 and not _sources(reference, "gemm")
    assert len(_sources(small, "gemm")) == 1
