"""The numba backend against PyTorch at the sizes it is built for: a TinyLlama-1.1B decoder block (dim
2048, 32 heads over 4 KV heads, FFN 5632), where rows are many enough for the parallel and BLAS paths,
attention streams several key/value tiles and the sequence is not a multiple of any tile. The tiny shapes
of the other tests run every kernel serially; these do not."""
from __future__ import annotations

import pytest
import torch

import fusec
from fusec.models import LlamaBlock, LlamaConfig, example_inputs
from fusec.models.registry import decode_inputs

CONFIG = LlamaConfig.tinyllama_1b()


@pytest.fixture(scope="module")
def block() -> LlamaBlock:
    torch.manual_seed(0)
    return LlamaBlock(CONFIG).eval()


def kernel_tiles(compiled) -> dict[str, int]:
    tiles: dict[str, int] = {}
    for n in compiled.graph.nodes:
        if n.op == "kernel":
            for name, size in n.attr("tiles") or ():
                tiles[name] = max(tiles.get(name, 0), size)
    return tiles


def assert_close_to_eager(got: torch.Tensor, want: torch.Tensor, tolerance: float) -> None:
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    assert err <= tolerance * scale, f"max error {err:.3e} exceeds {tolerance:g} x max |eager| {scale:.3e}"


def test_prefill_of_77_tokens_matches_eager(block):
    (x,) = example_inputs(CONFIG, seq_len=77, seed=1)   # 77 rows: over 64, prime, no tile divides it
    with torch.no_grad():
        want = block(x)
    compiled = fusec.compile(block, (x,))
    tiles = kernel_tiles(compiled)
    assert 77 > tiles["m"] and 77 % tiles["m"], tiles      # several row tiles, a ragged last one
    assert_close_to_eager(compiled(x), want, 1e-4)


def test_long_prefill_streams_several_key_value_tiles():
    """701 tokens of 128-wide heads: attention streams keys and values in several tiles (the last one
    ragged), the online softmax's whole path. (The kv tile fits the L1, the q tile the L2: on a host
    whose L2 holds all 701 rows they are one block; tests/test_attention_loops.py pins a small cache
    to run several ragged query blocks.)"""
    config = LlamaConfig(dim=256, n_heads=2, n_kv_heads=2, hidden_dim=512)
    torch.manual_seed(4)
    block = LlamaBlock(config).eval()
    (x,) = example_inputs(config, seq_len=701, seed=4)
    with torch.no_grad():
        want = block(x)
    compiled = fusec.compile(block, (x,))
    tiles = kernel_tiles(compiled)
    assert 701 > tiles["kv"] and 701 % tiles["kv"], tiles
    assert_close_to_eager(compiled(x), want, 1e-4)


def test_decode_after_133_cached_tokens_matches_eager(block):
    args, kwargs = decode_inputs(CONFIG, past_len=133, batch=2, seed=2)
    with torch.no_grad():
        want = block(*args, **kwargs)
    compiled = fusec.compile(block, args, kwargs)
    assert_close_to_eager(compiled(*args, **kwargs), want, 1e-4)


def test_bf16_weight_prefill_matches_eager_on_the_rounded_weights(block):
    """bf16 weights: eager on the same weights rounded to bf16 (computing in float32) is the reference.
    With MKL the prefill GEMMs also round their activations to bf16 (a bf16 x bf16 -> f32 GEMM: exact
    products, float32 sums; docs/numba-backend.md), hence 2e-3 of the output's scale rather than 1e-4."""
    (x,) = example_inputs(CONFIG, seq_len=77, seed=3)
    rounded = LlamaBlock(CONFIG).eval()
    rounded.load_state_dict({k: v.to(torch.bfloat16).float() if v.dim() == 2 else v
                             for k, v in block.state_dict().items()})
    with torch.no_grad():
        want = rounded(x)
    compiled = fusec.compile(block, (x,), weights="bf16")
    assert_close_to_eager(compiled(x), want, 2e-3 if compiled.stats.get("blas") in ("onednn", "mkl") else 1e-4)
