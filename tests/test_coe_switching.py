"""CoE expert switching: the paper's switching ratios, the per-socket figure from the machine preset, the
request arithmetic, the table, and argument checks that name what was expected and what was given."""
from __future__ import annotations

import pytest

from fusec.coe.switching import (DGX_A100, DGX_H100, MEASURED_NAME, PLATFORMS, SN40L_NODE, SN40L_SOCKET,
                                 Platform, coe_estimate, compare, decode_seconds_per_token, format_table,
                                 switch_seconds, switch_speedup)
from fusec.machines import get_machine

LLAMA2_7B_BF16 = 13.5e9          # ~6.74e9 params x 2 bytes
STORIES15M_BF16 = int(15.2e6) * 2
TOY = Platform("toy", "link", link_bw=1e9, hbm_bw=1e10, hbm_efficiency=0.5, source="test values")


def test_paper_switching_ratios_for_llama2_7b_experts():
    # SN40L Table V: model switching 31x vs DGX A100, 15x vs DGX H100 (text: 16x)
    s = switch_speedup(LLAMA2_7B_BF16)
    assert set(s) == {"vs DGX A100", "vs DGX H100"}
    assert s["vs DGX A100"] == pytest.approx(1e12 / 32e9) and 30 <= s["vs DGX A100"] < 32
    assert s["vs DGX H100"] == pytest.approx(1e12 / 64e9) and 15 <= s["vs DGX H100"] < 16.5
    assert switch_seconds(LLAMA2_7B_BF16, SN40L_NODE) == pytest.approx(13.5e-3)  # docs/rdu-model.md, formula 6's example


def test_platforms_are_sourced_and_sn40l_comes_from_the_machine():
    m = get_machine("sn40l")
    assert (SN40L_SOCKET.link_bw, SN40L_SOCKET.hbm_bw, SN40L_SOCKET.hbm_efficiency) == (
        m.ddr_to_hbm_bw, m.hbm_bw, m.hbm_efficiency)
    assert SN40L_NODE.link_bw == pytest.approx(1e12) and SN40L_NODE.hbm_bw == 8 * m.hbm_bw
    assert (DGX_A100.link_bw, DGX_H100.link_bw, DGX_H100.hbm_bw) == (32e9, 64e9, 24e12)
    assert "[A]" in DGX_A100.source and "DFAYN" in DGX_H100.source
    assert all(p.source and "[" in p.source for p in PLATFORMS)
    assert len({p.name for p in PLATFORMS}) == len(PLATFORMS)


def test_stories15m_switch_on_one_socket():
    t = switch_seconds(STORIES15M_BF16, SN40L_SOCKET)
    assert t == pytest.approx(STORIES15M_BF16 / get_machine("sn40l").ddr_to_hbm_bw)
    assert t == pytest.approx(243.2e-6)


def test_coe_estimate_hand_computed():
    # switch 2e9 / 1e9 = 2 s; decode 1e9 / (1e10 x 0.5) = 0.2 s/token; 10 tokens = 2 s; request 0.5 x 2 + 2 = 3 s
    e = coe_estimate(2_000_000_000, 1_000_000_000, 10, 0.5, TOY)
    assert e["platform"] == "toy"
    assert e["switch_s"] == pytest.approx(2.0)
    assert e["decode_s_per_token"] == pytest.approx(0.2)
    assert e["request_s"] == pytest.approx(3.0)
    assert e["tokens_per_s"] == pytest.approx(10 / 3)
    assert e["switch_fraction"] == pytest.approx(1.0)
    assert decode_seconds_per_token(1_000_000_000, TOY) == pytest.approx(0.2)


def test_no_misses_no_switch_cost():
    e = coe_estimate(2_000_000_000, 1_000_000_000, 10, 0.0, TOY)
    assert e["request_s"] == pytest.approx(10 * e["decode_s_per_token"])
    assert e["tokens_per_s"] == pytest.approx(5.0)
    assert e["switch_fraction"] == pytest.approx(1.0)  # what a miss would cost, still reported


def test_compare_and_table():
    rows = compare(STORIES15M_BF16, STORIES15M_BF16, 20, 1.0, measured={"switch_p50_s": 0.012, "tokens_per_s": 80.0})
    assert [r["platform"] for r in rows] == [MEASURED_NAME] + [p.name for p in PLATFORMS]
    assert rows[0]["switch_s"] == 0.012 and rows[0]["switch_fraction"] is None
    text = format_table(rows)
    for name in [MEASURED_NAME] + [p.name for p in PLATFORMS]:
        assert name in text
    header, rule, measured_line = text.splitlines()[:3]
    for col in ("platform", "switch (ms)", "decode (ms/token)", "tokens/s", "switch / N tokens"):
        assert col in header
    assert measured_line.split()[-1] == "-" and "12.0" in measured_line and "80.0" in measured_line
    assert len(text.splitlines()) == 2 + len(rows)
    assert [r["platform"] for r in compare(1, 1, 1, 0.0)] == [p.name for p in PLATFORMS]
    with_p99 = format_table(compare(1, 1, 1, 0.0, measured={"switch_p50_s": 1e-3, "switch_p99_s": 2e-3}))
    assert "1.00 (p99 2.00)" in with_p99


@pytest.mark.parametrize("args, words", [
    ((-1, 1, 1, 0.5), ("expert_bytes", "non-negative", "-1")),
    ((1, -5, 1, 0.5), ("weight_bytes_per_token", "positive", "-5")),
    ((1, 0, 1, 0.5), ("weight_bytes_per_token", "positive", "0")),
    ((1, 1, 0, 0.5), ("tokens_per_request", ">= 1", "0")),
    ((1, 1, 2.5, 0.5), ("tokens_per_request", "integer", "2.5")),
    ((1, 1, 1, 1.5), ("miss_rate", "[0, 1]", "1.5")),
    ((1, 1, 1, -0.1), ("miss_rate", "[0, 1]", "-0.1")),
])
def test_bad_arguments_name_expected_and_given(args, words):
    with pytest.raises(ValueError) as e:
        coe_estimate(*args, TOY)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_other_bad_arguments():
    with pytest.raises(ValueError, match="platform must be a Platform.*'DGX H100'"):
        switch_seconds(1, "DGX H100")
    with pytest.raises(ValueError, match="expected keys among .*got switch_s"):
        compare(1, 1, 1, 0.0, measured={"switch_s": 1.0})
    with pytest.raises(ValueError, match="hbm_efficiency must be in \\(0, 1\\], got 1.5"):
        Platform("x", "link", 1e9, 1e9, 1.5, "test")
    with pytest.raises(ValueError, match="expert_bytes must be a positive"):
        switch_speedup(0)
