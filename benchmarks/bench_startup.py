"""Time from `compile_generator` to the first generated token, cold (a fresh cache) and warm (a new process,
the same cache), for built-in models with random weights.

    python benchmarks/bench_startup.py [stories15M stories110M ...] [--warm 3] [--out bench_out]

Each run is its own process (what a user starting a server or a script pays): it builds the model, then
times `compile_generator` and the first `generate` of a 5-token prompt and 1 new token (which compiles, or
loads, the prefill program). The first run in a fresh `FUSEC_CACHE_DIR` is cold; the next `--warm` runs
reuse that directory. A second cold run, in another fresh directory, passes `background=False`: both
programs compiled before the first prompt, rather than the prompt run in PyTorch eager (fp32 weights) or
through the decode program while the workers finish the prefill program (`compile_generator`'s
default). The import of torch and fusec and building the model are not counted (they are reported
beside, and so are each program's phases: trace, passes, generate, finish, run). Writes
bench_startup.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

from fusec import benchtools

CHILD = """
import json, sys, time
t0 = time.perf_counter()
import torch
from fusec.generate import compile_generator
from fusec.models import LlamaConfig
from fusec.models.causal_lm import random_model
t1 = time.perf_counter()
model = random_model(LlamaConfig.preset(sys.argv[1]))
t2 = time.perf_counter()
generator = compile_generator(model, background=sys.argv[2] == "background")
t3 = time.perf_counter()
generator.generate(torch.tensor([[1, 5, 9, 22, 7]]), max_new_tokens=1)
t4 = time.perf_counter()
programs = {**{f"decode b{b}": p for b, p in generator._decode.items()},
            **{f"prefill b{b}": p for (b, _), p in generator._prefill.items()}}
how = sorted({str(p.stats.get("trace_cache")) for p in programs.values()})
print(json.dumps({"import_s": t1 - t0, "model_s": t2 - t1, "compile_generator_s": t3 - t2,
                  "first_generate_s": t4 - t3, "to_first_token_s": t4 - t2, "trace_cache": how,
                  "prompts_by_decode": generator.last["prompts_by_decode"],
                  "prompts_by_eager": generator.last["prompts_by_eager"],
                  "phase_seconds": {name: p.stats.get("phase_seconds") for name, p in programs.items()}}))
"""


def run_once(model: str, cache: str, background: bool = True) -> dict:
    return benchtools.child_json(CHILD, [model, "background" if background else "wait"],
                                 {**os.environ, "FUSEC_CACHE_DIR": cache}, model)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", default=["stories15M", "stories110M"])
    p.add_argument("--warm", type=int, default=3, help="warm runs per model (median reported)")
    p.add_argument("--out", default="bench_out")
    args = p.parse_args()
    record, rows = benchtools.run_record(), []
    for model in args.models:
        with benchtools.fresh_cache_dir() as cache:
            cold = run_once(model, cache)
            warm = [run_once(model, cache) for _ in range(args.warm)]
        with benchtools.fresh_cache_dir() as cache:
            waited = run_once(model, cache, background=False)
        row = {"model": model, "cold_s": cold["to_first_token_s"], "cold_waiting_s": waited["to_first_token_s"],
               "warm_s": statistics.median(w["to_first_token_s"] for w in warm),
               "warm_runs_s": [w["to_first_token_s"] for w in warm], "cold": cold, "warm": warm,
               "cold_waiting": waited}
        rows.append(row)
        print(f"{model:12s} cold {row['cold_s']:7.2f} s (prompt by decode / eager: {cold['prompts_by_decode']} / "
              f"{cold['prompts_by_eager']}; both "
              f"programs first {row['cold_waiting_s']:.2f} s)   warm {row['warm_s']:6.2f} s (median of {len(warm)}: "
              f"{', '.join(f'{s:.2f}' for s in row['warm_runs_s'])}; trace cache {warm[-1]['trace_cache']})")
    path = benchtools.write_json(Path(args.out) / "bench_startup.json", {"run": record, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
