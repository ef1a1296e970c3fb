"""Markdown tables from the benchmarks' JSON, so a published table is never typed by hand.

    python benchmarks/tables.py bench_out/bench_generate.json             # print the table
    python benchmarks/tables.py bench_out/*.json --update docs/benchmarks.md README.md

A table is made from one JSON file, that is from one run, and says which: its command, date and commit
(the `run` record `benchtools.write_json` adds). `--update` replaces, in each markdown file, the block
between `<!-- table: NAME -->` and `<!-- /table -->`; a file without that marker is left alone. NAME is
the JSON file's stem (`bench_generate`, `bench_block`, `bench_startup`, `bench_symbolic_block`, ...), or
the stem and a part for a benchmark with several tables (`bench_rdu.looping`, `bench_coe.switching`):
`RENDERERS` lists them all.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
import sys
from typing import Any, Callable

from fusec.rdu import tables as rdu_tables

Cells = list[list[str]]

__all__ = ["RENDERERS", "render", "render_parts", "render_report", "table_names", "update_markdown", "main"]


def _run_line(report: dict) -> str:
    # runs of bench_rdu before the shared run record kept their date and commit at the top level
    run = report.get("run") or {k: report[k] for k in ("date", "commit") if k in report}
    machine = report.get("machine")  # bench_rdu's is the modelled machine's name
    bandwidth = ((machine if isinstance(machine, dict) else {}).get("bandwidth") or {}).get("best")
    parts = [f"`{run.get('command', 'unknown command')}`", run.get("date", "undated"),
             f"commit `{run.get('commit') or 'unknown'}`"]
    if bandwidth:
        parts.append(f"memory bandwidth {bandwidth / 1e9:.1f} GB/s measured in the run")
    return "From " + ", ".join(parts) + "."


def _pivot(rows: list[dict], row_key: str, cell: Callable[[dict], str], header: str = "") -> Cells:
    """Rows by `row_key`, one column per implementation (in order of first appearance)."""
    names = list(dict.fromkeys(r["implementation"] for r in rows))
    keys = list(dict.fromkeys(r[row_key] for r in rows))
    table = [[header or row_key, *names]]
    for key in keys:
        found = {r["implementation"]: r for r in rows if r[row_key] == key}
        table.append([str(key)] + [cell(found[n]) if found.get(n, {}).get("status") == "ok" else "-"
                                   for n in names])
    return table


def _share(row: dict) -> str:
    fraction = row.get("roofline_fraction")
    if not isinstance(fraction, (int, float)):
        return ""
    return f" ({fraction:.0%})" if fraction >= 0.1 else f" ({fraction:.1%})"


def _generate(report: dict) -> Cells:
    return _pivot(report["results"], "model",
                  lambda r: f"{r['decode_tokens_per_s']:.0f} tok/s{_share(r)}")


def _block(report: dict) -> Cells:
    return _pivot(report["results"], "case", lambda r: f"{r['median_ms']:.2f} ms{_share(r)}")


def _startup(report: dict) -> Cells:
    warm = len(report["rows"][0]["warm_runs_s"]) if report["rows"] else 0
    waiting = all("cold_waiting_s" in r for r in report["rows"])  # (runs before 2026-12-01 have no such column)
    return [["to the first token", "cold"] + (["cold, both programs first"] if waiting else []) +
            [f"warm (median of {warm})"]] + [
        [r["model"], f"{r['cold_s']:.1f} s" + _prompt_by(r.get("cold", {}))] +
        ([f"{r['cold_waiting_s']:.1f} s"] if waiting else []) + [f"{r['warm_s']:.2f} s"] for r in report["rows"]]


def _prompt_by(cold: dict) -> str:
    """How a cold start's prompt ran while the workers compiled the prefill program, if it did."""
    return next((f" (prompt by {how})" for how in ("decode", "eager") if cold.get(f"prompts_by_{how}")), "")


def _startup_legend(report: dict) -> str:
    text = ("`compile_generator` and the first `generate` (5-token prompt, 1 new token), each run a new process "
            "with random weights: cold in a fresh cache directory, warm with the same one; importing torch and "
            "fusec is not counted.")
    if all("cold_waiting_s" in r for r in report["rows"]):
        text += (" Cold is the default: the prompt runs through the decode program if the workers are still "
                 "compiling the prefill program (\"prompt by decode\"), or in PyTorch eager for fp32 weights "
                 "(\"prompt by eager\"); \"both programs first\" is another fresh directory with "
                 "`background=False`.")
    return text


def _symbolic(report: dict) -> Cells:
    compiles = all("specialized_compile_s" in r for r in report["rows"])
    return [["tokens", "symbolic ms", "specialized ms", "ratio", "spread ms (sym / spec)"] +
            (["specialized compile s"] if compiles else [])] + [
        [str(r["tokens"]), f"{r['symbolic_ms']:.2f}", f"{r['specialized_ms']:.2f}", f"{r['ratio']:.3f}",
         f"{r['spread_symbolic_ms']:.1f} / {r['spread_specialized_ms']:.1f}"] +
        ([f"{r['specialized_compile_s']:.1f}"] if compiles else []) for r in report["rows"]]


def _symbolic_legend(report: dict) -> str:
    text = ("Medians of calls alternating between the one symbolic program and a program specialized to "
            "each length; the spread (max - min) says how noisy the machine was.")
    if "symbolic_compile_s" in report:
        # runs before the warm-up existed timed the symbolic compile as their process's first
        when = ("after a warm-up compile, as each specialized one" if report.get("warm_up_s")
                else "first in its process")
        text += f" The symbolic program compiled in {report['symbolic_compile_s']:.1f} s ({when})."
    if report.get("new_process_compiles"):
        runs = report["new_process_compiles"]
        text += (f" Each compiled in a new process with an empty kernel cache ({len(runs[0]['seconds'])} rounds, "
                 "alternating): " + "; ".join(
                     (f"{r['tokens']} token{'s' if r['tokens'] > 1 else ''} " if r["tokens"] else "symbolic ")
                     + " / ".join(f"{t:.1f}" for t in r["seconds"]) + " s" for r in runs) + ".")
    return text


def _trace_layers(report: dict) -> Cells:
    return [["model", "program", "layers", "whole export", "two layers + expansion", "ratio"]] + [
        [r["model"], r["program"], str(r["layers"]), f"{r['whole_s']:.2f} s",
         f"{r['two_layers_s']:.2f} + {r['expand_s']:.2f} s", f"{r['ratio']:.2f}"] for r in report["rows"]]


def _accuracy(report: dict) -> Cells:
    return [["model", "weights", "greedy = fp32", "max logit error", "relative to the largest logit"]] + [
        [r["model"], r["weights"], f"{r['agreement']:.1%}", f"{r['max_logit_error']:.1e}", f"{r['relative_error']:.2%}"]
        for r in report["rows"]]


def _accuracy_legend(report: dict) -> str:
    return (f"Random weights (seed {report['seed']}), {report['steps']} greedy steps after a prompt of "
            f"{report['prompt_len']} tokens, teacher-forced: the share of positions whose greedy token "
            "equals fp32 eager's, and the largest logit error.")


def _load(report: dict) -> str:
    load = report.get("load_average")
    return "" if load is None else f"; 1-minute load average {load:.1f} as it started"


def _gemm(report: dict) -> Cells:
    return _pivot(report["results"], "shape", lambda r: f"{r['gflop_s']:.1f}, {r['gflop_per_cpu_s']:.0f}",
                  header="M x K x N")


def _gemm_legend(report: dict) -> str:
    return (f"GFLOP/s of wall time, then GFLOP per CPU-second of the process; {report['threads']} threads, "
            f"medians of {report['repeat']} rounds alternating between the libraries{_load(report)}.")


def _matvec(report: dict) -> Cells:
    return [["weight", "N x K", "fp32", "bf16", "int8", "bf16/fp32 bytes/s", "int8 speedup"]] + [
        [r["shape"], f"{r['n']}x{r['k']}", f"{r['fp32_best_gb_s']:.1f}", f"{r['bf16_best_gb_s']:.1f}",
         f"{r['int8_best_gb_s']:.1f}", f"{r['bf16_vs_fp32_bytes']:.2f}", f"{r['int8_vs_fp32_time']:.2f}x"]
        for r in report["results"]]


def _matvec_legend(report: dict) -> str:
    copies = (f"weights cycled over {report['footprint_mb']:g} MB of copies" if report["footprint_mb"]
              else "one copy of each matrix (cache-resident when it fits)")
    return (f"Best of {report['rounds']} rounds in GB/s of weights read, {report['threads']} Numba thread(s), "
            f"{copies}; read bandwidth "
            f"{report['bandwidth']['best'] / 1e9:.1f} GB/s measured in the run{_load(report)}. int8 speedup: "
            "int8's weights per second over fp32's.")


def _coe(report: dict) -> Cells:
    from fusec.coe.bench import report_rows  # loads torch and the CoE: only this table needs them
    return [["measure", "value"]] + [[r["what"], r["value"]] for r in report_rows(report)]


def _coe_legend(report: dict) -> str:
    c, m = report["config"], report["measured"]
    return (f"{c['experts']} {c['preset']}-sized experts (random weights, bf16), an HBM budget of "
            f"{c['hbm_experts']}, {m['requests']} requests of Zipf({c['zipf']}) popularity, {m['tokens_per_request']} "
            f"new tokens each, greedy, {c['policy']}, prefetch {'on' if c['prefetch'] else 'off'}, {m['threads']} "
            f"threads; the naive baseline runs {report['baseline']['requests']} requests of the same stream.")


def _coe_switching(report: dict) -> Cells:
    from fusec.coe.switching import COLUMNS, table_rows  # loads the CoE package: only this table needs it
    header = [h.replace(" N ", f" {report['measured']['tokens_per_request']} ") for _, h, _ in COLUMNS]
    return [header] + [[r[key] for key, _, _ in COLUMNS] for r in table_rows(report["rdu"])]


Part = tuple[Callable[[dict], Cells | None], str | Callable[[dict], str]]
# per JSON file stem: its tables by marker name, each (its cells, or None when the run did not compute it;
# its legend: text or a function of the report)
RENDERERS: dict[str, dict[str, Part]] = {
    "bench_generate": {"bench_generate": (_generate, "Decode tokens/s (batch 1, greedy) and, in brackets, its "
                                                     "share of the bandwidth roofline.")},
    "bench_block": {"bench_block": (_block, "Median time per call and, in brackets, its share of the roofline "
                                            "(decode: bandwidth; prefill: matmul peak, bf16's own "
                                            "where measured).")},
    "bench_startup": {"bench_startup": (
        _startup, _startup_legend)},
    "bench_symbolic_block": {"bench_symbolic_block": (_symbolic, _symbolic_legend)},
    "bench_symbolic_generator": {"bench_symbolic_generator": (_symbolic, _symbolic_legend)},
    "bench_trace_layers": {"bench_trace_layers": (
        _trace_layers, "torch.export of the whole program against the program over the model's first two "
                       "layers and its IR expanded to all of them; one process after a first export of each, "
                       "the two alternating, medians.")},
    "bench_accuracy": {"bench_accuracy": (_accuracy, _accuracy_legend)},
    "bench_gemm": {"bench_gemm": (_gemm, _gemm_legend)},
    "bench_matvec": {"bench_matvec": (_matvec, _matvec_legend)},
    "bench_rdu": {
        "bench_rdu": (rdu_tables.paper, lambda r: "Small shapes on the test grid: a smoke run, not a comparison."
                      if r.get("small") else "An analytical model: nothing here is measured on hardware."),
        "bench_rdu.looping": (rdu_tables.looping, "Decode with kernel looping off and on, hardware orchestration "
                                                  "both."),
        "bench_rdu.fit": (rdu_tables.fit, rdu_tables.fit_legend),
        "bench_rdu.sensitivity": (rdu_tables.sensitivity, "Figures each unpublished parameter moves over its "
                                                          "range.")},
    "bench_coe": {"bench_coe": (_coe, _coe_legend),
                  "bench_coe.switching": (_coe_switching, "The same switching under the RDU model, after the "
                                                          "CPU's measured row; miss rate as measured.")},
}


def table_names() -> list[str]:
    """Every marker name a renderer writes."""
    return [name for parts in RENDERERS.values() for name in parts]


def _markdown(cells: Cells) -> list[str]:
    lines = ["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(cells[0])]
    return lines + ["| " + " | ".join(row) + " |" for row in cells[1:]]


def _check(stem: str) -> None:
    if stem not in RENDERERS:
        raise ValueError(f"no table for {stem}.json: expected one of "
                         f"{', '.join(n + '.json' for n in RENDERERS)}")


def render_parts(stem: str, report: dict[str, Any]) -> dict[str, str]:
    """The markdown tables (each with its run line and legend) of one benchmark's report, by marker name;
    a table the run did not compute is left out."""
    _check(stem)
    tables = {}
    for name, (build, legend) in RENDERERS[stem].items():
        cells = build(report)
        if cells is None:
            continue
        legend = legend(report) if callable(legend) else legend
        tables[name] = "\n".join([" ".join(filter(None, [_run_line(report), legend])), "", *_markdown(cells)])
    return tables


def render_report(stem: str, report: dict[str, Any]) -> str:
    """All the tables of one benchmark's report (`stem`: its JSON file's, e.g. "bench_rdu")."""
    return "\n\n".join(render_parts(stem, report).values())


def render(path: str | Path) -> str:
    """The markdown tables (each with its run line and legend) of one benchmark JSON file."""
    path = Path(path)
    _check(path.stem)  # before reading: the name says what is wrong
    return render_report(path.stem, json.loads(path.read_text()))


def update_markdown(markdown: str, name: str, table: str) -> str:
    """`markdown` with the block between `<!-- table: name -->` and `<!-- /table -->` replaced by `table`
    (unchanged when the marker is absent)."""
    pattern = re.compile(rf"(<!-- table: {re.escape(name)} -->\n).*?(<!-- /table -->)", re.S)
    return pattern.sub(lambda m: m.group(1) + table + "\n" + m.group(2), markdown)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Markdown tables from benchmark JSON files.")
    p.add_argument("json", nargs="+", help=f"JSON files of the benchmarks: {', '.join(n + '.json' for n in RENDERERS)}")
    p.add_argument("--update", nargs="*", default=[], metavar="MARKDOWN",
                   help="replace the marked table blocks in these files instead of printing")
    args = p.parse_args(argv)
    tables, missing = {}, []
    for f in map(Path, args.json):
        _check(f.stem)
        parts = render_parts(f.stem, json.loads(f.read_text()))
        tables.update(parts)
        missing += [name for name in RENDERERS[f.stem] if name not in parts]
    if not args.update:
        print("\n\n".join(tables.values()))
    for md in map(Path, args.update):
        text = md.read_text()
        for name, table in tables.items():
            text = update_markdown(text, name, table)
        for name in missing:
            if f"<!-- table: {name} -->" in text:
                print(f"{md}: table {name} left as it was: its run did not compute it", file=sys.stderr)
        md.write_text(text)
    return 0
