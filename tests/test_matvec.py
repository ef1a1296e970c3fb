"""Matrix-vector kernels of a decode step: sibling products (Q, K, V; W1, W3) in one parallel loop, every
weight format, and the low-precision loops vectorized with 512-bit registers where the CPU has them."""
import numpy as np
import numba
import pytest
import torch

from fusec.backends.numba_cpu import int8_dot, lowp, matvec
from fusec.backends.numba_cpu.runtime import Program
from fusec.backends.reference import run_graph
from fusec.semantics import quantize_activations
from fusec.models import load_model
from fusec.models.registry import decode_inputs
from fusec.tracing import trace
from fusec.passes.pipeline import run_pipeline
from fusec.passes.weights import quantize_int8, store_weights

pytestmark = pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning")  # tiny kernels
SUFFIX = {"fp32": "", "bf16": "_bf16", "int8": "_int8"}


def bf16_bits(w: np.ndarray) -> np.ndarray:
    return (w.view(np.uint32) >> 16).astype(np.uint16)


def widened(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def call(fmt: str, a: np.ndarray, weights: list[np.ndarray], outs: list[np.ndarray], group: int = 8) -> None:
    """The kernel for len(weights) matrices of format `fmt` on float32 `weights` (stored as that format),
    `group` weight rows a thread's unit."""
    arity = str(len(weights)) if len(weights) > 1 else ""
    module = matvec if fmt == "fp32" else lowp
    kernel = getattr(module, f"matvec{arity}{SUFFIX[fmt]}")
    if fmt == "int8":
        stored = [x.numpy() for w in weights for x in quantize_int8(torch.from_numpy(w))]
    elif fmt == "bf16":
        stored = [bf16_bits(w) for w in weights]
    else:
        stored = weights
    kernel(a, *stored, *outs, group)


def dense(fmt: str, w: np.ndarray) -> np.ndarray:
    """The float32 matrix a kernel of format `fmt` multiplies by when given float32 `w`."""
    if fmt == "bf16":
        return widened(bf16_bits(w))
    if fmt == "int8":
        q, s = (x.numpy() for x in quantize_int8(torch.from_numpy(w)))
        return (q.astype(np.float32) * s).reshape(w.shape)
    return w


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("rows,k,ns", [(1, 64, (10,)), (3, 96, (7, 1)), (2, 64, (5, 12, 9)), (1, 32, (3, 3, 3)),
                                       (1, 64, (37, 16))])
@pytest.mark.parametrize("group", [8, 16])
def test_one_loop_over_several_matrices_matches_numpy(fmt, rows, k, ns, group):
    """Row counts that are not multiples of the groups (the rest four rows at a time, then one), a matrix
    of one row, several activation rows; groups of 8 and of 16 weight rows (the `matvec_group` tile)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((rows, k)).astype(np.float32)
    weights = [rng.standard_normal((n, k)).astype(np.float32) for n in ns]
    outs = [np.full((rows, n), np.nan, np.float32) for n in ns]
    call(fmt, a, weights, outs, group)
    x = quantize_activations(a) if fmt == "int8" else a  # int8 x int8: the activations quantized too
    for w, c in zip(weights, outs):
        np.testing.assert_allclose(c, x @ dense(fmt, w).T, rtol=1e-5, atol=1e-4)


def test_bf16_siblings_with_a_strided_weight_or_odd_k_take_the_plain_loop():
    rng = np.random.default_rng(1)
    for k, flip in ((33, False), (64, True)):
        a = rng.standard_normal((2, k)).astype(np.float32)
        bits = [bf16_bits(rng.standard_normal((n, k)).astype(np.float32)) for n in (6, 5)]
        if flip:
            bits = [b[:, ::-1] for b in bits]
        outs = [np.zeros((2, b.shape[0]), np.float32) for b in bits]
        lowp.matvec2_bf16(a, *bits, *outs, 8)
        for b, c in zip(bits, outs):
            np.testing.assert_allclose(c, a @ widened(b).T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("k", [2, 34, 100])
def test_bf16_columns_past_the_last_vector_are_added(k):
    """The bf16 loop takes 32 columns (16 pairs) a vector; the rest (here all of K = 2) are added after."""
    rng = np.random.default_rng(2)
    a = rng.standard_normal((2, k)).astype(np.float32)
    bits = [bf16_bits(rng.standard_normal((n, k)).astype(np.float32)) for n in (6, 4)]
    outs = [np.full((2, b.shape[0]), np.nan, np.float32) for b in bits]
    lowp.matvec2_bf16(a, *bits, *outs, 8)
    for b, c in zip(bits, outs):
        np.testing.assert_allclose(c, a @ widened(b).T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("group", [8, 16])
def test_bf16_widening_pairs_every_weight_with_its_own_activation(group):
    """The bf16 loop widens 32 weights by two unpacks and permutes the activations to their order: a
    weight matrix with one power of two per row (row n at column n mod K, every position of a 32-weight
    chunk and of the rest) must give that activation times it exactly. 117 rows: whole groups, then four
    rows at a time, then one; K = 102: three chunks and 6 columns of rest; two activation rows."""
    k, n = 102, 117
    rng = np.random.default_rng(6)
    a = rng.standard_normal((2, k)).astype(np.float32)
    scale = np.float32(2.0) ** rng.integers(-3, 4, n).astype(np.float32)
    w = np.zeros((n, k), np.float32)
    w[np.arange(n), np.arange(n) % k] = scale
    c = np.full((2, n), np.nan, np.float32)
    lowp.matvec_bf16(a, bf16_bits(w), c, group)
    np.testing.assert_array_equal(c, a[:, np.arange(n) % k] * scale)


@pytest.mark.parametrize("k", [3, 17, 40, 290])
def test_fp32_columns_past_the_last_vector_and_strided_weights(k):
    """The fp32 loop takes 16 columns a vector and adds the rest after; strided weights (a transposed or
    reversed view) take the plain loop. 13 rows: a group of eight, then four, then one."""
    rng = np.random.default_rng(3)
    a = rng.standard_normal((2, k)).astype(np.float32)
    ws = [rng.standard_normal((13, k)).astype(np.float32), rng.standard_normal((k, 5)).astype(np.float32).T]
    outs = [np.full((2, w.shape[0]), np.nan, np.float32) for w in ws]
    matvec.matvec2(a, *ws, *outs, 8)
    for w, c in zip(ws, outs):
        np.testing.assert_allclose(c, a @ w.T, rtol=1e-5, atol=1e-4)
    c = np.full((2, 13), np.nan, np.float32)
    matvec.matvec(a, ws[0][::-1], c, 8)
    np.testing.assert_allclose(c, a @ ws[0][::-1].T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("fmt", ["fp32", "bf16"])
@pytest.mark.parametrize("rows", [2, 4, 5, 7, 9, 18])
@pytest.mark.parametrize("k", [3, 18, 64, 288])
def test_register_blocks_of_activation_rows_match_numpy(fmt, rows, k):
    """Several activation rows against fp32 or bf16 weights (`matvec_blocked`): blocks of four activation
    rows by two weight rows, the activation rows past the last block one at a time, an odd last weight
    row; a group of eight weight rows, then five. Rows that are not whole chunks of weights (K = 3, 18)
    take the group loop, bf16 of an odd K the plain loop."""
    rng = np.random.default_rng(rows + k)
    a = rng.standard_normal((rows, k)).astype(np.float32)
    w = rng.standard_normal((13, k)).astype(np.float32)
    c = np.full((rows, 13), np.nan, np.float32)
    call(fmt, a, [w], [c])
    np.testing.assert_allclose(c, a @ dense(fmt, w).T, rtol=1e-5, atol=1e-4)


def test_int8_kernel_refuses_weights_of_another_k():
    a = np.ones((1, 64), np.float32)
    q, s = (x.numpy() for x in quantize_int8(torch.ones(4, 96)))
    with pytest.raises(ValueError, match=r"\[N, K/32, 32\]"):
        lowp.matvec_int8(a, q, s, np.zeros((1, 4), np.float32), 8)


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("k", [96, 288, 290])
def test_groups_of_16_rows_give_the_same_bits_as_groups_of_8(fmt, k):
    """A row's dot product is summed alike whatever the group it is in: the group size (a tile) changes
    the time, never the result. The rows of a group are reduced together (`simd.hsums`), each by one
    row's tree: groups of 8, 12 (not a power of two) and 16, and the rest four rows at a time, then one.
    K = 288 (stories15M: 9 chunks of 32, 9 int8 blocks), 290 (2 columns past the last chunk)."""
    if fmt == "int8" and k % 32:
        pytest.skip("int8 weights are blocks of 32")
    rng = np.random.default_rng(4)
    a = rng.standard_normal((2, k)).astype(np.float32)
    weights = [rng.standard_normal((n, k)).astype(np.float32) for n in (53, 16, 8)]
    outs = {g: [np.full((2, w.shape[0]), np.nan, np.float32) for w in weights] for g in (8, 12, 16)}
    for g, o in outs.items():
        call(fmt, a, weights, o, g)
    x = quantize_activations(a) if fmt == "int8" else a
    for w, c8, c12, c16 in zip(weights, *outs.values()):
        np.testing.assert_array_equal(c8, c16)
        np.testing.assert_array_equal(c8, c12)
        np.testing.assert_allclose(c8, x @ dense(fmt, w).T, rtol=1e-5, atol=1e-4)


def test_sibling_matrices_of_two_formats_are_refused():
    """One call's matrices share the activations as the loop reads them (for bf16 permuted to the
    widening's order), so they must be of one format."""
    a = np.ones((1, 64), np.float32)
    w = np.ones((8, 64), np.float32)
    outs = [np.zeros((1, 8), np.float32) for _ in range(2)]
    with pytest.raises(numba.core.errors.TypingError, match="of one format"):
        matvec.matvec2(a, w, bf16_bits(w), *outs, 8)


def test_a_kernel_with_its_group_bound_computes_what_the_kernel_does():
    """Python calls a kernel through `with_group` (the group compiled in as a constant, as generated code
    passes it): the same values as the kernel called with the group."""
    rng = np.random.default_rng(5)
    a = rng.standard_normal((1, 64)).astype(np.float32)
    q, s = (x.numpy() for x in quantize_int8(torch.from_numpy(rng.standard_normal((40, 64)).astype(np.float32))))
    want, got = np.zeros((1, 40), np.float32), np.zeros((1, 40), np.float32)
    lowp.matvec_int8(a, q, s, want, 16)
    matvec.with_group(lowp.matvec_int8, 16, 4)(a, q, s, got)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8"])
def test_decode_step_runs_sibling_products_in_one_call(fmt):
    """A stories15M block's decode step: Q, K and V in one call, W1 and W3 in one: four parallel loops per
    layer (with Wo and W2), not seven; the results are the reference backend's."""
    module, _ = load_model("llama-block:stories15M")
    args, kwargs = decode_inputs(module.config, 12)
    graph = run_pipeline(trace(module, args, kwargs).graph, until="canonical")
    graph = run_pipeline(store_weights(graph, fmt), after="canonical")
    program = Program(graph)
    suffix = SUFFIX[fmt]
    calls = [line.strip() for line in program.source.splitlines() if line.strip().startswith("matvec") and "(" in line]
    assert [c.split("(")[0] for c in calls] == [f"matvec3{suffix}", f"matvec{suffix}", f"matvec2{suffix}",
                                                f"matvec{suffix}"], calls
    inputs = [t.numpy() for t in list(args) + list(kwargs.values())]
    np.testing.assert_allclose(program.run(inputs)[0], run_graph(graph, inputs)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif("avx512bw" not in int8_dot._target_features(), reason="512-bit vectors need a CPU with AVX-512")
@pytest.mark.parametrize("name,widen", [("matvec_int8", "vpdpbusd" if int8_dot.KIND == "vnni" else "vpmaddwd"),
                                        ("matvec_bf16", "vpunpcklwd")])
def test_low_precision_loops_widen_with_512_bit_vectors(name, widen):
    """LLVM prefers 256-bit vectors on AVX-512 CPUs; the bf16 loops ask for 512 (`wide_vectors`): half the
    shuffles per weight; the int8 loop's integer products (`int8_dot._quads`) are 512-bit `vpdpbusd` (VNNI)
    or `pmaddwd`. Both prefetch the next group of weight rows while they sum this one.
    Compiled afresh (machine code loaded from the cache cannot be inspected)."""
    kernel = numba.njit(parallel=True, fastmath=lowp._FASTMATH)(getattr(lowp, name).py_func)
    a = np.ones((1, 64), np.float32)
    c = np.zeros((1, 8), np.float32)
    if name == "matvec_int8":
        kernel(a, *(x.numpy() for x in quantize_int8(torch.ones(8, 64))), c, 8)
    else:
        kernel(a, np.zeros((8, 64), np.uint16), c, 8)
    asm = kernel.inspect_asm(kernel.signatures[0])
    assert any(widen in line and "zmm" in line for line in asm.splitlines()), f"no 512-bit {widen} in {name}"
    assert "prefetch" in asm, f"{name} does not fetch the next group of rows ahead (`simd.prefetch`)"
