"""The fused-vs-unfused benchmark runs end to end on the tiny block and writes a complete report.

Nothing here asserts a timing: the machines these tests run on are shared and noisy.
"""
from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusec import benchtools

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_block.py"


def load_bench():
    """The benchmark module (the script in benchmarks/ is a shim over it)."""
    from fusec import bench_block
    return bench_block


@pytest.fixture(scope="module")
def bench():
    return load_bench()


SMOKE_ARGS = ["--preset", "tiny", "--seq", "8", "--past", "8", "--repeat", "2"]
FUSEC_PROGRAMS = {f"fusec {kind}/{case}" for kind in ("unfused", "fused", "bf16", "int8") for case in ("prefill", "decode")}
LOWP_ERROR = {"fusec bf16": 3e-2, "fusec int8": 3e-2}  # max error allowed for low-precision weights


@pytest.fixture(scope="module")
def report(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_out")
    # A kept cache dir, so that the warm-compile test below finds these programs compiled.
    argv = SMOKE_ARGS + ["--no-compile-time", "--no-torch-compile", "--out", str(out),
                         "--cache-dir", str(out / "cache")]
    # The machine's rooflines measured on a small array and small matrices: the report's fields and
    # their signs are checked here, not the figures (a full-size measurement takes tens of seconds).
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(benchtools, "measure_memory_bandwidth",
                   functools.partial(benchtools.measure_memory_bandwidth, 8 << 20))
        mp.setattr(benchtools, "measure_matmul_peak", functools.partial(benchtools.measure_matmul_peak, 256))
        assert bench.main(argv) == 0
    return out, json.loads((out / "bench_block.json").read_text())


def test_report_has_every_implementation_and_case(bench, report):
    _, data = report
    pairs = {(row["implementation"], row["case"]) for row in data["results"]}
    assert pairs == {(name, case) for name in bench.IMPLEMENTATIONS for case in bench.CASES}


def test_measured_rows_have_positive_times_and_small_errors(report):
    _, data = report
    for row in data["results"]:
        if row["implementation"] == "torch.compile":
            assert row["status"] == "skipped" and "median_ms" not in row
            continue
        assert row["status"] == "ok", row
        assert row["median_ms"] > 0 and row["speedup"] > 0 and row["roofline_fraction"] > 0
        # bf16 weights keep 8 bits of mantissa, int8 blocks ~7 bits (and quantized activations): the tiny
        # block's outputs (scale ~4) move by ~1e-2
        assert row["max_error"] < LOWP_ERROR.get(row["implementation"], 1e-4), row
        if row["implementation"].startswith("fusec"):  # (the tiny block's 8 rows take no BLAS GEMM)
            assert row["blas"] == "none", row


def test_report_records_machine_rooflines_and_cold_compile_times(report):
    out, data = report
    assert data["machine"]["bandwidth"]["best"] > 0 and data["machine"]["matmul_peak"]["best"] > 0
    assert data["roofline"]["decode"]["bound"] == "memory" and data["roofline"]["prefill"]["bound"] == "compute"
    assert set(data["compile_time"]["cold"]) == FUSEC_PROGRAMS
    assert all(t["compile_s"] > 0 for t in data["compile_time"]["cold"].values())
    assert data["compile_time"]["warm"] == {} and not data["compile_time"]["measured_warm"]
    assert (out / "bench_block.png").stat().st_size > 0


def test_warm_compile_subprocess_reports_every_fusec_program(bench, report):
    out, _ = report
    times = bench.warm_compile_times(bench.parse_args(SMOKE_ARGS), str(out / "cache"))
    assert set(times) == FUSEC_PROGRAMS, times
    assert all(t["compile_s"] > 0 and t["first_call_s"] >= 0 for t in times.values())


def test_torch_compile_failure_is_reported_not_raised(bench):
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("no kernel for this")

    compiled, info = bench.inductor_compile(Broken(), (torch.ones(2),), {})
    assert compiled is None and info["status"].startswith("failed: ") and "no kernel" in info["status"]


def test_unknown_backend_falls_back_to_reference(bench):
    block = bench.build_block("tiny")
    inputs, kwargs = bench.case_inputs(block.config, "decode", seq=4, past=3)
    compiled, used = bench.fusec_compile(block, inputs, kwargs, fuse=True, backend="no-such-backend")
    assert used == "reference"
    with torch.no_grad():
        torch.testing.assert_close(compiled(*inputs, **kwargs), block(*inputs, **kwargs), rtol=0, atol=1e-5)


def test_roofline_counts_decode_bytes_and_prefill_flops(bench):
    block = bench.build_block("tiny")
    machine = {"bandwidth": {"best": 1e9}, "matmul_peak": {"best": 1e9}}
    params = sum(p.numel() for p in block.parameters())
    decode = bench.roofline(block, "decode", seq=8, past=10, machine=machine)
    assert decode["bytes"] == 4 * params + 2 * 2 * 10 * 16 * 4
    prefill = bench.roofline(block, "prefill", seq=8, past=10, machine=machine)
    assert prefill["flops"] == 2 * params * 8 + 4 * 4 * 16 * (8 * 9 // 2)


# --- benchtools -----------------------------------------------------------------------------------------

def test_median_time_runs_warmup_plus_repeat():
    calls = []
    assert benchtools.median_time(lambda: calls.append(1), warmup=2, repeat=3) >= 0
    assert len(calls) == 5
    with pytest.raises(ValueError, match="repeat"):
        benchtools.median_time(lambda: None, repeat=0)


def test_format_table_aligns_and_marks_missing_values():
    text = benchtools.format_table([{"name": "a", "ms": 1.5}, {"name": "bb", "ms": None}],
                                   [("name", "name", ""), ("ms", "median ms", ".2f")])
    lines = text.splitlines()
    assert lines[0].split() == ["name", "median", "ms"] and lines[2].split() == ["a", "1.50"]
    assert lines[3].split() == ["bb", "-"] and len({len(line) for line in lines}) == 1


def test_set_threads_sets_torch_and_numba(monkeypatch):
    import numba
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        monkeypatch.setenv(var, "")  # so that monkeypatch restores what set_threads writes
    before = torch.get_num_threads()
    try:
        assert benchtools.set_threads(1) == 1
        assert torch.get_num_threads() == 1 and numba.get_num_threads() == 1
    finally:
        benchtools.set_threads(before)


def test_write_json_and_chart(tmp_path):
    path = benchtools.write_json(tmp_path / "sub" / "r.json", {"a": 1})
    data = json.loads(path.read_text())
    assert data.pop("run").keys() == {"date", "commit", "command"} and data == {"a": 1}
    pytest.importorskip("matplotlib")
    png = benchtools.write_bar_chart(tmp_path / "c.png", {"prefill": {"x": 1.0, "y": 2.0}}, "ms")
    assert png is not None and png.read_bytes()[:4] == b"\x89PNG"


def test_script_in_benchmarks_runs_the_same_benchmark():
    done = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--preset" in done.stdout


def test_generation_progress_writes_to_the_stderr_of_its_call(monkeypatch):
    """Bound at import, a default stream outlived the (captured) stderr it was: 'I/O operation on closed file'."""
    import io
    import sys

    from fusec.bench_generate import Progress
    now = io.StringIO()
    monkeypatch.setattr(sys, "stderr", now)
    assert Progress("x", 2).stream is now
