"""int8 x int8 products: activations quantized like the weights (blocks of 32), integer dot products, and
the reference backend's definition of what they compute."""
import numba
import numpy as np
import pytest
import torch

from fusec.backends.numba_cpu import int8, int8_dot
from fusec.backends.numba_cpu.runtime import Program
from fusec.backends.reference import run_graph
from fusec.semantics import quantize_activations
from fusec.errors import FusecError
from fusec.ir import Builder, TensorType
from fusec.models import load_model
from fusec.passes.pipeline import run_pipeline
from fusec.passes.weights import quantize_int8, store_weights
from fusec.tracing import trace

pytestmark = pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning")  # tiny kernels


@numba.njit
def _quantized(a, q):
    xq, xs = int8.quantize_rows(a, q)
    return xq, xs, xq.astype(np.float32) * xs.reshape((xs.shape[0], xs.shape[1], 1))


def activations() -> np.ndarray:
    a = np.random.default_rng(0).standard_normal((3, 160)).astype(np.float32)
    a[0, :32] = np.linspace(-1.27, 1.27, 32)  # scale 0.01
    a[0, 5], a[0, 6] = 0.025, -0.035           # exactly half a step: ties go to the even integer
    a[1, 32:64] = 0.0                          # an all-zero block: scale 0
    a[1, 64], a[2, 130] = np.nan, -np.inf      # a block holding NaN or inf reads as NaN
    a[2, :32] *= np.float32(1e-38)              # so small that 127 / max|a| overflows: quantized to 0
    return a


def test_activations_quantize_per_block_to_nearest_even_as_the_reference_defines():
    a = activations()
    q = np.zeros((1, 5, 32), np.int8)
    xq, xs, widened = _quantized(a, q)
    assert xs[0, 0] == pytest.approx(0.01) and (xq[0, 0, 0], xq[0, 0, 31]) == (-127, 127)
    assert (xq[0, 0, 5], xq[0, 0, 6]) == (2, -4)  # 2.5 -> 2, -3.5 -> -4
    assert xs[1, 1] == 0 and (xq[1, 1] == 0).all()
    assert 0 < xs[2, 0] < 1e-38 and (xq[2, 0] == 0).all()  # not the +-127 of an overflowed 127 / max|a|
    assert np.isnan(xs[1, 2]) and np.isnan(xs[2, 4]) and np.isfinite(np.delete(xs.ravel(), [7, 14])).all()
    assert np.abs(xq).max() <= 127
    strided = _quantized(np.asfortranarray(a), q)  # read through a contiguous copy: the same blocks
    np.testing.assert_array_equal(strided[0], xq)
    np.testing.assert_array_equal(strided[1], xs)
    want = quantize_activations(a)
    np.testing.assert_array_equal(widened.reshape(a.shape), want)  # bit for bit, NaN where NaN
    finite = np.isfinite(a).all(axis=1)
    assert np.abs(want[finite] - a[finite]).max() <= np.abs(a[finite]).max() / 254 + 1e-7


FEATURES = {"vnni": {"avx512vnni", "avx512bw"}, "avx512": {"avx512bw"}, "avx2": {"avx2"}, "portable": set()}
INSTRUCTION = {"vnni": "vpdpbusd", "avx512": "vpmaddwd", "avx2": "vpmaddwd"}


def _compiled(kind, monkeypatch):
    """matvec_int8 compiled afresh with the integer products in form `kind` (skipped where the CPU lacks it)."""
    if not FEATURES[kind] <= int8_dot._target_features():
        pytest.skip(f"the CPU has no {kind}")
    monkeypatch.setattr(int8_dot, "KIND", kind)
    return numba.njit(parallel=True, fastmath=int8._FASTMATH)(int8.matvec_int8.py_func)


def _block_sums(a, q, s):
    """What the kernel computes, per block: the exact integer dot product times s * xs (float32), summed."""
    xq, xs, _ = _quantized(a, q)
    dots = np.einsum("mbi,nbi->mnb", xq.astype(np.int64), q.astype(np.int64)).astype(np.float64)
    scales = (s[None, :, :, 0] * xs[:, None, :]).astype(np.float32).astype(np.float64)
    return (dots * scales).sum(axis=2)


@pytest.mark.parametrize("kind", ["vnni", "avx512", "avx2", "portable"])
def test_every_form_of_the_integer_products_gives_the_same_dot_products(kind, monkeypatch):
    """VNNI's vpdpbusd, pmaddwd (AVX-512, AVX2) where the CPU has them, else portable IR: all exact in int32,
    so every form gives the same bits as the portable one. Weights of every int8 value, -128 included
    (vpdpbusd takes them as w + 128, unsigned); 5 blocks: two pairs and an odd last block."""
    kernel = _compiled(kind, monkeypatch)
    rng = np.random.default_rng(1)
    a = activations()
    a[1:] = rng.standard_normal((2, 160)).astype(np.float32)  # rows 1 and 2 finite
    a[2, 7] = np.nan
    w = rng.standard_normal((13, 160)).astype(np.float32)     # 13 rows: a group of eight, then four, then one
    q, s = (x.numpy() for x in quantize_int8(torch.from_numpy(w)))
    q[0, :, :] = np.arange(-128, 128, 1).reshape(8, 32)[:5].astype(np.int8)  # every value, -128 too
    q[1, 0, :] = -128
    c = np.zeros((3, 13), np.float32)
    kernel(a, q, s, c, 8)
    want = _block_sums(a, q, s)
    np.testing.assert_allclose(c[:2], want[:2], rtol=1e-5, atol=1e-5)
    assert np.isnan(c[2]).all()  # a NaN activation is not hidden by its quantization
    portable = np.zeros_like(c)
    monkeypatch.setattr(int8_dot, "KIND", "portable")
    numba.njit(parallel=True, fastmath=int8._FASTMATH)(int8.matvec_int8.py_func)(a, q, s, portable, 8)
    np.testing.assert_array_equal(c, portable)
    if kind != "portable":
        kernel = _compiled(kind, monkeypatch)
        kernel(a, q, s, c, 8)
        assert INSTRUCTION[kind] in kernel.inspect_asm(kernel.signatures[0])
        sixteen = np.zeros_like(c)
        kernel(a, q, s, sixteen, 16)  # groups of 16 rows (int8's `matvec_group` tile on AVX-512): 13 rows are the rest
        np.testing.assert_array_equal(sixteen, portable)


def test_the_int8_loop_uses_vnni_and_fetches_the_next_rows_ahead(monkeypatch):
    """Where the CPU has AVX512-VNNI, one vpdpbusd per 64 weight bytes of a row (not a widening and a
    pmaddwd per 32); the next group of rows is prefetched while this one is summed; and the activations'
    quantization is vectorized (packed rounding, not a call or a scalar per value)."""
    kernel = _compiled("vnni", monkeypatch)
    a = np.ones((1, 128), np.float32)
    q, s = (x.numpy() for x in quantize_int8(torch.ones(8, 128)))
    kernel(a, q, s, np.zeros((1, 8), np.float32), 8)
    asm = kernel.inspect_asm(kernel.signatures[0])
    assert "vpdpbusd" in asm and "vpmaddwd" not in asm and "vpmovsxbw" not in asm
    assert "prefetch" in asm
    assert "vrndscaleps" in asm


def int8_graph():
    module, args = load_model("llama-block")
    graph = store_weights(run_pipeline(trace(module, args).graph, until="canonical"), "int8")
    return module, args, graph


def test_matmuls_of_int8_weights_quantize_their_activations_in_the_reference():
    module, args, graph = int8_graph()
    marked = [n for n in graph.nodes if n.op == "matmul" and n.attr("quantize") == "int8"]
    for n in graph.nodes:
        if n.op != "matmul":
            continue
        right = graph.nodes[n.args[1]]
        reads_int8 = right.op == "permute" and graph.nodes[right.args[0]].op == "reshape" and \
            graph.nodes[graph.nodes[right.args[0]].args[0]].op == "mul"
        assert (n.attr("quantize") == "int8") == reads_int8
    assert len(marked) == 5  # wq, wo, w1, w2, w3; not wk and wv (too small: float32) nor attention's
    # one marked matmul evaluated alone: quantized activations times the dequantized weight
    b = Builder(graph.tensors)
    x = b.add("input", (), {"index": 0, "name": "x"}, TensorType((3, 64), "f32"))
    q = b.add("param", (), {"name": "attention.wq.weight"}, TensorType((64, 2, 32), "i8"))
    s = b.add("param", (), {"name": "attention.wq.weight.scale"}, TensorType((64, 2, 1), "f32"))
    w = b.add("reshape", [b.add("mul", [b.add("cast", [q], {"dtype": "f32"}), s])], {"shape": (64, 64)})
    mm = b.add("matmul", [x, b.add("permute", [w], {"perm": (1, 0)})], {"quantize": "int8"})
    a = np.random.default_rng(2).standard_normal((3, 64)).astype(np.float32)
    got = run_graph(b.finish([mm]), [a])[0]
    dense = graph.tensors["attention.wq.weight"].numpy().astype(np.float32) * \
        graph.tensors["attention.wq.weight.scale"].numpy()
    np.testing.assert_allclose(got, quantize_activations(a) @ dense.reshape(64, 64).T, rtol=1e-6, atol=1e-6)
    assert np.abs(got - a @ dense.reshape(64, 64).T).max() > 1e-4  # the activations really are quantized


def test_numba_refuses_a_quantized_matmul_it_cannot_read_as_int8():
    """A matmul marked quantize="int8" whose weight is not an int8 weight's dequantization: emitting a plain
    GEMM would skip the activations' quantization (a silently different answer), so codegen refuses."""
    b = Builder({"w": torch.ones(64, 64)})
    x = b.add("input", (), {"index": 0, "name": "x"}, TensorType((2, 64), "f32"))
    w = b.add("param", (), {"name": "w"}, TensorType((64, 64), "f32"))
    mm = b.add("matmul", [x, b.add("permute", [w], {"perm": (1, 0)})], {"quantize": "int8"})
    graph = run_pipeline(b.finish([mm]), after="canonical", target="cpu")
    with pytest.raises(FusecError, match="int8 weight"):
        Program(graph)
