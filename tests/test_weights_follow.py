"""A compiled program follows its module's parameters like eager does: a parameter replaced after compiling
(`load_state_dict(assign=True)`, a new Parameter, `param.data = ...`, `share_memory()`) is rebound on the
next call without recompiling; an in-place update is read in place; a changed shape or dtype is a clear
error; never a read of freed memory. Weights bound explicitly (`bind_weights`) stay bound."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import fusec
from fusec.binding import WeightBindingError

pytestmark = pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning")  # tiny kernels
BACKENDS = ["numba", "reference"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_isolated(code: str) -> None:
    """Run `code` in a new interpreter (a crash there fails this test instead of ending it); it prints ok."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240,
                            cwd=ROOT, env=env)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


def eager(module, *args):
    with torch.no_grad():
        return module(*args)


def check(compiled, module, x) -> None:
    torch.testing.assert_close(compiled(x), eager(module, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("change", ["load_state_dict_assign", "new_parameter", "data", "submodule"])
def test_replaced_parameters_are_followed_without_recompiling(backend, change):
    module, x = mlp(), torch.randn(3, 16)
    compiled = fusec.compile(module, (x,), backend=backend)
    program = compiled.specializations[0]
    check(compiled, module, x)
    before, other = eager(module, x), mlp(seed=1)
    if change == "load_state_dict_assign":
        module.load_state_dict(other.state_dict(), assign=True)
    elif change == "new_parameter":
        module[2].weight = nn.Parameter(torch.randn(8, 32))
    elif change == "data":
        module[0].bias.data = torch.randn(32)
    else:
        module[0] = other[0]
    assert not torch.allclose(eager(module, x), before)  # the change matters
    check(compiled, module, x)
    assert compiled.specializations == [program]  # rebound, not recompiled


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_updates_are_read_in_place(backend):
    module, x = mlp(), torch.randn(3, 16)
    compiled = fusec.compile(module, (x,), backend=backend)
    with torch.no_grad():
        module[0].weight.add_(1.0)
    check(compiled, module, x)
    module[2].weight.data.copy_(torch.randn(8, 32))
    check(compiled, module, x)
    module.load_state_dict(mlp(seed=2).state_dict())  # copies into the same tensors
    check(compiled, module, x)


def test_bf16_weights_follow_a_replaced_parameter():
    torch.manual_seed(0)
    module, x = nn.Linear(64, 96).eval(), torch.randn(2, 64)
    compiled = fusec.compile(module, (x,), weights="bf16")
    module.weight = nn.Parameter(torch.randn(96, 64))
    want = torch.nn.functional.linear(x, module.weight.detach().to(torch.bfloat16).float(), module.bias.detach())
    torch.testing.assert_close(compiled(x), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_parameter_of_another_shape_is_a_clear_error(backend):
    module, x = mlp(), torch.randn(3, 16)
    compiled = fusec.compile(module, (x,), backend=backend)
    module[2].weight = nn.Parameter(torch.randn(8, 33))
    with pytest.raises(WeightBindingError, match=r"changed.*\[8, 32\].*\[8, 33\]"):
        compiled(x)
    module[2].weight = nn.Parameter(torch.randn(8, 32, dtype=torch.float64))
    with pytest.raises(WeightBindingError, match="float64"):
        compiled(x)
    module[2].weight = nn.Parameter(torch.randn(8, 32))  # back to a fitting one: it works again
    check(compiled, module, x)


def test_explicitly_bound_weights_stay_bound():
    module, x = mlp(), torch.randn(3, 16)
    compiled = fusec.compile(module, (x,))
    other = mlp(seed=1)
    compiled.bind_weights(dict(other.named_parameters()))
    module.load_state_dict(mlp(seed=2).state_dict(), assign=True)
    torch.testing.assert_close(compiled(x), eager(other, x), rtol=1e-5, atol=1e-5)


def test_generator_follows_replaced_model_weights():
    from fusec.generate import compile_generator, eager_generate
    from fusec.models.causal_lm import random_model
    from fusec.models.llama import LlamaConfig
    config = LlamaConfig(dim=32, n_heads=2, n_kv_heads=1, hidden_dim=64, vocab_size=53, max_seq_len=16, n_layers=1)
    model = random_model(config, seed=0)
    gen = compile_generator(model, backend="reference")
    ids = torch.tensor([[1, 2, 3, 4]])
    gen.generate(ids, max_new_tokens=3)
    model.load_state_dict(random_model(config, seed=1).state_dict(), assign=True)
    want, _ = eager_generate(model, ids, max_new_tokens=6)
    assert torch.equal(gen.generate(ids, max_new_tokens=6), want)
    assert gen.last["compiles"] == 0


def test_share_memory_after_compiling_reads_the_shared_weights():
    """share_memory() moves every parameter to new memory and frees the old: the next call used to read
    freed memory (a segfault with 32 MiB of weights). Run in a subprocess so a crash fails the test."""
    code = textwrap.dedent("""
        import torch, fusec
        torch.manual_seed(0)
        module = torch.nn.Linear(2048, 4096).eval()
        x = torch.randn(2, 2048)
        compiled = fusec.compile(module, (x,))
        module.share_memory()
        for _ in range(3):
            junk = [torch.randn(2048, 4096) for _ in range(2)]  # reuse the freed memory
            got = compiled(x)
            with torch.no_grad():
                torch.testing.assert_close(got, module(x), rtol=1e-4, atol=1e-4)
        print("ok")
    """)
    run_isolated(code)


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.randn(2048, 4096))

    def forward(self, x):
        return x * self.scale + 1.0


def test_share_memory_after_compiling_leaves_buffers_folded_in_intact():
    """Buffers are constants of the program (folded at trace time): share_memory() must not leave the
    program reading the buffer's freed memory."""
    code = textwrap.dedent("""
        import torch, fusec
        from tests.test_weights_follow import Scaled
        torch.manual_seed(0)
        module, x = Scaled(), torch.randn(2048, 4096)
        with torch.no_grad():
            want = module(x)
        compiled = fusec.compile(module, (x,))
        module.share_memory()
        for _ in range(3):
            junk = [torch.randn(2048, 4096) for _ in range(2)]  # reuse the freed memory
            torch.testing.assert_close(compiled(x), want)
        print("ok")
    """)
    run_isolated(code)
