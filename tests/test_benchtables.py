"""Benchmark tables come from the benchmarks' JSON: the run record is written, the table shows the JSON's
numbers and its run, and `--update` replaces only the marked block."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fusec.benchtables import main, render, render_report, table_names, update_markdown
from fusec.benchtools import write_json

ROOT = Path(__file__).resolve().parent.parent

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


def test_startup_table_sets_the_cold_start_waiting_for_both_programs_beside(tmp_path):
    report = {"run": {"date": "2026-12-01 09:00 UTC", "commit": "1234567", "command": "python bench_startup.py"},
              "rows": [{"model": "stories15M", "cold_s": 9.31, "cold_waiting_s": 12.44, "warm_s": 0.81,
                        "warm_runs_s": [0.8, 0.81, 0.9], "cold": {"prompts_by_decode": 1}}]}
    path = tmp_path / "bench_startup.json"
    path.write_text(json.dumps(report))
    lines = render(path).splitlines()
    assert "`background=False`" in lines[0]
    assert "| to the first token | cold | cold, both programs first | warm (median of 3) |" in lines
    assert "| stories15M | 9.3 s (prompt by decode) | 12.4 s | 0.81 s |" in lines
    report["rows"][0]["cold"] = {"prompts_by_decode": 0, "prompts_by_eager": 1}
    path.write_text(json.dumps(report))
    assert "| stories15M | 9.3 s (prompt by eager) | 12.4 s | 0.81 s |" in render(path).splitlines()


def test_trace_layers_table_sets_the_whole_export_beside_two_layers_and_expansion(tmp_path):
    report = {"run": {"date": "2026-12-01 05:40 UTC", "commit": "421878b", "command": "python bench_trace_layers.py"},
              "rows": [{"model": "tinyllama_1b", "program": "prefill", "layers": 22, "whole_s": 11.82,
                        "two_layers_s": 1.46, "expand_s": 0.14, "ratio": 0.135}]}
    path = tmp_path / "bench_trace_layers.json"
    path.write_text(json.dumps(report))
    lines = render(path).splitlines()
    assert lines[0].startswith("From `python bench_trace_layers.py`, 2026-12-01 05:40 UTC, commit `421878b`.")
    assert "| tinyllama_1b | prefill | 22 | 11.82 s | 1.46 + 0.14 s | 0.14 |" in lines


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
    docs = (ROOT / "docs" / "symbolic.md").read_text()
    for name in ("bench_symbolic_block", "bench_symbolic_generator"):  # `--update docs/symbolic.md` fills both
        assert "NEW TABLE" in update_markdown(docs, name, "NEW TABLE"), f"docs/symbolic.md has no {name} marker"


RUN = {"date": "2026-11-30 19:00 UTC", "commit": "abc1234", "command": "python benchmarks/bench_x.py"}


def _render(tmp_path, stem: str, report: dict) -> list[str]:
    path = tmp_path / f"{stem}.json"
    path.write_text(json.dumps({"run": RUN, **report}))
    return render(path).splitlines()


def test_accuracy_table(tmp_path):
    row = {"model": "stories15M", "weights": "int8", "agreement": 0.984375, "max_logit_error": 0.02512,
           "relative_error": 0.01318}
    lines = _render(tmp_path, "bench_accuracy", {"steps": 64, "prompt_len": 8, "backend": "numba", "seed": 0,
                                                 "rows": [row]})
    assert lines[0].startswith("From `python benchmarks/bench_x.py`, 2026-11-30 19:00 UTC, commit `abc1234`.")
    assert "64 greedy steps after a prompt of 8 tokens" in lines[0]
    assert "| model | weights | greedy = fp32 | max logit error | relative to the largest logit |" in lines
    assert "| stories15M | int8 | 98.4% | 2.5e-02 | 1.32% |" in lines


def test_gemm_table_pivots_libraries_and_names_the_load(tmp_path):
    rows = [{"shape": "256 x 2048 x 5632", "implementation": name, "status": "ok", "gflop_s": wall,
             "gflop_per_cpu_s": cpu}
            for name, wall, cpu in (("OpenBLAS sgemm", 23.14, 70.2), ("MKL sgemm", 37.9, 115.4))]
    lines = _render(tmp_path, "bench_gemm", {"threads": 2, "repeat": 7, "load_average": 13.52, "results": rows})
    assert "2 threads, medians of 7 rounds" in lines[0] and "load average 13.5" in lines[0]
    assert "| M x K x N | OpenBLAS sgemm | MKL sgemm |" in lines
    assert "| 256 x 2048 x 5632 | 23.1, 70 | 37.9, 115 |" in lines


def test_matvec_table_shows_the_best_rounds(tmp_path):
    row = {"shape": "stories110M qkvo", "n": 768, "k": 768, "fp32_gb_s": 20.0, "fp32_best_gb_s": 28.44,
           "bf16_gb_s": 20.0, "bf16_best_gb_s": 25.7, "int8_gb_s": 9.0, "int8_best_gb_s": 10.7,
           "bf16_vs_fp32_bytes": 0.9037, "int8_vs_fp32_time": 1.3377}
    lines = _render(tmp_path, "bench_matvec", {"threads": 1, "rounds": 30, "footprint_mb": 0.0, "load_average": 11.0,
                                               "bandwidth": {"best": 5.4e9}, "results": [row]})
    assert "Best of 30 rounds" in lines[0] and "read bandwidth 5.4 GB/s" in lines[0]
    assert "| stories110M qkvo | 768x768 | 28.4 | 25.7 | 10.7 | 0.90 | 1.34x |" in lines


RDU = {"small": False, "machine": "sn40l",
       "rows": [{"figure": "decode tok/s, llama3.1-8b 8K, 16 sockets", "source": "SN40L Table IV", "config": "HO",
                 "paper": 1042, "unit": "tok/s", "kind": "value", "model": 1050.4, "ratio": 1.008, "within": True,
                 "use": "fit", "note": ""}],
       "looping": [{"model": "llama3.1-8b", "sockets": 16, "context": 4096, "unlooped_tok_s": 1074.2,
                    "looped_tok_s": 1779.0, "gain": 1.656, "unlooped_hbm_util": 0.54, "looped_hbm_util": 0.9}],
       "fit": {"call_sync_s": {"value": 1.13e-5, "default": 1.1e-5, "target": "SN40L Table IV"}},
       "kl_would_need": {"call_sync_s": 29.3e-6, "kl_geomean": 1.6, "table_iv_8b_tok_s": 650.0}}


def test_rdu_tables_come_from_its_json_in_parts(tmp_path, capsys):
    lines = _render(tmp_path, "bench_rdu", RDU)
    assert "| decode tok/s, llama3.1-8b 8K, 16 sockets | SN40L Table IV | HO | 1042 tok/s | 1.05e+03 | 1.01 | yes " \
           "| fit |  |" in lines
    assert "| llama3.1-8b | 16 | 4096 | 1,074 | 1,779 | 1.66x | 54% | 90% |" in lines
    assert "| call_sync_s | 1.13e-05 | 1.1e-05 | SN40L Table IV |" in lines
    assert any("would need call_sync_s = 29.3 us" in line for line in lines)
    # a run without the sensitivity leaves its block as it was, and says so
    md = tmp_path / "rdu.md"
    md.write_text("<!-- table: bench_rdu.fit -->\nold fit\n<!-- /table -->\n"
                  "<!-- table: bench_rdu.sensitivity -->\nold sensitivity\n<!-- /table -->\n")
    assert main([str(tmp_path / "bench_rdu.json"), "--update", str(md)]) == 0
    text = md.read_text()
    assert "old fit" not in text and "1.13e-05" in text and "old sensitivity" in text
    assert "table bench_rdu.sensitivity left as it was" in capsys.readouterr().err
    # runs before the shared run record kept their date and commit at the top level
    old = render_report("bench_rdu", {**RDU, "date": "2026-11-30", "commit": "404227e"})
    assert old.startswith("From `unknown command`, 2026-11-30, commit `404227e`.")


def test_bench_rdu_markdown_is_the_same_renderer(tmp_path, capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_rdu", ROOT / "benchmarks" / "bench_rdu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    path = tmp_path / "run.json"  # --markdown reads a JSON file of any name
    path.write_text(json.dumps({"run": RUN, **RDU}))
    assert bench.main(["--markdown", str(path)]) == 0
    assert capsys.readouterr().out.strip() == render_report("bench_rdu", {"run": RUN, **RDU})


def test_coe_tables_show_the_run_and_the_modelled_switching(tmp_path):
    from fusec.coe.switching import compare
    measured = dict(requests=200, tokens_per_request=64, tokens_per_s=451.2, hit_rate=0.995,
                    outcomes={"hit": 107, "prefetched": 92, "miss": 1}, switches=192, switch_p50_s=3.4e-3,
                    switch_p99_s=9.1e-3, miss_switch_p50_s=0.05, miss_switch_p99_s=0.05, generate_median_s=0.111,
                    loads=93, evictions=73, prefetches=92, prefetches_used=92, routing_accuracy=0.98,
                    route_confidence_mean=0.87, expert_bytes=29 << 20, hbm_bytes=594 << 20,
                    peak_resident_bytes=580 << 20, rss_growth_bytes=582 << 20, threads=2, ddr_bytes=4346 << 20,
                    sram_bytes=51 << 20, switch_fraction_p50=0.031, switch_fraction_p99=0.082, memory_ok=True,
                    naive_tokens_per_s=132.0, speedup_vs_naive=3.42)
    report = {"measured": measured, "baseline": {"requests": 12, "tokens_per_s": 132.0},
              "config": {"experts": 150, "hbm_experts": 20, "preset": "stories15M", "zipf": 1.1, "policy": "lru",
                         "prefetch": True},
              "rdu": compare(29 << 20, 30 << 20, 64, 0.005, measured={"switch_p50_s": 3.4e-3, "switch_p99_s": 9.1e-3})}
    lines = _render(tmp_path, "bench_coe", report)
    assert "| fusec CoE tokens/s | 451 |" in lines and "| hit rate (expert resident when asked for) | 99.5% |" in lines
    assert "150 stories15M-sized experts" in lines[0] and "naive baseline runs 12 requests" in lines[0]
    assert "| platform | switch (ms) | decode (ms/token) | tokens/s | switch / 64 tokens |" in lines
    assert "| this CPU (measured) | 3.40 (p99 9.10) | - | - | - |" in lines
    assert sum(line.startswith("From `python benchmarks/bench_x.py`") for line in lines) == 2  # each names its run


MARKER = re.compile(r"^<!-- table: (\S+) -->$", re.M)


def _docs() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", _docs(), ids=lambda p: p.name)
def test_every_table_marker_has_a_renderer(doc):
    unknown = set(MARKER.findall(doc.read_text())) - set(table_names())
    assert not unknown, f"{doc.name} marks tables no renderer writes: {', '.join(sorted(unknown))}"


@pytest.mark.parametrize("name", ["benchmarks.md", "rdu-model.md"])
def test_benchmark_docs_have_no_table_outside_markers(name):
    """Every table in these pages is a benchmark's, so each is written from its run's JSON."""
    inside, stray = False, []
    for number, line in enumerate((ROOT / "docs" / name).read_text().splitlines(), 1):
        if MARKER.match(line.strip()):
            inside = True
        elif line.strip() == "<!-- /table -->":
            inside = False
        elif line.startswith("|") and not inside:
            stray.append(number)
    assert not stray, f"docs/{name} has table lines outside <!-- table: NAME --> markers: lines {stray}"
