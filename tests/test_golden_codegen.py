"""Golden tests of the generated Numba code: the whole program text of the tiny Llama block's prefill
(16 rows: matrix-vector streams, attention; 80 rows: BLAS GEMMs with parallel row-block prologues
and epilogues), its decode step (matrix-vector streams) and its decode step over
bf16 weights, and the unfused prefill (one kernel per op), so that any change to the emitter shows up as a diff in review.

A deliberate change: regenerate with `FUSEC_UPDATE_GOLDEN=1 python -m pytest tests/test_golden_codegen.py`
and read the diff of tests/golden/ before committing it."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import fusec
import fusec.passes.tile
from fusec.machines import get_machine
from fusec.models import load_model
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


@pytest.mark.parametrize("case", ["prefill", "prefill_gemm", "decode", "decode_bf16", "prefill_unfused"])
def test_generated_code_is_the_golden_text(case):
    path = GOLDEN / f"numba_tiny_block_{case}.txt"
    text = program_text(case)
    if os.environ.get("FUSEC_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"{path.name} missing: run with FUSEC_UPDATE_GOLDEN=1 to write it"
    want = path.read_text()
    if text != want:
        import difflib
        diff = "".join(difflib.unified_diff(want.splitlines(True), text.splitlines(True), "golden", "generated",
                                            n=2))
        pytest.fail(f"generated code differs from {path.name} (FUSEC_UPDATE_GOLDEN=1 to accept):\n{diff[:4000]}")
