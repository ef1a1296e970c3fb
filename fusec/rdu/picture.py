"""The placement as a picture a person can read (matplotlib; SVG or PNG).

    draw(placement, "svg", title)   # str;  draw(placement, "png", title) -> bytes;  figure(...) -> Figure

Left, one panel per section (the first MAX_PANELS; a note names the rest): the PCU/PMU grid with a
colour per pipeline stage (PCUs as squares, the PMUs of the stage's input buffer as circles of the same
colour; a kernel's stages share a hue, lighter to darker in pipeline order; whole tensors kept on chip
are ringed in black; free units are pale grey), each large stage labelled at its centre, the heaviest
flows between unit groups drawn as arrows labelled with their bytes per call, and the busiest link of
the routing in red. Beside each panel, its legend: every stage with its kernel, PCUs and PMUs.
Right, the memory plan over time (sections run one after another): per section, the bytes live in
SRAM (stage buffers and on-chip tensors), HBM and DDR, stacked by kind of tensor.
Text stays text in the SVG (searchable; the tests read the legend from it), and both formats carry no
date, so the same placement gives the same file.
"""
from __future__ import annotations

import io

from fusec.errors import FusecError
# matplotlib (optional, and slow to load) is imported inside the functions that draw
from fusec.rdu.placement import Placement

FORMATS = ("svg", "png")
MAX_PANELS = 8        # sections drawn; a program with more (unfused: one per op) names the rest
HEAVIEST_FLOWS = 6    # arrows per section
LABEL_MIN_PCUS = 8    # stages at least this large are labelled on the grid (all are in the legend)
FREE = "#e8e8e8"
KIND_COLOURS = {"stage buffers": "#76b7b2", "on-chip tensors": "#b07aa1", "weight": "#4e79a7",
                "const": "#9c755f", "input": "#59a14f", "activation": "#f28e2b", "output": "#e15759"}


def draw(p: Placement, fmt: str, title: str = "") -> str | bytes:
    """The picture as SVG text or PNG bytes. FusecError for another format, or without matplotlib."""
    if fmt not in FORMATS:
        raise FusecError(f"a placement is drawn as {' or '.join(FORMATS)}, not {fmt!r} "
                         f"(text and json: fusec.rdu.view.format_placement, Placement.to_dict)")
    try:
        import matplotlib  # optional (the `bench` extra): only pictures need it
    except ImportError as e:
        raise FusecError(f"drawing a placement needs matplotlib ({e}): pip install 'fusec[bench]' "
                         f"(or use --format text or json)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig = figure(p, title)
    buf = io.BytesIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "fusec"}):
        if fmt == "svg":
            fig.savefig(buf, format="svg", metadata={"Date": None})
        else:
            fig.savefig(buf, format="png", dpi=100, metadata={"Software": None}, pil_kwargs={"optimize": True})
    plt.close(fig)
    return buf.getvalue().decode() if fmt == "svg" else buf.getvalue()


def figure(p: Placement, title: str = ""):
    """The matplotlib Figure (see the module docstring)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows, cols = p.machine.grid
    shown = p.sections[:MAX_PANELS]
    across = 1 if len(shown) <= 1 else 2
    down = max(1, -(-len(shown) // across))
    big = 5.5 if len(shown) == 1 else 3.6   # a panel at most this wide (inches), at least 1.6
    scale = min(0.11, big / cols, 0.8 * big / rows)
    panel_w, panel_h = max(cols * scale, 1.6), max(rows * scale, 1.6)
    legend_w = 2.7
    width = across * (panel_w + legend_w) + 3.9
    height = max(down * (panel_h + 0.5) + 1.2, 5.2)
    fig = plt.figure(figsize=(width, height))
    outer = fig.add_gridspec(1, 2, width_ratios=[across * (panel_w + legend_w), 3.3], wspace=0.1,
                             left=0.02, right=0.98, top=1 - 0.6 / height, bottom=0.7 / height)
    m = p.machine
    head = (f"{title + ' ' if title else ''}placed on {m.name} ({rows}x{cols} grid, {m.pcus} PCUs, {m.pmus} PMUs), "
            f"{len(p.sections)} section(s), {len(p.kernel_names)} kernel(s), {len(p.stages)} stage(s)")
    fig.suptitle(head, fontsize=10, x=0.02, ha="left")
    left = outer[0].subgridspec(down, 2 * across, width_ratios=[panel_w, legend_w] * across, hspace=0.35,
                                wspace=0.05)
    for i, sec in enumerate(shown):
        r, c = divmod(i, across)
        ax = fig.add_subplot(left[r, 2 * c])
        _section_panel(ax, p, sec.index)
        key = fig.add_subplot(left[r, 2 * c + 1])
        _legend(key, p, sec.index)
    notes = [f"Squares: PCUs, circles: PMUs (a stage's input buffer in its colour; ringed: a tensor kept on chip), "
             f"grey: free. Arrows: the {HEAVIEST_FLOWS} heaviest flows per section between unit groups 2+ cells "
             f"apart, bytes per call. Red: the busiest link."]
    if not shown:
        fig.text(0.05, 0.5, "no kernels: nothing is placed on the grid", fontsize=10)
    if len(p.sections) > len(shown):
        notes.append(f"Sections {len(shown)}-{len(p.sections) - 1} are not drawn (the first {len(shown)} of "
                     f"{len(p.sections)}); `fusec dump MODEL --stage placed` lists every section.")
    fig.text(0.02, 0.25 / height, "\n".join(notes), fontsize=7, va="bottom")
    right = outer[1].subgridspec(3, 1, hspace=0.55)
    for k, tier in enumerate(("sram", "hbm", "ddr")):
        _memory_bars(fig.add_subplot(right[k]), p, tier, last=k == 2)
    return fig


# --- one section -------------------------------------------------------------------------------------------

def stage_colours(p: Placement, section: int) -> dict[str, str]:
    """A colour per unit group of the section ("stage:i", "buffer:j"): a hue per kernel, its stages
    lighter to darker in pipeline order; a stage's input buffer has its stage's colour, an on-chip
    tensor the base colour of the kernel that writes it."""
    from matplotlib import colors
    import matplotlib
    sec = p.sections[section]
    hues = matplotlib.colormaps["tab10" if len(sec.kernels) <= 10 else "tab20"].colors
    out = {}
    for n, k in enumerate(sec.kernels):
        base = colors.to_rgb(hues[n % len(hues)])
        mine = [i for i in sec.stages if p.stages[i].kernel == k]
        for j, i in enumerate(mine):
            t = 0.45 - 0.75 * j / max(len(mine) - 1, 1) if len(mine) > 1 else 0.0  # +: towards white, -: black
            shade = tuple(x + (1 - x) * t if t > 0 else x * (1 + t) for x in base)
            out[f"stage:{i}"] = out[f"buffer:{p.stages[i].buffer}"] = colors.to_hex(shade)
        for b in sec.buffers:
            if p.buffers[b].kind == "tensor" and p.buffers[b].kernel == k:
                out[f"buffer:{b}"] = colors.to_hex(base)
    return out


def _centre(cells) -> tuple[float, float]:
    return sum(c for _, c in cells) / len(cells), sum(r for r, _ in cells) / len(cells)   # (x, y)


def _groups(p: Placement, section: int) -> dict[str, tuple]:
    sec = p.sections[section]
    out = {f"stage:{i}": p.stages[i].cells for i in sec.stages}
    return out | {f"buffer:{i}": p.buffers[i].cells for i in sec.buffers}


def _section_panel(ax, p: Placement, section: int) -> None:
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Circle, FancyArrowPatch, Rectangle
    rows, cols = p.machine.grid
    sec = p.sections[section]
    colour = stage_colours(p, section)
    groups = _groups(p, section)
    owner = {cell: key for key, cells in groups.items() for cell in cells}
    squares, square_colours, circles, circle_colours, rings = [], [], [], [], []
    for r in range(rows):
        for c in range(cols):
            key = owner.get((r, c))
            fill = colour[key] if key else FREE
            if p.machine.unit_at(r, c) == "pcu":
                squares.append(Rectangle((c - 0.42, r - 0.42), 0.84, 0.84))
                square_colours.append(fill)
            else:
                circles.append(Circle((c, r), 0.42))
                circle_colours.append(fill)
                rings.append("black" if key and p.buffers[int(key.split(":")[1])].kind == "tensor" else "none")
    ax.add_collection(PatchCollection(squares, facecolors=square_colours, edgecolors="none"))
    ax.add_collection(PatchCollection(circles, facecolors=circle_colours, edgecolors=rings, linewidths=0.6))
    for i in sec.stages:
        st = p.stages[i]
        if st.pcus >= LABEL_MIN_PCUS:
            x, y = _centre(st.cells)
            ax.text(x, y, st.name, fontsize=6, ha="center", va="center",
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.75})
    flows = [f for f in p.flows if f.src in groups and f.dst in groups and f.bytes > 0]
    apart = [f for f in flows if _distance(groups[f.src], groups[f.dst]) >= 2]
    apart.sort(key=lambda f: (-f.bytes, f.src, f.dst))
    top = apart[0].bytes if apart else 1
    for f in apart[:HEAVIEST_FLOWS]:
        (x1, y1), (x2, y2) = _centre(groups[f.src]), _centre(groups[f.dst])
        ax.add_patch(FancyArrowPatch((x1, y1), (x2, y2), arrowstyle="-|>", mutation_scale=9,
                                     connectionstyle="arc3,rad=0.2", color="#222222", alpha=0.8,
                                     linewidth=0.8 + 2.2 * f.bytes / top))
        ax.text((x1 + x2) / 2, (y1 + y2) / 2, human_bytes(f.bytes), fontsize=6, color="#222222", ha="center",
                va="center", bbox={"boxstyle": "round,pad=0.1", "fc": "#fffbe6", "ec": "#999999", "lw": 0.4})
    (a, b, load) = sec.busiest_link
    if load > 0:
        ax.plot([a[1], b[1]], [a[0], b[0]], color="#d00000", linewidth=3, solid_capstyle="round")
    ax.set_xlim(-0.7, cols - 0.3)
    ax.set_ylim(rows - 0.3, -0.7)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"section {section}", fontsize=8, loc="left")


def _distance(a, b) -> float:
    (x1, y1), (x2, y2) = _centre(a), _centre(b)
    return abs(x1 - x2) + abs(y1 - y2)


def _legend(ax, p: Placement, section: int) -> None:
    """Every stage of the section (colour, name, kernel, PCUs, PMUs of its input buffer) and every
    on-chip tensor."""
    from matplotlib.lines import Line2D
    names = dict(p.kernel_names)
    colour = stage_colours(p, section)
    sec = p.sections[section]
    handles = []
    for i in sec.stages:
        st = p.stages[i]
        label = f"{st.name}  %{st.kernel} {names[st.kernel]}  {st.pcus} PCU, {p.buffers[st.buffer].pmus} PMU"
        handles.append(Line2D([], [], marker="s", linestyle="", markersize=7, color=colour[f"stage:{i}"],
                              label=label))
    for b in sec.buffers:
        buf = p.buffers[b]
        if buf.kind == "tensor":
            handles.append(Line2D([], [], marker="o", linestyle="", markersize=7, color=colour[f"buffer:{b}"],
                                  markeredgecolor="black", label=f"tensor {buf.name} on chip  {buf.pmus} PMU"))
    ax.axis("off")
    size = 6 if len(handles) <= 24 else 5
    kernels = " ".join(f"%{k}" for k in sec.kernels)
    title = (f"section {section}: kernel(s) {kernels}\n{sec.pcus} PCUs, {sec.pmus} PMUs, {sec.tiles} tile(s), "
             f"busiest link {human_bytes(sec.busiest_link[2])}\nstage, kernel, units:")
    ax.legend(handles=handles, loc="upper left", fontsize=size, frameon=False, handletextpad=0.3,
              borderaxespad=0, title=title, title_fontsize=size, alignment="left", ncol=1 if len(handles) <= 24 else 2)


# --- the memory plan ---------------------------------------------------------------------------------------

def memory_over_sections(p: Placement, tier: str) -> dict[str, list[int]]:
    """kind -> bytes live in `tier` during each section. SRAM: the section's stage buffers and the
    tensors it keeps whole on chip (capacities); HBM and DDR: the tensors whose lifetime covers it."""
    n = len(p.sections)
    if tier == "sram":
        out = {"stage buffers": [0] * n, "on-chip tensors": [0] * n}
        for b in p.buffers:
            out["stage buffers" if b.kind == "stage" else "on-chip tensors"][b.section] += b.capacity
        return out
    out = {}
    for t in p.memory.tensors:
        if t.tier == tier:
            row = out.setdefault(t.kind, [0] * n)
            for s in range(t.lifetime[0], min(t.lifetime[1], n - 1) + 1):
                row[s] += t.bytes
    return out


def _memory_bars(ax, p: Placement, tier: str, last: bool) -> None:
    from matplotlib.ticker import MaxNLocator
    m = p.machine
    data = memory_over_sections(p, tier)
    n = len(p.sections)
    top = max((sum(col) for col in zip(*data.values())), default=0)
    unit = next(u for u in range(5) if top < 1024 ** (u + 1) or u == 4)   # bars in B, KiB, MiB, GiB or TiB
    bottom = [0.0] * n
    for kind in KIND_COLOURS:
        if kind in data and any(data[kind]):
            values = [v / 1024 ** unit for v in data[kind]]
            ax.bar(range(n), values, bottom=bottom, width=0.7 if n > 1 else 0.4, color=KIND_COLOURS[kind],
                   label=kind)
            bottom = [a + b for a, b in zip(bottom, values)]
    capacity = {"sram": m.sram_bytes, "hbm": m.hbm_bytes, "ddr": m.ddr_bytes}[tier]
    peak = dict(p.memory.peak).get(tier, 0) if tier != "sram" else top
    what = "live per section; plan peak" if tier != "sram" else "buffers and on-chip tensors; peak"
    ax.set_title(f"{tier.upper()}: {what} {human_bytes(peak)} of {human_bytes(capacity)}", fontsize=7, loc="left")
    ax.set_xlim(-0.8, n - 0.2)
    ax.tick_params(labelsize=6)
    ax.yaxis.set_major_locator(MaxNLocator(nbins=4))
    ax.set_ylabel(("B", "KiB", "MiB", "GiB", "TiB")[unit], fontsize=7)
    if not any(bottom):
        ax.text(0.5, 0.5, f"nothing in {tier.upper()}", transform=ax.transAxes, ha="center", va="center",
                fontsize=7, color="#777777")
        ax.set_yticks([])
        ax.set_ylabel("")
    else:
        ax.set_ylim(0, 1.45 * max(bottom))   # room for the legend above the bars
        ax.legend(fontsize=6, loc="upper center", ncol=3, frameon=False, columnspacing=0.8, handlelength=1.2)
    ax.set_xticks(range(n) if n <= 12 else range(0, n, max(1, n // 8)))
    if last:
        ax.set_xlabel("section (time: sections run one after another)", fontsize=7)


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" or n == int(n) else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
