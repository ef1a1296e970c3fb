"""Pictures of a placement: text (tables and an ASCII grid per section), SVG and PNG.

In the ASCII grid each unit shows the kernel that owns it, by its letter in the section's legend:
upper case for a PCU, lower case for a PMU, `.` for a unit the section leaves free. The SVG and PNG draw
the same grid in colour per kernel (PCUs as squares, PMUs as circles) with the most loaded links of the
dimension-order routes drawn over it, thicker and redder the more bytes they carry.
"""
from __future__ import annotations

import io

from fusec.placement import Cell, Placement

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7",
           "#9c755f", "#bab0ac")
BUSIEST_LINKS = 12   # links highlighted per section
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
    from fusec.benchtools import format_table
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


# --- drawings --------------------------------------------------------------------------------------------

def link_loads(p: Placement, section: int) -> list[tuple[Cell, Cell, float]]:
    """(from, to, bytes) of every loaded link of the section, busiest first (routes recomputed)."""
    from passes.placement_grid import link_list
    sec = p.sections[section]
    cells = {f"stage:{i}": list(p.stages[i].cells) for i in sec.stages}
    cells |= {f"buffer:{i}": list(p.buffers[i].cells) for i in sec.buffers}
    return link_list(p.machine, cells, [(f.src, f.dst, f.bytes) for f in p.flows if f.src in cells])


def _panels(p: Placement, cell: int):
    """(section, x0, y0) of each panel, and the picture's width and height."""
    rows, cols = p.machine.grid
    n = len(p.sections)
    across = min(n, 4)
    pw, ph = cols * cell + 20, rows * cell + 40
    panels = [(s, (s % across) * pw + 10, (s // across) * ph + 30) for s in range(n)]
    return panels, across * pw, -(-n // across) * ph


def _shapes(p: Placement, title: str, cell: int):
    """What both pictures draw, as plain tuples: ("text", x, y, text), ("pcu"/"pmu", x, y, colour) with
    (x, y) the unit's top-left corner, ("link", x1, y1, x2, y2, share of the busiest load, bytes)."""
    panels, _, _ = _panels(p, cell)
    names = dict(p.kernel_names)
    rows, cols = p.machine.grid
    yield "text", 10, 14, f"{title} on {p.machine.name}: {len(p.sections)} section(s)"
    for s, x0, y0 in panels:
        sec = p.sections[s]
        colour = {k: PALETTE[i % len(PALETTE)] for i, k in enumerate(sec.kernels)}
        owners = p.owners(s)
        yield "text", x0, y0 - 4, (f"section {s}: " + ", ".join(f"%{k} {names[k]}" for k in sec.kernels))[:120]
        for r in range(rows):
            for c in range(cols):
                unit, kernel = owners.get((r, c), (p.machine.unit_at(r, c), -1))
                yield unit, x0 + c * cell, y0 + r * cell, colour.get(kernel, "#eeeeee")
        loads = link_loads(p, s)[:BUSIEST_LINKS]
        top = loads[0][2] if loads else 1.0
        for a, b, load in loads:
            yield ("link", x0 + a[1] * cell + cell / 2, y0 + a[0] * cell + cell / 2,
                   x0 + b[1] * cell + cell / 2, y0 + b[0] * cell + cell / 2, load / top, load)


def to_svg(p: Placement, title: str = "", cell: int = 10) -> str:
    """The layout as SVG: one panel per section, units coloured by kernel, busiest links in red."""
    _, width, height = _panels(p, cell)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 20}" '
           f'font-family="monospace" font-size="10">']
    for kind, *a in _shapes(p, title, cell):
        if kind == "text":
            out.append(f'<text x="{a[0]}" y="{a[1]}">{_escape(a[2])}</text>')
        elif kind == "pcu":
            out.append(f'<rect x="{a[0] + 1}" y="{a[1] + 1}" width="{cell - 2}" height="{cell - 2}" fill="{a[2]}"/>')
        elif kind == "pmu":
            out.append(f'<circle cx="{a[0] + cell / 2}" cy="{a[1] + cell / 2}" r="{cell / 2 - 1}" fill="{a[2]}"/>')
        else:
            out.append(f'<line x1="{a[0]}" y1="{a[1]}" x2="{a[2]}" y2="{a[3]}" stroke="#d00000" '
                       f'stroke-width="{1 + 3 * a[4]:.2f}" stroke-opacity="{0.4 + 0.6 * a[4]:.2f}">'
                       f'<title>{a[5]:,.0f} bytes per call</title></line>')
    out.append("</svg>")
    return "\n".join(out)


def to_png(p: Placement, title: str = "", cell: int = 10) -> bytes:
    """The layout as PNG (matplotlib, Agg backend): the same picture as `to_svg`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle, Rectangle
    _, width, height = _panels(p, cell)
    fig = plt.figure(figsize=(width / 100, (height + 20) / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(height + 20, 0)
    ax.axis("off")
    for kind, *a in _shapes(p, title, cell):
        if kind == "text":
            ax.text(a[0], a[1], a[2], fontsize=6, family="monospace")
        elif kind == "pcu":
            ax.add_patch(Rectangle((a[0] + 1, a[1] + 1), cell - 2, cell - 2, color=a[2]))
        elif kind == "pmu":
            ax.add_patch(Circle((a[0] + cell / 2, a[1] + cell / 2), cell / 2 - 1, color=a[2]))
        else:
            ax.plot([a[0], a[2]], [a[1], a[3]], color="#d00000", linewidth=1 + 3 * a[4], alpha=0.4 + 0.6 * a[4])
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
