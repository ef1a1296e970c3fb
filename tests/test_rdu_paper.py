"""The RDU model against the papers (`fusec/rdu/paper.py`): every published figure has a row, ratios come
from the model, kernel looping beats the unlooped decode, the JSON of `fusec rdu --paper --json`, the
PyTorch-level unfused program (`passes/placement_torchops.py`) and the looped-program formula. Runs the
table on small shapes (`small=True`): the structure is the same, the numbers are not the paper's."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from fusec.api import lower
from fusec.machines import get_machine
from fusec.models import load_model
from fusec.models.registry import decode_inputs
from fusec.rdu import paper as rdu_paper
from fusec.rdu.model import report, with_figures
from fusec.tracing import trace
from fusec.passes.place import plan
from fusec.passes.placement_torchops import kernel_ops, torch_op_groups

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_rdu.py"
QUICK = ("table-iv", "looping", "coe")
SMALL_MACHINE = "test_grid"   # small shapes on the small grid: placements in well under a second


@pytest.fixture(scope="module")
def rows():
    return rdu_paper.paper_rows(SMALL_MACHINE, QUICK, small=True)


@pytest.fixture(scope="module")
def fusion_rows():
    cases = rdu_paper.FUSION_CASES
    rdu_paper.FUSION_CASES = cases[:1]
    try:
        return rdu_paper.paper_rows(SMALL_MACHINE, ("fusion",), small=True)
    finally:
        rdu_paper.FUSION_CASES = cases


@pytest.fixture(scope="module")
def unfused_block():
    module, inputs = load_model("llama-block")
    return lower(trace(module, inputs).graph, fuse=False, target="rdu")


def test_every_published_figure_has_a_row(rows, fusion_rows):
    figures = [r["figure"] for r in rows + fusion_rows]
    assert len(figures) == len(set(figures))
    for name, _, _ in rdu_paper.TABLE_IV:
        assert any(name in f and "16 sockets" in f for f in figures if f.startswith("decode tok/s"))
    assert sum(f.startswith("kernel-looping gain") for f in figures) == 2
    assert sum("fraction of peak HBM" in f for f in figures) == 2            # 8 and 16 sockets
    assert sum(f.startswith("model switching") for f in figures) == 2         # vs DGX A100 and H100
    assert sum(f.startswith("CoE BS1/") for f in figures) == 8
    for case in ("prefill", "decode"):
        assert sum(f.startswith("fusion speedup") and case in f for f in figures) == 2   # both unfused variants
        assert sum(f.startswith("HO gain") and case in f for f in figures) == 1
    assert any(f.startswith("fewer kernels") for f in figures)
    for r in rows + fusion_rows:
        assert r["source"] and r["config"] and r["use"] in ("fit", "held out")
        if r["use"] == "held out" and not r["within"] and r["figure"].startswith(("decode tok/s", "CoE")):
            assert r["note"], f"{r['figure']}: outside 25% without a reason"


def test_ratios_come_from_the_model(rows):
    for r in rows:
        if r["kind"] == "value":
            assert r["ratio"] == pytest.approx(r["model"] / r["paper"])
            assert r["within"] == (0.75 <= r["ratio"] <= 1.25)
    m = get_machine(SMALL_MACHINE)
    faster = rdu_paper.paper_rows(with_figures(m, call_sync_s=0.0, hbm_bw=2 * m.hbm_bw), ("table-iv",), small=True)
    before = {r["figure"]: r["model"] for r in rows}
    for r in faster:
        assert r["model"] > before[r["figure"]]  # less overhead and more bandwidth: more tokens/s
        assert r["ratio"] == pytest.approx(r["model"] / r["paper"])


def test_range_rows_are_met_inside_the_range(fusion_rows):
    for r in fusion_rows:
        if r["kind"] == "range":
            lo, hi = r["paper"]
            assert (r["ratio"] == 1.0) == (lo <= r["model"] <= hi)


def test_kernel_looping_beats_the_unlooped_decode():
    rdu_paper._SMALL[0] = True
    try:
        table = rdu_paper.looping_table(get_machine(SMALL_MACHINE))
    finally:
        rdu_paper._SMALL[0] = False
    assert {(r["model"], r["sockets"]) for r in table} == set(rdu_paper.KL_CASES)
    for r in table:
        assert r["looped_tok_s"] > r["unlooped_tok_s"] and r["gain"] > 1
        assert r["looped_hbm_util"] > r["unlooped_hbm_util"]


def test_a_looped_call_streams_the_layers_through_one_pipeline():
    module, _ = load_model("llama-block")
    args, kwargs = decode_inputs(module.config, past_len=32)
    p = plan(lower(trace(module, args, kwargs).graph, target="rdu"), "sn40l", 0, "bf16")
    assert len(p.sections) == 1
    m = p.machine
    one = report(p, layers=1, looping=True)["total"]
    assert one["time_s"] == pytest.approx(report(p, layers=1)["total"]["time_s"])  # one layer: nothing to loop
    rep = report(p, layers=32, looping=True, orchestration="hardware")
    sec, total = rep["sections"][0], rep["total"]
    n = sec["tiles"]
    stream = (32 * n - 1) / n * sec["steady_s"] + sec["fill_s"] / n
    assert total["time_s"] == pytest.approx(m.launch_overhead_s + m.call_sync_s + stream)
    unlooped = report(p, layers=32, orchestration="hardware")["total"]
    assert unlooped["time_s"] == pytest.approx(32 * (sec["pipeline_s"] + m.call_sync_s) + m.launch_overhead_s)
    assert total["time_s"] < unlooped["time_s"]


def test_unfused_as_pytorch_ops_groups_decomposed_ops(unfused_block):
    g = unfused_block
    groups = torch_op_groups(g)
    by_group: dict[int, list[tuple]] = {}
    for k, grp in groups.items():
        by_group.setdefault(grp, []).append(kernel_ops(g, k))
    chains = sorted(tuple(op for ops in v for op in ops) for v in by_group.values())
    assert ("amax", "sub", "exp", "sum", "div") in chains      # softmax: one PyTorch op
    assert ("sigmoid", "mul") in chains                        # silu
    assert chains.count(("sum", "mul")) == 2                   # the two RMSNorms' mean
    primitives = plan(g, "sn40l", 0, "bf16")
    torch_level = plan(g, "sn40l", 0, "bf16", sections="torch")
    assert len(torch_level.sections) == len(set(groups.values())) < len(primitives.sections)
    assert report(torch_level)["total"]["bytes"]["hbm"] < report(primitives)["total"]["bytes"]["hbm"]
    with pytest.raises(ValueError, match="section mode must be one of packed, kernel, torch"):
        plan(g, "sn40l", sections="ops")


def test_fused_kernels_each_in_a_section():
    module, inputs = load_model("llama-block")
    fused = lower(trace(module, inputs).graph, target="rdu")
    kernels = [i for i, n in enumerate(fused.nodes) if n.op == "kernel"]
    p = plan(fused, "sn40l", 0, "bf16", sections="kernel")
    assert [s.kernels for s in p.sections] == [(k,) for k in kernels]


def test_fusec_rdu_paper_json(monkeypatch, capsys):
    from fusec.cli import main
    real = rdu_paper.paper_rows
    monkeypatch.setattr(rdu_paper, "paper_rows", lambda machine="sn40l": real(SMALL_MACHINE, ("table-iv", "coe"), small=True))
    assert main(["rdu", "--paper", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert isinstance(data, list) and data
    for row in data:
        assert {"figure", "paper", "model", "ratio", "config", "source", "within", "use"} <= set(row)
        assert isinstance(row["model"], float) and isinstance(row["figure"], str)
    assert main(["rdu", "--paper"]) == 0
    assert "within 25%" in capsys.readouterr().out


def test_fusec_rdu_decode_shows_looping_side_by_side(capsys):
    from fusec.cli import main
    assert main(["rdu", "llama-block", "--decode", "--past", "8", "--layers", "8"]) == 0
    out = capsys.readouterr().out
    assert "== fused, not looped" in out and "== fused, looped" in out
    gain = float(out.split("kernel looping (fused): ")[1].split("x")[0])
    assert gain > 1
    assert main(["rdu", "llama-block", "--decode", "--past", "8", "--no-kernel-looping", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["looping"] is False
    assert main(["rdu"]) != 0
    assert "needs a MODEL" in capsys.readouterr().err


def test_benchmark_writes_the_table_json_and_chart(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_rdu", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--small", "--sections", "table-iv", "coe", "--no-fit", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench_rdu.json").read_text())
    assert [r["figure"] for r in data["rows"]] == [r["figure"] for r in rdu_paper.paper_rows(
        SMALL_MACHINE, ("table-iv", "coe"), small=True)]
    assert (tmp_path / "bench_rdu.png").stat().st_size > 1000
    capsys.readouterr()
    assert bench.main(["--markdown", str(tmp_path / "bench_rdu.json")]) == 0
    md = capsys.readouterr().out
    assert md.count("\n| decode tok/s") == 3 and "| figure | source |" in md


def test_the_cpu_loop_body_is_one_block_as_the_model_assumes():
    """The model loops the traced block `n_layers` times; the loop pass's body over a decoder loops
    every layer and holds the same kernels as one block."""
    import torch
    from fusec.models.causal_lm import CausalLM, DecodeStep, decode_example
    from fusec.models.llama import LlamaBlock, LlamaConfig
    from fusec.passes.loop import loop_kernels
    from fusec.passes.pipeline import run_pipeline
    config = LlamaConfig(dim=64, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=97, max_seq_len=32,
                         n_layers=4)
    torch.manual_seed(0)
    m = CausalLM(config).eval()
    graph = run_pipeline(trace(DecodeStep(m), decode_example(m, 1, 32), {}).graph, target="cpu-unlooped")
    [loop] = [n for n in loop_kernels(graph).nodes if n.op == "loop"]
    body = sorted(n.attr("op") if any(k == "op" for k, _ in n.attrs) else "kernel"
                  for n in loop.attr("body").nodes if n.op == "kernel")
    args, kwargs = decode_inputs(config, past_len=8)
    block = lower(trace(LlamaBlock(config).eval(), args, kwargs).graph, target="rdu")
    kernels = [n for n in block.nodes if n.op == "kernel"]
    assert loop.attr("trips") == config.n_layers and len(body) == len(kernels)
