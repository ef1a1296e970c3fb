"""The placement picture (fusec/rdu/picture.py): legend, panels, flows, memory plan, file formats, and
the compact stage regions the placement gives it."""
from __future__ import annotations

import math
import struct
import xml.etree.ElementTree as ET

import pytest

from fusec.api import lower
from fusec.errors import FusecError
from fusec.rdu.picture import HEAVIEST_FLOWS, draw, figure, human_bytes, memory_over_sections
from fusec.rdu.placement import Placement
from fusec.tracing import trace
from fusec.passes.place import plan

SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def block():
    from fusec.models import load_model
    module, inputs = load_model("llama-block")
    graph = lower(trace(module, inputs).graph, fuse=True, target="rdu")
    return {m: plan(graph, m) for m in ("sn40l", "test_grid")}


@pytest.fixture(scope="module")
def decode():
    """One decode step of the tiny Llama block after 7 tokens of K/V, placed on sn40l in bf16."""
    from fusec.models import load_model
    from fusec.models.registry import decode_inputs
    module, _ = load_model("llama-block")
    args, kwargs = decode_inputs(module.config, past_len=7)
    return plan(lower(trace(module, args, kwargs).graph, fuse=True, target="rdu"), "sn40l", dtype="bf16")


def svg_texts(svg: str) -> list[str]:
    root = ET.fromstring(svg)
    assert root.tag == SVG + "svg"
    return ["".join(t.itertext()) for t in root.iter(SVG + "text")]


def legend_texts(p: Placement) -> list[str]:
    import matplotlib.pyplot as plt
    fig = figure(p, "test")
    try:
        return [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    finally:
        plt.close(fig)


def assert_legend_lists_every_stage(p: Placement, texts: list[str]) -> None:
    for st in p.stages:
        assert any(t.startswith(st.name + " ") and f"%{st.kernel} " in t and f"{st.pcus} PCU" in t for t in texts), \
            f"stage {st.name} missing from the legend {texts}"
    for b in p.buffers:
        if b.kind == "tensor":
            assert any(t.startswith(f"tensor {b.name} on chip") for t in texts), b.name


@pytest.mark.parametrize("machine", ("sn40l", "test_grid"))
def test_the_legend_lists_every_stage_with_its_kernel(block, machine):
    p = block[machine]
    assert_legend_lists_every_stage(p, legend_texts(p))
    texts = svg_texts(draw(p, "svg", "llama-block"))
    assert_legend_lists_every_stage(p, texts)
    for sec in p.sections:  # one panel per section
        assert f"section {sec.index}" in texts


def test_the_picture_builds_for_a_decode_program(decode):
    assert any(st.role == "qk" for st in decode.stages)
    texts = svg_texts(draw(decode, "svg", "llama-block decode"))
    assert_legend_lists_every_stage(decode, texts)
    assert draw(decode, "png")[:8] == b"\x89PNG\r\n\x1a\n"


def test_png_and_svg_are_valid_and_the_same_placement_gives_the_same_file(block):
    p = block["test_grid"]
    png = draw(p, "png", "llama-block")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    assert 600 < width < 3000 and 300 < height < 3000
    svg = draw(p, "svg", "llama-block")
    assert svg_texts(svg) and svg == draw(p, "svg", "llama-block")


def test_the_heaviest_flows_are_arrows_labelled_with_their_bytes(block):
    from matplotlib.patches import FancyArrowPatch
    import matplotlib.pyplot as plt
    p = block["sn40l"]
    fig = figure(p)
    grid = fig.axes[0]
    arrows = [a for a in grid.patches if isinstance(a, FancyArrowPatch)]
    labels = {t.get_text() for t in grid.texts}
    plt.close(fig)
    assert 1 <= len(arrows) <= HEAVIEST_FLOWS
    heaviest = max((f for f in p.flows if f.src.startswith("stage:") and f.dst.startswith("buffer:")
                    and p.buffers[int(f.dst.split(":")[1])].kernel != p.stages[int(f.src.split(":")[1])].kernel),
                   key=lambda f: f.bytes)   # from one kernel to the next: groups apart
    assert human_bytes(heaviest.bytes) in labels


def test_the_memory_plan_bars_add_up(block, decode):
    for p in (block["test_grid"], decode):
        sram = memory_over_sections(p, "sram")
        for sec in p.sections:
            assert sram["stage buffers"][sec.index] + sram["on-chip tensors"][sec.index] == sum(
                p.buffers[b].capacity for b in sec.buffers)
        hbm = memory_over_sections(p, "hbm")
        weights = sum(t.bytes for t in p.memory.tensors if t.kind == "weight" and t.tier == "hbm")
        assert all(v == weights for v in hbm["weight"])   # weights live throughout
        assert max(map(sum, zip(*hbm.values()))) <= dict(p.memory.peak)["hbm"]
    assert human_bytes(1536) == "1.5 KiB" and human_bytes(512) == "512 B" and human_bytes(2**30) == "1 GiB"


def spread(cells) -> float:
    """Mean Manhattan distance of a group's units to their centre, over that of a square patch of the
    same units on the checkerboard (1: as compact as a square)."""
    n = len(cells)
    cr, cc = sum(r for r, _ in cells) / n, sum(c for _, c in cells) / n
    return sum(abs(r - cr) + abs(c - cc) for r, c in cells) / n / (math.sqrt(2 * n) / 2)


def test_each_stage_sits_in_a_compact_region_and_the_hops_do_not_grow():
    """A chain of six 64-PCU stages, each fed through a one-PMU buffer: hops alone let annealing scatter
    every stage over the chip (spread 2.1-3.8); the compact start and the locality term keep each in a
    patch (1.0-1.2), with fewer hops and a busiest link no more loaded than the strip placements'."""
    from fusec.machines import get_machine
    from fusec.passes import placement_grid as grid
    m = get_machine("sn40l")
    groups, flows = [], []
    for i in range(6):
        groups += [grid.Group(f"buffer:{i}", "pmu", 1), grid.Group(f"stage:{i}", "pcu", 64)]
        flows += [(f"buffer:{i}", f"stage:{i}", 4096)] + ([(f"stage:{i - 1}", f"buffer:{i}", 4096)] if i else [])
    cells, routing = grid.place(m, groups, flows, seed=0)
    assert max(spread(cells[f"stage:{i}"]) for i in range(6)) < 1.3
    strips = grid.STYLES[-1]   # the strip start (spread up to 1.5) and its annealing (what hops alone give)
    start = grid.greedy(m, groups, flows, strips.compact)
    scattered = grid.anneal(m, groups, flows, start, 0, strips)
    assert min(spread(scattered[f"stage:{i}"]) for i in range(6)) > 1.8
    old = [grid.route(m, c, flows) for c in (start, scattered)]
    assert routing.weighted_hops < min(r.weighted_hops for r in old)
    assert routing.busiest[2] <= min(r.busiest[2] for r in old)


# --- formats -----------------------------------------------------------------------------------------------

def test_a_bad_format_is_a_clear_error(block, tmp_path, capsys):
    from fusec.cli import main
    with pytest.raises(FusecError, match="svg or png, not 'jpg'"):
        draw(block["test_grid"], "jpg")
    with pytest.raises(SystemExit):
        main(["dump", "llama-block", "--stage", "placed", "--format", "jpg"])
    assert "invalid choice: 'jpg'" in capsys.readouterr().err
    assert main(["dump", "llama-block", "--stage", "placed", "--format", "dot"]) == 1
    assert "not dot" in capsys.readouterr().err
    out = tmp_path / "layout.png"
    assert main(["dump", "llama-block", "--stage", "placed", "-o", str(out)]) == 1   # text into a .png
    assert "--format png" in capsys.readouterr().err and not out.exists()
    assert main(["dump", "llama-block", "--stage", "placed", "--format", "svg", "-o", str(out)]) == 1
    assert "--format png" in capsys.readouterr().err and not out.exists()


def test_a_png_is_not_written_to_a_terminal(monkeypatch, capsys):
    import sys
    from fusec.cli import main
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(["dump", "llama-block", "--stage", "placed", "--format", "png"]) == 1
    assert "-o layout.png" in capsys.readouterr().err


def test_the_cli_writes_a_png_a_person_can_open(tmp_path):
    from fusec.cli import main
    out = tmp_path / "layout.png"
    assert main(["dump", "llama-block", "--stage", "placed", "--format", "png", "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_program_without_kernels_draws_a_note_not_a_crash():
    from fusec.machines import get_machine
    from fusec.rdu.placement import MemoryPlan
    empty = Placement(get_machine("sn40l"), 0, None, (), (), (), (), MemoryPlan((), (), ()), ())
    assert any("nothing is placed" in t for t in svg_texts(draw(empty, "svg")))


def test_a_picture_without_matplotlib_says_which_extra_to_install(block, monkeypatch):
    """matplotlib is optional (the `bench` extra): without it, drawing names the package and the extra
    instead of surfacing a bare ModuleNotFoundError."""
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what a missing package looks like to `import`
    with pytest.raises(FusecError, match=r"matplotlib.*fusec\[bench\]"):
        draw(block["test_grid"], "png")
