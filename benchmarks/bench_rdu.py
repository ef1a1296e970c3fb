"""The RDU model against the SN40L and kernel-looping papers: paper-vs-model table, kernel looping side by
side, calibration fit and sensitivity.

    python benchmarks/bench_rdu.py                        # everything (~10 min: ~40 placements of 7B-405B blocks)
    python benchmarks/bench_rdu.py --no-sensitivity --no-fit
    python benchmarks/bench_rdu.py --markdown bench_out/bench_rdu.json   # the docs' tables from a run's JSON
    python benchmarks/tables.py bench_out/bench_rdu.json --update docs/rdu-model.md   # ... written into the docs

Rows and configurations: `fusec/rdu/paper.py`; fit and sensitivity: `fusec/rdu/calibrate.py`. No
number here is measured on hardware: every model number is the analytical model's, on the machine
defaults of `fusec/machines.py` (sn40l). Writes bench_rdu.json and bench_rdu.png to --out.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

from fusec.benchtables import render_report
from fusec.benchtools import format_table, run_record, write_json
from fusec.machines import get_machine
from fusec.rdu import paper as rdu_paper

LOOP_COLUMNS = [("model", "model", ""), ("sockets", "sockets", "d"), ("context", "context", "d"),
                ("unlooped_tok_s", "not looped tok/s", ",.0f"), ("looped_tok_s", "looped tok/s", ",.0f"),
                ("gain", "gain", ".2f"), ("unlooped_hbm_util", "HBM % not looped", ".0%"),
                ("looped_hbm_util", "HBM % looped", ".0%")]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", nargs="+", default=list(rdu_paper.SECTIONS), choices=list(rdu_paper.SECTIONS))
    p.add_argument("--small", action="store_true",
                   help="small widths and sequences on the test grid (a smoke run, not a comparison)")
    p.add_argument("--no-fit", action="store_true", help="skip the calibration fit")
    p.add_argument("--no-sensitivity", action="store_true", help="skip the sensitivity table")
    p.add_argument("--out", default="bench_out", help="directory for bench_rdu.json and bench_rdu.png")
    p.add_argument("--markdown", metavar="JSON", help="print the docs' tables from a bench_rdu.json and exit")
    return p.parse_args(argv)


def chart(data: dict, path: Path) -> Path | None:
    """Model / paper per figure (log scale, the +-25% band shaded) and the looping gains side by side."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = data["rows"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(15, max(5, 0.28 * len(rows))),
                               gridspec_kw={"width_ratios": [3, 2]})
    y = range(len(rows))
    a.barh(list(y), [r["ratio"] for r in rows], color=["tab:green" if r["within"] else "tab:red" for r in rows])
    a.axvspan(0.75, 1.25, color="grey", alpha=0.2)
    a.axvline(1.0, color="black", lw=0.8)
    a.set_xscale("log")
    a.set_yticks(list(y), [r["figure"] for r in rows], fontsize=7)
    a.invert_yaxis()
    a.set_xlabel("model / paper (1 = the paper's figure or inside its range; band: +-25%)")
    loops = data.get("looping", [])
    if loops:
        names = [f"{r['model']} x{r['sockets']}" for r in loops]
        x = range(len(loops))
        b.bar([i - 0.2 for i in x], [r["unlooped_tok_s"] for r in loops], 0.4, label="not looped")
        b.bar([i + 0.2 for i in x], [r["looped_tok_s"] for r in loops], 0.4, label="kernel looping")
        b.set_xticks(list(x), names, rotation=30, fontsize=8)
        b.set_yscale("log")
        b.set_ylabel("decode tokens/s (model)")
        b.legend()
        b.set_title("kernel looping (KL: geomean 1.6x, up to 2.2x)")
    run = data["run"]
    fig.suptitle(f"RDU model vs the SN40L papers ({run['date']}, {run['commit']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore")
    args = parse_args(argv)
    if args.markdown:
        print(render_report("bench_rdu", json.loads(Path(args.markdown).read_text())))
        return 0
    from fusec.rdu import calibrate as rdu_calibrate
    run = run_record()  # taken now: the code this run loaded (HEAD may move while it runs)
    m = get_machine("test_grid" if args.small else "sn40l")  # small: small shapes on the small grid
    start = time.perf_counter()
    rows = rdu_paper.paper_rows(m, args.sections, small=args.small)
    print("# RDU model vs the papers (sn40l defaults; ratio = model / paper, 1 inside a published range)")
    print(rdu_paper.format_rows(rows))
    data = {"run": run, "small": args.small, "machine": m.name, "rows": rows}
    if "looping" in args.sections:
        rdu_paper._SMALL[0] = args.small
        try:
            data["looping"] = rdu_paper.looping_table(m)
            if not args.no_fit:
                data["fit"] = {k: {"value": v, "target": rdu_calibrate.FIT_TARGETS[k][2], "default": getattr(m, k)}
                               for k, v in rdu_calibrate.fit(m).items()}
                data["kl_would_need"] = rdu_calibrate.kl_would_need(m)
        finally:
            rdu_paper._SMALL[0] = False
        print("\n# decode with kernel looping off and on (hardware orchestration both)")
        print(format_table(data["looping"], LOOP_COLUMNS))
        if "fit" in data:
            print("\n# calibration: fitted value of each fitted parameter (defaults in fusec/machines.py)")
            print(format_table([{"parameter": k, "fitted": v["value"], "default": v["default"], "target": v["target"]}
                                for k, v in data["fit"].items()],
                               [("parameter", "parameter", ""), ("fitted", "fitted", ".3g"),
                                ("default", "default", ".3g"), ("target", "fitted to", "")]))
            need = data["kl_would_need"]
            print(f"the KL geomean of 1.6x would need call_sync_s = {1e6 * need['call_sync_s']:.1f} us "
                  f"(geomean {need['kl_geomean']:.2f}x), which gives Llama 3.1 8B {need['table_iv_8b_tok_s']:,.0f} "
                  f"tok/s against Table IV's 1042")
    if not args.no_sensitivity and not args.small:
        data["sensitivity"] = rdu_calibrate.sensitivity(m)
        print("\n# sensitivity: figures each unpublished parameter moves over its range")
        print(rdu_calibrate.format_sensitivity(data["sensitivity"]))
    data["seconds"] = time.perf_counter() - start
    out = Path(args.out)
    path = write_json(out / "bench_rdu.json", data)
    png = chart(data, out / "bench_rdu.png")
    print(f"\nwrote {path}" + (f" and {png}" if png else "") + f" ({data['seconds']:.0f} s)")
    within = sum(r["within"] for r in rows)
    print(f"{within} of {len(rows)} figures within 25% of the paper's"
          + (f"; kernel-looping geomean {math.exp(sum(math.log(r['gain']) for r in data['looping']) / len(data['looping'])):.2f}x"
             if data.get("looping") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
