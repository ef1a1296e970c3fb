"""The NumPy reference backend against torch, the independent oracle, one op family at a time."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import mutually_broadcastable_shapes

from fusec.backends.reference import compile_graph, run_graph
from fusec.semantics import _OPS, TakeIndexError, eval_node
from fusec.dtypes import from_numpy, from_torch, round_bf16, to_numpy, to_torch
from fusec.errors import FusecError
from fusec.ir import Builder, Graph, TensorType
from fusec.verify import verify
from fusec.opset import OPS
from fusec.printer import parse_graph

RNG = np.random.default_rng(0)


def rand(*shape: int, dtype=np.float32, low: float = -2.0, high: float = 2.0) -> np.ndarray:
    return RNG.uniform(low, high, size=shape).astype(dtype)


def one_op(op: str, arrays: list[np.ndarray], **attrs) -> Graph:
    """A graph whose inputs have the arrays' types, applying `op` to them once."""
    b = Builder()
    ids = [b.add("input", (), {"index": i}, TensorType(a.shape, from_numpy(a.dtype))) for i, a in enumerate(arrays)]
    graph = b.finish([b.add(op, ids, attrs)])
    verify(graph)
    return graph


def run_op(op: str, *arrays: np.ndarray, **attrs) -> np.ndarray:
    graph = one_op(op, list(arrays), **attrs)
    (out,) = run_graph(graph, list(arrays))
    assert out.shape == graph.nodes[graph.outputs[0]].shape
    assert out.dtype == to_numpy(graph.nodes[graph.outputs[0]].dtype)
    return out


def check(out: np.ndarray, expected: torch.Tensor, **tol) -> None:
    assert out.dtype == expected.numpy().dtype, (out.dtype, expected.dtype)
    np.testing.assert_allclose(out, expected.numpy(), **(tol or {"rtol": 1e-6, "atol": 1e-6}))


T = torch.from_numpy

UNARY = {
    "neg": torch.neg, "exp": torch.exp, "log": torch.log, "sqrt": torch.sqrt, "rsqrt": torch.rsqrt,
    "sin": torch.sin, "cos": torch.cos, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "abs": torch.abs,
    "reciprocal": torch.reciprocal, "erf": torch.erf, "relu": torch.relu, "floor": torch.floor,
}


@pytest.mark.parametrize("op", UNARY)
def test_unary_f32(op):
    x = rand(3, 5, low=0.1) if op in ("log", "sqrt", "rsqrt") else rand(3, 5)
    check(run_op(op, x), UNARY[op](T(x)))


def test_sigmoid_is_stable_at_extremes():
    x = np.array([-1000.0, -80.0, 0.0, 80.0, 1000.0], np.float32)
    out = run_op("sigmoid", x)
    assert np.all(np.isfinite(out))
    check(out, torch.sigmoid(T(x)))


def test_erf_f16_stays_f16():
    x = rand(8, dtype=np.float16)
    check(run_op("erf", x), torch.erf(T(x)), rtol=1e-3, atol=1e-3)


def test_not():
    x = rand(4, 3) > 0
    check(run_op("not", x), torch.logical_not(T(x)))


BINARY = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "pow": torch.pow,
    "max": torch.maximum, "min": torch.minimum, "eq": torch.eq, "ne": torch.ne, "lt": torch.lt,
    "le": torch.le, "gt": torch.gt, "ge": torch.ge,
}


@pytest.mark.parametrize("op", BINARY)
def test_binary_broadcasting(op):
    a, b = rand(2, 1, 4, low=0.5), rand(3, 1, low=0.5)
    check(run_op(op, a, b), BINARY[op](T(a), T(b)), rtol=1e-5, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(shapes=mutually_broadcastable_shapes(num_shapes=2, max_dims=4, max_side=4),
       op=st.sampled_from(sorted(BINARY)), seed=st.integers(0, 2**16))
def test_binary_random_broadcast(shapes, op, seed):
    rng = np.random.default_rng(seed)
    a, b = (rng.uniform(0.5, 2.0, size=s).astype(np.float32) for s in shapes.input_shapes)
    out = run_op(op, a, b)
    assert out.shape == shapes.result_shape
    check(out, BINARY[op](T(a), T(b)), rtol=1e-5, atol=1e-6)


def test_scalar_operand_does_not_promote_f32():
    x = rand(2, 3)
    out = run_graph(parse_graph("""
        %0 = input {index=0} : f32[2,3]
        %1 = const {value=0.1} : f32[]
        %2 = mul %0, %1 : f32[2,3]
        %3 = sum %2 {axes=[0,1], keepdim=false} : f32[]
        return %2, %3
    """), [x])
    assert [o.dtype for o in out] == [np.float32, np.float32]
    assert out[1].shape == () and isinstance(out[1], np.ndarray)
    check(out[0], T(x) * torch.tensor(0.1))


@pytest.mark.parametrize("op", ["and", "or"])
def test_logical_on_bool(op):
    a, b = rand(3, 4) > 0, rand(4) > 0
    check(run_op(op, a, b), {"and": torch.logical_and, "or": torch.logical_or}[op](T(a), T(b)))


def test_integer_div_truncates_toward_zero():
    a = np.array([7, -7, 7, -7, 6, 0], np.int64)
    b = np.array([2, 2, -2, -2, 3, 5], np.int64)
    check(run_op("div", a, b), torch.div(T(a), T(b), rounding_mode="trunc"))


def test_integer_div_by_zero_is_zero():
    assert run_op("div", np.array([5, -5], np.int32), np.array([0, 0], np.int32)).tolist() == [0, 0]


def test_where_broadcasts():
    c, a, b = rand(2, 1, 3) > 0, rand(4, 3), rand(1)
    check(run_op("where", c, a, b), torch.where(T(c), T(a), T(b)))


@pytest.mark.parametrize("src,dst", [(np.float32, "i32"), (np.float32, "bool"), (np.int64, "f32"),
                                     (np.float32, "f16"), (np.float32, "f64"), (np.bool_, "f32")])
def test_cast(src, dst):
    x = (rand(3, 4) * 5).astype(src)
    check(run_op("cast", x, dtype=dst), T(x).to(to_torch(dst)))


def test_cast_to_bf16_rounds_like_torch():
    x = rand(64) * 100
    out = run_op("cast", x, dtype="bf16")
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, T(x).to(torch.bfloat16).float().numpy())


REDUCE = {"sum": lambda x, axes, k: torch.sum(x, axes, keepdim=k),
          "amax": lambda x, axes, k: torch.amax(x, axes, keepdim=k),
          "amin": lambda x, axes, k: torch.amin(x, axes, keepdim=k)}


@pytest.mark.parametrize("op", REDUCE)
@pytest.mark.parametrize("axes", [(0,), (1,), (0, 2), (0, 1, 2)])
@pytest.mark.parametrize("keepdim", [True, False])
def test_reductions(op, axes, keepdim):
    x = rand(3, 4, 5)
    check(run_op(op, x, axes=axes, keepdim=keepdim), REDUCE[op](T(x), axes, keepdim), rtol=1e-5)


def test_sum_keeps_integer_dtype():
    x = np.arange(12, dtype=np.int32).reshape(3, 4)
    out = run_op("sum", x, axes=(1,), keepdim=False)
    assert out.dtype == np.int32 and out.tolist() == x.sum(1).tolist()


def test_sum_f16_accumulates_in_f32():
    x = np.full(4096, 1.0, np.float16)  # 2048 + 1 is not representable in f16: naive f16 sum stalls
    check(run_op("sum", x, axes=(0,), keepdim=False), torch.sum(T(x)))


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("keepdim", [True, False])
def test_argmax(axis, keepdim):
    x = rand(3, 4, 5)
    check(run_op("argmax", x, axes=(axis,), keepdim=keepdim), torch.argmax(T(x), axis, keepdim=keepdim))


def test_argmax_needs_one_axis():
    with pytest.raises(FusecError, match="exactly one axis"):
        run_op("argmax", rand(3, 4), axes=(0, 1), keepdim=False)


def test_matmul_broadcast_batch():
    a, b = rand(2, 1, 3, 4), rand(5, 4, 6)
    check(run_op("matmul", a, b), torch.matmul(T(a), T(b)), rtol=1e-5, atol=1e-5)


def test_layout_ops():
    x = rand(2, 3, 4)
    check(run_op("reshape", x, shape=(6, 4)), T(x).reshape(6, 4))
    check(run_op("permute", x, perm=(2, 0, 1)), T(x).permute(2, 0, 1))
    y = rand(2, 1, 4)
    check(run_op("expand", y, shape=(2, 5, 4)), T(y).expand(2, 5, 4))
    check(run_op("slice", x, axis=2, start=1, stop=4, step=2), T(x)[:, :, 1:4:2])
    check(run_op("slice", x, axis=0, start=1, stop=2, step=1), T(x)[1:2])
    z = rand(2, 5, 4)
    check(run_op("concat", x, z, x, axis=1), torch.cat([T(x), T(z), T(x)], 1))


def test_take_embedding_lookup():
    table, idx = rand(10, 4), np.array([[0, 3, 9], [9, 9, 1]], np.int64)
    check(run_op("take", table, idx, axis=0), torch.nn.functional.embedding(T(idx), T(table)))
    check(run_op("take", table, np.array([1, 3], np.int32), axis=1), T(table)[:, [1, 3]])
    small = np.array([[0, 3], [2, 2]], np.int32)
    check(run_op("take", table, small, axis=-1), T(table)[:, T(small).long()])


@pytest.mark.parametrize("bad", [10, -1])
def test_take_out_of_range_raises(bad):
    with pytest.raises(TakeIndexError, match="out of range") as info:
        run_op("take", rand(10, 4), np.array([1, bad], np.int64), axis=0)
    assert isinstance(info.value, IndexError) and isinstance(info.value, FusecError)


def test_iota():
    g = parse_graph("""
        %0 = iota {shape=[3,4], axis=1, dtype="i64", start=2, step=3} : i64[3,4]
        %1 = iota {shape=[3,4], axis=-2, dtype="f32"} : f32[3,4]
        %2 = iota {shape=[5], axis=0, dtype="f32", start=0.5, step=0.25} : f32[5]
        return %0, %1, %2
    """)
    a, b, c = run_graph(g, [])
    check(a, torch.arange(2, 2 + 3 * 4, 3).expand(3, 4))
    check(b, torch.arange(3, dtype=torch.float32)[:, None].expand(3, 4))
    check(c, torch.arange(0.5, 1.75, 0.25, dtype=torch.float32))


def test_const_splat_stored_and_param():
    weight = torch.randn(3, 4)
    stored = rand(3, 4)
    g = parse_graph("""
        %0 = input {index=0} : f32[3,4]
        %1 = const {value=-inf} : f32[3,4]
        %2 = const {key="c0"} : f32[3,4]
        %3 = param {name="w"} : f32[3,4]
        %4 = max %0, %1 : f32[3,4]
        %5 = add %4, %2 : f32[3,4]
        %6 = mul %5, %3 : f32[3,4]
        return %6, %3, %1
    """, {"c0": stored, "w": weight})
    x = rand(3, 4)
    out, w, splat = run_graph(g, [x])
    check(out, (T(x) + T(stored)) * weight)
    assert np.shares_memory(w, weight.numpy())  # params are used in place, never copied
    assert splat.dtype == np.float32 and np.all(splat == -np.inf)


KERNEL = """
    %0 = input {index=0} : f32[2,3]
    %1 = input {index=1} : f32[2,3]
    %2 = kernel %1, %0 : f32[2,3]
      body {
        %0 = input {index=0} : f32[2,3]
        %1 = input {index=1} : f32[2,3]
        %2 = sub %0, %1 : f32[2,3]
        %3 = exp %2 : f32[2,3]
        %4 = sum %3 {axes=[1], keepdim=false} : f32[2]
        return %3, %4
      }
    %3 = result %2 {index=0} : f32[2,3]
    %4 = result %2 {index=1} : f32[2]
    %5 = kernel %4 : f32[2]
      body {
        %0 = input {index=0} : f32[2]
        %1 = param {name="w"} : f32[2]
        %2 = mul %0, %1 : f32[2]
        return %2
      }
    return %3, %5
"""


def test_kernel_nodes_and_result():
    w = torch.tensor([2.0, 3.0])
    g = parse_graph(KERNEL, {"w": w})
    verify(g)
    x, y = rand(2, 3), rand(2, 3)
    e, s = run_graph(g, [x, y])
    ref = torch.exp(T(y) - T(x))
    check(e, ref)
    check(s, ref.sum(1) * w, rtol=1e-5)
    assert [o.dtype for o in compile_graph(g)([x, y])] == [np.float32, np.float32]


def test_input_checks():
    g = one_op("add", [rand(2), rand(2)])
    with pytest.raises(FusecError, match="takes 2 input"):
        run_graph(g, [rand(2)])
    with pytest.raises(FusecError, match="expected f32\\[2\\]"):
        run_graph(g, [rand(2), rand(3)])


def test_failing_node_is_named():
    g = parse_graph("""
        %0 = input {index=0} : f32[4]
        %1 = input {index=1} : i64[2]
        %2 = take %0, %1 {axis=0} : f32[2]
        return %2
    """)
    with pytest.raises(TakeIndexError) as info:
        run_graph(g, [rand(4), np.array([0, 7])])
    assert "%2 = take" in "".join(info.value.__notes__)


def test_outputs_survive_later_uses_and_repeats():
    x = rand(3)
    out = run_graph(parse_graph("""
        %0 = input {index=0} : f32[3]
        %1 = exp %0 : f32[3]
        %2 = neg %1 : f32[3]
        %3 = neg %0 : f32[3]
        return %1, %2, %1, %0
    """), [x])
    check(out[0], torch.exp(T(x)))
    check(out[1], -torch.exp(T(x)))
    assert out[2] is out[0] and out[3] is x


def test_every_op_has_a_definition():
    assert set(_OPS) == set(OPS)


def test_eval_node_directly():
    g = one_op("add", [rand(2), rand(2)])
    node = g.nodes[g.outputs[0]]
    assert eval_node(node, [np.ones(2, np.float32), np.ones(2, np.float32)], {}).tolist() == [2.0, 2.0]


def test_dtype_mapping():
    for name in ("f32", "f64", "f16", "i64", "i32", "i16", "i8", "u8", "bool"):
        assert from_numpy(to_numpy(name)) == name
        assert from_torch(to_torch(name)) == name
        assert torch.empty(0, dtype=to_torch(name)).numpy().dtype == to_numpy(name)
    assert to_numpy("bf16") == np.float32 and from_torch(torch.bfloat16) == "bf16"
    with pytest.raises(FusecError):
        to_numpy("f8")
    with pytest.raises(FusecError):
        from_torch(torch.complex64)


def test_round_bf16_matches_torch():
    x = np.concatenate([rand(1000) * 1e3, [np.inf, -np.inf, np.nan, 0.0, -0.0, 3.4e38]]).astype(np.float32)
    expected = T(x).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(round_bf16(x), expected)
