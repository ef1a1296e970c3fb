"""The command-line side of the RDU mapping: `fusec dump MODEL --stage placed` and `fusec rdu MODEL`.

    fusec dump llama-block --stage placed                 # sections, stages, ASCII grid, memory plan
    fusec dump llama-block --stage placed --format svg -o layout.svg     # or png, json
    fusec rdu llama-block:llama2_7b --seq-len 4096 --compare             # fused vs unfused, prefill
    fusec rdu llama-block:llama2_7b --decode --tp 8                      # tokens/s of one decode step
"""
from __future__ import annotations

import argparse
import json
import sys

from fusec.errors import FusecError

PLACED_FORMATS = ("text", "json", "svg", "png")
DTYPES = ("auto", "traced", "bf16", "f16", "f32")


def dump_placed(spec: str, fmt: str, seq_len: int | None = None, fuse: bool = True,
                dynamic: bool = False) -> str | bytes:
    """The placement of model `spec` on sn40l (seed 0) as text, json, svg or png (bytes); `dynamic`: of
    its symbolic program (sequence axis symbolic) placed at `seq_len` tokens (default: the upper bound)."""
    from fusec.placement import placement_of
    from fusec.placement_view import format_placement, to_png, to_svg
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
    return _place(_traced(spec, seq_len, decode_past, dynamic), fuse, machine, seed, dtype, seq_len)


def _traced(spec: str, seq_len: int | None, decode_past: int | None, dynamic: bool = False):
    """The traced IR of model `spec`: its example inputs, or one decode step after `decode_past` tokens;
    `dynamic`: with the sequence axis (axis 1 of the first input) symbolic, `seq_len` then being the size
    the report is for (see `_place`)."""
    from fusec.models import load_model
    from fusec.tracing import trace
    if dynamic:
        if decode_past is not None:
            raise FusecError("--dynamic makes the prompt length symbolic; it does not apply to --decode")
        module, inputs = load_model(spec)
        return trace(module, inputs, dynamic={0: {1}}).graph
    module, inputs = load_model(spec, seq_len=seq_len)
    kwargs = {}
    if decode_past is not None:
        from fusec.models.registry import decode_inputs
        config = getattr(module, "config", None)
        if config is None or not spec.startswith("llama-block"):
            raise FusecError(f"--decode needs a built-in llama-block model, not {spec!r}")
        inputs, kwargs = decode_inputs(config, past_len=decode_past)
    return trace(module, inputs, kwargs).graph


def _place(traced, fuse: bool, machine: str, seed: int, dtype: str | None, seq_len: int | None = None):
    """Lower and place; a symbolic program first at `seq_len` tokens (default its upper bound), so the
    placement, the memory plan and the report are for that size (SambaFlow compiles per shape too)."""
    from fusec.api import lower
    from fusec.sizes import concrete
    from passes.place import place
    return place(concrete(lower(traced, fuse=fuse), seq_len), machine, seed, dtype)


def add_rdu_parser(subparsers) -> argparse.ArgumentParser:
    from fusec.cli import nonnegative_int, positive_int
    r = subparsers.add_parser("rdu", help="estimate a model's time on an RDU (the analytical model)")
    r.add_argument("model", help="registry name (see `fusec models`) or path/to/file.py:factory")
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
    r.add_argument("--orchestration", default="software", choices=("software", "hardware"))
    r.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the placement's annealing")
    r.add_argument("--format", default="text", choices=("text", "json"))
    r.add_argument("--stages", action="store_true", help="always print the per-stage tables")
    r.add_argument("-o", "--output", help="write to this file instead of standard output")
    return r


def rdu_main(args: argparse.Namespace) -> int:
    """`fusec rdu`: the performance report of a model (or fused vs unfused with --compare)."""
    from backends.rdu_model import format_report, report
    from fusec.machines import get_machine
    from fusec.models import load_model
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
    variants = [True, False] if args.compare else [not args.unfused]
    traced = _traced(args.model, args.seq_len, past, args.dynamic)
    reports = {}
    for fuse in variants:
        graph = _place(traced, fuse, args.machine, args.seed, dtype, args.seq_len)
        reports["fused" if fuse else "unfused"] = report(
            graph, machine, layers=layers, tp=args.tp, orchestration=args.orchestration, decode=args.decode,
            seed=args.seed, dtype=dtype)
    if args.format == "json":
        text = json.dumps(reports if args.compare else next(iter(reports.values())), indent=1)
    else:
        parts = [f"== {name}\n{format_report(rep, True if args.stages else None)}" for name, rep in reports.items()]
        if args.compare:
            f, u = reports["fused"]["total"], reports["unfused"]["total"]
            parts.append(f"fused is {u['time_s'] / f['time_s']:.2f}x faster than unfused "
                         f"({1e3 * f['time_s']:.4f} ms vs {1e3 * u['time_s']:.4f} ms per call; "
                         f"{f['kernels']} vs {u['kernels']} kernels per layer)")
        text = "\n\n".join(parts)
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
