"""The `fusec` command line: dump the IR at any stage, explain, check, generate text, benchmark, model an RDU,
serve experts, run the demo, list models, manage the cache.

    fusec dump llama-block --stage canonical
    fusec dump my_model.py:make_model --stage ir --format dot -o graph.dot
    fusec demo
    fusec explain llama-block          # which ops fuse into which kernels, which run in PyTorch
    fusec check llama-block --float64  # errors per output; bisects to the first wrong kernel
    fusec cache info                   # or: fusec cache clear
    fusec generate path/to/model --prompt "Once upon a time"   # HF directory, llama2.c .bin or GGUF
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch

import fusec
from fusec import cache
from fusec.api import lower, program_stats
from fusec.argtypes import nonnegative_float, positive_int
from fusec.cli_generate import add_parser as add_generate_parser, generate_main
from fusec.errors import FusecError
from fusec.explain import explain
from fusec.export import to_dot, to_json
from fusec.generate import compile_generator, eager_generator
from fusec.models import list_models, load_model
from fusec.models.causal_lm import CausalLM
from fusec.rdu.cli import add_rdu_parser, dump_placed, rdu_main, write_bytes
from fusec.sizes import concrete
from fusec.tracing import trace
from fusec.passes.pipeline import TARGETS, run_pipeline


def _frontend_stages() -> list[str]:
    return ["fx", "ir"]


BACKEND_STAGES = ["numba"]  # generated source, after every pass


def stage_names() -> list[str]:
    """Every stage `fusec dump` can show, in pipeline order."""
    rdu = [s for s in TARGETS["rdu"] if s != "weights"]  # the CPU stages, then placed (RDU target only)
    return _frontend_stages() + [s for s in rdu if s != "placed"] + ["looped", "placed"] + BACKEND_STAGES


def dump(spec: str, stage: str, fmt: str, seq_len: int | None = None, fuse: bool = True,
         dynamic: bool = False) -> str:
    """The IR of model `spec` after `stage`, formatted as text, json or dot (`numba`: generated source).
    `dynamic`: the symbolic program (sequence axis symbolic), at `seq_len` tokens when given."""
    if stage not in stage_names():
        raise FusecError(f"unknown stage {stage!r}; expected one of {', '.join(stage_names())}")
    if stage == "placed" or fmt in ("svg", "png"):
        if stage != "placed":
            raise FusecError(f"--format {fmt} draws the placement: use --stage placed")
        return dump_placed(spec, fmt, seq_len, fuse, dynamic)
    module, inputs = load_model(spec, seq_len=None if dynamic else seq_len)
    traced = trace(module, inputs, dynamic={0: {1}} if dynamic else None)
    if stage == "fx":
        if fmt != "text":
            raise FusecError("stage 'fx' prints only as text (it is torch's graph, not fusec IR)")
        return traced.fx_graph.code.strip()
    if stage == "numba":
        compiled = fusec.compile(module, inputs, fuse=fuse, dynamic={0: {1}} if dynamic else None)
        return f"{_stats_line(compiled.stats)}\n{compiled.source}"
    if not fuse and stage not in ("ir", "canonical"):
        graph = lower(traced.graph, fuse=False)
    else:
        graph = traced.graph if stage == "ir" else run_pipeline(traced.graph, until=stage, target="cpu")
    if dynamic and seq_len is not None:  # the symbolic program as it runs at that size
        graph = concrete(graph, seq_len)
    if fmt == "json":
        return to_json(graph)
    if fmt == "dot":
        return to_dot(graph, spec)
    summary = ", ".join(f"{op} {n}" for op, n in graph.ops().items())
    head = f"# {spec} after {stage}: {len(graph.nodes)} nodes ({summary})"
    if "kernel" in graph.ops():
        head += "\n" + _stats_line(program_stats(graph))
    return f"{head}\n{graph!r}"


def _stats_line(stats: dict) -> str:
    return (f"# {stats['kernels']} kernels per call, {stats['intermediate_bytes']:,} bytes of intermediates "
            f"written to memory")


def demo(spec: str, bench_table: bool = True) -> int:
    """Trace a built-in model, print its IR summary, run it on the reference and numba backends (fused
    and unfused) against PyTorch eager, then print the benchmark table of the tiny block."""
    module, inputs = load_model(spec)
    with torch.no_grad():
        want = module(*inputs)
    scale = max(want.abs().max().item(), 1e-30)
    print(f"model      {spec}: {type(module).__name__}, inputs {', '.join(str(list(x.shape)) for x in inputs)}")
    ok = True
    for label, backend, fuse in (("reference", "reference", True), ("numba unfused", "numba", False),
                                 ("numba fused", "numba", True)):
        start = time.perf_counter()
        compiled = fusec.compile(module, inputs, backend=backend, fuse=fuse)
        took = time.perf_counter() - start
        if backend == "reference":
            print(f"traced IR  {len(compiled.traced.graph.nodes)} nodes: " +
                  ", ".join(f"{op} {n}" for op, n in compiled.traced.graph.ops().items()))
        err = (compiled(*inputs) - want).abs().max().item()
        ok &= err / scale <= 1e-4
        print(f"{label:<14} {compiled.stats['kernels']:3d} kernels, {compiled.stats['intermediate_bytes']:>9,} "
              f"bytes of intermediates, compiled in {took:5.2f} s, max error vs PyTorch {err:.2e} "
              f"(relative {err / scale:.1e})")
    print("result     " + ("OK" if ok else "MISMATCH"))
    if ok and bench_table:
        print("\nbenchmark of the tiny block (fusec bench llama-block --seq 16 --past 16):")
        bench("llama-block:tiny", ["--seq", "16", "--past", "16", "--repeat", "20", "--no-compile-time",
                                   "--no-torch-compile", "--out", "bench_out/demo"])
        ok = demo_generate()
    return 0 if ok else 1


def demo_generate(new_tokens: int = 48, repeat: int = 3) -> bool:
    """Generate tokens with a random-weight stories15M, fusec against PyTorch eager with a KV cache, like
    with like: both generators built and warmed up before timing, the same prompt, the median of `repeat`
    runs of prefill + decode."""
    print(f"\ngeneration: stories15M (random weights), {new_tokens} new tokens, greedy, median of {repeat}")
    model = CausalLM.from_preset("stories15M", seed=0).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    rates, ids = {}, {}
    for name, gen in (("fusec", compile_generator(model, background=False)), ("eager", eager_generator(model))):
        gen.generate(prompt, max_new_tokens=4)  # warm up: programs built, caches touched
        gen.wait()  # (and the weights moved to huge pages)
        seconds = []
        for _ in range(repeat):
            ids[name] = gen.generate(prompt, max_new_tokens=new_tokens)
            seconds.append(gen.last["prefill_seconds"] + gen.last["decode_seconds"])
        rates[name] = new_tokens / statistics.median(seconds)
    same = bool(torch.equal(ids["fusec"], ids["eager"]))
    print(f"fusec      {rates['fusec']:7.1f} tokens/s (prefill + decode)")
    print(f"eager      {rates['eager']:7.1f} tokens/s (prefill + decode, PyTorch with a KV cache)")
    print("tokens     " + ("identical to eager" if same else "DIFFER from eager"))
    return same


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fusec", description="Dataflow-graph compiler with kernel fusion for PyTorch.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    d = sub.add_parser("dump", help="print a model's IR after a stage")
    d.add_argument("model", help="registry name (see `fusec models`) or path/to/file.py:factory")
    d.add_argument("--stage", default="canonical", help="one of: " + ", ".join(stage_names()) + " (default canonical)")
    d.add_argument("--format", default="text", choices=("text", "json", "dot", "svg", "png"),
                   help="text (default), json or dot (Graphviz); svg or png draw the placement (--stage placed)")
    d.add_argument("--seq-len", type=positive_int, default=None, help="sequence length of the example input")
    d.add_argument("--unfused", action="store_true", help="show the unfused program (one kernel per op)")
    d.add_argument("--dynamic", action="store_true",
                   help="the symbolic program (sequence axis symbolic); with --seq-len, at that size")
    d.add_argument("-o", "--output", help="write to this file instead of standard output")
    m = sub.add_parser("demo", help="trace a built-in model, run it and compare with PyTorch")
    m.add_argument("model", nargs="?", default="llama-block",
                   help="registry name (see `fusec models`) or path/to/file.py:factory (default llama-block)")
    m.add_argument("--no-bench", action="store_true", help="skip the benchmark table")
    sub.add_parser("models", help="list the built-in model names")
    add_generate_parser(sub)
    add_rdu_parser(sub)
    _add_debug_commands(sub)
    b = sub.add_parser("bench", help="fused vs unfused vs PyTorch eager vs torch.compile on a Llama block",
                       add_help=False)
    b.add_argument("model", nargs="?", default="llama-block:tinyllama_1b", help="llama-block[:PRESET]")
    co = sub.add_parser("coe", help="Composition of Experts: `fusec coe bench [--help]` runs its benchmark",
                        add_help=False)  # `fusec coe bench --help` is the benchmark's own help
    co.add_argument("action", nargs="?", choices=("bench",), help="bench: the CoE benchmark (see its --help)")
    p.commands = sub.choices  # {command: its parser}: `fusec coe --help` prints the one of coe
    return p


def bench(spec: str, rest: list[str]) -> int:
    """`fusec bench llama-block:PRESET [benchmark flags]` runs fusec/bench_block.py on that block;
    `fusec bench generate MODEL [flags]` runs fusec/bench_generate.py (whole-model tokens/s)."""
    if spec == "generate":
        from fusec.bench_generate import main as generate_main  # the benchmarks load on use
        return generate_main(rest)
    from fusec.bench_block import main as bench_main  # the benchmarks load on use
    name, _, preset = spec.partition(":")
    if name != "llama-block":
        raise FusecError(f"fusec bench runs Llama blocks: expected llama-block[:PRESET], got {spec!r}")
    return bench_main(["--preset", preset or "tiny", *rest])


def _add_debug_commands(sub) -> None:
    """`fusec explain`, `fusec check` and `fusec cache` (see fusec/explain.py, check.py, cache.py)."""
    e = sub.add_parser("explain", help="which ops fuse into which kernels, which run in PyTorch and why (dry run)")
    c = sub.add_parser("check", help="errors of fused, unfused, reference and PyTorch; bisect a mismatch")
    for p in (e, c):
        p.add_argument("model", help="registry name (see `fusec models`) or path/to/file.py:factory")
        p.add_argument("--seq-len", type=positive_int, default=None, help="sequence length of the example input")
    c.add_argument("--float64", action="store_true", help="measure errors against PyTorch in float64")
    c.add_argument("--tol", type=nonnegative_float, default=1e-4, help="largest error, scaled by the output's magnitude")
    k = sub.add_parser("cache", help="the on-disk compile cache: where it is and how big, or clear it")
    k.add_argument("action", choices=("info", "clear"), help="info: where it is, what it holds; clear: empty it")


def _debug_command(args) -> int:
    if args.command == "cache":
        result = cache.info() if args.action == "info" else cache.clear()
        verb = "" if args.action == "info" else "removed "
        print(f"cache dir  {result['dir'] or 'none: programs compile in memory'}")
        for refused in result["refused"]:  # the directories not used, and why
            print(f"           (not {refused})")
        for ndir in result["numba_dirs"][1:]:
            print(f"numba dir  {ndir} (NUMBA_CACHE_DIR)")
        print(f"{verb}programs   {result['programs']} ({result['compiled']} with compiled code)\n"
              f"{verb}traces     {result['traces']} (traced modules, `fusec.trace_cache`)\n"
              f"{verb}size       {result['bytes'] / 2**20:.1f} MiB in {result['files']} files")
        return 0
    module, inputs = load_model(args.model, seq_len=args.seq_len)
    if args.command == "explain":
        print(explain(module, inputs))
        return 0
    from fusec.check import check  # loads the reference backend and SciPy (seconds): only `fusec check` needs them
    report = check(module, inputs, float64=args.float64, tol=args.tol)
    print(report)
    return 0 if report.ok else 1


def _check_output_name(path: str | None, fmt: str) -> None:
    """A picture file named for the other format, text written into a .png or .svg, or a PNG written to a
    terminal is refused before anything runs: the file would not open, the terminal would fill with bytes."""
    if fmt == "png" and path is None and sys.stdout.isatty():
        raise FusecError("--format png is binary: write it to a file with -o layout.png (or redirect the output)")
    suffix = os.path.splitext(path or "")[1].lower().lstrip(".")
    if suffix in ("svg", "png") and fmt != suffix:
        raise FusecError(f"-o {path} names a {suffix.upper()} file but the format is {fmt}: add --format {suffix} "
                         f"(with --stage placed), or name the file for --format {fmt}")


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)
    args, rest = build_parser().parse_known_args(argv)
    if rest and args.command not in ("bench", "coe"):
        build_parser().parse_args(argv)  # reports the unknown arguments and exits
    try:
        if args.command == "dump":
            _check_output_name(args.output, args.format)
            text = dump(args.model, args.stage, args.format, args.seq_len, fuse=not args.unfused,
                        dynamic=args.dynamic)
            if isinstance(text, bytes):  # --format png
                return write_bytes(text, args.output)
            if args.output:
                with open(args.output, "w") as f:
                    f.write(text + "\n")
            else:
                print(text)
            return 0
        if args.command == "rdu":
            return rdu_main(args)
        if args.command == "bench":
            return bench(args.model, rest)
        if args.command == "coe":
            if args.action is None:  # `fusec coe --help`, or no action
                coe_parser = build_parser().commands["coe"]
                if rest and rest[0] in ("-h", "--help"):
                    coe_parser.print_help()
                    return 0
                coe_parser.error("expected an action: bench (`fusec coe bench --help` shows its options)")
            from fusec.coe.bench import main as coe_bench  # the benchmarks load on use
            return coe_bench(rest)
        if args.command == "demo":
            return demo(args.model, bench_table=not args.no_bench)
        if args.command in ("explain", "check", "cache"):
            return _debug_command(args)
        if args.command == "generate":
            return generate_main(args)
        if args.command == "models":
            print("\n".join(list_models()))
            return 0
        build_parser().print_help()
        return 2
    except BrokenPipeError:  # `fusec dump ... | head`
        sys.stderr.close()
        return 0
    except (FusecError, ValueError, TypeError, OSError, ImportError) as e:  # ImportError: a missing extra
        print(f"fusec: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
