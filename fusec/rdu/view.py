"""Pictures of a placement: text (tables and an ASCII grid per section), SVG and PNG.

In the ASCII grid each unit shows the kernel that owns it, by its letter in the section's legend:
upper case for a PCU, lower case for a PMU, `.` for a unit the section leaves free. The SVG and PNG
(`fusec.rdu.picture`) colour every stage, with a legend, the heaviest flows and the memory plan.
"""
from __future__ import annotations

from fusec.benchtools import format_table
from fusec.rdu.picture import draw
from fusec.rdu.placement import Placement

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
STAGE_COLUMNS = [("stage", "stage", ""), ("mode", "mode", ""), ("pcus", "PCUs", "d"), ("pmus", "PMUs", "d"),
                 ("flops", "FLOPs", ".4g"), ("hbm", "HBM read", ",d"), ("ddr", "DDR read", ",d"),
                 ("sram", "SRAM read", ",d"), ("sends", "sends", ",d")]
TENSOR_COLUMNS = [("tensor", "tensor", ""), ("kind", "kind", ""), ("bytes", "bytes", ",d"), ("tier", "tier", ""),
                  ("offset", "offset", ",d"), ("life", "sections", ""), ("traffic", "bytes/call", ",d")]


def _legend(p: Placement, section: int) -> dict[int, str]:
    return {k: LETTERS[i % 26] for i, k in enumerate(p.sections[section].kernels)}


def ascii_grid(p: Placement, section: int) -> str:
    letters = _legend(p, section)
    owners = p.owners(section)
    rows, cols = p.machine.grid
    lines = []
    for r in range(rows):
        line = []
        for c in range(cols):
            unit, kernel = owners.get((r, c), ("", -1))
            line.append("." if kernel < 0 else letters[kernel] if unit == "pcu" else letters[kernel].lower())
        lines.append("".join(line))
    return "\n".join(lines)


def format_placement(p: Placement, title: str = "") -> str:
    """The placement as text: per section its kernels, stages (PCUs, PMUs, work) and grid; then the
    memory plan."""
    names = dict(p.kernel_names)
    m = p.machine
    out = [f"# {title + ' ' if title else ''}placed on {m.name} ({m.grid[0]}x{m.grid[1]} grid, {m.pcus} PCUs, "
           f"{m.pmus} PMUs of {m.pmu_bytes // 1024} KiB), seed {p.seed}, dtype {p.dtype or 'as traced'}",
           f"# {len(p.sections)} section(s), {len(p.kernel_names)} kernel(s), {len(p.stages)} stage(s)"]
    for sec in p.sections:
        letters = _legend(p, sec.index)
        legend = ", ".join(f"{letters[k]}=%{k} {names[k]}" for k in sec.kernels)
        a, b, load = sec.busiest_link
        out.append(f"\n## section {sec.index}: {legend}")
        out.append(f"{sec.pcus} PCUs, {sec.pmus} PMUs, {sec.tiles} tile(s); busiest link {a}->{b} {load:,} bytes")
        out.append(f"traffic-weighted hops {sec.weighted_hops:,.0f} (random placement {sec.random_weighted_hops:,.0f})")
        rows = []
        for i in sec.stages:
            st = p.stages[i]
            tiers = st.bytes_by_tier(reads_only=True)
            rows.append({"stage": st.name, "mode": st.mode, "pcus": st.pcus, "pmus": p.buffers[st.buffer].pmus,
                         "flops": st.flops, "hbm": tiers["hbm"], "ddr": tiers["ddr"], "sram": tiers["sram"],
                         "sends": st.sends})
        for i in sec.buffers:
            b_ = p.buffers[i]
            if b_.kind == "tensor":
                rows.append({"stage": f"tensor {b_.name}", "mode": "on chip", "pmus": b_.pmus})
        out.append(format_table(rows, STAGE_COLUMNS))
        out.append(ascii_grid(p, sec.index))
    out.append("\n## memory plan (" + ", ".join(f"{tier} peak {peak:,} bytes" for tier, peak in p.memory.peak)
               + (f"; spilled to DDR: {', '.join(p.memory.spilled)}" if p.memory.spilled else "") + ")")
    out.append(format_table([{"tensor": t.name, "kind": t.kind, "bytes": t.bytes,
                              "tier": t.tier + (" (streamed)" if t.streamed else ""), "offset": t.offset,
                              "life": f"{t.lifetime[0]}-{t.lifetime[1]}", "traffic": t.traffic}
                             for t in p.memory.tensors], TENSOR_COLUMNS))
    return "\n".join(out)


# --- drawings (fusec/rdu/picture.py) -----------------------------------------------------------------

def to_svg(p: Placement, title: str = "") -> str:
    """The placement as SVG: a panel per section with its legend, flows and memory plan."""
    return draw(p, "svg", title)


def to_png(p: Placement, title: str = "") -> bytes:
    """The same picture as `to_svg`, as PNG."""
    return draw(p, "png", title)
