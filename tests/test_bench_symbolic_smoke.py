"""A smoke run of benchmarks/bench_symbolic.py: the symbolic program against specialized ones on the tiny
block at two lengths; its JSON has a row per length and renders as a table with the compile times, those
in processes of their own too."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from fusec.benchtables import render

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_symbolic.py"


def test_symbolic_benchmark_writes_a_row_per_length(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_symbolic", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    path = script.main(["block", "tiny", "--lengths", "1,5", "--upper", "8", "--repeat", "1", "--out", str(tmp_path),
                        "--new-process-rounds", "1"])
    report = json.loads(path.read_text())
    assert path.name == "bench_symbolic_block.json" and report["programs"] == 1
    assert [r["tokens"] for r in report["rows"]] == [1, 5]
    assert all(r["symbolic_ms"] > 0 and r["specialized_ms"] > 0 for r in report["rows"])
    # the compiles are timed after a warm-up (the process's first compile pays for imports and helpers),
    # and the table shows them
    assert report["warm_up_s"] > 0 and report["symbolic_compile_s"] > 0
    table = render(path)
    assert "| 5 | " in table and "specialized compile s |" in table
    assert f"compiled in {report['symbolic_compile_s']:.1f} s (after a warm-up compile" in table
    # and each program's compile in a process of its own, with an empty kernel cache
    fresh = report["new_process_compiles"]
    assert [r["tokens"] for r in fresh] == [None, 1, 5] and all(len(r["seconds"]) == 1 for r in fresh)
    assert all(r["seconds"][0] > r["phases"][0]["trace"] > 0 for r in fresh)
    assert f"symbolic {fresh[0]['seconds'][0]:.1f} s; 1 token {fresh[1]['seconds'][0]:.1f} s; 5 tokens" in table
