"""Expert switching in a Composition of Experts (CoE): copy cost vs decode cost, per platform.

A router picks one expert per request; unless it is already resident, the expert's weights are copied
from the big slow tier (DDR on SN40L, host memory on a DGX) into HBM, then the expert generates tokens
(docs/rdu-hardware.md: SN40L "Composition of Experts"; docs/rdu-model.md, formula 6):
    T_switch = expert_bytes / BW_tier->HBM
    T_decode = weight_bytes_per_token / (BW_HBM x efficiency)          memory-bound decode at batch 1
    T_request = miss_rate x T_switch + tokens x T_decode               (the router's own time is left out)

    rows = compare(13.5e9, 13.5e9, tokens_per_request=20, miss_rate=1.0)
    print(format_table(rows))

Tags as in docs/rdu-hardware.md: [P] primary text, [S] secondary, [D] derived, [M] unverified;
[A] = an assumption of ours from a source not listed there (e.g. a vendor datasheet).
SN40L = Prabhakar et al., arXiv:2405.07518 (MICRO 2024); DFAYN = Gandhi et al., MLSys 2026 (notes only).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

from fusec.benchtools import format_table as _plain_table
from fusec.machines import get_machine

SN40L_NODE_SOCKETS = 8     # SN40L §II/§VI-C: Samba-CoE runs on one node of 8 sockets (TP8) [P]
MEASURED_NAME = "this CPU (measured)"
MEASURED_KEYS = ("switch_p50_s", "switch_p99_s", "decode_s_per_token", "tokens_per_s", "switch_fraction")


@dataclass(frozen=True)
class Platform:
    """One system an expert runs on. Bandwidths in bytes/s."""

    name: str
    link_name: str          # the tier -> HBM copy path used for switching
    link_bw: float          # bytes/s of that copy (the whole system's, as the expert is sharded over it)
    hbm_bw: float           # bytes/s of HBM, summed over the devices holding the expert (for decode)
    hbm_efficiency: float   # achievable fraction of hbm_bw in decode
    source: str             # where each figure comes from

    def __post_init__(self):
        for what in ("link_bw", "hbm_bw"):
            v = getattr(self, what)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"platform {self.name!r}: {what} must be a positive number of bytes/s, got {v!r}")
        if not 0 < self.hbm_efficiency <= 1:
            raise ValueError(f"platform {self.name!r}: hbm_efficiency must be in (0, 1], got {self.hbm_efficiency!r}")


def _sn40l_platforms() -> tuple[Platform, Platform]:
    """One socket and one 8-socket node, both from the `sn40l` machine preset (one source of truth)."""
    m = get_machine("sn40l")
    n = SN40L_NODE_SOCKETS
    socket = Platform(
        "SN40L (1 socket)", "DDR->HBM", m.ddr_to_hbm_bw, m.hbm_bw, m.hbm_efficiency,
        f"fusec.machines sn40l: ddr_to_hbm_bw {m.source('ddr_to_hbm_bw')}; hbm_bw {m.source('hbm_bw')}; "
        f"hbm_efficiency {m.source('hbm_efficiency')}")
    node = Platform(
        f"SN40L node ({n} sockets)", "DDR->HBM", n * m.ddr_to_hbm_bw, n * m.hbm_bw, m.hbm_efficiency,
        f"link: {n} x {m.ddr_to_hbm_bw / 1e9:g} GB/s = {n * m.ddr_to_hbm_bw / 1e12:g} TB/s, the paper's "
        f"'over 1 TB/s' aggregate DDR->HBM per node, SN40L §I/§VI-C [P]; HBM: {n} x the socket's "
        f"{m.hbm_bw / 1e12:g} TB/s (SN40L Table II [P]) [D]; efficiency as one socket (SN40L §VI-B [P])")
    return socket, node


SN40L_SOCKET, SN40L_NODE = _sn40l_platforms()

# The paper's DGX figures are estimates with optimistic switching (SN40L §VI-C, Table V [P]): 32 / 64 GB/s
# host->GPU for the whole node. Read per GPU (8 x 64 GB/s, as formula 6's example in docs/rdu-model.md
# suggests) the ratio would be ~2x, not Table V's 15x; the paper's 31x / 15x follow only from the node-wide
# figure used here.
_GPU_EFFICIENCY = ("efficiency 0.5: GPU decode 'rarely exceeds 50%' of HBM bandwidth, SN40L §VI-B [P] "
                   "(an upper bound; KL reports ~21%)")
DGX_A100 = Platform(
    "DGX A100", "host->GPU", 32e9, 8 * 2.039e12, 0.5,
    "link: 32 GB/s host->GPU assumed by SN40L §VI-C / Table V [P]; HBM: 8 x A100-80GB 2.039 TB/s = 16.3 TB/s, "
    "[A] vendor datasheet (no figure in docs/rdu-hardware.md); " + _GPU_EFFICIENCY + ", assumed for A100 too [A]")
DGX_H100 = Platform(
    "DGX H100", "host->GPU", 64e9, 24e12, 0.5,
    "link: 64 GB/s host->GPU assumed by SN40L §VI-C / Table V [P]; HBM: DGX H100 = 24 TB/s, DFAYN notes "
    "(docs/rdu-hardware.md) [S] (datasheet 8 x 3.35 TB/s = 26.8 TB/s [A]); " + _GPU_EFFICIENCY)

PLATFORMS: tuple[Platform, ...] = (SN40L_SOCKET, SN40L_NODE, DGX_A100, DGX_H100)


# --- checks --------------------------------------------------------------------------------------------

def _bytes(what: str, value, positive: bool = False) -> float:
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (value > 0 if positive else value >= 0))
    if not ok:
        kind = "a positive" if positive else "a non-negative"
        raise ValueError(f"{what} must be {kind} number of bytes, got {value!r}")
    return value


def _platform(value) -> Platform:
    if not isinstance(value, Platform):
        raise ValueError(f"platform must be a Platform (e.g. one of PLATFORMS), got {value!r}")
    return value


# --- the model -----------------------------------------------------------------------------------------

def switch_seconds(expert_bytes: int, platform: Platform) -> float:
    """Time to copy one expert into HBM: expert_bytes / link_bw (docs/rdu-model.md, formula 6)."""
    return _bytes("expert_bytes", expert_bytes) / _platform(platform).link_bw


def decode_seconds_per_token(weight_bytes_per_token: int, platform: Platform) -> float:
    """Memory-bound decode at batch 1: the bytes read per token / achievable HBM bandwidth
    (DFAYN Eq. 3 at one sample, docs/rdu-model.md formula 5)."""
    p = _platform(platform)
    return _bytes("weight_bytes_per_token", weight_bytes_per_token, positive=True) / (p.hbm_bw * p.hbm_efficiency)


def coe_estimate(expert_bytes: int, weight_bytes_per_token: int, tokens_per_request: int, miss_rate: float,
                 platform: Platform) -> dict:
    """One request: the router's expert is missing from HBM with probability `miss_rate`, then it generates
    `tokens_per_request` tokens. switch_fraction = switch / (tokens x decode), i.e. "switching costs X% of
    generating N tokens" (independent of miss_rate)."""
    if isinstance(tokens_per_request, bool) or not isinstance(tokens_per_request, int) or tokens_per_request < 1:
        raise ValueError(f"tokens_per_request must be an integer >= 1, got {tokens_per_request!r}")
    if isinstance(miss_rate, bool) or not isinstance(miss_rate, (int, float)) or not 0 <= miss_rate <= 1:
        raise ValueError(f"miss_rate must be a number in [0, 1], got {miss_rate!r}")
    switch = switch_seconds(expert_bytes, platform)
    decode = decode_seconds_per_token(weight_bytes_per_token, platform)
    generate = tokens_per_request * decode
    request = miss_rate * switch + generate
    return {"platform": platform.name, "switch_s": switch, "decode_s_per_token": decode, "request_s": request,
            "tokens_per_s": tokens_per_request / request, "switch_fraction": switch / generate}


def compare(expert_bytes: int, weight_bytes_per_token: int, tokens_per_request: int, miss_rate: float,
            measured: dict | None = None, platforms: Iterable[Platform] = PLATFORMS) -> list[dict]:
    """One coe_estimate row per platform, after a first "this CPU (measured)" row built from `measured`
    (keys: switch_p50_s, switch_p99_s, decode_s_per_token, tokens_per_s, switch_fraction; missing -> None).
    The measured row's switch_s is its p50."""
    rows = []
    if measured is not None:
        unknown = sorted(set(measured) - set(MEASURED_KEYS))
        if unknown:
            raise ValueError(f"measured: expected keys among {', '.join(MEASURED_KEYS)}, got {', '.join(unknown)}")
        rows.append({"platform": MEASURED_NAME, "switch_s": measured.get("switch_p50_s"),
                     "switch_p99_s": measured.get("switch_p99_s"),
                     "decode_s_per_token": measured.get("decode_s_per_token"), "request_s": None,
                     "tokens_per_s": measured.get("tokens_per_s"),
                     "switch_fraction": measured.get("switch_fraction")})
    rows += [coe_estimate(expert_bytes, weight_bytes_per_token, tokens_per_request, miss_rate, p)
             for p in platforms]
    return rows


def switch_speedup(expert_bytes: int) -> dict[str, float]:
    """How much faster the SN40L node switches an expert than each DGX: T_switch(DGX) / T_switch(node).

    SN40L Table V [P] reports 31x (vs DGX A100) and 15x (vs DGX H100; its text says 16x) for Samba-CoE's
    Llama2-7B experts (~13.5e9 bytes in bf16). The model gives 1 TB/s / 32 GB/s = 31.25x and
    1 TB/s / 64 GB/s = 15.6x; the ratio is a ratio of link bandwidths, so it does not depend on the size."""
    node = switch_seconds(_bytes("expert_bytes", expert_bytes, positive=True), SN40L_NODE)
    return {f"vs {p.name}": switch_seconds(expert_bytes, p) / node for p in (DGX_A100, DGX_H100)}


# --- printing ------------------------------------------------------------------------------------------

def _num(x: float | None, scale: float = 1.0, suffix: str = "") -> str:
    """3 significant figures (no exponent from 0.001 up), thousands separators from 1000; None -> "-"."""
    if x is None:
        return "-"
    v = x * scale
    if v == 0:
        return "0" + suffix
    a = abs(v)
    text = (f"{v:,.0f}" if a >= 100 else f"{v:.1f}" if a >= 10 else f"{v:.2f}" if a >= 1
            else f"{v:.3f}" if a >= 0.01 else f"{v:.3g}")
    return text + suffix


COLUMNS = [("platform", "platform", ""), ("switch", "switch (ms)", ""), ("decode", "decode (ms/token)", ""),
           ("tps", "tokens/s", ""), ("fraction", "switch / N tokens", "")]


def table_rows(rows: list[dict]) -> list[dict]:
    """`compare`'s rows as text, keyed as COLUMNS: a measured row with a p99 shows "p50 (p99 X)" in the
    switch column; None shows as "-"."""
    cells = []
    for r in rows:
        switch = _num(r.get("switch_s"), 1e3)
        if r.get("switch_p99_s") is not None:
            switch += f" (p99 {_num(r['switch_p99_s'], 1e3)})"
        cells.append({"platform": r["platform"], "switch": switch,
                      "decode": _num(r.get("decode_s_per_token"), 1e3), "tps": _num(r.get("tokens_per_s")),
                      "fraction": _num(r.get("switch_fraction"), 100, "%")})
    return cells


def format_table(rows: list[dict]) -> str:
    """A plain fixed-width table of `table_rows(rows)`: platform | switch (ms) | decode (ms/token) |
    tokens/s | switch / N tokens."""
    return _plain_table(table_rows(rows), COLUMNS)
