"""Fusion of whole models (built-in blocks, HF layers, an HF causal LM): five kernels per block, equal to
the canonical graph and to PyTorch eager; small hand-written graphs are in test_pass_fuse.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.utils._pytree as pytree

from fuse_checks import assert_kernel_contract, kinds
from fusec.backends.reference import run_graph
from fusec.models import LlamaConfig, load_model
from fusec.opset import OPS
from fusec.passes.fuse import describe, fuse, fusion_stats, unfuse
from fusec.passes.fusion_rules import Plan
from fusec.passes.pipeline import run_pipeline
from fusec.printer import format_graph
from fusec.tracing import trace
from fusec.verify import verify


def hf_layer(impl: str):
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama import modeling_llama
    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=128, max_position_embeddings=128,
                                      attn_implementation=impl)
    torch.manual_seed(0)
    layer = modeling_llama.LlamaDecoderLayer(config, layer_idx=0).eval()
    x = torch.randn(2, 10, 64, generator=torch.Generator().manual_seed(1))
    position_ids = torch.arange(10)[None].expand(2, -1)
    cos_sin = modeling_llama.LlamaRotaryEmbedding(config)(x, position_ids)
    causal = torch.full((10, 10), float("-inf")).triu(1)[None, None].expand(2, 1, 10, 10).contiguous()
    return layer, (x,), {"attention_mask": causal, "position_embeddings": cos_sin}


def built_in(spec: str, decode: bool = False):
    module, args = load_model(spec)
    if not decode:
        return module, args, {}
    from fusec.models.registry import decode_inputs
    args, kwargs = decode_inputs(LlamaConfig.tiny(), past_len=7, batch=2)
    return module, args, kwargs


MODELS = {
    "llama-block": lambda: built_in("llama-block"),
    "llama-block:stories15M": lambda: built_in("llama-block:stories15M"),
    "llama-block-decode": lambda: built_in("llama-block", decode=True),
    "hf-eager": lambda: hf_layer("eager"),
    "hf-sdpa": lambda: hf_layer("sdpa"),
}
_CACHE: dict[str, tuple] = {}


def compiled(name: str):
    """(module, args, kwargs, flat inputs, canonical graph, fused graph) of a test model, traced once."""
    if name not in _CACHE:
        module, args, kwargs = MODELS[name]()
        canonical = run_pipeline(trace(module, args, kwargs).graph, until="canonical")
        inputs = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        _CACHE[name] = module, args, kwargs, inputs, canonical, fuse(canonical)
    return _CACHE[name]


def eager(module, args, kwargs) -> np.ndarray:
    with torch.no_grad():
        out = module(*args, **kwargs)
    return (out[0] if isinstance(out, tuple) else out).numpy()


@pytest.mark.parametrize("name", MODELS)
def test_llama_block_fuses_to_exactly_five_kernels(name):
    *_, fused = compiled(name)
    verify(fused)
    assert_kernel_contract(fused)
    assert kinds(fused) == ["matmul", "attention", "matmul", "matmul", "matmul"]
    (qkv, ops_qkv), (_, ops_attn), (_, ops_out), (_, ops_ffn), (_, ops_down) = describe(fused)
    assert ops_qkv["matmul"] == 3 and ops_qkv["rsqrt"] == 1 and ops_qkv["concat"] == 2  # norm, Q/K/V, RoPE
    assert ops_attn["matmul"] == 2 and ops_attn["exp"] == 1
    assert ops_attn.get("expand", 0) == (0 if name.endswith("stories15M") else 2)  # GQA: K, V as views
    assert ops_out["matmul"] == 1 and ops_out["add"] == 1                                    # + residual
    assert ops_ffn["matmul"] == 2 and ops_ffn["rsqrt"] == 1 and ops_ffn["sigmoid"] == 1      # norm, SiLU*up
    assert ops_down["matmul"] == 1 and ops_down["add"] == 1                                  # + residual
    for n in fused.nodes:  # no kernel writes an expanded (repeated) K or V
        if n.op == "kernel":
            body = n.attr("body")
            assert all(body.nodes[o].op != "expand" for o in body.outputs)


def test_decode_step_keeps_the_kv_concatenation_inside_attention():
    *_, fused = compiled("llama-block-decode")
    attention = next(n for n in fused.nodes if n.op == "kernel" and n.attr("kind") == "attention")
    assert attention.attr("body").ops()["concat"] == 2
    assert fused.nodes[attention.args[1]].op == "input"  # past_k read in place


@pytest.mark.parametrize("name", MODELS)
def test_fused_model_matches_the_canonical_graph_and_eager(name):
    module, args, kwargs, inputs, canonical, fused = compiled(name)
    (want,) = run_graph(canonical, inputs)
    (got,) = run_graph(fused, inputs)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, eager(module, args, kwargs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_fusing_a_fused_model_again_changes_nothing(name):
    *_, fused = compiled(name)
    assert format_graph(fuse(fused)) == format_graph(fused)


@pytest.mark.parametrize("name", MODELS)
def test_unfuse_gives_one_kernel_per_op_that_is_not_a_reshape(name):
    *_, inputs, canonical, _ = compiled(name)
    unfused = unfuse(canonical)
    verify(unfused)
    plan = Plan(canonical)
    ops = [n for i, n in enumerate(canonical.nodes)
           if OPS[n.op] not in ("source", "kernel") and not plan.copied[i] and n.op != "reshape"]
    assert kinds(unfused) == ["op"] * len(ops)
    assert {n.op for n in unfused.nodes} <= {"input", "kernel", "reshape"}
    for want, got in zip(run_graph(canonical, inputs), run_graph(unfused, inputs), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_fusion_cuts_intermediate_bytes_at_least_five_times_on_the_llama_block():
    *_, canonical, fused = compiled("llama-block")
    before, after = fusion_stats(unfuse(canonical)), fusion_stats(fused)
    assert after["kernels"] == 5 and before["kernels"] > 40
    assert after["intermediate_bytes"] * 5 <= before["intermediate_bytes"]


def test_fused_stage_runs_after_canonical():
    *_, canonical, fused = compiled("llama-block")
    from fusec.passes.hoist_slices import hoist_slices
    from fusec.passes.layout import choose_layout
    stage = choose_layout(hoist_slices(fused))  # the fused stage: fuse, hoist_slices, layout
    assert format_graph(run_pipeline(canonical, until="fused")) == format_graph(stage)


def test_hf_causal_lm_with_two_layers_fuses_and_matches_eager():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=128, max_position_embeddings=128, num_hidden_layers=2,
                                      vocab_size=100, use_cache=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    canonical = run_pipeline(trace(model, (ids,)).graph, until="canonical")
    fused = fuse(canonical)
    verify(fused)
    assert_kernel_contract(fused)
    layer = ["matmul", "attention", "matmul", "matmul", "matmul"]
    # the embedding lookup (rows of a weight: data, a kernel of its own, so that the first block's kernels
    # equal the second's and both loop); then 2 blocks and norm + lm_head
    assert kinds(fused) == ["pointwise"] + layer * 2 + ["matmul"]
    (got,) = run_graph(fused, [ids])
    with torch.no_grad():
        want = model(ids).logits.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert format_graph(fuse(fused)) == format_graph(fused)
