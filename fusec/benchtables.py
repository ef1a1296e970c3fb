"""Markdown tables from the benchmarks' JSON, so a published table is never typed by hand.

    python benchmarks/tables.py bench_out/bench_generate.json             # print the table
    python benchmarks/tables.py bench_out/*.json --update docs/benchmarks.md README.md

A table is made from one JSON file, that is from one run, and says which: its command, date and commit
(the `run` record `benchtools.write_json` adds). `--update` replaces, in each markdown file, the block
between `<!-- table: NAME -->` and `<!-- /table -->`, where NAME is the JSON file's stem
(`bench_generate`, `bench_block`, `bench_startup`, `bench_symbolic_block`, ...); a file without that
marker is left alone.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any, Callable

__all__ = ["render", "update_markdown", "main"]


def _run_line(report: dict) -> str:
    run = report.get("run") or {}
    bandwidth = ((report.get("machine") or {}).get("bandwidth") or {}).get("best")
    parts = [f"`{run.get('command', 'unknown command')}`", run.get("date", "undated"),
             f"commit `{run.get('commit') or 'unknown'}`"]
    if bandwidth:
        parts.append(f"memory bandwidth {bandwidth / 1e9:.1f} GB/s measured in the run")
    return "From " + ", ".join(parts) + "."


def _pivot(rows: list[dict], row_key: str, cell: Callable[[dict], str]) -> list[list[str]]:
    """Rows by `row_key`, one column per implementation (in order of first appearance)."""
    names = list(dict.fromkeys(r["implementation"] for r in rows))
    keys = list(dict.fromkeys(r[row_key] for r in rows))
    table = [[row_key, *names]]
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


def _generate(report: dict) -> list[list[str]]:
    return _pivot(report["results"], "model",
                  lambda r: f"{r['decode_tokens_per_s']:.0f} tok/s{_share(r)}")


def _block(report: dict) -> list[list[str]]:
    return _pivot(report["results"], "case", lambda r: f"{r['median_ms']:.2f} ms{_share(r)}")


def _startup(report: dict) -> list[list[str]]:
    warm = len(report["rows"][0]["warm_runs_s"]) if report["rows"] else 0
    return [["to the first token", "cold", f"warm (median of {warm})"]] + [
        [r["model"], f"{r['cold_s']:.1f} s", f"{r['warm_s']:.2f} s"] for r in report["rows"]]


def _symbolic(report: dict) -> list[list[str]]:
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
    return text

# per JSON file stem: (the table's cells, its legend: text or a function of the report)
RENDERERS: dict[str, tuple[Callable[[dict], list[list[str]]], str | Callable[[dict], str]]] = {
    "bench_generate": (_generate, "Decode tokens/s (batch 1, greedy) and, in brackets, its share of the "
                                  "bandwidth roofline."),
    "bench_block": (_block, "Median time per call and, in brackets, its share of the roofline (decode: "
                            "bandwidth; prefill: matmul peak)."),
    "bench_startup": (_startup, "`compile_generator` and the first `generate` (5-token prompt, 1 new token), "
                                "each run a new process with random weights: cold in a fresh cache directory, "
                                "warm with the same one; importing torch and fusec is not counted."),
    "bench_symbolic_block": (_symbolic, _symbolic_legend),
    "bench_symbolic_generator": (_symbolic, _symbolic_legend),
}


def render(path: str | Path) -> str:
    """The markdown table (with its run line and legend) of one benchmark JSON file."""
    path = Path(path)
    if path.stem not in RENDERERS:
        raise ValueError(f"no table for {path.name}: expected one of "
                         f"{', '.join(n + '.json' for n in RENDERERS)}")
    report: dict[str, Any] = json.loads(path.read_text())
    build, legend = RENDERERS[path.stem]
    legend = legend(report) if callable(legend) else legend
    cells = build(report)
    lines = ["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(cells[0])]
    lines += ["| " + " | ".join(row) + " |" for row in cells[1:]]
    return "\n".join([_run_line(report) + " " + legend, "", *lines])


def update_markdown(markdown: str, name: str, table: str) -> str:
    """`markdown` with the block between `<!-- table: name -->` and `<!-- /table -->` replaced by `table`
    (unchanged when the marker is absent)."""
    pattern = re.compile(rf"(<!-- table: {re.escape(name)} -->\n).*?(<!-- /table -->)", re.S)
    return pattern.sub(lambda m: m.group(1) + table + "\n" + m.group(2), markdown)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Markdown tables from benchmark JSON files.")
    p.add_argument("json", nargs="+", help="bench_generate.json, bench_block.json, bench_startup.json")
    p.add_argument("--update", nargs="*", default=[], metavar="MARKDOWN",
                   help="replace the marked table blocks in these files instead of printing")
    args = p.parse_args(argv)
    tables = {Path(f).stem: render(f) for f in args.json}
    if not args.update:
        print("\n\n".join(tables.values()))
    for md in map(Path, args.update):
        text = md.read_text()
        for name, table in tables.items():
            text = update_markdown(text, name, table)
        md.write_text(text)
    return 0
