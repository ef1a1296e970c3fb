"""The RDU model on Llama blocks: fused vs unfused, placement quality and placement compile time.

    python benchmarks/bench_rdu.py                       # every preset incl. llama2_7b, plus Llama 3.1 8B TP16
    python benchmarks/bench_rdu.py --presets tiny --no-llama3

For each preset: prefill (--seq tokens, default the preset's max_seq_len up to 4096) and decode (one token
after max_seq_len - 1 tokens of K/V), each traced once, lowered fused and unfused, placed on --machine
(sn40l; floats counted as bf16 there) and estimated for the whole model (the preset's n_layers times one
block). Reports per case: model time, the fused/unfused ratio, tokens/s, what bounds the fused program,
placement quality (traffic-weighted hops of the placement against a random placement of the same unit
groups, summed over sections) and the compile time of the placement pass. Then:
- Llama-2-7B under program-load times of 1, 10 and 100 us per section (unpublished; default 100 us),
- Llama 3.1 8B decode at 8K context on 16 sockets (tensor parallel) against SN40L Table IV's 1042 tok/s.
No timing here is measured on hardware: every number is the analytical model's.
Writes bench_rdu.json to --out.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

from backends.rdu_model import report, with_figures
from fusec.api import lower
from fusec.benchtools import format_table, write_json
from fusec.machines import get_machine
from fusec.models.llama import LlamaBlock, LlamaConfig, example_inputs
from fusec.models.registry import decode_inputs
from fusec.tracing import trace
from passes.place import plan

PRESETS = ("tiny", "stories15M", "tinyllama_1b", "llama2_7b")
MAX_PREFILL = 4096
PROGRAM_LOADS = (1e-6, 10e-6, 100e-6)
PAPER = {  # SN40L paper (arXiv:2405.07518) figures the model is compared with
    "prefill fusion speedup": "1.5-3x (Llama2-7B 4K prefill among them, 8 sockets; §VI-A)",
    "decode fusion speedup": "1-13x (§VI-A)",
    "llama3.1-8b decode": "1042 tok/s on 16 sockets, BF16, 8K context (Table IV)",
}
COLUMNS = [("model", "model", ""), ("case", "case", ""), ("tokens", "tokens", "d"),
           ("fused_ms", "fused ms", ".3f"), ("unfused_ms", "unfused ms", ".3f"), ("speedup", "fused x", ".2f"),
           ("bound", "fused bound", ""), ("tokens_per_s", "fused tok/s", ",.1f"),
           ("kernels", "kernels f/u", ""), ("hops_gain", "hops vs random", ".2f"),
           ("place_s", "place s f/u", "")]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=list(PRESETS), help="Llama presets to model")
    p.add_argument("--seq", type=int, default=None, help="prefill tokens (default: max_seq_len, at most 4096)")
    p.add_argument("--machine", default="sn40l")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-llama3", action="store_true", help="skip the Llama 3.1 8B TP16 comparison")
    p.add_argument("--out", default="bench_out", help="directory for bench_rdu.json")
    return p.parse_args(argv)


def llama31_8b() -> LlamaConfig:
    """Llama 3.1 8B (Meta, 2024): GQA with 8 KV heads, SwiGLU 14336; 8K positions for the 8K decode."""
    return LlamaConfig(dim=4096, n_heads=32, n_kv_heads=8, hidden_dim=14336, rope_theta=500000.0,
                       max_seq_len=8192, vocab_size=128256, n_layers=32)


def traced_cases(config: LlamaConfig, seq: int | None) -> dict[str, object]:
    """The traced IR of one block for prefill and for one decode step (weights are never run)."""
    block = LlamaBlock(config).eval()
    seq = seq or min(config.max_seq_len, MAX_PREFILL)
    args, kwargs = decode_inputs(config, past_len=config.max_seq_len - 1)
    return {"prefill": trace(block, example_inputs(config, seq_len=seq)).graph,
            "decode": trace(block, args, kwargs).graph}


def model_case(name: str, config: LlamaConfig, case: str, graph, machine, dtype, seed: int) -> tuple[dict, dict]:
    """(table row, details) of one case: fused and unfused placed and estimated for the whole model."""
    out, placements = {}, {}
    for fuse in (True, False):
        lowered = lower(graph, fuse=fuse)
        start = time.perf_counter()
        placement = plan(lowered, machine, seed, dtype)
        seconds = time.perf_counter() - start
        rep = report(placement, machine, layers=config.n_layers, decode=case == "decode",
                     tokens=_tokens(lowered))
        key = "fused" if fuse else "unfused"
        placements[key] = placement
        hops = sum(s.weighted_hops for s in placement.sections)
        random_hops = sum(s.random_weighted_hops for s in placement.sections)
        out[key] = {"time_s": rep["total"]["time_s"], "tokens_per_s": rep["total"]["tokens_per_s"],
                    "bound": rep["total"]["bound"], "sections": len(placement.sections),
                    "kernels": rep["total"]["kernels"], "place_seconds": seconds, "weighted_hops": hops,
                    "random_weighted_hops": random_hops, "total": rep["total"]}
    f, u = out["fused"], out["unfused"]
    row = {"model": name, "case": case, "tokens": f["total"]["tokens"], "fused_ms": 1e3 * f["time_s"],
           "unfused_ms": 1e3 * u["time_s"], "speedup": u["time_s"] / f["time_s"], "bound": f["bound"],
           "tokens_per_s": f["tokens_per_s"], "kernels": f"{f['kernels']}/{u['kernels']}",
           "hops_gain": (f["random_weighted_hops"] + u["random_weighted_hops"])
           / max(f["weighted_hops"] + u["weighted_hops"], 1e-9),
           "place_s": f"{f['place_seconds']:.2f}/{u['place_seconds']:.2f}"}
    return row, {"row": row, **out, "_placements": placements}


def _tokens(graph) -> int:
    from backends.rdu_model import tokens_per_call
    return tokens_per_call(graph)


def program_load_sweep(details: dict, config: LlamaConfig, machine) -> list[dict]:
    """Fused/unfused ratios of one model when loading a section's configuration takes 1, 10 or 100 us."""
    rows = []
    for load in PROGRAM_LOADS:
        m = with_figures(machine, program_load_s=load)
        row = {"program_load_us": load * 1e6}
        for case, d in details.items():
            times = {k: report(d["_placements"][k], m, layers=config.n_layers, decode=case == "decode",
                               tokens=d["row"]["tokens"])["total"]["time_s"] for k in ("fused", "unfused")}
            row[f"{case}_speedup"] = times["unfused"] / times["fused"]
        rows.append(row)
    return rows


def llama3_comparison(machine, dtype, seed: int) -> list[dict]:
    """Llama 3.1 8B decode at 8K context, TP16, software and hardware orchestration."""
    config = llama31_8b()
    block = LlamaBlock(config).eval()
    args, kwargs = decode_inputs(config, past_len=config.max_seq_len - 1)
    placement = plan(lower(trace(block, args, kwargs).graph), machine, seed, dtype)
    rows = []
    for tp in (1, 8, 16):
        for orchestration in ("software", "hardware"):
            rep = report(placement, machine, layers=config.n_layers, tp=tp, decode=True, tokens=1,
                         orchestration=orchestration)
            rows.append({"tp": tp, "orchestration": orchestration, "tokens_per_s": rep["total"]["tokens_per_s"],
                         "ms_per_token": 1e3 * rep["total"]["time_s"], "paper_tokens_per_s": 1042 if tp == 16 else None,
                         "hbm_utilisation": rep["total"]["hbm_bandwidth_utilisation"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore")
    args = parse_args(argv)
    torch.manual_seed(0)
    machine = get_machine(args.machine)
    dtype = "bf16" if machine.name == "sn40l" else None
    rows, results, sweeps = [], {}, {}
    for preset in args.presets:
        config = LlamaConfig.preset(preset)
        details = {}
        for case, graph in traced_cases(config, args.seq).items():
            row, details[case] = model_case(preset, config, case, graph, machine, dtype, args.seed)
            rows.append(row)
            print(f"{preset} {case}: fused {row['fused_ms']:.3f} ms, x{row['speedup']:.2f}", file=sys.stderr)
        if preset == "llama2_7b":
            sweeps[preset] = program_load_sweep(details, config, machine)
        results[preset] = {case: {k: v for k, v in d.items() if k != "_placements"} for case, d in details.items()}
    print(f"# RDU model on {machine.name} ({dtype or 'as traced'}), whole models (n_layers x one block); "
          f"place s = compile time of the placement pass, fused/unfused")
    print(format_table(rows, COLUMNS))
    for preset, sweep in sweeps.items():
        print(f"\n# {preset}: fused/unfused ratio against the (unpublished) program-load time per section")
        print(format_table(sweep, [("program_load_us", "load us", ".0f"), ("prefill_speedup", "prefill x", ".2f"),
                                   ("decode_speedup", "decode x", ".2f")]))
    llama3 = [] if args.no_llama3 else llama3_comparison(machine, dtype, args.seed)
    if llama3:
        print("\n# Llama 3.1 8B decode, 8K context (SN40L Table IV: 1042 tok/s on 16 sockets)")
        print(format_table(llama3, [("tp", "sockets", "d"), ("orchestration", "orchestration", ""),
                                    ("ms_per_token", "ms/token", ".3f"), ("tokens_per_s", "tok/s", ",.0f"),
                                    ("hbm_utilisation", "HBM util", ".0%"), ("paper_tokens_per_s", "paper", "")]))
    path = write_json(Path(args.out) / "bench_rdu.json",
                      {"machine": machine.name, "dtype": dtype, "seed": args.seed, "paper": PAPER, "rows": rows,
                       "results": results, "program_load_sweep": sweeps, "llama3_1_8b_decode": llama3})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
