"""`fusec check` (errors per output, bisection to the first wrong kernel), `fusec explain` (a dry run),
and the debugging knobs: FUSEC_DEBUG=3, FUSEC_DEBUG_DIR and the progress line."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import fusec
from fusec.check import Error, Report, check, compare, first_bad_kernel
from fusec.debug import PROGRESS_MIN_STEPS, Progress
from fusec.explain import explain

pytestmark = pytest.mark.filterwarnings("ignore::numba.NumbaPerformanceWarning")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

USER_MODEL = '''
import torch


class Scan(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(8, 16)
        self.down = torch.nn.Linear(16, 8)

    def forward(self, x):
        h = torch.relu(self.up(x))
        return self.down(torch.cumsum(h, dim=-1)).softmax(-1)


def make():
    torch.manual_seed(0)
    return Scan(), (torch.randn(4, 8),)
'''


def scan_model():
    namespace: dict = {}
    exec(compile(USER_MODEL, "user_model.py", "exec"), namespace)
    return namespace["make"]()


# --- compare ---------------------------------------------------------------------------------------------

def test_compare_treats_matching_nan_and_inf_as_equal():
    a = np.array([1.0, np.nan, np.inf, -np.inf])
    assert compare(a, a).max_abs == 0.0
    assert compare(np.array([1.0, 0.0]), np.array([1.0, np.nan])).max_abs == float("inf")
    assert compare(np.array([np.inf]), np.array([-np.inf])).max_abs == float("inf")
    err = compare(np.array([1.0, 2.0]), np.array([1.0, 2.5]))
    assert err.max_abs == 0.5 and err.scaled == pytest.approx(0.2)


# --- check -----------------------------------------------------------------------------------------------

def test_check_reports_every_backend_ok():
    module, inputs = scan_model()
    report = check(module, inputs)
    assert report.ok and report.mismatch is None
    assert set(report.rows) == {"fused", "unfused", "reference"}
    assert all(e.scaled <= 1e-4 for errors in report.rows.values() for e in errors)
    assert "result: OK" in str(report)


def test_check_float64_adds_torch_float32_row():
    module, inputs = scan_model()
    report = check(module, inputs, float64=True)
    assert "torch f32" in report.rows and "float64" in report.baseline
    assert report.ok


def test_bisection_names_the_first_wrong_kernel():
    module, inputs = scan_model()
    compiled = fusec.compile(module, inputs)
    program = compiled.program
    assert len(program.steps) >= 2
    broken = program.steps[1]
    real = broken.fn

    def wrong(*args):  # a kernel that computes something else: its outputs are off by one
        real(*args)
        args[-1][...] += 1.0
    broken.fn = wrong
    found = first_bad_kernel(program, [inputs[0].numpy()])
    assert found is not None and found.step == 1 and found.node == broken.kernel
    assert found.ir.startswith(f"%{broken.kernel} = kernel") and "body {" in found.ir
    assert "def k1(" in found.source
    assert "first differing kernel: k1" in str(Report("m", "x", {"fused": [Error(1.0, 1.0)]}, mismatch=found))
    broken.fn = real
    assert first_bad_kernel(program, [inputs[0].numpy()]) is None


# --- explain ---------------------------------------------------------------------------------------------

def test_explain_llama_block_is_five_kernels_without_fallbacks():
    from fusec.models import load_model
    module, inputs = load_model("llama-block")
    info = explain(module, inputs)
    assert [k.kind for k in info.kernels] == ["matmul", "attention", "matmul", "matmul", "matmul"]
    assert not info.fallbacks
    assert info.unfused_stats["kernels"] > info.stats["kernels"]
    text = str(info)
    assert "attention" in text and "ops: " in text and "attention_norm" in text


def test_explain_lists_fallbacks_with_reason_and_origin():
    module, inputs = scan_model()
    info = explain(module, inputs)
    (fallback,) = info.fallbacks
    assert fallback.target == "aten.cumsum.default" and fallback.reason == "no lowering"
    assert "user_model.py:13" in fallback.origin
    text = str(info)
    assert "run by PyTorch" in text and "aten.cumsum.default" in text and "no lowering" in text


# --- the command line ------------------------------------------------------------------------------------

def _cli(tmp_path, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "user_model.py").write_text(USER_MODEL)
    argv = [sys.executable, "-m", "fusec", *args]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([a.replace("{tmp}", str(tmp_path)) for a in argv], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)


def test_cli_explain_and_check(tmp_path):
    out = _cli(tmp_path, "explain", "{tmp}/user_model.py:make")
    assert out.returncode == 0, out.stderr
    assert "aten.cumsum.default" in out.stdout and "k0" in out.stdout
    out = _cli(tmp_path, "check", "{tmp}/user_model.py:make", "--float64")
    assert out.returncode == 0, out.stderr
    assert "fused" in out.stdout and "torch f32" in out.stdout and "result: OK" in out.stdout


# --- FUSEC_DEBUG=3, FUSEC_DEBUG_DIR, progress -------------------------------------------------------------

def test_debug_level_3_prints_the_generated_code(monkeypatch, capfd):
    monkeypatch.setenv("FUSEC_DEBUG", "3")
    module, inputs = scan_model()
    compiled = fusec.compile(module, inputs)
    err = capfd.readouterr().err
    assert "[fusec] fused/fuse" in err and "--- after" in err  # levels 1 and 2
    assert "--- generated code of Scan" in err and compiled.source.splitlines()[-1] in err


def test_debug_dir_writes_stages_source_and_summary(monkeypatch, tmp_path):
    monkeypatch.setenv("FUSEC_DEBUG_DIR", str(tmp_path))
    module, inputs = scan_model()
    compiled = fusec.compile(module, inputs)
    (run,) = list(tmp_path.iterdir())
    names = sorted(p.name for p in run.iterdir())
    assert "00-ir.txt" in names and "fx.txt" in names and "numba.py" in names and "summary.json" in names
    assert any(n.endswith("-fuse.txt") for n in names) and any(n.endswith("-tile.txt") for n in names)
    assert (run / "numba.py").read_text().strip() == compiled.source.strip()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["module"] == "Scan" and summary["stats"]["kernels"] == len(summary["kernels"])
    assert summary["torch_fallbacks"][0]["target"] == "aten.cumsum.default"
    assert [p["pass"] for p in summary["passes"]][:2] == ["dce", "cse"]
    assert summary["kernels"][0]["name"] == "k0"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_only_in_terminals_and_on_long_compiles(monkeypatch):
    monkeypatch.delenv("FUSEC_DEBUG", raising=False)
    tty = _Terminal()
    progress = Progress("Big", PROGRESS_MIN_STEPS, stream=tty)
    for _ in range(PROGRESS_MIN_STEPS):
        progress.step()
    progress.close()
    assert f"kernel {PROGRESS_MIN_STEPS}/{PROGRESS_MIN_STEPS}" in tty.getvalue()
    for stream, total in ((io.StringIO(), PROGRESS_MIN_STEPS), (_Terminal(), PROGRESS_MIN_STEPS - 1)):
        quiet = Progress("Small", total, stream=stream)
        quiet.step()
        quiet.close()
        assert stream.getvalue() == ""


def test_compile_of_many_kernels_shows_progress_in_a_terminal(monkeypatch, tmp_path):
    tty = _Terminal()
    monkeypatch.delenv("FUSEC_DEBUG", raising=False)
    # an empty cache and rows no other test compiles: machine code that is all cached, or already loaded
    # in this process, is not compiled at build time, so there would be nothing to show
    monkeypatch.setenv("FUSEC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(sys, "stderr", tty)
    module, _ = scan_model()
    inputs = (torch.randn(5, 8),)
    compiled = fusec.compile(module, inputs, fuse=False)  # one kernel per op: many
    assert compiled.stats["kernels"] >= PROGRESS_MIN_STEPS
    assert "[fusec] compiling Scan: kernel" in tty.getvalue()
    torch.testing.assert_close(compiled(*inputs), module(*inputs).detach())
