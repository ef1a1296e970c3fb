"""The compile-time benchmark runs end to end on the tiny causal LM and reports every generated function.

Nothing here asserts a timing: the machines these tests run on are shared and noisy."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_compile.py"


def test_bench_compile_reports_each_program_s_bodies(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_compile", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["tiny", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "bench_compile.json").read_text())
    assert report["run"]["commit"] and len(report["rows"]) == 1
    row = report["rows"][0]
    bodies = row["bodies"]
    kinds = {(b["kind"], program) for b in bodies for program in b["programs"]}
    assert ("attention", "decode b1") in kinds and ("attention", "prefill b1") in kinds
    assert ("matmul", "decode b1") in kinds and ("matmul", "prefill b1") in kinds
    assert all(b["seconds"] > 0 and b["programs"] for b in bodies)
    assert set(row["phases"]) == {"decode b1", "prefill b1"}
    assert "over" in capsys.readouterr().out
