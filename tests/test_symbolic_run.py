"""One symbolic program for every size in its bounds (`fusec.compile(..., dynamic=...)`): compared with
PyTorch eager at many sizes (1, primes, the upper bound), fused and unfused, on both backends, with no
new program compiled; calls outside the bounds are clear errors."""
from __future__ import annotations

import warnings

import pytest
import torch

import fusec
from fusec.machines import cpu
from fusec.models import LlamaBlock, LlamaConfig, example_inputs
from fusec.models.llama import init_weights
from fusec.passes.tile import loop_tiles
from fusec.sizes import SizeError

SIZES = (1, 2, 3, 7, 13, 31, 64, 65, 127, 128)


@pytest.fixture(scope="module")
def block():
    return init_weights(LlamaBlock(LlamaConfig.tiny()), seed=0).eval()


def _check_sizes(compiled, module, sizes=SIZES):
    with torch.no_grad():
        for t in sizes:
            (x,) = example_inputs(LlamaConfig.tiny(), batch=1, seq_len=t, seed=t)
            torch.testing.assert_close(compiled(x), module(x), rtol=1e-4, atol=1e-5, msg=f"at size {t}")
    assert compiled.stats["programs"] == 1


@pytest.mark.parametrize("backend", ["numba", "reference"])
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_block_one_program_for_every_length(block, backend, fuse):
    (x,) = example_inputs(LlamaConfig.tiny(), batch=1, seq_len=10)
    compiled = fusec.compile(block, (x,), dynamic={"x": {1: (1, 128)}}, backend=backend, fuse=fuse)
    assert compiled.graph.sizes == {"s0": (1, 128)}
    assert "s0" in repr(compiled.graph)
    _check_sizes(compiled, block)


def test_symbolic_kernels_read_sizes_from_their_arrays(block):
    (x,) = example_inputs(LlamaConfig.tiny(), batch=1, seq_len=10)
    compiled = fusec.compile(block, (x,), dynamic={"x": {1: (1, 128)}})
    assert "s0 = a0.shape[1]" in compiled.source
    # the product (matvec or BLAS) is chosen per call, at the tiling pass's threshold for this cpu
    assert f"if s0 <= {loop_tiles(cpu())['matvec_rows']}:" in compiled.source
    # over that many rows Q, K and V (W1 and W3) are one joint GEMM call, as in a program of fixed sizes
    assert "gemm3_mkl(" in compiled.source and "gemm2_mkl(" in compiled.source
    # and up to it, one joint matrix-vector call each (one parallel loop, not one per product)
    assert "matvec3(" in compiled.source and "matvec2(" in compiled.source


def test_symbolic_outputs_share_one_parallel_loop_at_every_size():
    """Q, K and V with their RoPE written by one parallel loop whose blocks are counted at run time (a
    loop per output cost the threads a meeting per output), right at
    every size: one row (fewer rows than blocks), a prime, more rows than the matrix-vector threshold, the
    upper bound."""
    config = LlamaConfig.stories15M()
    module = init_weights(LlamaBlock(config), seed=0).eval()
    (x,) = example_inputs(config, batch=1, seq_len=10)
    compiled = fusec.compile(module, (x,), dynamic={"x": {1: (1, 256)}})
    assert "= max(threads(), (s0 + " in compiled.source
    with torch.no_grad():
        for t in (1, 2, 19, 61, 256):
            (x,) = example_inputs(config, batch=1, seq_len=t, seed=t)
            torch.testing.assert_close(compiled(x), module(x), rtol=1e-4, atol=1e-4, msg=f"at size {t}")
    assert compiled.stats["programs"] == 1


def test_a_causal_mask_of_run_time_size_is_computed_where_attention_reads_it():
    """A mask of indices alone (the causal mask of a symbolic prefill, up to 1024 x 1024) is recomputed in
    the attention kernel rather than stored by a kernel of its own: attention then bounds its key loop."""
    from fusec.models.causal_lm import Prefill, random_model
    config = LlamaConfig(dim=64, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=61, max_seq_len=1024,
                         n_layers=2)
    model = random_model(config, seed=7)
    compiled = fusec.compile(Prefill(model, None), (torch.zeros(1, 8, dtype=torch.int64),),
                             dynamic={"tokens": {1: (1, 1024)}})
    kernels = [n for n in compiled.graph.walk() if n.op == "kernel"]
    assert not any(n.dtype == "bool" for n in kernels)
    attention = [n for n in kernels if n.attr("kind") == "attention"]
    assert attention and all(len(n.args) == 3 for n in attention)  # q, k and v: no mask operand
    with torch.no_grad():
        for t in (1, 5, 97, 1024):
            ids = torch.randint(0, config.vocab_size, (1, t), generator=torch.Generator().manual_seed(t))
            for got, want in zip(compiled(ids), Prefill(model, None)(ids)):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"at {t} tokens")
    assert compiled.stats["programs"] == 1


def test_outside_the_bounds_is_a_clear_error(block):
    (x,) = example_inputs(LlamaConfig.tiny(), batch=1, seq_len=10)
    compiled = fusec.compile(block, (x,), dynamic={"x": {1: (1, 64)}}, backend="reference")
    with pytest.raises(SizeError, match=r"input 'x' dimension 1 is the size s0, which must be in \[1, 64\]; got 65"):
        compiled(torch.randn(1, 65, 64))
    with pytest.raises(ValueError):  # SizeError is a ValueError
        compiled(torch.randn(1, 65, 64))
    assert compiled.stats["programs"] == 1


def test_bounds_the_model_cannot_take_name_torchs_suggestion_and_what_was_asked(block):
    (x,) = example_inputs(LlamaConfig.tiny(), batch=1, seq_len=10)
    # the rotary table has 128 rows: torch's bound beside the one the caller gave
    with pytest.raises(fusec.FusecError, match=r"max=128.*asked for x_1 in 1\.\.4096"):
        fusec.compile(block, (x,), dynamic={"x": {1: (1, 4096)}}, backend="reference")


def test_set_form_takes_the_range_torch_finds_and_compiles_size_1_apart(block):
    (x,) = example_inputs(LlamaConfig.tiny(), batch=1, seq_len=10)
    compiled = fusec.compile(block, (x,), dynamic={"x": {1}}, backend="reference")
    assert compiled.graph.sizes == {"s0": (2, 128)}  # torch.export specializes 1
    _check_sizes(compiled, block, sizes=(2, 5, 128))
    (one,) = example_inputs(LlamaConfig.tiny(), batch=1, seq_len=1)
    with torch.no_grad():
        torch.testing.assert_close(compiled(one), block(one), rtol=1e-4, atol=1e-5)
    assert compiled.stats["programs"] == 2


@pytest.mark.parametrize("bad, words", [
    ({"x": {1: (0, 8)}}, "1 <= lo <= hi"),
    ({"x": {5: (1, 8)}}, "not a dimension"),
    ({"y": {1}}, "names the input 'y'"),
    ({"x": {1: "long"}}, r"must be \(lo, hi\)"),
])
def test_bad_dynamic_specs_name_the_problem(block, bad, words):
    (x,) = example_inputs(LlamaConfig.tiny(), batch=1, seq_len=10)
    with pytest.raises((ValueError, TypeError), match=words):
        fusec.compile(block, (x,), dynamic=bad, backend="reference")


@pytest.mark.parametrize("backend, fuse", [("numba", True), ("reference", False)], ids=["fused", "unfused"])
def test_hf_llama_decoder_layer_one_program(backend, fuse):
    pytest.importorskip("transformers")
    from test_tracing import hf_config, hf_layer_inputs, randomize
    from torch.export import Dim
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    config = hf_config("sdpa")
    layer = randomize(LlamaDecoderLayer(config, layer_idx=0), seed=10)
    x, kwargs = hf_layer_inputs(config, seq_len=12, seed=11)
    t = Dim("T", min=1, max=64)  # one size shared by the activations, the mask and the rotary tables
    dynamic = {"hidden_states": {1: t}, "attention_mask": {2: t, 3: t}, "position_embeddings_0": {1: t},
               "position_embeddings_1": {1: t}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = fusec.compile(layer, (x,), kwargs, dynamic=dynamic, backend=backend, fuse=fuse)
        for n in (1, 2, 5, 17, 64):
            x2, kwargs2 = hf_layer_inputs(config, seq_len=n, seed=n)
            with torch.no_grad():
                got, want = compiled(x2, **kwargs2), layer(x2, **kwargs2)
            got = got[0] if isinstance(got, tuple) else got
            want = want[0] if isinstance(want, tuple) else want
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"at size {n}")
    assert compiled.stats["programs"] == 1


def test_dynamo_dynamic_shapes_compile_once(block):
    import torch._dynamo

    from fusec.dynamo import graphs
    torch._dynamo.reset()
    before = {id(g) for g in graphs()}
    compiled = torch.compile(block, backend="fusec", dynamic=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in (5, 9, 17, 3):
            (x,) = example_inputs(LlamaConfig.tiny(), batch=1, seq_len=t, seed=t)
            torch.testing.assert_close(compiled(x), block(x), rtol=1e-4, atol=1e-5, msg=f"at size {t}")
    live = [g for g in graphs() if id(g) not in before]
    assert len(live) == 1 and not live[0].eager
    (program,) = live[0].compiled
    assert program.stats["programs"] == 1 and program.graph.sizes


class _Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


@pytest.mark.parametrize("backend, fuse", [("numba", True), ("reference", False)], ids=["fused", "unfused"])
def test_hf_llama_for_causal_lm_one_program(backend, fuse):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                      num_key_value_heads=2, num_hidden_layers=2, vocab_size=97,
                                      max_position_embeddings=64, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    model = _Logits(transformers.LlamaForCausalLM(config).eval())
    ids = torch.randint(0, 97, (1, 10), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = fusec.compile(model, (ids,), dynamic={"input_ids": {1: (1, 64)}}, backend=backend, fuse=fuse)
        for n in (1, 2, 7, 13, 64):
            x = torch.randint(0, 97, (1, n), generator=torch.Generator().manual_seed(n))
            with torch.no_grad():
                torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5, msg=f"at size {n}")
    assert compiled.stats["programs"] == 1 and compiled.graph.sizes == {"s0": (1, 64)}
    assert compiled.stats["torch_ops"] == 0  # the mask's cumsum and index fold (fusec.passes.ranges)


def test_dump_and_rdu_report_a_symbolic_program_at_a_size():
    from fusec.cli import dump
    from fusec.rdu.cli import _lowered
    from fusec.rdu.placement import placement_of
    symbolic = dump("llama-block:tiny", "tiled", "text", dynamic=True)
    assert "sizes {s0=[2,128]}" in symbolic and "f32[1,s0,64]" in symbolic
    at = dump("llama-block:tiny", "tiled", "text", seq_len=17, dynamic=True)
    assert "s0" not in at and "f32[1,17,64]" in at
    graph = _lowered("llama-block:tiny", 17, True, None, dynamic=True)
    assert not graph.sizes and graph.nodes[graph.inputs[0]].shape == (1, 17, 64)
    assert placement_of(graph).sections
    with pytest.raises(SizeError, match=r"s0 must be in \[2, 128\]; given 500"):
        _lowered("llama-block:tiny", 500, True, None, dynamic=True)


class MeanAndVariance(torch.nn.Module):
    """Statistics over the symbolic axis (LayerNorm-over-time, as in a pooling head): the count is a size."""

    def forward(self, x):
        centered = x - x.mean(dim=1, keepdim=True)
        return centered / (x.var(dim=1, keepdim=True, unbiased=False) + 1e-5).sqrt() + x.mean(dim=(1, 2)).unsqueeze(1).unsqueeze(2)


@pytest.mark.parametrize("backend", ["numba", "reference"])
def test_mean_and_variance_over_a_symbolic_axis_need_no_torch_op(backend):
    module = MeanAndVariance()
    compiled = fusec.compile(module, (torch.randn(2, 9, 8),), dynamic={"x": {1: (1, 64)}}, backend=backend)
    assert compiled.stats["torch_ops"] == 0  # mean and var lowered, the count read at run time
    for t in (1, 2, 9, 31, 64):
        x = torch.randn(2, t, 8, generator=torch.Generator().manual_seed(t))
        torch.testing.assert_close(compiled(x), module(x), rtol=1e-4, atol=1e-5, msg=f"at size {t}")
    assert compiled.stats["programs"] == 1


def test_variance_with_the_default_correction_matches_torch_statically():
    class Var(torch.nn.Module):
        def forward(self, x):
            return x.var(dim=-1) + x.var()

    x = torch.randn(3, 5, 7)
    compiled = fusec.compile(Var(), (x,))
    assert compiled.stats["torch_ops"] == 0
    torch.testing.assert_close(compiled(x), Var()(x), rtol=1e-4, atol=1e-5)
