"""The Numba backend on hand-built kernels: each loop nest kind against the reference backend."""
import numpy as np
import pytest

from fusec.backends.numba_cpu.runtime import Program
from fusec.backends.reference import run_graph
from fusec.ir import Builder, TensorType
from fusec.kernels import add_kernel

RNG = np.random.default_rng(0)


def f32(*shape):
    return TensorType(tuple(shape), "f32")


def one_kernel(kind, make_body, input_types, anchors_of=None, tensors=None):
    """A graph of one kernel whose body `make_body(builder, inputs) -> outputs` builds."""
    tensors = dict(tensors or {})
    body = Builder(tensors)
    ins = [body.add("input", (), {"index": i, "name": f"a{i}"}, t) for i, t in enumerate(input_types)]
    outs = make_body(body, ins)
    anchors = anchors_of(body) if anchors_of else ()
    body_graph = body.finish(outs)
    outer = Builder(body_graph.tensors)
    args = [outer.add("input", (), {"index": i, "name": f"x{i}"}, t) for i, t in enumerate(input_types)]
    results = add_kernel(outer, kind, body_graph, args, anchors)
    return outer.finish(results)


def check(graph, inputs, tol=1e-5):
    want = run_graph(graph, inputs)
    got = Program(graph).run(inputs)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol)
    return got


def test_pointwise_views_fold_into_indexing():
    # permute + slice + concat + expand + broadcasting, all in one kernel
    def body(b, ins):
        x, y = ins
        p = b.add("permute", [x], {"perm": (0, 2, 1)})               # [2,5,3]
        lo = b.add("slice", [p], {"axis": 2, "start": 0, "stop": 1, "step": 1})
        hi = b.add("slice", [p], {"axis": 2, "start": 1, "stop": 3, "step": 1})
        cat = b.add("concat", [b.add("neg", [hi]), lo], {"axis": 2})
        e = b.add("expand", [y], {"shape": (2, 5, 3)})
        return [b.add("add", [cat, e])]
    g = one_kernel("pointwise", body, [f32(2, 3, 5), f32(1, 5, 1)])
    check(g, [RNG.standard_normal((2, 3, 5), np.float32), RNG.standard_normal((1, 5, 1), np.float32)])


def test_reshape_split_and_merge():
    def body(b, ins):
        r = b.add("reshape", ins, {"shape": (4, 3, 2)})
        p = b.add("permute", [r], {"perm": (2, 0, 1)})
        return [b.add("reshape", [p], {"shape": (8, 3)})]
    g = one_kernel("pointwise", body, [f32(6, 4)])
    check(g, [RNG.standard_normal((6, 4), np.float32)])


@pytest.mark.parametrize("axes", [(1,), (0,), (0, 1)])
def test_row_kernel_softmax_over_any_axis(axes):
    def body(b, ins):
        (x,) = ins
        m = b.add("amax", [x], {"axes": axes, "keepdim": True})
        e = b.add("exp", [b.add("sub", [x, m])])
        return [b.add("div", [e, b.add("sum", [e], {"axes": axes, "keepdim": True})])]
    g = one_kernel("reduce", body, [f32(7, 13)])
    check(g, [RNG.standard_normal((7, 13), np.float32)])


def test_argmax_and_bool_reductions():
    def body(b, ins):
        (x,) = ins
        am = b.add("argmax", [x], {"axes": (1,), "keepdim": False})
        pos = b.add("gt", [x, b.const(0.0, "f32")])
        anyp = b.add("amax", [pos], {"axes": (1,), "keepdim": False})
        return [am, anyp]
    g = one_kernel("reduce", body, [f32(5, 9)])
    check(g, [RNG.standard_normal((5, 9), np.float32)])


def test_take_embedding_lookup():
    weight = RNG.standard_normal((11, 4)).astype(np.float32)

    def body(b, ins):
        w = b.add("param", (), {"name": "emb"}, f32(11, 4))
        return [b.add("take", [w, ins[0]], {"axis": 0})]
    g = one_kernel("pointwise", body, [TensorType((2, 3), "i64")], tensors={"emb": weight})
    check(g, [np.array([[0, 10, 3], [4, 4, 1]], np.int64)])


@pytest.mark.parametrize("rows", [1, 16])
def test_matmul_with_norm_prologue_and_gated_epilogue(rows):
    k, n = 32, 24
    tensors = {"g": RNG.standard_normal((n, k)).astype(np.float32),
               "u": RNG.standard_normal((n, k)).astype(np.float32),
               "nw": RNG.standard_normal(k).astype(np.float32)}

    def body(b, ins):
        (x,) = ins
        ss = b.add("sum", [b.add("mul", [x, x])], {"axes": (1,), "keepdim": True})
        inv = b.add("rsqrt", [b.add("add", [b.add("mul", [ss, b.const(1 / k, "f32")]), b.const(1e-5, "f32")])])
        h = b.add("mul", [b.add("mul", [x, inv]), b.add("param", (), {"name": "nw"}, f32(k))])
        gate = b.add("matmul", [h, b.add("permute", [b.add("param", (), {"name": "g"}, f32(n, k))], {"perm": (1, 0)})])
        up = b.add("matmul", [h, b.add("permute", [b.add("param", (), {"name": "u"}, f32(n, k))], {"perm": (1, 0)})])
        silu = b.add("mul", [gate, b.add("sigmoid", [gate])])
        return [b.add("mul", [silu, up])]
    g = one_kernel("matmul", body, [f32(rows, k)], tensors=tensors)
    check(g, [RNG.standard_normal((rows, k), np.float32)], tol=1e-4)


def test_attention_grouped_query_heads_with_causal_mask():
    b_, h, hkv, t, d = 1, 4, 2, 6, 8

    def body(b, ins):
        q, k, v = ins
        def repeat(x):  # GQA: [1,hkv,t,d] -> [1,h,t,d] as views
            r = b.add("reshape", [x], {"shape": (b_, hkv, 1, t, d)})
            e = b.add("expand", [r], {"shape": (b_, hkv, h // hkv, t, d)})
            return b.add("reshape", [e], {"shape": (b_, h, t, d)})
        kt = b.add("permute", [repeat(k)], {"perm": (0, 1, 3, 2)})
        s = b.add("matmul", [q, kt])
        s = b.add("div", [s, b.const(float(np.sqrt(d)), "f32")])
        qi = b.add("iota", (), {"shape": (t, t), "axis": 0, "dtype": "i64"})
        kj = b.add("iota", (), {"shape": (t, t), "axis": 1, "dtype": "i64"})
        s = b.add("where", [b.add("gt", [kj, qi]), b.const(float("-inf"), "f32"), s])
        m = b.add("amax", [s], {"axes": (3,), "keepdim": True})
        e = b.add("exp", [b.add("sub", [s, m])])
        p = b.add("div", [e, b.add("sum", [e], {"axes": (3,), "keepdim": True})])
        o = b.add("matmul", [p, repeat(v)])
        return [b.add("reshape", [b.add("permute", [o], {"perm": (0, 2, 1, 3)})], {"shape": (b_, t, h * d)})]

    def anchors(b):
        mms = [i for i, n in enumerate(b.nodes) if n.op == "matmul"]
        return (mms[0], mms[1])
    types = [f32(b_, h, t, d), f32(b_, hkv, t, d), f32(b_, hkv, t, d)]
    # anchors are ids in the finished body: matmuls survive pruning in order, so find them after finish
    g = one_kernel("attention", body, types)
    body_graph = g.nodes[[i for i, n in enumerate(g.nodes) if n.op == "kernel"][0]].attr("body")
    mms = tuple(i for i, n in enumerate(body_graph.nodes) if n.op == "matmul")
    g = one_kernel("attention", body, types, anchors_of=lambda b: mms)
    check(g, [RNG.standard_normal(tuple(x.shape), np.float32) for x in types], tol=1e-5)


@pytest.mark.parametrize("pos", [0, 3, 9])
def test_attention_key_loop_stops_at_a_runtime_position(pos):
    """Decode: the mask `key_index > pos` with pos an input bounds the key loop at pos + 1."""
    h, tk, d = 2, 10, 4
    tensors = {"keys": np.arange(tk, dtype=np.int64).reshape(1, tk)}

    def body(b, ins):
        q, k, v, p = ins
        s = b.add("matmul", [q, b.add("permute", [k], {"perm": (0, 2, 1)})])       # [h,1,tk]
        key = b.add("const", (), {"key": "keys"}, TensorType((1, tk), "i64"))
        masked = b.add("gt", [key, p])                                             # [1,tk]
        s = b.add("where", [masked, b.const(float("-inf"), "f32"), s])
        m = b.add("amax", [s], {"axes": (2,), "keepdim": True})
        e = b.add("exp", [b.add("sub", [s, m])])
        pr = b.add("div", [e, b.add("sum", [e], {"axes": (2,), "keepdim": True})])
        return [b.add("matmul", [pr, v])]
    types = [f32(h, 1, d), f32(h, tk, d), f32(h, tk, d), TensorType((1,), "i64")]
    g = one_kernel("attention", body, types, tensors=tensors)
    body_graph = g.nodes[[i for i, n in enumerate(g.nodes) if n.op == "kernel"][0]].attr("body")
    mms = tuple(i for i, n in enumerate(body_graph.nodes) if n.op == "matmul")
    g = one_kernel("attention", body, types, anchors_of=lambda b: mms, tensors=tensors)
    inputs = [RNG.standard_normal((h, 1, d), np.float32), RNG.standard_normal((h, tk, d), np.float32),
              RNG.standard_normal((h, tk, d), np.float32), np.array([pos], np.int64)]
    inputs[1][:, pos + 1:] = np.nan  # keys after pos are never read (their scores are -inf whatever they are)
    inputs[2][:, pos + 1:] = 7.0     # values after pos weigh 0 (a nan there would be 0 * nan = nan, as in eager)
    program = Program(g)
    assert "lim = max(0, min(10," in program.source
    want = run_graph(g, [x if i == 3 else np.nan_to_num(x) for i, x in enumerate(inputs)])
    np.testing.assert_allclose(program.run(inputs)[0], want[0], rtol=1e-5, atol=1e-5)
    inputs[2][:, tk - 1] = np.nan  # a masked non-finite value: nan where the reference has nan
    want = run_graph(g, [np.nan_to_num(x) if i == 1 else x for i, x in enumerate(inputs)])
    np.testing.assert_allclose(program.run(inputs)[0], want[0], rtol=1e-5, atol=1e-5, equal_nan=True)



# --- values indexed by a value loaded inside a loop (an embedding row per reduced position) ---------------

def _embedding_bag(form: str):
    """Mean of the embedding rows of the first `length` tokens. The row number is loaded inside the loop
    over positions, so the row lookup must stay in that loop (it was hoisted above it: `t4` undefined)."""
    import torch

    class EmbeddingBag(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(100, 8)

        def forward(self, tokens, length):            # tokens [1, 16] int64, length [1] int64
            mask = (torch.arange(16) < length).float()  # [16]
            e = self.emb(tokens)                          # [1, 16, 8]
            if form == "sum":
                bag = (e * mask[None, :, None]).sum(1)
            elif form == "matmul":                        # rank 2: the BLAS path
                bag = mask @ e[0]
            else:                                         # batched: the scalar matmul loop over positions
                bag = (mask[None, None, :] @ e)[:, 0]
            return bag / length.float()
    return EmbeddingBag().eval()


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


@pytest.mark.parametrize("form", ["sum", "matmul", "batched-matmul"])
def test_embedding_rows_read_inside_the_reduction_loop(form):
    import torch

    import fusec
    torch.manual_seed(0)
    model = _embedding_bag(form)
    tokens = torch.randint(0, 100, (1, 16))
    compiled = fusec.compile(model, (tokens, torch.tensor([5])), backend="numba", strict=True)
    for length in (1, 5, 16):
        torch.testing.assert_close(compiled(tokens, torch.tensor([length])), model(tokens, torch.tensor([length])))
    if form == "sum":  # the row lookup sits in the loop over positions, the invariant length load before all loops
        lines = compiled.source.splitlines()
        loop = next(i for i, line in enumerate(lines) if line.lstrip().startswith("for r"))
        lookup = next(i for i, line in enumerate(lines) if "= w0[" in line)
        assert lookup > loop and _indent(lines[lookup]) > _indent(lines[loop])
        kernel = max(i for i, line in enumerate(lines[:lookup]) if line.startswith("def "))
        load = next(i for i, line in enumerate(lines) if i > kernel and line.strip().endswith("= a1[0]"))
        first_loop = next(i for i, line in enumerate(lines) if i > kernel and line.lstrip().startswith("for "))
        assert load < first_loop and _indent(lines[load]) == 4


def test_single_token_attention_keeps_the_score_in_the_key_loop():
    """One query, one key: the key index is 0 in every index, so only the variable the score override reads
    (`s`, assigned in the key loop) says where the scaled score may go (it was hoisted: `s` undefined)."""
    import torch

    import fusec
    from fusec.models.llama import LlamaBlock, LlamaConfig
    torch.manual_seed(0)
    config = LlamaConfig(dim=64, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=97, max_seq_len=16, n_layers=1)
    block = LlamaBlock(config).eval()
    x = torch.randn(1, 1, config.dim)
    compiled = fusec.compile(block, (x,), backend="numba", strict=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), block(x), rtol=1e-4, atol=1e-4)
