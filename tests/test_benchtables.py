"""Benchmark tables come from the benchmarks' JSON: the run record is written, the table shows the JSON's
numbers and its run, and `--update` replaces only the marked block."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from fusec.benchtables import main, render, update_markdown
from fusec.benchtools import write_json

REPORT = {"machine": {"bandwidth": {"best": 36.6e9}},
          "results": [
              {"model": "stories15M", "implementation": "eager", "status": "ok", "decode_tokens_per_s": 185.2,
               "roofline_fraction": 0.31},
              {"model": "stories15M", "implementation": "torch.compile", "status": "skipped"},
              {"model": "stories15M", "implementation": "fusec fp32", "status": "ok",
               "decode_tokens_per_s": 431.7, "roofline_fraction": 0.74},
              {"model": "stories42M", "implementation": "fusec fp32", "status": "ok",
               "decode_tokens_per_s": 125.0, "roofline_fraction": 0.052}]}


def test_write_json_records_the_run(tmp_path):
    data = json.loads(write_json(tmp_path / "bench_generate.json", REPORT).read_text())
    run = data["run"]
    assert run["date"].endswith("UTC") and run["command"].strip()
    assert run["commit"] is None or len(run["commit"].split("+")[0]) >= 7
    assert data["results"] == REPORT["results"]


def test_table_shows_the_json_numbers_and_its_run(tmp_path):
    report = {"run": {"date": "2026-11-30 01:00 UTC", "commit": "abc1234", "command": "fusec bench generate"},
              **REPORT}
    path = tmp_path / "bench_generate.json"
    path.write_text(json.dumps(report))
    table = render(path)
    assert "`fusec bench generate`, 2026-11-30 01:00 UTC, commit `abc1234`, memory bandwidth 36.6 GB/s" in table
    lines = table.splitlines()
    assert "| model | eager | torch.compile | fusec fp32 |" in lines
    assert "| stories15M | 185 tok/s (31%) | - | 432 tok/s (74%) |" in lines
    assert "| stories42M | - | - | 125 tok/s (5.2%) |" in lines


def test_startup_table_shows_cold_and_the_warm_median(tmp_path):
    report = {"run": {"date": "2026-11-30 06:04 UTC", "commit": "8e11c85", "command": "python bench_startup.py"},
              "rows": [{"model": "stories15M", "cold_s": 28.61, "warm_s": 1.032, "warm_runs_s": [1.05, 1.032, 1.01]}]}
    path = tmp_path / "bench_startup.json"
    path.write_text(json.dumps(report))
    lines = render(path).splitlines()
    assert lines[0].startswith("From `python bench_startup.py`, 2026-11-30 06:04 UTC, commit `8e11c85`.")
    assert "| to the first token | cold | warm (median of 3) |" in lines
    assert "| stories15M | 28.6 s | 1.03 s |" in lines


def test_update_replaces_only_the_marked_block(tmp_path):
    path = tmp_path / "bench_generate.json"
    path.write_text(json.dumps(REPORT))
    md = tmp_path / "doc.md"
    md.write_text("before\n<!-- table: bench_generate -->\nold table\n<!-- /table -->\nafter\n"
                  "<!-- table: bench_block -->\nkept\n<!-- /table -->\n")
    assert main([str(path), "--update", str(md)]) == 0
    text = md.read_text()
    assert "old table" not in text and "432 tok/s" in text
    assert text.startswith("before\n") and "after\n<!-- table: bench_block -->\nkept\n" in text
    assert update_markdown("no marker", "bench_generate", "x") == "no marker"


def test_unknown_json_names_what_is_expected(tmp_path):
    path = tmp_path / "other.json"
    path.write_text("{}")
    with pytest.raises(ValueError, match="no table for other.json: expected one of bench_generate.json"):
        render(path)


def test_symbolic_tables_show_compile_times_and_have_their_place_in_the_docs(tmp_path):
    row = {"tokens": 5, "symbolic_ms": 1.0, "specialized_ms": 0.95, "ratio": 1.0526, "spread_symbolic_ms": 0.1,
           "spread_specialized_ms": 0.2, "specialized_compile_s": 8.04}
    report = {"run": {"date": "2026-11-30 11:00 UTC", "commit": "abc1234", "command": "python bench_symbolic.py"},
              "what": "generator", "symbolic_compile_s": 12.34, "warm_up_s": 3.0, "programs": 1, "rows": [row]}
    path = tmp_path / "bench_symbolic_generator.json"
    path.write_text(json.dumps(report))
    table = render(path)
    assert "| 5 | 1.00 | 0.95 | 1.053 | 0.1 / 0.2 | 8.0 |" in table.splitlines()
    assert "The symbolic program compiled in 12.3 s (after a warm-up compile, as each specialized one)." in table
    path.write_text(json.dumps({**report, "warm_up_s": 0.0}))  # a run without the warm-up says so
    assert "compiled in 12.3 s (first in its process)" in render(path)
    docs = (Path(__file__).resolve().parent.parent / "docs" / "symbolic.md").read_text()
    for name in ("bench_symbolic_block", "bench_symbolic_generator"):  # `--update docs/symbolic.md` fills both
        assert "NEW TABLE" in update_markdown(docs, name, "NEW TABLE"), f"docs/symbolic.md has no {name} marker"
