"""The placement pass (`passes/place.py`): invariants of the layout and the memory plan, determinism,
the verifier, the "placed" stage and its dump (golden text for the tiny block, SVG/PNG/JSON), and the
numerics of a compiled program, which placement must not change."""
from __future__ import annotations

import dataclasses
import difflib
import json

import pytest
import torch

import fusec
from fusec.api import lower
from fusec.errors import FusecError, IRError
from fusec.machines import get_machine
from fusec.models import load_model
from fusec.rdu.placement import TIERS, Placement, Tensor, placement_of
from fusec.tracing import trace
from fusec.passes.pipeline import STAGES, TARGETS
from fusec.passes.place import partition, place, plan, proportional, verify_placement
from fusec.passes.placement_memory import allocate

MACHINES = ("sn40l", "plasticine", "test_grid")


@pytest.fixture(scope="module")
def traced():
    module, inputs = load_model("llama-block")
    return trace(module, inputs).graph


@pytest.fixture(scope="module")
def graphs(traced):
    return {"fused": lower(traced, fuse=True, target="rdu"), "unfused": lower(traced, fuse=False, target="rdu")}


@pytest.fixture(scope="module")
def placements(graphs):
    return {(name, m): plan(g, m) for name, g in graphs.items() for m in MACHINES}


# --- invariants -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ("fused", "unfused"))
@pytest.mark.parametrize("machine", MACHINES)
def test_every_unit_is_used_once_per_section_and_has_the_right_type(placements, name, machine):
    p = placements[name, machine]
    m = p.machine
    for sec in p.sections:
        seen = []
        for i in sec.stages:
            assert len(p.stages[i].cells) == p.stages[i].pcus >= 1
            assert all(m.unit_at(*c) == "pcu" for c in p.stages[i].cells)
            seen += p.stages[i].cells
        for i in sec.buffers:
            assert len(p.buffers[i].cells) == p.buffers[i].pmus >= 1
            assert all(m.unit_at(*c) == "pmu" for c in p.buffers[i].cells)
            seen += p.buffers[i].cells
        assert len(seen) == len(set(seen))
        assert sec.pcus <= m.pcus and sec.pmus <= m.pmus


@pytest.mark.parametrize("name", ("fused", "unfused"))
@pytest.mark.parametrize("machine", MACHINES)
def test_capacities_hold(placements, name, machine):
    p = placements[name, machine]
    m = p.machine
    for b in p.buffers:
        assert b.capacity <= b.pmus * m.pmu_bytes
    peaks = dict(p.memory.peak)
    assert peaks["hbm"] <= m.hbm_bytes and peaks["ddr"] <= m.ddr_bytes and peaks["sram"] <= m.sram_bytes
    assert all(t.tier in TIERS for t in p.memory.tensors)


@pytest.mark.parametrize("name", ("fused", "unfused"))
def test_sections_cover_the_kernels_in_graph_order(graphs, placements, name):
    kernels = [i for i, n in enumerate(graphs[name].nodes) if n.op == "kernel"]
    for m in MACHINES:
        p = placements[name, m]
        assert [k for s in p.sections for k in s.kernels] == kernels
        assert [s.index for s in p.sections] == list(range(len(p.sections)))


def test_a_llama_block_is_one_section_on_sn40l_and_unfused_is_one_per_op(graphs, placements):
    assert len(placements["fused", "sn40l"].sections) == 1
    unfused = placements["unfused", "sn40l"]
    assert all(len(s.kernels) == 1 for s in unfused.sections)
    assert len(unfused.sections) == sum(n.op == "kernel" for n in graphs["unfused"].nodes)


def test_a_small_chip_splits_the_block_into_sections_that_fit(placements):
    p = placements["fused", "test_grid"]
    assert len(p.sections) > 1
    for sec in p.sections:
        assert len(sec.stages) <= p.machine.pcus


def test_pcus_go_to_stages_in_proportion_to_their_work(placements):
    p = placements["fused", "sn40l"]
    gemm = max((s for s in p.stages if s.mode == "systolic"), key=lambda s: s.flops)
    small = min((s for s in p.stages if s.flops > 0), key=lambda s: s.flops)
    assert gemm.pcus >= small.pcus


def test_proportional_respects_bounds_and_budget():
    counts = proportional([8.0, 1.0, 1.0, 0.0], [100, 100, 3, 100], 20)
    assert sum(counts) <= 20 and all(c >= 1 for c in counts)
    assert counts[0] > counts[1] and counts[2] <= 3 and counts[3] == 1


def test_the_placement_beats_a_random_one(placements):
    for key in (("fused", "sn40l"), ("unfused", "sn40l")):
        p = placements[key]
        placed = sum(s.weighted_hops for s in p.sections)
        assert placed < sum(s.random_weighted_hops for s in p.sections)


def test_the_busiest_link_is_a_link_between_neighbours(placements):
    for p in placements.values():
        for sec in p.sections:
            (r1, c1), (r2, c2), load = sec.busiest_link
            assert load == 0 or abs(r1 - r2) + abs(c1 - c2) == 1


# --- determinism and the stage --------------------------------------------------------------------------

def test_the_same_seed_gives_the_same_placement(graphs):
    first, again = plan(graphs["fused"], "sn40l", seed=3), plan(graphs["fused"], "sn40l", seed=3)
    assert first == again


def test_place_keeps_the_nodes_and_a_second_run_changes_nothing(graphs):
    placed = place(graphs["fused"], "test_grid")
    assert placed.nodes == graphs["fused"].nodes and placed.outputs == graphs["fused"].outputs
    again = place(placed, "test_grid")
    assert again == placed and placement_of(again) == placement_of(placed)


def test_the_placed_stage_runs_after_tiled_for_the_rdu_only():
    for target in ("rdu", "rdu-unfused"):
        assert TARGETS[target][-2:] == ("tiled", "placed")
    assert [name for name, _ in STAGES["placed"]] == ["place"]
    assert all("placed" not in TARGETS[t] for t in ("cpu", "cpu-unfused"))


def test_the_pipeline_graph_carries_a_placement_for_sn40l(graphs):
    p = placement_of(graphs["fused"])
    assert isinstance(p, Placement) and p.machine.name == "sn40l" and p.seed == 0


def test_a_graph_without_placement_says_how_to_get_one(traced):
    with pytest.raises(FusecError, match="placed"):
        placement_of(lower(traced))  # the CPU target does not place


def test_a_cpu_is_not_a_placement_target(graphs):
    with pytest.raises(FusecError, match="checkerboard"):
        plan(graphs["fused"], "cpu")


# --- the verifier ---------------------------------------------------------------------------------------

def _corrupt_stage(p: Placement, **changes) -> Placement:
    stages = list(p.stages)
    stages[1] = dataclasses.replace(stages[1], **changes)
    return dataclasses.replace(p, stages=tuple(stages))


def test_verifier_rejects_a_unit_used_twice(placements):
    p = placements["fused", "sn40l"]
    stolen = p.stages[0].cells[0]
    bad = _corrupt_stage(p, cells=(stolen,) + p.stages[1].cells[1:])
    with pytest.raises(IRError, match="assigned to both"):
        verify_placement(bad)


def test_verifier_rejects_a_pcu_group_on_a_pmu(placements):
    p = placements["fused", "sn40l"]
    pmu = p.buffers[0].cells[0]
    free_pmu = next((r, c) for r in range(40) for c in range(52) if (r + c) % 2
                    and (r, c) not in p.owners(0))
    bad = _corrupt_stage(p, cells=(free_pmu,) + p.stages[1].cells[1:])
    assert pmu != free_pmu
    with pytest.raises(IRError, match="not a pcu"):
        verify_placement(bad)


def test_verifier_rejects_missing_kernels(graphs, placements):
    p = placements["fused", "sn40l"]
    bad = dataclasses.replace(p, sections=(dataclasses.replace(p.sections[0], kernels=p.sections[0].kernels[1:]),))
    with pytest.raises(IRError, match="cover kernels"):
        verify_placement(bad, graphs["fused"])


def test_verifier_rejects_overlapping_live_tensors(placements):
    p = placements["fused", "sn40l"]
    hbm = [t for t in p.memory.tensors if t.tier == "hbm"]
    moved = dataclasses.replace(hbm[1], offset=hbm[0].offset)
    tensors = tuple(moved if t.name == moved.name else t for t in p.memory.tensors)
    with pytest.raises(IRError, match="share hbm addresses"):
        verify_placement(dataclasses.replace(p, memory=dataclasses.replace(p.memory, tensors=tensors)))


# --- the memory plan -------------------------------------------------------------------------------------

def test_addresses_are_reused_across_lifetimes():
    def t(name, size, life):
        return Tensor(name, "activation", size, "hbm", 0, life, size)
    offsets, peak = allocate([t("a", 100, (0, 1)), t("b", 100, (2, 3)), t("c", 50, (1, 2))])
    assert offsets["a"] == offsets["b"] == 0  # never live together: one address
    assert offsets["c"] == 128 and peak == 178  # live with both: after them, 64-byte aligned


def test_weights_stay_in_hbm_and_activations_spill_to_ddr_first(graphs, placements):
    roomy = placements["unfused", "test_grid"]
    fixed = sum(t.bytes for t in roomy.memory.tensors if t.kind in ("weight", "const"))
    hbm = fixed + (dict(roomy.memory.peak)["hbm"] - fixed) // 2  # the weights and half the rest
    p = plan(graphs["unfused"], dataclasses.replace(get_machine("test_grid"), hbm_bytes=hbm))
    tiers = {t.name: t for t in p.memory.tensors}
    assert p.memory.spilled, "half the activations' room cannot hold them"
    assert all(tiers[name].kind not in ("weight", "const") for name in p.memory.spilled)
    assert all(t.tier == "hbm" for t in p.memory.tensors if t.kind in ("weight", "const"))
    assert dict(p.memory.peak)["hbm"] <= hbm
    spilled = {tiers[n].traffic for n in p.memory.spilled}
    kept = [t.traffic for t in p.memory.tensors if t.tier == "hbm" and t.kind == "activation"]
    assert not kept or min(spilled) <= max(kept)  # the least-needed go first


def test_values_used_inside_a_fused_section_stay_on_chip(placements):
    p = placements["fused", "sn40l"]
    kinds = {t.name: (t.kind, t.tier) for t in p.memory.tensors}
    assert all(tier == "sram" for kind, tier in kinds.values() if kind == "activation")
    assert all(tier == "hbm" for kind, tier in kinds.values() if kind in ("weight", "input", "output"))


def test_unfused_intermediates_go_through_hbm(placements):
    p = placements["unfused", "sn40l"]
    assert all(t.tier == "hbm" for t in p.memory.tensors)


# --- dumps -------------------------------------------------------------------------------------------------

# `fusec dump llama-block --stage placed`; regenerate with that command after a deliberate change.
GOLDEN = """\
# llama-block placed on sn40l (40x52 grid, 1040 PCUs, 1040 PMUs of 512 KiB), seed 0, dtype as traced
# 1 section(s), 5 kernel(s), 13 stage(s)

## section 0: A=%1 matmul, B=%5 attention, C=%7 matmul, D=%8 matmul, E=%10 matmul
960 PCUs, 71 PMUs, 1 tile(s); busiest link (33, 5)->(34, 5) 3,712 bytes
traffic-weighted hops 2,160,928 (random placement 7,382,000)
stage             mode  PCUs  PMUs      FLOPs  HBM read  DDR read  SRAM read   sends
------------  --------  ----  ----  ---------  --------  --------  ---------  ------
k1.prologue       simd    64     2       4144     4,352         0          0   4,096
k1.gemm       systolic    64    10  2.621e+05    32,768         0      4,096   8,192
k1.epilogue       simd    64     3       5376     2,048         0      6,144   6,144
k5.qk         systolic    64     2  3.277e+04         0         0      6,144   4,096
k5.softmax        simd    64     2       7168       256         0      4,096   4,096
k5.pv         systolic    64     2  3.277e+04         0         0      6,144   4,096
k7.gemm       systolic    64     6  1.311e+05    16,384         0      4,096   4,096
k7.epilogue       simd    64     3       1024     4,096         0      4,096   8,192
k8.prologue       simd    64     2       4144       256         0      4,096   4,096
k8.gemm       systolic   128    18  5.243e+05    65,536         0      4,096  16,384
k8.epilogue       simd   128     5       6144         0         0     16,384   8,192
k10.gemm      systolic    64    11  2.621e+05    32,768         0      8,192   4,096
k10.epilogue      simd    64     3       1024         0         0      8,192       0
tensor %3      on chip     -     1          -         -         -          -       -
tensor %4      on chip     -     1          -         -         -          -       -
A.A.A.A.A.A.A.A.A.A.A.A.A.A.A.A.A.A.A.A.A.A.........
.A.A.A.A.AaA.A.A.A.A.A.A.A.A.A.AaA.A.A.A.A.A........
A.A.A.A.A.A.A.A.A.A.A.A.A.A.A.A.A.A.A.A.A.A.........
.A.AaA.A.AaA.A.A.A.A.A.A.A.AaA.A.A.A.A.A.A.A........
A.A.A.A.AaA.A.A.AaA.AaAaA.AaA.A.A.AaAaA.AaA.........
.A.A.A.A.A.A.A.A.A.A.A.A.A.A.A.A.A.A.A.A.A.A........
A.A.A.A.A.A.A.A.A.AaA.A.A.A.A.A.A.A.A.A.A.A.........
.A.A.AaA.A.A.A.A.A.AaA.A.A.A.A.AaA.A.A.A.A.A........
A.A.A.A.A.A.A.A.A.A.A.A.A.A.A.A.B.B.B.B.B.B.........
.B.B.B.B.B.B.B.B.B.B.B.B.B.B.B.B.B.B.B.B.B.B........
B.B.B.B.B.B.B.B.BbB.B.B.B.B.B.B.BbB.B.B.B.B.........
.B.B.B.B.B.B.B.B.B.B.B.B.B.B.B.B.B.B.B.B.B.B........
B.B.B.BbB.B.B.B.B.B.B.B.B.B.B.B.B.B.B.B.B.B.........
.B.B.B.B.B.B.B.B.B.B.B.B.B.BbB.B.B.B.B.B.B.B........
B.B.B.B.B.B.B.B.B.B.B.B.B.B.B.B.B.B.B.B.B.B.........
.B.B.B.B.B.B.B.B.B.BbB.B.B.B.BbB.B.B.B.B.B.B........
B.B.B.B.B.B.B.B.B.B.B.B.B.B.B.B.B.B.B.B.B.B.........
.C.C.C.C.C.C.C.C.C.C.C.C.B.B.B.B.B.B.B.B.B.B........
C.C.CcCcC.C.CcC.C.CcC.C.CcC.C.C.C.C.C.C.C.C.........
.C.C.C.C.C.C.C.C.C.C.C.C.C.C.C.C.C.C.CcC.C.C........
C.C.C.C.C.C.C.C.C.C.C.C.C.C.C.C.C.C.C.C.C.C.E.E.E.E.
.C.C.C.C.C.C.C.C.C.C.C.CcC.C.C.C.C.C.C.C.C.C.E.E.E.E
C.C.C.C.C.C.CcC.C.C.C.C.C.C.C.C.C.C.CcC.C.C.E.E.E.E.
.D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.C.C.C.C.C.C.E.E.E.E
D.D.D.D.D.D.D.D.DdD.DdD.D.D.D.D.D.D.D.D.D.D.E.E.E.E.
.D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.EeE.E.E
D.D.D.D.D.DdD.D.D.D.D.D.D.DdD.D.D.DdD.D.D.D.E.E.E.E.
.D.D.DdD.D.D.D.D.DdD.DdD.D.D.D.D.D.D.D.D.DdD.E.E.EeE
D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.E.E.E.E.
.DdD.D.D.DdD.DdD.D.D.D.D.D.D.DdD.DdD.D.D.D.D.E.E.E.E
D.D.DdD.D.D.D.D.DdD.D.DdD.DdD.D.D.D.DdD.DdD.E.E.E.E.
.D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.E.EeE.E
D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.E.E.E.E.
.D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.E.E.E.E
D.D.DdD.D.D.D.D.D.D.DdD.D.D.D.D.D.D.D.DdD.D.E.E.E.E.
.D.D.D.D.D.D.DdD.D.D.D.D.D.D.DdD.D.D.D.D.D.D.E.E.E.E
D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.E.E.E.E.
.E.E.E.E.D.D.D.D.D.D.D.D.D.D.D.D.D.D.D.DeD.D.EeE.EeE
EeE.EeE.E.E.E.EeE.EeE.E.E.EeE.E.EeE.E.E.E.E.EeE.E.E.
.E.E.E.E.E.EeE.E.E.E.E.E.E.E.E.E.E.E.E.E.E.E.E.E.E.E

## memory plan (ddr peak 0 bytes, hbm peak 158,464 bytes, sram peak 4,096 bytes)
tensor                        kind   bytes             tier   offset  sections  bytes/call
----------------------  ----------  ------  ---------------  -------  --------  ----------
%0                           input   4,096              hbm  147,456       0-0       8,192
%10                         output   4,096              hbm  151,552       0-0       4,096
%2                      activation   4,096  sram (streamed)        0       0-0       8,192
%3                      activation   2,048             sram        0       0-0       4,096
%4                      activation   2,048             sram  524,288       0-0       4,096
%5                      activation   4,096  sram (streamed)        0       0-0       8,192
%7                      activation   4,096  sram (streamed)        0       0-0      12,288
%8                      activation   8,192  sram (streamed)        0       0-0      16,384
attention.wk.weight         weight   8,192              hbm  131,072       0-0       8,192
attention.wo.weight         weight  16,384              hbm   98,304       0-0      16,384
attention.wq.weight         weight  16,384              hbm  114,688       0-0      16,384
attention.wv.weight         weight   8,192              hbm  139,264       0-0       8,192
attention_norm.weight       weight     256              hbm  157,696       0-0         256
c10                          const   1,024              hbm  155,648       0-0       1,024
c11                          const     256              hbm  157,952       0-0         256
c9                           const   1,024              hbm  156,672       0-0       1,024
feed_forward.w1.weight      weight  32,768              hbm        0       0-0      32,768
feed_forward.w2.weight      weight  32,768              hbm   32,768       0-0      32,768
feed_forward.w3.weight      weight  32,768              hbm   65,536       0-0      32,768
ffn_norm.weight             weight     256              hbm  158,208       0-0         256
"""


@pytest.fixture(scope="module")
def placed_text():
    from fusec.rdu.cli import dump_placed
    return dump_placed("llama-block", "text")


def test_placed_dump_of_the_tiny_block_matches_the_golden_text(placed_text):
    assert placed_text + "\n" == GOLDEN, "\n".join(difflib.unified_diff(
        GOLDEN.splitlines(), placed_text.splitlines(), "golden", "dump", lineterm=""))


def test_the_grid_picture_shows_every_unit_the_section_uses(placed_text):
    lines = placed_text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("tensor %4")) + 1
    grid = lines[start:start + 40]
    assert all(len(line) == 52 and set(line) <= set("ABCDEabcde.") for line in grid)
    assert sum(ch.isupper() for line in grid for ch in line) == 960
    assert sum(ch.islower() for line in grid for ch in line) == 71


def test_svg_png_and_json_are_produced(placements):
    from fusec.rdu.view import to_png, to_svg
    p = placements["fused", "test_grid"]
    svg = to_svg(p, "llama-block")
    assert "<svg" in svg and svg.rstrip().endswith("</svg>") and "<path" in svg
    assert svg.count(">section ") >= len(p.sections)
    png = to_png(p, "llama-block")
    assert isinstance(png, bytes) and png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    data = json.loads(json.dumps(p.to_dict()))
    assert data["machine"] == "test_grid" and len(data["sections"]) == len(p.sections)
    assert data["memory"]["tensors"] and data["stages"][0]["cells"]


def test_cli_routes_the_placed_stage_and_the_drawing_formats(tmp_path, capsys):
    from fusec.cli import main
    assert main(["dump", "llama-block", "--stage", "placed", "--format", "svg", "-o", str(tmp_path / "l.svg")]) == 0
    assert "<svg" in (tmp_path / "l.svg").read_text()
    assert main(["dump", "llama-block", "--stage", "tiled", "--format", "png"]) == 1
    assert "use --stage placed" in capsys.readouterr().err


# --- numerics ----------------------------------------------------------------------------------------------

def test_a_placed_program_runs_in_section_order_and_matches_eager():
    module, inputs = load_model("llama-block")
    compiled = fusec.compile(module, inputs)
    assert "placement" not in compiled.graph.annotations  # a CPU compile does not place
    p = plan(compiled.graph, "sn40l")
    assert [step.kernel for step in compiled.program.steps] == [k for s in p.sections for k in s.kernels]
    with torch.no_grad():
        want = module(*inputs)
    got = compiled(*inputs)
    assert (got - want).abs().max().item() <= 1e-4 * max(want.abs().max().item(), 1.0)


def test_partition_raises_when_a_kernel_cannot_fit(graphs):
    from fusec.passes.placement_stages import Sizer, analyze
    tiny = dataclasses.replace(get_machine("test_grid"), pcus=2, pmus=2, grid=(2, 2))
    with pytest.raises(IRError, match="needs"):
        partition(analyze(graphs["fused"], tiny, Sizer()), tiny)
