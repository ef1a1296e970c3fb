"""Accuracy of low-precision weights against float32: logit error and greedy-token agreement.

    python benchmarks/bench_accuracy.py [stories15M stories42M ...] [--steps 64] [--weights bf16 int8]

fp32 eager generates `steps` greedy tokens after a random prompt. The whole sequence is then run once
through the model compiled with `weights=` (teacher forcing: every position sees fp32's tokens, so a
single early difference does not decide all later steps). Reported per model and format: the share of
the `steps` positions whose greedy token (argmax) equals fp32's, and the max abs logit error over them,
also relative to the largest fp32 logit.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import fusec
from fusec.benchtools import run_record, write_json
from fusec.generate import eager_generate
from fusec.models.causal_lm import CausalLM
from fusec.models.llama import PRESETS

DEFAULT_MODELS = ("stories15M", "stories42M", "stories110M")


def agreement(model, prompt: torch.Tensor, steps: int, weights: str, backend: str = "numba") -> dict:
    """{"agreement", "max_logit_error", "relative_error"} of `model` compiled with `weights` against its
    float32 eager self over `steps` greedy steps after `prompt` [1, T] (see the module docstring)."""
    ids, ref_logits = eager_generate(model, prompt, steps)  # [1, T + steps], [1, steps, vocab]
    forward = ids[:, :-1]  # the logits at position t choose token t + 1
    compiled = fusec.compile(model, (forward,), backend=backend, weights=weights)
    with torch.no_grad():
        logits = compiled(forward)[:, prompt.shape[1] - 1:]
    same = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean()
    error = float((logits - ref_logits).abs().max())
    return {"agreement": float(same), "max_logit_error": error,
            "relative_error": error / max(float(ref_logits.abs().max()), 1e-30)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_accuracy", description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", default=list(DEFAULT_MODELS), help="presets (random weights)")
    parser.add_argument("--steps", type=int, default=64, help="greedy steps compared")
    parser.add_argument("--prompt-len", type=int, default=8)
    parser.add_argument("--weights", nargs="+", default=["bf16", "int8"], choices=["fp32", "bf16", "int8"])
    parser.add_argument("--backend", default="numba")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench_out", help="directory for bench_accuracy.json")
    args = parser.parse_args(argv)
    run_record()  # the run's commit and date as it starts
    rows = []
    print(f"{'model':<14}{'weights':<9}{'greedy = fp32':>15}{'max logit err':>15}{'relative':>10}")
    for name in args.models:
        if name not in PRESETS:
            parser.error(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
        model = CausalLM.from_preset(name, args.seed)
        prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_len),
                               generator=torch.Generator().manual_seed(args.seed))
        for weights in args.weights:
            r = agreement(model, prompt, args.steps, weights, args.backend)
            rows.append({"model": name, "weights": weights, **r})
            print(f"{name:<14}{weights:<9}{r['agreement']:>15.1%}{r['max_logit_error']:>15.2e}"
                  f"{r['relative_error']:>10.2%}", flush=True)
    path = write_json(Path(args.out) / "bench_accuracy.json",
                      {"steps": args.steps, "prompt_len": args.prompt_len, "backend": args.backend,
                       "seed": args.seed, "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
