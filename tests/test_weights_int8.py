"""int8 weight-only storage (blocks of 32, float32 scales): the pass, the kernels, and end to end."""
import numpy as np
import pytest
import torch

import fusec
from fusec.backends.numba_cpu.lowp import gemm_int8, matvec_bf16, matvec_int8
from fusec.backends.numba_cpu.runtime import Program
from fusec.backends.reference import run_graph
from fusec.semantics import quantize_activations
from fusec.generate import compile_generator, eager_generate
from fusec.models import load_model
from fusec.models.causal_lm import random_model
from fusec.models.llama import LlamaConfig
from fusec.models.registry import decode_inputs
from fusec.tracing import trace
from fusec.passes.pipeline import run_pipeline
from fusec.passes.weights import quantize_int8, store_weights

TINY = LlamaConfig(dim=64, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=97, max_seq_len=128, n_layers=2)
# int8 with a scale per 32 weights: each weight is off by at most half a step, max|block| / 254; a block's
# output moves by ~1% of its scale (measured 0.05-0.07% on the block below, 1.8% on stories15M's logits
# with the activations quantized as well)
INT8_TOLERANCE = 2e-2

pytestmark = pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning")  # tiny kernels


def test_quantization_rounds_to_nearest_even_per_block_of_32():
    w = torch.zeros(2, 64)
    w[0, :32] = torch.linspace(-1.27, 1.27, 32)       # scale 0.01
    w[0, 5], w[0, 6] = 0.025, -0.035                   # exactly half a step: ties go to the even integer
    w[1, 32:] = 3.0                                    # the first block of row 1 is all zeros: scale 0
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == (2, 2, 32) and scale.shape == (2, 2, 1)
    assert float(scale[0, 0, 0]) == pytest.approx(0.01) and float(scale[1, 0, 0]) == 0.0
    assert int(q[0, 0, 0]) == -127 and int(q[0, 0, 31]) == 127
    assert (int(q[0, 0, 5]), int(q[0, 0, 6])) == (2, -4)  # 2.5 -> 2, -3.5 -> -4
    assert (q[1, 0] == 0).all() and (q[1, 1] == 127).all()
    err = (q.float() * scale).reshape(2, 64) - w
    assert float(err.abs().max()) <= float(scale.max()) / 2 + 1e-7
    w[1, 40] = float("nan")  # a non-finite weight is not hidden: its block reads as NaN
    assert torch.isnan(quantize_int8(w)[1][1, 1]).all()
    with pytest.raises(ValueError, match="whole blocks of 32"):
        quantize_int8(torch.zeros(4, 33))


def test_pass_stores_matrices_as_int8_blocks_and_leaves_the_module_alone():
    module, args = load_model("llama-block")
    graph = store_weights(run_pipeline(trace(module, args).graph, until="canonical"), "int8")
    params = {n.attr("name"): n for n in graph.nodes if n.op == "param"}
    wq = params["attention.wq.weight"]
    assert wq.dtype == "i8" and wq.shape[-1] == 32
    assert params["attention.wq.weight.scale"].dtype == "f32"
    assert params["attention_norm.weight"].dtype == "f32"  # small weights stay float32
    assert graph.tensors["attention.wq.weight"].dtype == torch.int8
    assert module.attention.wq.weight.dtype == torch.float32


def int8_program(module, args, kwargs=None):
    graph = run_pipeline(trace(module, args, kwargs).graph, until="canonical")
    return run_pipeline(store_weights(graph, "int8"), after="canonical")


@pytest.mark.parametrize("case", ["prefill", "decode"])
def test_numba_int8_matches_reference_and_stays_close_to_fp32(case):
    # 80 prompt rows dequantize tiles for MKL's sgemm per thread (gemm3_int8_mkl, ...: OpenBLAS's gemm_int8
    # without MKL, tests/test_gemm_widen.py); a decode step streams int8 (matvec_int8)
    module, args = load_model("llama-block:stories15M", seq_len=80 if case == "prefill" else None)
    kwargs = {}
    if case == "decode":
        args, kwargs = decode_inputs(module.config, 12)
    graph = int8_program(module, args, kwargs)
    inputs = [t.numpy() for t in list(args) + list(kwargs.values())]
    program = Program(graph)
    assert len(program.steps) == 5  # dequantized inside the kernels, not by kernels of their own
    assert ("matvec_int8(" if case == "decode" else "gemm3_int8_mkl(") in program.source
    got = program.run(inputs)[0]
    want = run_graph(graph, inputs)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        fp32 = module(*args, **kwargs).numpy()
    assert np.abs(got - fp32).max() <= INT8_TOLERANCE * np.abs(fp32).max()
    assert np.abs(got - fp32).max() > 0  # the weights really are quantized


@pytest.mark.parametrize("rows,n,k", [(1, 10, 64), (3, 7, 96), (2, 9, 33), (65, 300, 64)])
def test_low_precision_kernels_match_numpy(rows, n, k):
    """Row counts that are not multiples of the 4-row blocking, odd K (bf16 pairs) and a GEMM-sized M."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((rows, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    bits = (w.view(np.uint32) >> 16).astype(np.uint16)
    c = np.zeros((rows, n), np.float32)
    matvec_bf16(a, bits, c, 8)
    np.testing.assert_allclose(c, a @ (bits.astype(np.uint32) << 16).view(np.float32).T, rtol=1e-5, atol=1e-4)
    matvec_bf16(a, bits[:, ::-1], c, 8)  # a strided weight takes the plain loop
    np.testing.assert_allclose(c, a @ (bits[:, ::-1].astype(np.uint32) << 16).view(np.float32).T, rtol=1e-5,
                               atol=1e-4)
    if k % 32 == 0:
        q, s = (x.numpy() for x in quantize_int8(torch.from_numpy(w)))
        dense = (q.astype(np.float32) * s).reshape(n, k)
        for kernel in (lambda *args: matvec_int8(*args, 16), gemm_int8):
            c[:] = 0
            kernel(a, q, s, c)  # int8 x int8: the activations quantized too
            np.testing.assert_allclose(c, quantize_activations(a) @ dense.T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("fuse", [True, False])
def test_compile_int8_fused_and_unfused_follows_a_replaced_parameter(fuse):
    module, args = load_model("llama-block")
    compiled = fusec.compile(module, args, weights="int8", fuse=fuse)
    with torch.no_grad():
        want = module(*args)
        got = compiled(*args)
    assert float((got - want).abs().max()) <= INT8_TOLERANCE * float(want.abs().max())
    reference = fusec.compile(module, args, weights="int8", backend="reference")
    torch.testing.assert_close(got, reference(*args), rtol=1e-4, atol=1e-4)
    # a replaced parameter is quantized again at the next call (the program follows the module)
    module.attention.wq.weight = torch.nn.Parameter(module.attention.wq.weight.detach() * 2)
    with torch.no_grad():
        want = module(*args)
        got = compiled(*args)
    assert float((got - want).abs().max()) <= INT8_TOLERANCE * float(want.abs().max())


def test_generator_int8_agrees_with_fp32_greedy():
    """Teacher-forced greedy agreement and logit error against fp32 eager (the bench_accuracy measure,
    on a small model: stories15M measured 98% over 64 steps, 1.8% relative logit error)."""
    from fusec.accuracy import agreement
    model = random_model(TINY, seed=0)
    prompt = torch.randint(0, TINY.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    result = agreement(model, prompt, 64, "int8")
    assert result["agreement"] >= 0.75 and result["relative_error"] <= 5e-2
    gen = compile_generator(model, weights="int8")
    ids, logits = gen.generate(prompt, max_new_tokens=8, return_logits=True)
    ref_ids, ref_logits = eager_generate(model, prompt, 8)
    assert float((logits[:, :1] - ref_logits[:, :1]).abs().max()) <= INT8_TOLERANCE * float(ref_logits.abs().max())


def test_coe_stores_file_experts_as_int8_and_matches_each_expert_compiled_alone(tmp_path):
    """Expert files (bf16) quantized on load: the CoE's tokens equal the expert's own int8 generator's."""
    from fusec.coe import CoE, save_expert
    from fusec.models.causal_lm import load_safetensors
    paths = {name: save_expert(random_model(TINY, seed=i), tmp_path / f"{name}.safetensors")
             for i, name in enumerate(("a", "b"))}
    coe = CoE(None, paths, hbm_bytes=1 << 30, weights="int8", max_seq_len=64, prompt_buckets=(16,))
    prompt = [3, 1, 4, 1, 5]
    for name, path in paths.items():
        alone = compile_generator(load_safetensors(path), 64, weights="int8", prompt_buckets=(16,))
        want = alone.generate(torch.tensor(prompt), max_new_tokens=6)
        assert torch.equal(coe.generate(prompt, max_new_tokens=6, expert=name).tokens, want), name
