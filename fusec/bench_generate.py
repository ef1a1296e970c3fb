"""Whole-model generation tokens/s: PyTorch eager with a KV cache, torch.compile, fusec fp32, bf16 and int8.

    fusec bench generate stories15M                          # one preset (random weights)
    python benchmarks/bench_generate.py                      # stories15M, 42M, 110M and tinyllama_1b
    python benchmarks/bench_generate.py path/to/model.safetensors --new-tokens 64   # real weights

Per model: prompt processing (prefill of --prompt-len tokens, median of --repeat runs) and generation
(--new-tokens greedy tokens after that prompt, batch --batch; fewer when the prompt plus 256 exceed the
model's max_seq_len, as for stories15M). Every implementation runs the same Prefill/DecodeStep programs
(fusec/models/causal_lm.py) over a static KV cache of --max-seq-len rows (default: prompt plus new tokens):
eager in PyTorch, torch.compile (inductor) on them, and fusec.compile. torch and numba run on --threads
threads. The machine's read bandwidth is measured in the same run (before and after, the better of the two)
and every generation rate is set against its roofline: bandwidth / bytes read per token, the weights
(bf16 weights read half the bytes, int8 1.125 bytes per weight with its block scales) and the KV cache's
rows up to each step's position (fp32, averaged over the steps). The model's parameters are moved into
one block of huge pages first (`fusec.huge_pages`, as `compile_generator` does), so that every
implementation reads the same memory. Tokens are checked
against eager's (leading tokens equal, max logit error on the common path). "ms/tok outside" is the decode
step's time outside its kernels (Python between calls and argument unboxing:
`benchtools.seconds_outside_kernels`); `--impl fusec-fp32-unlooped` adds fusec with one Python call per
kernel beside the looped default. A progress bar is drawn on stderr when it is a terminal. Writes a table,
bench_generate.json and bench_generate.png (in --out).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from fusec import benchtools, huge_pages
from fusec.argtypes import nonnegative_int, positive_int
from fusec.bench_block import failure
from fusec.generate import Generator, compile_generator, eager_generator
from fusec.models.causal_lm import CausalLM, decode_example, load_safetensors
from fusec.models.llama import PRESETS
from fusec.passes.weights import BYTES_PER_WEIGHT

IMPLEMENTATIONS = ("eager", "torch.compile", "fusec fp32", "fusec bf16", "fusec int8", "fusec fp32 unlooped")
IMPL_FLAGS = {name.replace(" ", "-"): name for name in IMPLEMENTATIONS}  # --impl fusec-fp32
# on request only: fusec with one Python call per kernel instead of one per run of equal layers (passes.loop)
OPTIONAL = ("fusec-fp32-unlooped",)
DEFAULT_MODELS = ("stories15M", "stories42M", "stories110M", "tinyllama_1b")
COLUMNS = [("model", "model", ""), ("implementation", "implementation", ""), ("new_tokens", "new", "d"),
           ("prefill_tokens_per_s", "prefill tok/s", ".0f"), ("decode_tokens_per_s", "decode tok/s", ".1f"),
           ("vs_eager", "vs eager", ".2f"), ("vs_torch_compile", "vs t.compile", ".2f"),
           ("roofline_tokens_per_s", "roofline tok/s", ".1f"), ("roofline_fraction", "of roofline", ".1%"),
           ("ms_first", "ms/tok first", ".2f"), ("ms_last", "ms/tok last", ".2f"),
           ("tokens_match_eager", "= eager", "d"), ("max_logit_error", "logit err", ".1e"),
           ("outside_ms", "ms/tok outside", ".3f"), ("compile_s", "compile s", ".1f"), ("status", "status", "")]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fusec bench generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", help="presets (" + ", ".join(PRESETS) + ") or safetensors "
                        "files / Hugging Face model directories; default: " + ", ".join(DEFAULT_MODELS))
    parser.add_argument("--preset", nargs="+", default=[], choices=list(PRESETS), help="presets, as above")
    parser.add_argument("--prompt-len", type=positive_int, default=32, help="prompt tokens (random ids)")
    parser.add_argument("--new-tokens", type=positive_int, default=256, help="tokens to generate")
    parser.add_argument("--max-seq-len", type=positive_int, help="KV cache rows (default: prompt plus new tokens)")
    parser.add_argument("--batch", type=positive_int, default=1, help="sequences generated at once")
    parser.add_argument("--threads", type=positive_int, default=2, help="threads for torch and numba alike")
    parser.add_argument("--repeat", type=positive_int, default=3, help="timed prefill runs (median)")
    parser.add_argument("--impl", nargs="+", default=[f for f in IMPL_FLAGS if f not in OPTIONAL],
                        choices=list(IMPL_FLAGS),
                        help="implementations to run (eager always runs: it is the reference)")
    parser.add_argument("--backend", default="numba", help="fusec backend")
    parser.add_argument("--no-torch-compile", action="store_true", help="skip torch.compile (inductor)")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the random weights and prompt")
    parser.add_argument("--out", default="bench_out", help="directory for bench_generate.json and .png")
    return parser.parse_args(argv)


# --- models and implementations -------------------------------------------------------------------------

def load(spec: str, seed: int) -> tuple[str, CausalLM]:
    """(name, model): a preset with random weights from `seed`, or the weights of a safetensors path."""
    if spec in PRESETS:
        return spec, CausalLM.from_preset(spec, seed)
    path = Path(spec)
    if not path.exists():
        raise ValueError(f"unknown model {spec!r}: expected a preset ({', '.join(PRESETS)}) or a safetensors "
                         f"file or directory")
    return path.stem or path.name, load_safetensors(path)


def inductor_compiler(module: torch.nn.Module, example: tuple) -> Callable:
    """torch.compile of an eager program, compiled now (on the example) so that failures surface here."""
    compiled = torch.compile(module, dynamic=False)

    def run(*args):
        with torch.no_grad():
            return compiled(*args)

    run(*example)
    return run


def kv_bytes_per_token(model: CausalLM, prompt_len: int, new_tokens: int) -> int:
    """fp32 bytes of one sequence's K and V cache rows a decode step reads (rows 0..its position), averaged
    over the steps after a `prompt_len`-token prompt (`new_tokens` - 1 steps: the first token comes from
    the prefill)."""
    config = model.config
    row = 2 * config.n_layers * config.n_kv_heads * config.head_dim * 4
    positions = range(prompt_len, prompt_len + max(new_tokens - 1, 1))
    return int(row * statistics.mean(p + 1 for p in positions))


def roofline(bandwidth: float, summary: dict, fmt: str, batch: int) -> float:
    """Tokens/s at `bandwidth` bytes/s: a step reads the weights once and each sequence's cache rows."""
    return batch * bandwidth / (summary[f"weight_bytes_{fmt}"] + batch * summary.get("kv_bytes", 0))


def make_generator(name: str, model: CausalLM, max_seq_len: int, backend: str) -> Generator:
    if name == "eager":
        return eager_generator(model, max_seq_len)
    if name == "torch.compile":
        torch._dynamo.reset()  # every model starts from a fresh cache (no dynamic-shape promotion)
        return eager_generator(model, max_seq_len, compiler=inductor_compiler, name="torch.compile")
    weights = name.split()[1]
    # both programs finished, the weights on huge pages: timed runs meet no compile or copy in the background
    generator = compile_generator(model, max_seq_len, weights=weights, backend=backend, loop="unlooped" not in name)
    generator.wait()
    return generator


class Progress:
    """Records when each token arrives; draws a bar on `stream` when it is a terminal."""

    def __init__(self, label: str, total: int, stream=None):
        stream = stream or sys.stderr  # the stream of now, not of when this module was imported
        self.label, self.total, self.stream = label, total, stream
        self.draw = hasattr(stream, "isatty") and stream.isatty()
        self.times: list[float] = []

    def __call__(self, n: int, tokens: torch.Tensor) -> None:
        self.times.append(time.perf_counter())
        if self.draw and (n == self.total or n % 4 == 0):
            done = int(30 * n / self.total)
            rate = (n - 1) / (self.times[-1] - self.times[0]) if n > 1 else 0.0
            self.stream.write(f"\r  {self.label:<28} [{'#' * done}{'.' * (30 - done)}] {n}/{self.total} "
                              f"{rate:7.1f} tok/s")
            self.stream.flush()

    def close(self) -> None:
        if self.draw:
            self.stream.write("\n")
            self.stream.flush()

    def step_ms(self) -> list[float]:
        """Milliseconds of each decode step (the time between successive tokens)."""
        return [(b - a) * 1e3 for a, b in zip(self.times, self.times[1:])]


# --- one model ------------------------------------------------------------------------------------------

def run_one(impl: str, model_name: str, model: CausalLM, prompt: torch.Tensor, new_tokens: int,
            args: argparse.Namespace, max_seq_len: int) -> tuple[dict, torch.Tensor | None, torch.Tensor | None]:
    """Time one implementation: (result row, generated ids, their logits); a failure is a row's status."""
    row = {"model": model_name, "implementation": impl, "new_tokens": new_tokens, "status": "ok"}
    batch, prompt_len = prompt.shape
    print(f"  {impl}: compiling and warming up ...", flush=True)
    try:
        gen = make_generator(impl, model, max_seq_len, args.backend)
        gen.generate(prompt, max_new_tokens=min(2, new_tokens))  # compiles the prefill, warms every program
    except NotImplementedError as e:
        row["status"] = f"skipped: {e}"
        return row, None, None
    except Exception as e:  # one broken implementation must not hide the others' numbers
        row["status"] = failure(e)
        return row, None, None
    prefill = gen.prefill_program(batch, gen.prefill_length(prompt_len))
    with torch.no_grad():
        seconds = benchtools.median_time(lambda: prefill(prompt), warmup=1, repeat=args.repeat)
    progress = Progress(f"{model_name} {impl}", new_tokens)
    try:
        ids, logits = gen.generate(prompt, max_new_tokens=new_tokens, return_logits=True, on_token=progress)
    finally:
        progress.close()
    steps = progress.step_ms()
    tenth = max(len(steps) // 10, 1)
    row.update(compile_s=gen.stats["compile_seconds"], prefill_tokens_per_s=batch * prompt_len / seconds,
               decode_tokens_per_s=gen.last["decode_tokens_per_s"], decode_seconds=gen.last["decode_seconds"],
               ms_first=statistics.median(steps[:tenth]) if steps else None,
               ms_last=statistics.median(steps[-tenth:]) if steps else None,
               compiles_during_generation=gen.last["compiles"])
    decode = getattr(gen.decode_program(batch), "program", None)
    if hasattr(decode, "steps"):  # a fusec Numba program: the step's time outside its kernels
        example = decode_example(model, batch, max_seq_len, pos=prompt_len)
        row["outside_ms"] = 1e3 * benchtools.seconds_outside_kernels(decode, [x.numpy() for x in example])
        row["python_calls"] = len(decode.steps)
    return row, ids, logits


def agreement(ids: torch.Tensor, logits: torch.Tensor, ref_ids: torch.Tensor, ref_logits: torch.Tensor,
              prompt_len: int) -> tuple[int, float]:
    """(leading new tokens equal to the reference's in every row, max abs logit error up to and including
    the first different token: until then both saw the same sequence)."""
    new = ids[:, prompt_len:] != ref_ids[:, prompt_len:]
    first = int(new.any(dim=0).nonzero()[0]) if bool(new.any()) else new.shape[1]
    common = min(first + 1, new.shape[1])
    return first, float((logits[:, :common] - ref_logits[:, :common]).abs().max())


def bench_model(spec: str, args: argparse.Namespace, bandwidth: float) -> tuple[list[dict], dict]:
    """Every implementation on one model: (rows, the model's summary)."""
    model_name, model = load(spec, args.seed)
    huge_pages.pack_parameters(model)  # eager and torch.compile read what fusec reads
    config = model.config
    prompt = torch.randint(0, config.vocab_size, (args.batch, args.prompt_len),
                           generator=torch.Generator().manual_seed(args.seed))
    limit = min(args.max_seq_len or config.max_seq_len, config.max_seq_len)
    new_tokens = min(args.new_tokens, limit - args.prompt_len)
    if new_tokens < 1:
        raise ValueError(f"{model_name}: a {args.prompt_len}-token prompt leaves no room in max_seq_len={limit}")
    max_seq_len = args.max_seq_len or args.prompt_len + new_tokens
    summary = {"dim": config.dim, "layers": config.n_layers, "vocab": config.vocab_size,
               "tied": model.tie_embeddings, "new_tokens": new_tokens, "max_seq_len": max_seq_len,
               "kv_bytes": kv_bytes_per_token(model, args.prompt_len, new_tokens),
               **{f"weight_bytes_{fmt}": int(model.weight_bytes_per_token(size))
                  for fmt, size in BYTES_PER_WEIGHT.items()}}
    if new_tokens < args.new_tokens:
        summary["note"] = f"{new_tokens} new tokens: the prompt plus {args.new_tokens} exceed max_seq_len={limit}"
        print(f"note: {model_name}: {summary['note']}")
    print(f"{model_name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{summary['weight_bytes_fp32'] / 1e6:.1f} MB of fp32 weights read per token", flush=True)
    rows, ref = [], None
    wanted = {IMPL_FLAGS[flag] for flag in args.impl} - ({"torch.compile"} if args.no_torch_compile else set())
    for impl in IMPLEMENTATIONS:
        if impl != "eager" and impl not in wanted:
            if impl.replace(" ", "-") in OPTIONAL:  # listed only when asked for
                continue
            rows.append({"model": model_name, "implementation": impl, "status": "skipped"})
            continue
        row, ids, logits = run_one(impl, model_name, model, prompt, new_tokens, args, max_seq_len)
        if impl == "eager":
            ref = (ids, logits)
        elif ids is not None and ref is not None and ref[0] is not None:
            row["tokens_match_eager"], row["max_logit_error"] = agreement(ids, logits, *ref, args.prompt_len)
        if row.get("decode_tokens_per_s"):
            fmt = impl.split()[1] if impl.startswith("fusec") else "fp32"
            row["roofline_tokens_per_s"] = roofline(bandwidth, summary, fmt, args.batch)
            row["roofline_fraction"] = row["decode_tokens_per_s"] / row["roofline_tokens_per_s"]
        rows.append(row)
    by_name = {row["implementation"]: row.get("decode_tokens_per_s") for row in rows}
    for row in rows:
        rate = row.get("decode_tokens_per_s")
        if rate and by_name["eager"]:
            row["vs_eager"] = rate / by_name["eager"]
        if rate and by_name["torch.compile"]:
            row["vs_torch_compile"] = rate / by_name["torch.compile"]
    return rows, summary


def run(args: argparse.Namespace) -> dict:
    threads = benchtools.set_threads(args.threads)
    specs = list(args.models) + list(args.preset) or list(DEFAULT_MODELS)
    load_average = os.getloadavg()[0]  # before our own work starts
    print("measuring memory bandwidth (before) ...", flush=True)
    before = benchtools.measure_memory_bandwidth()
    results, models = [], {}
    for spec in specs:
        rows, summary = bench_model(spec, args, before["best"])
        results += rows
        models[rows[0]["model"]] = summary
    print("measuring memory bandwidth (after) ...", flush=True)
    after = benchtools.measure_memory_bandwidth()
    bandwidth = {key: max(before[key], after[key]) for key in before}
    for row in results:  # the roofline at the better of the two measurements
        if row.get("roofline_tokens_per_s"):
            row["roofline_tokens_per_s"] *= bandwidth["best"] / before["best"]
            row["roofline_fraction"] = row["decode_tokens_per_s"] / row["roofline_tokens_per_s"]
    return {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "batch": args.batch,
            "threads": {"torch": torch.get_num_threads(), "numba": threads}, "backend": args.backend,
            "machine": {"bandwidth": bandwidth, "bandwidth_before": before, "bandwidth_after": after,
                        "load_average_1min": load_average, "cpu_count": os.cpu_count()},
            "presets": models, "results": results}


def print_report(report: dict) -> None:
    bandwidth, threads = report["machine"]["bandwidth"], report["threads"]
    print(f"\ngeneration: prompt {report['prompt_len']} tokens, up to {report['new_tokens']} new tokens, batch "
          f"{report['batch']}; {threads['torch']} torch threads, {threads['numba']} numba threads")
    print(f"read bandwidth {bandwidth['best'] / 1e9:.1f} GB/s (numba {bandwidth['numba'] / 1e9:.1f}, numpy "
          f"{bandwidth['numpy'] / 1e9:.1f}, torch {bandwidth['torch'] / 1e9:.1f}); roofline = bandwidth / "
          f"bytes of weights and KV cache read per token")
    warning = benchtools.contention_warning(report["machine"], threads["torch"])
    if warning:
        print(warning)
    print(benchtools.format_table(report["results"], COLUMNS))
    for name, summary in report["presets"].items():
        if "note" in summary:
            print(f"note: {name}: {summary['note']}")


def write_outputs(report: dict, out: Path) -> None:
    json_path = benchtools.write_json(out / "bench_generate.json", report)
    chart: dict[str, dict[str, float]] = {}
    for row in report["results"]:
        if row.get("decode_tokens_per_s"):
            chart.setdefault(row["model"], {})[row["implementation"]] = row["decode_tokens_per_s"]
    best = report["machine"]["bandwidth"]["best"]
    for name, summary in report["presets"].items():
        if name in chart:
            for fmt in BYTES_PER_WEIGHT:
                chart[name][f"roofline {fmt}"] = roofline(best, summary, fmt, report["batch"])
    png_path = benchtools.write_bar_chart(out / "bench_generate.png", chart, "generated tokens/s",
                                          f"Llama generation, batch {report['batch']}, "
                                          f"{report['threads']['torch']} threads")
    print(f"\nwrote {json_path}" + (f" and {png_path}" if png_path else ""))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    benchtools.run_record()  # the commit and command of this run, taken as it starts
    return benchtools.run_and_report(args, run, print_report, write_outputs)


if __name__ == "__main__":
    sys.exit(main())
