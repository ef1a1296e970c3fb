"""The docs' tables of a `benchmarks/bench_rdu.py` run, as cells from its JSON (paper vs model, kernel
looping, calibration fit, sensitivity).

`fusec.benchtables` turns them into markdown (with the run's command, date and commit) for
`python benchmarks/tables.py bench_rdu.json --update docs/rdu-model.md` and for `bench_rdu.py --markdown`.
Each function returns None when the run did not compute its table (`--no-fit`, `--no-sensitivity`,
`--sections` without looping).
"""
from __future__ import annotations

Cells = list[list[str]]


def paper_text(r: dict) -> str:
    """A paper row's published figure as the paper states it: "1.5-3", "> 0.9 of peak", "up to 2.2"."""
    p = r["paper"]
    text = f"{p[0]:g}-{p[1]:g}" if isinstance(p, (list, tuple)) else f"{p:g}"
    text = {"at least": "> ", "up to": "up to "}.get(r["kind"], "") + text
    return text + ("" if r["unit"] == "x" else f" {r['unit']}")


def paper(data: dict) -> Cells:
    """Every published figure next to the model's, their ratio and whether it is within 25%."""
    return [["figure", "source", "configuration", "paper", "model", "model/paper", "within 25%",
             "fit / held out", "note"]] + [
        [r["figure"], r["source"], r["config"], paper_text(r),
         f"{r['model']:.3g}", f"{r['ratio']:.2f}", "yes" if r["within"] else "**no**", r["use"], r["note"]]
        for r in data["rows"]]


def looping(data: dict) -> Cells | None:
    """Decode with kernel looping off and on, per model and socket count."""
    if not data.get("looping"):
        return None
    return [["model", "sockets", "context", "not looped tok/s", "looped tok/s", "gain", "HBM of peak, not looped",
             "HBM of peak, looped"]] + [
        [r["model"], str(r["sockets"]), str(r["context"]), f"{r['unlooped_tok_s']:,.0f}", f"{r['looped_tok_s']:,.0f}",
         f"{r['gain']:.2f}x", f"{r['unlooped_hbm_util']:.0%}", f"{r['looped_hbm_util']:.0%}"]
        for r in data["looping"]]


def fit(data: dict) -> Cells | None:
    """The fitted value of each fitted parameter beside its default and the figure it is fitted to."""
    if not data.get("fit"):
        return None
    return [["parameter", "fitted", "default", "fitted to"]] + [
        [name, f"{v['value']:.3g}", f"{v['default']:.3g}", v["target"]] for name, v in data["fit"].items()]


def fit_legend(data: dict) -> str:
    need = data.get("kl_would_need")
    if not need:
        return ""
    return (f"The KL geomean of 1.6x would need call_sync_s = {1e6 * need['call_sync_s']:.1f} us (model geomean "
            f"then {need['kl_geomean']:.2f}x), which drops Llama 3.1 8B on 16 sockets to "
            f"{need['table_iv_8b_tok_s']:,.0f} tok/s against Table IV's 1042.")


def sensitivity(data: dict, top: int = 3) -> Cells | None:
    """Per unpublished parameter: its range, how many figures it moves by more than 5% and the largest moves."""
    if not data.get("sensitivity"):
        return None
    return [["parameter", "default", "range", "figures moved >5%", "largest moves (low / default / high)",
             "default from"]] + [
        [r["parameter"], f"{r['default']:.3g}", f"{r['low']:.3g} - {r['high']:.3g}", str(r["figures_moved"]),
         "; ".join(f"{x['figure']}: {x['low']:.3g} / {x['default']:.3g} / {x['high']:.3g}"
                   for x in r["moves"][:top]) or "-", r["fitted_to"] or "assumed"]
        for r in data["sensitivity"]]
