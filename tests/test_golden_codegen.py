"""Golden tests of the generated Numba code: the whole program text of the tiny Llama block's prefill
(16 rows: matrix-vector streams, attention; 80 rows: BLAS GEMMs with parallel row-block prologues
and epilogues), its decode step (matrix-vector streams) and its decode step over
bf16 weights, the unfused prefill (one kernel per op), and an RMS norm beside a gated activation (a
`reduce` and a `pointwise` kernel, whose parallel row loops a Llama block's kernels never show), and the
loop driver of a two-layer decode step (kernel looping), so that every kernel kind and the driver are
covered and any change to the emitter shows up as a diff in review.

A deliberate change: regenerate with `FUSEC_UPDATE_GOLDEN=1 python -m pytest tests/test_golden_codegen.py`
and read the diff of tests/golden/ before committing it."""
from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import fusec
import fusec.passes.tile
from fusec.machines import get_machine
from fusec.models import load_model
from fusec.models.causal_lm import CausalLM, DecodeStep, decode_example
from fusec.models.llama import LlamaConfig
from fusec.models.registry import decode_inputs

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(autouse=True)
def fixed_cpu(monkeypatch):
    """Tiles come from the host's caches and module names from a hash that includes the host CPU: pin
    the first and mask the second, so the text is the same on every machine."""
    machine = get_machine("test_cpu")
    monkeypatch.setattr(fusec.passes.tile, "cpu", lambda: machine)


def program_text(case: str) -> str:
    module, args = load_model("llama-block:tiny", seq_len=80 if case == "prefill_gemm" else None)
    kwargs, options = {}, {}
    if case.startswith("decode"):
        args, kwargs = decode_inputs(module.config, past_len=12)
    if case == "decode_bf16":
        options["weights"] = "bf16"
    if case == "prefill_unfused":
        options["fuse"] = False
    source = fusec.compile(module, args, kwargs, **options).program.source
    return re.sub(r"fusec_gen_[0-9a-f]+", "fusec_gen_<hash>", source)


class NormAndGate(nn.Module):
    """An RMS norm (a `reduce` kernel) and, apart from it, a gated activation (a `pointwise` kernel), on 64
    rows of 512: enough elements for parallel row loops."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, 512))

    def forward(self, x, g):
        norm = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.weight
        return norm, nn.functional.silu(g) * g + 1.0


@pytest.mark.parametrize("case", ["prefill", "prefill_gemm", "decode", "decode_bf16", "prefill_unfused"])
def test_generated_code_is_the_golden_text(case):
    assert_golden(GOLDEN / f"numba_tiny_block_{case}.txt", program_text(case))


def test_reduce_and_pointwise_kernels_are_the_golden_text():
    compiled = fusec.compile(NormAndGate().eval(), (torch.randn(64, 512), torch.randn(64, 512)))
    assert [n.attr("kind") for n in compiled.graph.nodes if n.op == "kernel"] == ["reduce", "pointwise"]
    text = re.sub(r"fusec_gen_[0-9a-f]+", "fusec_gen_<hash>", compiled.program.source)
    assert "parallel=True" in text and "prange(64)" in text
    assert_golden(GOLDEN / "numba_norm_and_gate.txt", text)


def test_loop_driver_is_the_golden_text():
    config = LlamaConfig(dim=64, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=97, max_seq_len=32, n_layers=2)
    torch.manual_seed(0)
    model = CausalLM(config).eval()
    compiled = fusec.compile(DecodeStep(model), decode_example(model, 1, config.max_seq_len, pos=5))
    [driver] = compiled.program.drivers.values()
    source = driver.code.source
    text = source[source.index("# loop:"):]  # the driver itself (its kernels are the other goldens' kinds)
    assert "for l in range(2):" in text
    assert_golden(GOLDEN / "numba_loop_driver.txt", text)


def assert_golden(path: Path, text: str) -> None:
    if os.environ.get("FUSEC_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"{path.name} missing: run with FUSEC_UPDATE_GOLDEN=1 to write it"
    want = path.read_text()
    if text != want:
        diff = "".join(difflib.unified_diff(want.splitlines(True), text.splitlines(True), "golden", "generated",
                                            n=2))
        pytest.fail(f"generated code differs from {path.name} (FUSEC_UPDATE_GOLDEN=1 to accept):\n{diff[:4000]}")
