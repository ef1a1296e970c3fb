"""The choice between MKL's bf16 GEMM and widened weight tiles (backends/numba_cpu/bf16_gemm_choice.py):
measured once per machine and cache directory, kept for the next processes, overridable."""
from __future__ import annotations

import json

import pytest

from fusec.backends.numba_cpu import bf16_gemm_choice as choice
from fusec.backends.numba_cpu.mkl import gemm_bf16_mkl, gemm_mkl

GEMMS = (gemm_bf16_mkl, gemm_mkl)


@pytest.fixture
def machine(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSEC_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FUSEC_BF16_GEMM", raising=False)
    choice.measured_faster.cache_clear()
    measured = []
    monkeypatch.setattr(choice, "measure_ratio", lambda *gemms: measured.append(gemms) or ratio[0])
    ratio = [0.5]
    yield tmp_path / choice.MACHINE_FILE, measured, ratio
    choice.measured_faster.cache_clear()


def test_measured_once_then_read_from_the_machine_file(machine):
    path, measured, ratio = machine
    assert choice.bf16_gemm_faster("cpu-a", GEMMS) is True and len(measured) == 1
    assert json.loads(path.read_text())["bf16_gemm"] == {"key": "cpu-a", "ratio": 0.5}
    choice.measured_faster.cache_clear()  # as a new process
    ratio[0] = 2.0
    assert choice.bf16_gemm_faster("cpu-a", GEMMS) is True and len(measured) == 1  # the stored verdict holds
    assert choice.bf16_gemm_faster("cpu-b", GEMMS) is False and len(measured) == 2  # another machine measures


def test_a_damaged_machine_file_is_measured_again(machine):
    path, measured, ratio = machine
    path.write_text("{not json")
    ratio[0] = 0.95  # slower than FASTER: widened tiles
    assert choice.bf16_gemm_faster("cpu-a", GEMMS) is False and len(measured) == 1
    assert json.loads(path.read_text())["bf16_gemm"]["ratio"] == 0.95


def test_the_setting_decides_without_measuring(machine, monkeypatch):
    path, measured, ratio = machine
    for setting, want in (("mkl", True), ("widen", False)):
        monkeypatch.setenv("FUSEC_BF16_GEMM", setting)
        choice.measured_faster.cache_clear()
        assert choice.bf16_gemm_faster("cpu-a", GEMMS) is want
    assert not measured
    monkeypatch.setenv("FUSEC_BF16_GEMM", "fast")
    choice.measured_faster.cache_clear()
    with pytest.raises(ValueError, match="FUSEC_BF16_GEMM must be 'mkl' or 'widen'"):
        choice.bf16_gemm_faster("cpu-a", GEMMS)


def test_the_measurement_is_a_positive_ratio():
    assert choice.measure_ratio(*GEMMS, rounds=1) > 0
