"""The command-line side of the RDU mapping: `fusec dump MODEL --stage placed` and `fusec rdu MODEL`.

    fusec dump llama-block --stage placed                 # sections, stages, ASCII grid, memory plan
    fusec dump llama-block --stage placed --format svg -o layout.svg     # or png, json
    fusec rdu llama-block:llama2_7b --seq-len 4096 --compare             # fused vs unfused, prefill
    fusec rdu llama-block:llama2_7b --decode --tp 8                      # tokens/s, looped and not, side by side
    fusec rdu --paper                                                    # the model against the papers' figures
"""
from __future__ import annotations

import argparse
import json
import sys

from fusec.api import lower
from fusec.argtypes import nonnegative_int, positive_int
from fusec.errors import FusecError
from fusec.machines import get_machine
from fusec.models import load_model
from fusec.models.registry import decode_inputs
from fusec.rdu import paper
from fusec.rdu.model import format_report, report
from fusec.rdu.placement import placement_of
from fusec.rdu.view import format_placement, to_png, to_svg
from fusec.sizes import concrete
from fusec.tracing import trace
from fusec.passes.place import place

PLACED_FORMATS = ("text", "json", "svg", "png")
DTYPES = ("auto", "traced", "bf16", "f16", "f32")


def dump_placed(spec: str, fmt: str, seq_len: int | None = None, fuse: bool = True,
                dynamic: bool = False) -> str | bytes:
    """The placement of model `spec` on sn40l (seed 0) as text, json, svg or png (bytes); `dynamic`: of
    its symbolic program (sequence axis symbolic) placed at `seq_len` tokens (default: the upper bound)."""
    if fmt not in PLACED_FORMATS:
        raise FusecError(f"stage 'placed' prints as {', '.join(PLACED_FORMATS)}, not {fmt}")
    graph = _lowered(spec, seq_len, fuse, None, dynamic=dynamic)
    placement = placement_of(graph)
    title = spec + ("" if fuse else " (unfused)")
    if fmt == "json":
        return json.dumps(placement.to_dict(), indent=1)
    if fmt == "svg":
        return to_svg(placement, title)
    if fmt == "png":
        return to_png(placement, title)
    return format_placement(placement, title)


def _lowered(spec: str, seq_len: int | None, fuse: bool, decode_past: int | None,
             machine: str = "sn40l", seed: int = 0, dtype: str | None = None, dynamic: bool = False):
    """Model `spec` traced and lowered to a placed graph, fused or unfused (see `_traced`)."""
    return _place(_traced(spec, seq_len, decode_past, dynamic), fuse, machine, seed, dtype, seq_len=seq_len)


def _traced(spec: str, seq_len: int | None, decode_past: int | None, dynamic: bool = False):
    """The traced IR of model `spec`: its example inputs, or one decode step after `decode_past` tokens;
    `dynamic`: with the sequence axis (axis 1 of the first input) symbolic, `seq_len` then being the size
    the report is for (see `_place`)."""
    if dynamic:
        if decode_past is not None:
            raise FusecError("--dynamic makes the prompt length symbolic; it does not apply to --decode")
        module, inputs = load_model(spec)
        return trace(module, inputs, dynamic={0: {1}}).graph
    module, inputs = load_model(spec, seq_len=seq_len)
    kwargs = {}
    if decode_past is not None:
        config = getattr(module, "config", None)
        if config is None or not spec.startswith("llama-block"):
            raise FusecError(f"--decode needs a built-in llama-block model, not {spec!r}")
        inputs, kwargs = decode_inputs(config, past_len=decode_past)
    return trace(module, inputs, kwargs).graph


def _place(traced, fuse: bool, machine: str, seed: int, dtype: str | None, weights: str = "fp32",
           seq_len: int | None = None):
    """`traced` lowered with its weights stored as `weights` (int8 weights and their scales are counted
    at their own sizes, whatever `dtype` says of floats) and placed on `machine`; a symbolic program first
    at `seq_len` tokens (default its upper bound), so the placement, the memory plan and the report are
    for that size (SambaFlow compiles per shape too)."""
    return place(concrete(lower(traced, fuse=fuse, weights=weights), seq_len), machine, seed, dtype)


def add_rdu_parser(subparsers) -> argparse.ArgumentParser:
    r = subparsers.add_parser("rdu", help="estimate a model's time on an RDU (the analytical model)")
    r.add_argument("model", nargs="?", help="registry name (see `fusec models`) or path/to/file.py:factory")
    r.add_argument("--paper", action="store_true",
                   help="the paper-vs-model table (SN40L, kernel looping); --json for its rows as JSON")
    r.add_argument("--json", action="store_true", help="with --paper: the rows as a JSON list")
    r.add_argument("--kernel-looping", action=argparse.BooleanOptionalAction, default=None,
                   help="the layers as one looped call (KL); with --decode and neither flag, both side by side")
    r.add_argument("--machine", default="sn40l", help="sn40l, plasticine, test_grid or a .json/.toml file")
    r.add_argument("--unfused", action="store_true", help="the unfused program (one kernel per op)")
    r.add_argument("--compare", action="store_true", help="report fused and unfused and their ratio")
    r.add_argument("--decode", action="store_true", help="one decode step (1 new token after --past tokens)")
    r.add_argument("--seq-len", type=positive_int, default=None, help="prefill tokens of the example input")
    r.add_argument("--dynamic", action="store_true",
                   help="trace with the sequence axis symbolic; report the program at --seq-len tokens")
    r.add_argument("--past", type=nonnegative_int, default=None, help="past tokens for --decode (default: max_seq_len - 1)")
    r.add_argument("--layers", type=positive_int, default=None,
                   help="calls of the block per model call (default: the preset's n_layers, else 1)")
    r.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel sockets")
    r.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="count float tensors at this size (auto: bf16 on sn40l, else as traced)")
    r.add_argument("--weights", default="fp32", choices=("fp32", "bf16", "int8"),
                   help="weight storage (int8: 1 byte per weight plus a scale per 32; see passes/weights.py)")
    r.add_argument("--orchestration", default=None, choices=("software", "hardware"),
                   help="kernel launches from the host or the chip (default: hardware for --decode, else software)")
    r.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the placement's annealing")
    r.add_argument("--format", default="text", choices=("text", "json"), help="the report as text (default) or JSON")
    r.add_argument("--stages", action="store_true", help="always print the per-stage tables")
    r.add_argument("-o", "--output", help="write to this file instead of standard output")
    return r


def rdu_main(args: argparse.Namespace) -> int:
    """`fusec rdu`: the performance report of a model (fused vs unfused with --compare, looped vs not with
    --decode), or the paper-vs-model table with --paper."""
    if args.paper:
        return _emit(args, _paper_text(args.json, args.machine))
    if args.model is None:
        raise FusecError("fusec rdu needs a MODEL (see `fusec models`), or --paper for the paper-vs-model table")
    machine = get_machine(args.machine)
    dtype = (("bf16" if machine.name == "sn40l" else None) if args.dtype == "auto" else
             None if args.dtype == "traced" else args.dtype)
    module, _ = load_model(args.model, seq_len=args.seq_len)
    config = getattr(module, "config", None)
    past = None
    if args.decode:
        past = args.past if args.past is not None else config.max_seq_len - 1 if config is not None else 0
    layers = args.layers if args.layers is not None else (
        getattr(config, "n_layers", 1) if args.model.startswith("llama-block") else 1)
    orchestration = args.orchestration or ("hardware" if args.decode else "software")
    loops = ([False, True] if args.decode and args.kernel_looping is None else [bool(args.kernel_looping)])
    variants = [True, False] if args.compare else [not args.unfused]
    traced = _traced(args.model, args.seq_len, past, args.dynamic)
    reports = {}
    for fuse in variants:
        graph = _place(traced, fuse, args.machine, args.seed, dtype, args.weights, args.seq_len)
        for looping in loops:
            name = ("fused" if fuse else "unfused") + (", looped" if looping else ", not looped" if
                                                       len(loops) > 1 else "")
            reports[name] = report(graph, machine, layers=layers, tp=args.tp, orchestration=orchestration,
                                   decode=args.decode, seed=args.seed, dtype=dtype, looping=looping)
    if args.format == "json":
        return _emit(args, json.dumps(reports if len(reports) > 1 else next(iter(reports.values())), indent=1))
    parts = [f"== {name}\n{format_report(rep, True if args.stages else None)}" for name, rep in reports.items()]
    for looped in ([False, True] if len(loops) > 1 else [loops[0]]) if args.compare else []:
        tail = (", looped" if looped else ", not looped") if len(loops) > 1 else ""
        f, u = reports["fused" + tail]["total"], reports["unfused" + tail]["total"]
        parts.append(f"fused{tail} is {u['time_s'] / f['time_s']:.2f}x faster than unfused "
                     f"({1e3 * f['time_s']:.4f} ms vs {1e3 * u['time_s']:.4f} ms per call; "
                     f"{f['kernels']} vs {u['kernels']} kernels per layer)")
    if len(loops) > 1:
        for fuse in variants:
            kind = "fused" if fuse else "unfused"
            off, on = reports[f"{kind}, not looped"]["total"], reports[f"{kind}, looped"]["total"]
            parts.append(f"kernel looping ({kind}): {off['time_s'] / on['time_s']:.2f}x "
                         f"({off['tokens_per_s']:,.1f} -> {on['tokens_per_s']:,.1f} tokens/s; "
                         f"KL reports up to 2.2x, geomean 1.6x)")
    return _emit(args, "\n\n".join(parts))


def _paper_text(as_json: bool, machine: str) -> str:
    rows = paper.paper_rows(machine)  # looked up on the module at the call: tests substitute quick rows
    return json.dumps(rows, indent=1) if as_json else paper.format_rows(rows)


def _emit(args: argparse.Namespace, text: str) -> int:
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(text + "\n")
    else:
        sys.stdout.write(text + "\n")
    return 0


def write_bytes(data: bytes, path: str | None) -> int:
    """Write binary output (a PNG) to `path`, or to standard output."""
    if path:
        with open(path, "wb") as fh:
            fh.write(data)
    else:
        sys.stdout.buffer.write(data)
    return 0
