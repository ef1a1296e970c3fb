"""The tiling pass: golden tiles for a small RDU grid and a small-cache cpu, every tile's working set fits
the budget, a second run changes nothing, numerics are unchanged, and the stage is in the pipeline."""
from __future__ import annotations

import dataclasses
from textwrap import dedent

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusec.backends.reference import run_graph
from fusec.ir import Builder, Graph, TensorType
from fusec.verify import verify
from fusec.kernels import add_kernel
from fusec.machines import KiB, MiB, Machine, cpu, get_machine
from fusec.printer import format_graph, format_node, parse_graph
from fusec.passes.layout import choose_layout
from fusec.passes.pipeline import STAGES, TARGETS, run_pipeline
from fusec.passes.tile import LOOP_TILES, choose_tiles, make_tile_pass, tile, working_set

# An RMSNorm (reduce), a projection with a ReLU epilogue (matmul) and two-head attention over its output.
BEFORE = """
%0 = input {index=0, name="x"} : f32[64,128]
%1 = kernel %0 {anchors=[2], kind="reduce", tiles=[]} : f32[64,128]
  body {
    %0 = input {index=0, name="a0"} : f32[64,128]
    %1 = mul %0, %0 : f32[64,128]
    %2 = sum %1 {axes=[1], keepdim=true} : f32[64,1]
    %3 = rsqrt %2 : f32[64,1]
    %4 = mul %0, %3 : f32[64,128]
    %5 = param {name="g"} : f32[128]
    %6 = mul %4, %5 : f32[64,128]
    return %6
  }
%2 = kernel %1 {anchors=[2], kind="matmul", tiles=[]} : f32[64,96]
  body {
    %0 = input {index=0, name="a0"} : f32[64,128]
    %1 = param {name="w"} : f32[128,96]
    %2 = matmul %0, %1 : f32[64,96]
    %3 = relu %2 : f32[64,96]
    return %3
  }
%3 = kernel %2 {anchors=[6,14], kind="attention", tiles=[]} : f32[2,32,32]
  body {
    %0 = input {index=0, name="a0"} : f32[64,96]
    %1 = reshape %0 {shape=[2,32,96]} : f32[2,32,96]
    %2 = slice %1 {axis=2, start=0, step=1, stop=32} : f32[2,32,32]
    %3 = slice %1 {axis=2, start=32, step=1, stop=64} : f32[2,32,32]
    %4 = slice %1 {axis=2, start=64, step=1, stop=96} : f32[2,32,32]
    %5 = permute %3 {perm=[0,2,1]} : f32[2,32,32]
    %6 = matmul %2, %5 : f32[2,32,32]
    %7 = const {value=0.1767766952966369} : f32[]
    %8 = mul %6, %7 : f32[2,32,32]
    %9 = amax %8 {axes=[2], keepdim=true} : f32[2,32,1]
    %10 = sub %8, %9 : f32[2,32,32]
    %11 = exp %10 : f32[2,32,32]
    %12 = sum %11 {axes=[2], keepdim=true} : f32[2,32,1]
    %13 = div %11, %12 : f32[2,32,32]
    %14 = matmul %13, %4 : f32[2,32,32]
    return %14
  }
return %3
"""

# Budget 32 KiB (2 PMUs of 16 KiB). Matmul: a 32x32 tile with the full K=128 needs 77824 bytes, so K is
# split into 4 chunks of 32; then 2*(4*32m + 4*32n + 4mn) + 4mn <= 32768 gives m=24, n=48 (reuse 16).
# Attention: 648q + 512kv + 4q*kv <= 32768 gives q=kv=24. Rows: 512 + 2052*rows <= 32768 gives 8.
TEST_GRID = """
%1 = kernel %0 {anchors=[2], kind="reduce", tiles=[["rows",8]]} : f32[64,128]
%2 = kernel %1 {anchors=[2], kind="matmul", tiles=[["k",32],["m",24],["n",48]]} : f32[64,96]
%3 = kernel %2 {anchors=[6,14], kind="attention", tiles=[["kv",24],["q",24]]} : f32[2,32,32]
"""

# Budget 64 KiB of L2: K splits in 2 (64); m=n=40; the whole attention (41216 bytes) fits; rows=24.
# The matmul's prologue/epilogue rows: 2*(128*4 + 96*4) = 1792 bytes a row, all 64 would fit, but each of
# the 2 cores gets a block: 32. Beside the sizes, the loop thresholds of `CPU_LOOP_RULES`.
SMALL_CPU = """
%1 = kernel %0 {anchors=[2], kind="reduce", tiles=[["parallel_min",16384],["rows",24]]} : f32[64,128]
%2 = kernel %1 {anchors=[2], kind="matmul", tiles=[["k",64],["m",40],["matvec_group",8],["matvec_rows",18],["n",40],["parallel_min",16384],["rows",32]]} : f32[64,96]
%3 = kernel %2 {anchors=[6,14], kind="attention", tiles=[["gemm_rows",16],["kv",32],["parallel_min",16384],["q",32]]} : f32[2,32,32]
"""


def small_cpu(l2: int = 64 * KiB) -> Machine:
    return dataclasses.replace(get_machine("test_cpu"), name="small_cpu", l2_bytes=l2, pmu_bytes=l2)


def sizes(tiles) -> tuple:
    """The tile sizes without the cpu's loop thresholds."""
    return tuple((name, size) for name, size in tiles if name not in LOOP_TILES)


def graph() -> Graph:
    rng = np.random.default_rng(0)
    tensors = {"g": rng.standard_normal(128).astype(np.float32),
               "w": rng.standard_normal((128, 96)).astype(np.float32) / 8}
    g = parse_graph(BEFORE, tensors)
    verify(g)
    return g


def kernel_lines(g: Graph) -> str:
    return "\n".join(format_node(i, n) for i, n in enumerate(g.nodes) if n.op == "kernel")


def check(machine: Machine | str, expected: str) -> Graph:
    """Tile `graph()`; the kernel lines match, nothing else changed, a second run changes nothing, every
    tile fits the budget and the reference backend computes the same outputs."""
    before = graph()
    after = tile(before, machine)
    verify(after)
    assert kernel_lines(after) == dedent(expected).strip()
    text = format_graph(after)
    for line in dedent(expected).strip().splitlines():
        text = text.replace(line, line[:line.index("tiles=")] + "tiles=[]" + line[line.index("}"):])
    assert text == format_graph(before), "the pass changed more than the tiles"
    assert format_graph(tile(after, machine)) == format_graph(after), "a second run changed the graph"
    budget = get_machine(machine).tile_budget
    for n in after.nodes:
        if n.op == "kernel":
            assert working_set(n, n.attr("tiles")) <= budget
    x = np.random.default_rng(1).standard_normal((64, 128)).astype(np.float32)
    for want, got in zip(run_graph(before, [x]), run_graph(after, [x])):
        np.testing.assert_array_equal(got, want)
    return after


def test_golden_tiles_on_the_test_grid():
    check("test_grid", TEST_GRID)
    assert get_machine("test_grid").tile_budget == 32 * KiB


def test_golden_tiles_on_a_small_cache_cpu():
    check(small_cpu(), SMALL_CPU)


def test_everything_fits_a_big_budget_whole():
    after = tile(graph(), small_cpu(2 * MiB))
    assert [sizes(n.attr("tiles")) for n in after.nodes if n.op == "kernel"] == [
        (("rows", 64),), (("k", 128), ("m", 64), ("n", 96), ("rows", 32)), (("kv", 32), ("q", 32))]


def test_default_machine_is_this_cpu_and_every_kernel_gets_tiles():
    after = tile(graph())
    assert format_graph(after) == format_graph(tile(graph(), cpu()))
    assert all(n.attr("tiles") for n in after.nodes if n.op == "kernel")


def test_the_tiled_stage_runs_after_fused():
    assert STAGES["tiled"] == (("tile", tile),)
    for target, stages in TARGETS.items():
        assert stages.index("tiled") > stages.index("unfused" if "unfused" in target else "fused")
    after = run_pipeline(graph(), until="tiled")
    assert kernel_lines(after) == kernel_lines(tile(choose_layout(graph())))


def test_make_tile_pass_names_its_machine():
    run = make_tile_pass("test_grid")
    assert run.__name__ == "tile_test_grid"
    assert format_graph(run(graph())) == format_graph(tile(graph(), "test_grid"))


def matmul_graph(m: int, k: int, n: int, kind: str = "matmul", dtype: str = "f32") -> Graph:
    """input A [m, k] @ input B [k, n] as one kernel of `kind`."""
    body = Builder()
    a = body.add("input", (), {"index": 0, "name": "a0"}, TensorType((m, k), dtype))
    b = body.add("input", (), {"index": 1, "name": "a1"}, TensorType((k, n), dtype))
    mm = body.add("matmul", [a, b])
    outer = Builder()
    ins = [outer.add("input", (), {"index": i, "name": f"x{i}"}, t) for i, t in
           enumerate([TensorType((m, k), dtype), TensorType((k, n), dtype)])]
    return outer.finish(add_kernel(outer, kind, body.finish([mm]), ins, anchors=(mm,)))


def test_the_brief_example_on_a_2_mib_l2():
    # 16384*(m+n) + 12*m*n <= 2 MiB with the full K: (m=56, n=64) and (64, 56) tie on reuse; n wins.
    # Prologue/epilogue rows: 2*(2048*4 + 2560*4) = 36864 bytes each, 56 fit (of the 128 per core), but 5
    # blocks of 56 on 2 cores take 3 blocks' time: 6 blocks of 48.
    g = tile(matmul_graph(256, 2048, 2560), small_cpu(2 * MiB))
    assert sizes(g.nodes[2].attr("tiles")) == (("k", 2048), ("m", 56), ("n", 64), ("rows", 48))


@pytest.mark.parametrize("kib", [64, 256, 2048])
def test_gemm_row_blocks_come_out_a_multiple_of_the_cores(kib):
    for m in range(9, 400):
        rows = dict(choose_tiles(matmul_graph(m, 2048, 2560).nodes[2], small_cpu(kib * KiB)))["rows"]
        assert -(-m // rows) % 2 == 0 or rows < 8, (m, rows)


def test_an_op_kernel_holding_a_matmul_gets_matmul_tiles():
    g = tile(matmul_graph(16, 8, 24, kind="op"), "test_grid")
    assert g.nodes[2].attr("tiles") == (("k", 8), ("m", 16), ("n", 24))


def check_sizes(tiles, dims: dict[str, int]) -> None:
    for name, size in sizes(tiles):
        assert 1 <= size <= dims[name], (name, size, dims)
        assert size == dims[name] or size % 8 == 0 or size < 8, (name, size, dims)


@settings(max_examples=60, deadline=None)
@given(m=st.integers(1, 300), k=st.integers(1, 3000), n=st.integers(1, 600),
       kib=st.sampled_from([4, 16, 64, 256, 2048]), dtype=st.sampled_from(["f32", "bf16", "f64"]))
def test_matmul_tiles_are_in_range_and_fit(m, k, n, kib, dtype):
    machine = small_cpu(kib * KiB)
    node = matmul_graph(m, k, n, dtype=dtype).nodes[2]
    tiles = choose_tiles(node, machine)
    check_sizes(tiles, {"m": m, "n": n, "k": k, "rows": m})
    assert dict(tiles)["rows"] <= max(-(-m // 16) * 8, min(m, 8))  # every one of the 2 cores gets rows
    smallest = (("k", min(k, 8)), ("m", 1), ("n", 1), ("rows", 1))
    assert working_set(node, tiles) <= machine.tile_budget or working_set(node, smallest) > machine.tile_budget


def attention_graph(tq: int, tk: int, d: int) -> Graph:
    body = Builder()
    q = body.add("input", (), {"index": 0, "name": "a0"}, TensorType((2, tq, d), "f32"))
    k = body.add("input", (), {"index": 1, "name": "a1"}, TensorType((2, d, tk), "f32"))
    v = body.add("input", (), {"index": 2, "name": "a2"}, TensorType((2, tk, d), "f32"))
    s = body.add("matmul", [q, k])
    o = body.add("matmul", [s, v])
    outer = Builder()
    types = body.finish([o]).input_types
    ins = [outer.add("input", (), {"index": i, "name": f"x{i}"}, t) for i, t in enumerate(types)]
    return outer.finish(add_kernel(outer, "attention", body.finish([o]), ins, anchors=(s, o)))


@settings(max_examples=40, deadline=None)
@given(tq=st.integers(1, 400), tk=st.integers(1, 400), d=st.sampled_from([16, 64, 128]),
       kib=st.sampled_from([16, 64, 512]))
def test_attention_tiles_are_in_range_and_fit(tq, tk, d, kib):
    machine = small_cpu(kib * KiB)
    node = attention_graph(tq, tk, d).nodes[3]
    tiles = choose_tiles(node, machine)
    check_sizes(tiles, {"q": tq, "kv": tk})
    smallest = (("kv", 1), ("q", 1))
    assert working_set(node, tiles) <= machine.tile_budget or working_set(node, smallest) > machine.tile_budget


def test_cpu_attention_kv_fits_the_l1_and_every_core_gets_a_query_block():
    """kv: 16 KiB of L1 over a key row, a value row and a score (64*4 + 64*4 + 4 bytes) is 31 keys, 24 as
    a multiple of 8. q: 2 heads on 4 cores, so each head's 100 rows split in 2 blocks of at most 56."""
    machine = dataclasses.replace(small_cpu(512 * KiB), cores=4, l1_bytes=16 * KiB)
    assert dict(sizes(choose_tiles(attention_graph(100, 300, 64).nodes[3], machine))) == {"kv": 24, "q": 56}


# A row of f32[..., C] streams 4C bytes in and 4C out, both double-buffered: 16C bytes per row.
@pytest.mark.parametrize("shape, kib, rows", [
    ((4096, 64), 64, 64),        # 1024 bytes a row: 64 rows in 64 KiB
    ((4096, 60), 64, 64),        # 960 bytes a row: 68 fit, rounded down to a multiple of 8
    ((3, 5), 4, 3),              # the whole dimension fits
    ((7,), 4, 1), ((), 4, 1),    # one row
    ((2, 1000, 3000), 64, 1),    # 48000 bytes a row: not even 8 rows fit, so 1
])
def test_pointwise_rows(shape, kib, rows):
    body = Builder()
    x = body.add("input", (), {"index": 0, "name": "a0"}, TensorType(shape, "f32"))
    y = body.add("exp", [x])
    outer = Builder()
    i = outer.add("input", (), {"index": 0, "name": "x"}, TensorType(shape, "f32"))
    g = outer.finish(add_kernel(outer, "pointwise", body.finish([y]), [i]))
    machine = small_cpu(kib * KiB)
    tiles = choose_tiles(g.nodes[1], machine)
    assert sizes(tiles) == (("rows", rows),)
