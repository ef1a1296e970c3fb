"""Machine descriptions: the presets hold the published figures (docs/rdu-hardware.md) with their sources,
derived figures follow from them, override files in JSON and TOML work, and mistakes name the valid choices."""
from __future__ import annotations

import dataclasses
import json
import os
import re

import pytest

from fusec.machines import (GiB, KiB, MiB, TiB, Machine, cache_size, cpu, get_machine, list_machines)
from fusec.passes.tile import loop_tiles

TAG = re.compile(r"\[(P|S|M|D)[^\]]*\]")
RDU_FIGURES = ("pcus", "pmus", "pmu_bytes", "grid", "peak_flops", "clock_hz", "lanes", "stages", "hbm_bytes",
               "hbm_bw", "ddr_bytes", "ddr_bw", "ddr_to_hbm_bw", "link_bw", "hop_latency_s", "launch_overhead_s",
               "program_load_s", "ddr_efficiency", "systolic_efficiency", "stage_pmus")


def test_list_machines():
    assert list_machines() == ["sn40l", "plasticine", "test_grid", "cpu", "test_cpu"]
    assert all(isinstance(get_machine(n), Machine) for n in list_machines())


def test_sn40l_has_the_published_figures():
    m = get_machine("sn40l")
    assert (m.kind, m.pcus, m.pmus, m.pmu_bytes) == ("rdu", 1040, 1040, 512 * KiB)  # SN40L Table II
    assert m.sram_bytes == 520 * MiB
    assert m.peak_flops == 638e12
    assert m.pcu_flops == pytest.approx(613.46e9, rel=1e-4)  # 638e12 / 1040 [D]
    assert (m.hbm_bytes, m.hbm_bw) == (64 * GiB, 1.8e12)
    assert (m.ddr_bytes, m.ddr_bw, m.ddr_to_hbm_bw) == (int(1.5 * TiB), 200e9, 125e9)
    assert m.hbm_efficiency == 0.95
    assert m.layout == "checkerboard" and m.grid[0] * m.grid[1] == m.pcus + m.pmus
    assert "[M]" in m.source("grid")  # the floorplan is our assumption, and says so
    assert "SN40L" in m.source("hbm_bw") and "[P]" in m.source("pcus")
    assert m.offchip().name == "hbm" and m.tile_budget == m.pmu_bytes * m.stage_pmus


def test_plasticine_has_the_published_figures():
    m = get_machine("plasticine")
    assert (m.pcus, m.pmus, m.grid, m.layout) == (64, 64, (16, 8), "checkerboard")
    assert (m.lanes, m.stages, m.clock_hz, m.pmu_bytes) == (16, 6, 1e9, 256 * KiB)
    assert m.peak_flops == 12.3e12 and m.sram_bytes == 16 * MiB
    assert m.pcu_flops == pytest.approx(m.lanes * m.stages * 2 * m.clock_hz, rel=2e-3)  # FMA per lane-stage
    assert m.hbm_bytes == 0 and m.offchip() == ("ddr", m.ddr_bytes, 51.2e9, m.ddr_efficiency)


def test_checkerboard_grid_holds_every_unit():
    m = get_machine("test_grid")
    cells = [m.unit_at(r, c) for r in range(m.grid[0]) for c in range(m.grid[1])]
    assert (m.grid, cells.count("pcu"), cells.count("pmu")) == ((4, 4), m.pcus, m.pmus)
    assert m.unit_at(0, 0) == "pcu" and m.unit_at(0, 1) == "pmu" and m.unit_at(1, 1) == "pcu"
    with pytest.raises(ValueError, match="outside the 4x4 grid"):
        m.unit_at(4, 0)


@pytest.mark.parametrize("name", ["sn40l", "plasticine", "test_grid"])
def test_every_rdu_figure_names_its_source_and_tag(name):
    m = get_machine(name)
    for figure in RDU_FIGURES:
        assert TAG.search(m.source(figure)), f"{name}.{figure}: source {m.source(figure)!r} has no tag"


def test_cpu_describes_this_machine():
    m = cpu()
    assert m.kind == "cpu" and m is get_machine("cpu")  # read once
    assert 0 < m.l1_bytes <= m.l2_bytes and m.l3_bytes > 0
    assert m.tile_budget == m.l2_bytes == m.pmu_bytes
    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert m.cores == m.pcus == expected
    assert m.peak_flops > 0 and m.pcu_flops == m.peak_flops / m.cores
    assert all(m.source(f) for f in ("l1_bytes", "l2_bytes", "l3_bytes", "cores", "clock_hz"))


def test_cache_size_reads_sysfs_and_falls_back(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sysconf_names", {})  # force the sysfs path
    for index, (level, kind, size, shared) in enumerate([(1, "Data", "48K", "0-1"), (1, "Instruction", "64K", "0"),
                                                         (2, "Unified", "2048K", "0"), (3, "Unified", "32M", "0-7")]):
        d = tmp_path / f"index{index}"
        d.mkdir()
        for name, text in (("level", str(level)), ("type", kind), ("size", size), ("shared_cpu_list", shared)):
            (d / name).write_text(text + "\n")
    assert cache_size(1, str(tmp_path))[0] == 24 * KiB  # shared by 2 CPUs
    assert cache_size(2, str(tmp_path))[0] == 2 * MiB
    assert cache_size(3, str(tmp_path))[0] == 32 * MiB  # the last level is reported whole
    size, note = cache_size(2, str(tmp_path / "missing"))
    assert size == 1 * MiB and "fallback" in note


def test_json_override(tmp_path):
    path = tmp_path / "hc24.json"
    path.write_text(json.dumps({"base": "sn40l", "name": "sn40l-hc24", "hbm_bw": 1.6e12, "ddr_bw": 100e9,
                                "grid": [52, 40], "stage_pmus": 4,
                                "sources": {"hbm_bw": "HC24: 25.6 TB/s over 16 sockets [D]"}}))
    m = get_machine(str(path))
    assert (m.name, m.hbm_bw, m.ddr_bw, m.grid, m.stage_pmus) == ("sn40l-hc24", 1.6e12, 100e9, (52, 40), 4)
    assert m.pcus == 1040 and m.peak_flops == 638e12  # the rest comes from the base
    assert m.source("hbm_bw") == "HC24: 25.6 TB/s over 16 sockets [D]"
    assert "override" in m.source("ddr_bw") and str(path) in m.source("ddr_bw")
    assert m.tile_budget == 4 * 512 * KiB


def test_toml_override(tmp_path):
    path = tmp_path / "half.toml"
    path.write_text('base = "sn40l"\nname = "sn40l-die"\npcus = 520\npmus = 520\npeak_flops = 319e12\n'
                    'grid = [20, 52]\nhbm_efficiency = 0.9\nhbm_bytes = 3.2e10\n')
    m = get_machine(str(path))
    assert (m.name, m.pcus, m.pmus, m.grid, m.hbm_efficiency) == ("sn40l-die", 520, 520, (20, 52), 0.9)
    assert m.hbm_bytes == 32_000_000_000 and isinstance(m.hbm_bytes, int)  # TOML floats become counts
    assert isinstance(m.pcus, int) and m.pcu_flops == pytest.approx(613.46e9, rel=1e-4)


def test_a_file_without_base_must_give_every_figure(tmp_path):
    full = {f.name: getattr(get_machine("test_grid"), f.name) for f in dataclasses.fields(Machine)
            if f.name != "sources"}
    full["name"] = "mine"
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(full))
    assert get_machine(str(path)) == dataclasses.replace(get_machine("test_grid"), name="mine")
    del full["hbm_bw"]
    path.write_text(json.dumps(full))
    with pytest.raises(ValueError, match="no 'base' preset, so it must give hbm_bw"):
        get_machine(str(path))


def test_unknown_names_and_keys_name_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="unknown machine 'sn50'.*sn40l, plasticine, test_grid, cpu"):
        get_machine("sn50")
    bad_key = tmp_path / "bad.json"
    bad_key.write_text(json.dumps({"base": "sn40l", "hbm_bandwidth": 1.6e12}))
    with pytest.raises(ValueError, match="unknown key.*hbm_bandwidth.*valid keys are base, name, .*hbm_bw"):
        get_machine(str(bad_key))
    bad_base = tmp_path / "base.toml"
    bad_base.write_text('base = "sn30"\n')
    with pytest.raises(ValueError, match="unknown base 'sn30'; the presets are sn40l"):
        get_machine(str(bad_base))
    with pytest.raises(ValueError, match="cannot read machine file"):
        get_machine(str(tmp_path / "missing.toml"))


def test_invalid_figures_are_rejected(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"base": "test_grid", "pcus": 8.5}))
    with pytest.raises(ValueError, match="pcus = 8.5 has the wrong type"):
        get_machine(str(path))
    path.write_text(json.dumps({"base": "test_grid", "grid": [2, 2]}))
    with pytest.raises(ValueError, match="2x2 grid cannot hold 8 PCUs \\+ 8 PMUs"):
        get_machine(str(path))
    path.write_text(json.dumps({"base": "sn40l", "hbm_efficiency": 1.5}))
    with pytest.raises(ValueError, match="hbm_efficiency must be in"):
        get_machine(str(path))


def test_machines_are_frozen_plain_data():
    m = get_machine("sn40l")
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.pcus = 1  # type: ignore[misc]
    assert m == get_machine("sn40l") and hash(m) == hash(get_machine("sn40l"))


def test_test_cpu_is_fixed_and_a_machine_file_sets_the_fork_join_cost(tmp_path):
    """`test_cpu` does not read the host (tests that pin tiles use it); `fork_join_s`, which the tiling
    pass's parallel_min follows, comes from a machine file like any figure."""
    m = get_machine("test_cpu")
    assert (m.kind, m.cores, m.l1_bytes, m.l2_bytes, m.clock_hz, m.fork_join_s) == ("cpu", 2, 48 * KiB, 2 * MiB,
                                                                                    2.3e9, 2e-6)
    assert m.source("fork_join_s").endswith("[M]") and cpu().fork_join_s == m.fork_join_s
    path = tmp_path / "slow_pool.json"
    path.write_text(json.dumps({"base": "test_cpu", "fork_join_s": 8e-6}))
    slow = get_machine(str(path))
    assert slow.fork_join_s == 8e-6 and "override" in slow.source("fork_join_s")
    assert loop_tiles(m)["parallel_min"] == 1 << 14 and loop_tiles(slow)["parallel_min"] == 1 << 16
