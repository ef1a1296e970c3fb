"""Trace time of a generator's two programs: through two layers and expanded (`fusec.trace_layers`)
against the export of the whole model, for built-in models with random weights.

    python benchmarks/bench_trace_layers.py [stories15M stories110M tinyllama_1b] [--repeat 3] [--out bench_out]

One process: after a first export of each program (the one-off imports and torch's warm-up), the
two ways alternate `--repeat` times per program (the decode step, the symbolic prefill); medians.
Writes bench_trace_layers.json.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from fusec import benchtools
from fusec.expand_layers import expand_layers
from fusec.models import LlamaConfig
from fusec.models.causal_lm import DecodeStep, Prefill, decode_example, random_model
from fusec.trace_layers import two_layer_view
from fusec.tracing import trace


def programs(model) -> list:
    tokens = torch.zeros(1, 8, dtype=torch.int64)
    return [("decode", DecodeStep(model), decode_example(model), None),
            ("prefill", Prefill(model, None), (tokens,), {"tokens": {1: (1, model.config.max_seq_len)}})]


def expanded(module, example, dynamic) -> tuple[float, float]:
    """(seconds of the 2-layer trace, seconds of the expansion)."""
    start = time.perf_counter()
    view, args = two_layer_view(module, example, None, dynamic)
    traced = trace(view, args, dynamic=dynamic)
    traced_at = time.perf_counter()
    expand_layers(traced.graph, module.model.config.n_layers, dict(module.named_parameters(remove_duplicate=False)))
    return traced_at - start, time.perf_counter() - traced_at


def whole(module, example, dynamic) -> float:
    start = time.perf_counter()
    trace(module, example, dynamic=dynamic)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", default=["stories15M", "stories110M", "tinyllama_1b"])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", default="bench_out")
    args = p.parse_args()
    record, rows = benchtools.run_record(), []
    for name in args.models:
        model = random_model(LlamaConfig.preset(name))
        for program, module, example, dynamic in programs(model):
            whole(module, example, dynamic)  # warm-up
            plain, two, grow = [], [], []
            for _ in range(args.repeat):
                t, e = expanded(module, example, dynamic)
                two.append(t)
                grow.append(e)
                plain.append(whole(module, example, dynamic))
            row = {"model": name, "program": program, "layers": model.config.n_layers,
                   "whole_s": statistics.median(plain), "two_layers_s": statistics.median(two),
                   "expand_s": statistics.median(grow), "runs": {"whole": plain, "two": two, "expand": grow}}
            row["ratio"] = (row["two_layers_s"] + row["expand_s"]) / row["whole_s"]
            rows.append(row)
            print(f"{name:13s} {program:8s} whole {row['whole_s']:6.2f} s   two layers {row['two_layers_s']:5.2f} s"
                  f" + expand {row['expand_s']:5.3f} s   ratio {row['ratio']:.2f}", flush=True)
        del model
    path = benchtools.write_json(Path(args.out) / "bench_trace_layers.json", {"run": record, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
