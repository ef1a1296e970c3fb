"""The analytical RDU model (`fusec/rdu/model.py`): the report's contents, its monotonicity (more
bandwidth or compute is never slower, fused is never slower than unfused), the metapipeline formula,
tokens/s, tensor parallelism and orchestration, `CompiledModule.rdu_report` and the `fusec rdu` command (the paper table and the
benchmark: tests/test_rdu_paper.py)."""
from __future__ import annotations

import dataclasses
import json

import pytest

import fusec
from fusec.api import lower
from fusec.machines import get_machine
from fusec.models import load_model
from fusec.models.registry import decode_inputs
from fusec.rdu.model import format_report, report, stage_terms, with_figures
from fusec.tracing import trace
from fusec.passes.place import plan

FIGURES = {"hbm_bw": 2.0, "ddr_bw": 2.0, "link_bw": 2.0, "peak_flops": 2.0, "launch_overhead_s": 0.5,
           "program_load_s": 0.5, "hbm_efficiency": 1.0}


@pytest.fixture(scope="module")
def block():
    return load_model("llama-block")


@pytest.fixture(scope="module")
def cases(block):
    """case -> (fused graph, unfused graph) of the tiny block: prefill 16 tokens, decode after 32."""
    module, inputs = block
    args, kwargs = decode_inputs(module.config, past_len=32)
    out = {}
    for case, traced in (("prefill", trace(module, inputs)), ("decode", trace(module, args, kwargs))):
        out[case] = (lower(traced.graph, fuse=True, target="rdu"), lower(traced.graph, fuse=False, target="rdu"))
    return out


@pytest.fixture(scope="module")
def placements(cases):
    return {(case, fused, m): plan(g[0 if fused else 1], m)
            for case, g in cases.items() for fused in (True, False) for m in ("sn40l", "test_grid")}


# --- contents --------------------------------------------------------------------------------------------

def test_report_has_sections_stages_and_totals(placements):
    p = placements["prefill", True, "test_grid"]
    rep = report(p, tokens=16)
    assert rep["machine"] == "test_grid" and len(rep["sections"]) == len(p.sections)
    for sec in rep["sections"]:
        assert sec["time_s"] > 0 and sec["pcus"] >= 1 and 0 < sec["pcu_utilisation"] <= 1
        assert sec["bound"] in ("compute", "SRAM", "HBM", "DDR", "network", "overhead")
        assert set(sec["bytes"]) == {"sram", "hbm", "ddr", "network"}
        for st in sec["stages"]:
            assert st["time_s"] == max(st[f"{b}_s"] for b in ("compute", "sram", "hbm", "ddr", "network"))
    total = rep["total"]
    assert total["time_s"] == pytest.approx(sum(s["time_s"] for s in rep["sections"]))
    assert total["tokens"] == 16 and total["tokens_per_s"] == pytest.approx(16 / total["time_s"])
    assert total["bytes"]["hbm"] > 0 and total["flops"] > 0


def test_a_graph_is_placed_or_uses_its_own_placement(cases):
    fused = cases["prefill"][0]
    own = report(fused)  # the pipeline placed it on sn40l
    assert own["machine"] == "sn40l" and own["total"]["tokens"] == 16
    assert report(fused, "test_grid")["machine"] == "test_grid"


def test_a_placement_cannot_be_evaluated_on_another_grid(placements):
    with pytest.raises(fusec.FusecError, match="place the graph again"):
        report(placements["prefill", True, "test_grid"], "sn40l")


def test_text_report_prints_the_numbers_of_the_report(placements):
    p = placements["decode", True, "sn40l"]
    rep = report(p, decode=True, layers=22)
    text = format_report(rep)
    lines = text.splitlines()
    assert "tokens/s (decode)" in text and "22 layer(s)" in text
    for sec in rep["sections"]:  # every section row and every stage row, with its time and bound
        assert any(line.split()[:1] == [str(sec["section"])] and f"{1e6 * sec['time_s']:.2f}" in line
                   for line in lines)
        for st in sec["stages"]:
            row = next(line for line in lines if line.split()[:1] == [st["stage"]])
            assert row.split()[-1] == st["bound"] and f"{1e6 * st['compute_s']:.2f}" in row
    assert {st.name for st in p.stages} <= {line.split()[0] for line in lines if line.split()}
    t = rep["total"]
    assert f"throughput  {t['tokens_per_s']:,.1f} tokens/s (decode)" in text
    assert f"per layer   {1e6 * t['layer_s']:.2f} us in {t['sections']} section(s), {t['kernels']} kernel(s)" in text


# --- monotonicity -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("figure", sorted(FIGURES))
@pytest.mark.parametrize("case", ("prefill", "decode"))
@pytest.mark.parametrize("fused", (True, False))
def test_more_bandwidth_or_compute_is_never_slower(placements, figure, case, fused):
    p = placements[case, fused, "test_grid"]
    base = report(p)["total"]["time_s"]
    factor = FIGURES[figure]
    faster = with_figures(p.machine, **{figure: min(getattr(p.machine, figure) * factor, 1.0)
                                        if figure == "hbm_efficiency" else getattr(p.machine, figure) * factor})
    assert report(p, faster)["total"]["time_s"] <= base * (1 + 1e-12)


@pytest.mark.parametrize("case", ("prefill", "decode"))
@pytest.mark.parametrize("machine", ("sn40l", "test_grid"))
def test_fused_is_never_slower_than_unfused(placements, case, machine):
    fused = report(placements[case, True, machine])["total"]
    unfused = report(placements[case, False, machine])["total"]
    assert fused["time_s"] <= unfused["time_s"]
    assert fused["kernels"] < unfused["kernels"] and fused["bytes"]["hbm"] <= unfused["bytes"]["hbm"]


def test_hardware_orchestration_and_tensor_parallelism_help_decode(placements):
    p = placements["decode", True, "sn40l"]
    software = report(p, layers=22, decode=True)["total"]
    hardware = report(p, layers=22, decode=True, orchestration="hardware")["total"]
    assert hardware["time_s"] < software["time_s"]
    tp = report(p, layers=22, decode=True, tp=4)["total"]
    assert tp["layer_s"] - tp["allreduce_s"] < software["layer_s"] and tp["allreduce_s"] > 0


def test_layers_multiply_the_block(placements):
    p = placements["decode", True, "sn40l"]
    one, many = report(p)["total"], report(p, layers=32)["total"]
    assert many["time_s"] == pytest.approx(32 * one["time_s"])
    assert many["tokens_per_s"] == pytest.approx(one["tokens_per_s"] / 32)


# --- the formulas -----------------------------------------------------------------------------------------

def test_section_time_follows_the_metapipeline_formula(placements):
    p = placements["prefill", True, "test_grid"]
    m = p.machine
    rep = report(p)
    for sec, row in zip(p.sections, rep["sections"]):
        stages = [p.stages[i] for i in sec.stages]
        alone = [max(stage_terms(p, st, m, {}).values()) for st in stages]
        steady = [s["time_s"] for s in row["stages"]]
        n = sec.tiles
        expected = (n - 1) / n * max(steady) + sum(alone) / n
        assert row["pipeline_s"] == pytest.approx(expected)
        assert row["time_s"] == pytest.approx(expected + m.launch_overhead_s + m.call_sync_s + m.program_load_s)


def test_a_one_section_program_stays_loaded(placements):
    rep = report(placements["prefill", True, "sn40l"])
    assert len(rep["sections"]) == 1 and rep["sections"][0]["load_s"] == 0
    assert rep["total"]["load_once_s"] == get_machine("sn40l").program_load_s


def test_compute_term_uses_the_stage_pcus(placements):
    p = placements["prefill", True, "sn40l"]
    st = max(p.stages, key=lambda s: s.flops)
    terms = stage_terms(p, st, p.machine, {})
    rate = p.machine.pcu_flops * p.machine.systolic_efficiency
    assert terms["compute"] == pytest.approx(st.flops / (st.pcus * rate))


def test_spilling_to_ddr_makes_a_program_slower(cases):
    unfused = cases["prefill"][1]
    roomy = plan(unfused, "test_grid")
    fixed = sum(t.bytes for t in roomy.memory.tensors if t.kind in ("weight", "const"))
    small = dataclasses.replace(get_machine("test_grid"), hbm_bytes=fixed + 4096)
    spilled = plan(unfused, small)
    assert spilled.memory.spilled
    assert report(spilled)["total"]["bytes"]["ddr"] > 0
    assert report(spilled)["total"]["time_s"] > report(roomy)["total"]["time_s"]


# --- entry points -----------------------------------------------------------------------------------------

def test_compiled_module_exposes_the_report_and_placement(block):
    module, inputs = block
    compiled = fusec.compile(module, inputs)
    assert "placement" not in compiled.graph.annotations  # placed on request only
    rep = compiled.rdu_report()
    assert rep["placement"].machine.name == "sn40l" and rep["placement"].seed == 0
    assert rep["total"]["tokens"] == 16 and rep is compiled.rdu_report()
    other = compiled.rdu_report("test_grid", layers=2)
    assert other["machine"] == "test_grid" and other["layers"] == 2


def test_fusec_rdu_command_compares_fused_and_unfused(capsys):
    from fusec.cli import main
    assert main(["rdu", "llama-block", "--machine", "test_grid", "--compare", "--decode", "--past", "8"]) == 0
    out = capsys.readouterr().out
    assert "== fused" in out and "== unfused" in out and "faster than unfused" in out
    assert main(["rdu", "llama-block", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["total"]["kernels"] == 5 and data["dtype"] == "bf16" and data["machine"] == "sn40l"


def test_low_precision_weights_make_a_modelled_decode_faster():
    """Weights stream from HBM at their stored size (int8: a byte per weight and a float32 scale per 32)
    and are widened in the consumer's pipeline, not by stages of their own: a bandwidth-bound decode step
    of stories15M is faster with bf16 weights than fp32 (floats as traced), and with int8 than bf16."""
    module, _ = load_model("llama-block:stories15M")
    args, kwargs = decode_inputs(module.config, past_len=32)
    traced = trace(module, args, kwargs).graph
    seconds, hbm = {}, {}
    for weights in ("fp32", "bf16", "int8"):
        graph = lower(traced, weights=weights, target="rdu")
        r = report(graph, "sn40l", decode=True, orchestration="hardware", layers=module.config.n_layers, looping=True)
        seconds[weights], hbm[weights] = r["total"]["time_s"], r["total"]["bytes"]["hbm"]
        # a widened weight is not sent from a stage of its own to the matmul's: the traffic stays activations'
        assert r["total"]["bytes"]["network"] <= 2 * r["total"]["bytes"]["hbm"], (weights, r["total"]["bytes"])
    assert seconds["int8"] < seconds["bf16"] < seconds["fp32"], seconds
    assert hbm["int8"] < 0.6 * hbm["bf16"] < 0.6 * hbm["fp32"], hbm
