"""Weights as arguments: one compiled program runs another module's weights after `bind_weights`, equal to
compiling that module, with no recompilation; a wrong set of weights fails before anything changes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fusec
from fusec.binding import WeightBindingError
from fusec.models.llama import LlamaBlock, LlamaConfig

CONFIG = LlamaConfig.preset("tiny")


def blocks():
    torch.manual_seed(0)
    first, second = LlamaBlock(CONFIG).eval(), LlamaBlock(CONFIG).eval()
    with torch.no_grad():
        for p in second.parameters():
            p.normal_(std=0.05)
    return first, second


def weights_for(compiled, module) -> dict:
    params = dict(module.named_parameters())
    return {name: params[name].detach().to(torch.bfloat16 if t.dtype == "bf16" else torch.float32)
            for name, t in compiled.weight_types().items()}


@pytest.mark.parametrize("backend", ["numba", "reference"])
@pytest.mark.parametrize("weights", ["fp32", "bf16"])
def test_bound_weights_give_the_other_modules_results_without_recompiling(backend, weights):
    first, second = blocks()
    x = torch.randn(1, 8, CONFIG.dim)
    compiled = fusec.compile(first, (x,), backend=backend, weights=weights)
    before = compiled(x)
    want = fusec.compile(second, (x,), backend=backend, weights=weights)(x)
    assert (before - want).abs().max() > 0.1  # the two modules differ
    compiled.bind_weights(weights_for(compiled, second))
    torch.testing.assert_close(compiled(x), want, rtol=0, atol=0)
    compiled.bind_weights(weights_for(compiled, first))
    torch.testing.assert_close(compiled(x), before, rtol=0, atol=0)
    if compiled.program is not None:  # one machine-code signature per kernel: nothing recompiled
        assert all(len(step.fn.signatures) == 1 for step in compiled.program.steps)


def test_wrong_weights_name_each_problem_and_change_nothing():
    first, second = blocks()
    x = torch.randn(1, 8, CONFIG.dim)
    compiled = fusec.compile(first, (x,))
    before = compiled(x)
    bad = weights_for(compiled, second)
    bad["attention.wq.weight"] = bad["attention.wq.weight"][:, :3]
    del bad["ffn_norm.weight"]
    with pytest.raises(WeightBindingError, match=r"attention.wq.weight: expected \[64, 64\] torch.float32, "
                       r"given \[64, 3\].*ffn_norm.weight: missing"):
        compiled.bind_weights(bad)
    torch.testing.assert_close(compiled(x), before, rtol=0, atol=0)


def test_read_only_arrays_are_refused():
    first, _ = blocks()
    x = torch.randn(1, 8, CONFIG.dim)
    compiled = fusec.compile(first, (x,))
    arrays = {name: t.numpy().copy() for name, t in weights_for(compiled, first).items()}
    arrays["ffn_norm.weight"].flags.writeable = False
    before = compiled(x)
    with pytest.raises(fusec.FusecError, match="read-only.*ffn_norm.weight"):
        compiled.bind_weights(arrays)
    torch.testing.assert_close(compiled(x), before, rtol=0, atol=0)  # the refused bind changed nothing
