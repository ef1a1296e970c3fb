"""Where a cold `compile_generator` spends its Numba time: each distinct generated function's compile, by
program, with Numba's own split (typing; lowering, LLVM included), beside each program's build phases.

    python benchmarks/bench_compile.py [stories15M stories110M ...] [--out bench_out]

Each model compiles in a new process with a fresh cache directory and no compile workers
(`FUSEC_COMPILE_WORKERS=0`): every body compiles in that process, one after another, so each one's time
is its own (with workers they overlap; `bench_startup.py` times that). The library the kernels call is
compiled once per machine and is not counted. A body's first compile in the process also pays for the
Numba implementations it is the first to use (`np.empty` for a new shape, a row operation): the order of
compiles shifts a little time between bodies, not the total. A driver's helpers (`_copy`, ...) compile
inside it: listed, marked "in the driver", not added to the total. Writes bench_compile.json.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from fusec import benchtools

CHILD = """
import json, re, sys, time
import torch
from numba.core import event
from fusec.generate import compile_generator
from fusec.models import LlamaConfig
from fusec.models.causal_lm import random_model

started, seconds, depth = {}, [], [0]

def generated(ev):
    return str(ev.data["dispatcher"].py_func.__module__).startswith("fusec_gen_")

class Timer(event.Listener):
    def on_start(self, ev):
        started[id(ev.data["dispatcher"]), str(ev.data["args"])] = (time.perf_counter(), depth[0])
        depth[0] += generated(ev)
    def on_end(self, ev):
        fn = ev.data["dispatcher"].py_func
        begun, outer = started.pop((id(ev.data["dispatcher"]), str(ev.data["args"])))
        if generated(ev):
            depth[0] -= 1
            seconds.append((fn.__module__, fn.__name__, time.perf_counter() - begun, outer > 0))

model = random_model(LlamaConfig.preset(sys.argv[1]))
with event.install_listener("numba:compile", Timer()):
    begun = time.perf_counter()
    generator = compile_generator(model, background=False)
    total = time.perf_counter() - begun
programs = {**{f"decode b{b}": p for b, p in generator._decode.items()},
            **{f"prefill b{b}": p for (b, _), p in generator._prefill.items()}}
owner, kind = {}, {}
for name, p in programs.items():
    for module in p.program.modules:
        owner.setdefault(module.__name__, []).append(name)
        found = re.search(r"kind=(\\w+)", module.__fusec_source__)
        kind[module.__name__] = found.group(1) if found else "driver"
bodies = []
for module_name, function, wall, nested in seconds:
    module = sys.modules[module_name]
    overload = next(iter(getattr(module, function).overloads.values()))
    passes = overload.metadata.get("pipeline_times", {}).get("nopython", {})
    split = {}
    for key, timing in passes.items():
        name = key.split("_", 1)[1]
        part = ("typing" if "type_inference" in name else "lowering" if "lowering" in name else "other")
        split[part] = split.get(part, 0.0) + timing.run
    bodies.append({"module": module_name, "function": function, "kind": kind.get(module_name, "?"),
                   "programs": owner.get(module_name, []), "seconds": wall, "nested": nested, **split})
print(json.dumps({"compile_generator_s": total, "bodies": bodies,
                  "phases": {name: p.stats.get("phase_seconds", {}) for name, p in programs.items()}}))
"""


def run_once(model: str) -> dict:
    with benchtools.fresh_cache_dir() as cache:
        return benchtools.child_json(CHILD, [model], {**os.environ, "FUSEC_CACHE_DIR": cache,
                                                     "FUSEC_COMPILE_WORKERS": "0"}, model)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", default=["stories15M"])
    p.add_argument("--out", default="bench_out")
    args = p.parse_args(argv)
    record, rows = benchtools.run_record(), []
    for model in args.models:
        result = run_once(model)
        rows.append({"model": model, **result})
        bodies = sorted(result["bodies"], key=lambda b: -b["seconds"])
        own = [b for b in bodies if not b["nested"]]
        print(f"{model}: compile_generator {result['compile_generator_s']:.2f} s, Numba "
              f"{sum(b['seconds'] for b in own):.2f} s over {len(own)} functions (workers off)")
        print(f"  {'seconds':>7}  {'typing':>6}  {'lowering':>8}  {'kind':10}  {'function':12}  programs")
        for b in bodies:
            print(f"  {b['seconds']:7.2f}  {b.get('typing', 0.0):6.2f}  {b.get('lowering', 0.0):8.2f}  "
                  f"{b['kind']:10}  {b['function']:12}  {', '.join(b['programs'])}"
                  f"{'  (in the driver)' if b['nested'] else ''}")
        for name, phases in result["phases"].items():
            print(f"  {name}: " + ", ".join(f"{k} {v:.2f} s" for k, v in phases.items()))
    path = benchtools.write_json(Path(args.out) / "bench_compile.json", {"run": record, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
