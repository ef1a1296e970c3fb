"""bfloat16 weight storage: the pass, and the numba kernels that widen weights as they stream in."""
import numpy as np
import pytest
import torch

import fusec

from fusec.backends.numba_cpu.gemm import BF16_GEMM_FROM
from fusec.backends.numba_cpu.mkl import bf16_gemm_in_hardware
from fusec.backends.numba_cpu.runtime import Program
from fusec.backends.reference import run_graph
from fusec.models import load_model
from fusec.models.registry import decode_inputs
from fusec.tracing import trace
from fusec.passes.pipeline import run_pipeline
from fusec.passes.weights import store_weights


def bf16_program(module, args, kwargs=None):
    graph = run_pipeline(trace(module, args, kwargs).graph, until="canonical")
    return run_pipeline(store_weights(graph, "bf16"), after="canonical")


def test_a_symbolic_bf16_prefill_takes_the_bf16_gemm_past_the_matrix_vector_rows():
    """One program for 1..128 tokens: up to the matrix-vector rows the weights stream through the
    matrix-vector loop; past them, on a CPU with bf16 products, MKL's bf16 GEMM over the activations
    rounded to bf16 (from `BF16_GEMM_FROM` rows), as a program of a fixed length takes it (elsewhere the
    weights widened to fp32 tiles past the tiling pass's 64 rows).
    Each length is compared with the reference backend's run of the same program at that length."""
    module, args = load_model("llama-block:stories15M", seq_len=10)
    compiled = fusec.compile(module, args, dynamic={"x": {1: (1, 128)}}, weights="bf16")
    reference = fusec.compile(module, args, dynamic={"x": {1: (1, 128)}}, weights="bf16", backend="reference")
    hardware = bf16_gemm_in_hardware()
    assert ("gemm_bf16_mkl(" in compiled.source) == hardware and "matvec_bf16(" in compiled.source
    with torch.no_grad():
        for length in (1, 5, 16, 17, 80, 128):
            x = load_model("llama-block:stories15M", seq_len=length)[1][0]
            got, want, fp32 = compiled(x).numpy(), reference(x).numpy(), module(x).numpy()
            if hardware and length >= BF16_GEMM_FROM:  # the GEMM rounds its activations to bf16; the reference not
                assert np.abs(got - want).max() <= 2e-3 * np.abs(want).max(), length
            else:
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
            assert np.abs(got - fp32).max() <= 1e-2 * np.abs(fp32).max()
    assert compiled.stats["programs"] == 1


def test_pass_stores_matrices_as_bf16_and_leaves_the_module_alone():
    module, args = load_model("llama-block")
    graph = store_weights(run_pipeline(trace(module, args).graph, until="canonical"), "bf16")
    params = {n.attr("name"): n for n in graph.nodes if n.op == "param"}
    assert params["attention.wq.weight"].dtype == "bf16"
    assert params["attention_norm.weight"].dtype == "f32"  # small weights stay float32
    assert graph.tensors["attention.wq.weight"].dtype == torch.bfloat16
    assert module.attention.wq.weight.dtype == torch.float32
    assert store_weights(graph, "fp32") is graph
    with pytest.raises(ValueError, match="int4"):
        store_weights(graph, "int4")


@pytest.mark.parametrize("case", ["prefill", "decode"])
def test_numba_bf16_matches_reference_and_stays_close_to_fp32(case):
    # 80 prompt rows take the BLAS path: weights widened per thread for sgemm (gemm3_bf16w_mkl, ...), or on a
    # CPU with bf16 products MKL's bf16 GEMM (gemm_bf16_mkl); a decode step's single row the matrix-vector loop
    hardware = case == "prefill" and bf16_gemm_in_hardware()
    module, args = load_model("llama-block:stories15M", seq_len=80 if case == "prefill" else None)
    kwargs = {}
    if case == "decode":
        args, kwargs = decode_inputs(module.config, 12)
    graph = bf16_program(module, args, kwargs)
    inputs = [t.numpy() for t in list(args) + list(kwargs.values())]
    program = Program(graph)
    assert len(program.steps) == 5  # the weights are widened inside the kernels, not by kernels of their own
    kernel = "matvec_bf16(" if case == "decode" else "gemm_bf16_mkl(" if hardware else "gemm3_bf16w_mkl("
    assert kernel in program.source
    got = program.run(inputs)[0]
    want = run_graph(graph, inputs)[0]
    if not hardware:
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    else:  # the prefill GEMM also rounds its activations to bf16 (tests/test_gemm_blas.py); the reference not
        assert np.abs(got - want).max() <= 2e-3 * np.abs(want).max()
    with torch.no_grad():
        fp32 = module(*args, **kwargs).numpy()
    # bf16 keeps 8 bits of mantissa: the block's output moves by well under 1% of its scale
    assert np.abs(got - fp32).max() <= 1e-2 * np.abs(fp32).max()
    assert np.abs(got - fp32).max() > 0  # the weights really are rounded
