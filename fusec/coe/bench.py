"""`fusec coe bench`: many experts behind a trained router, a Zipf-skewed stream of requests, an HBM budget
that holds a fraction of the experts; against the naive way (a fresh PyTorch model loaded per request).

    fusec coe bench                                   # 150 stories15M experts, budget of 20, 200 requests
    fusec coe bench --experts 30 --hbm-experts 5 --requests 60 --tokens 32
    fusec coe bench --smoke                           # seconds: a few tiny experts (what the tests run)

Expert files (random weights, bf16) are written once under --dir and reused. Reported: tokens/s, hit rate,
switch time p50/p99 and its share of the time to generate the request's tokens, loads, evictions,
prefetches, the routing accuracy and confidence, resident bytes and the process's memory growth during the
stream, the naive baseline's tokens/s, and the RDU model's switching estimate next to the measured figures.
"""
from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import torch

from fusec.argtypes import nonnegative_float, nonnegative_int, positive_int
from fusec.benchtools import format_table, quiet_warnings, run_record, set_threads, write_json
from fusec.coe import CoE
from fusec.coe.experts import Architecture, CONFIG_KEY, FileExpert, expected_shapes
from fusec.coe.router import synthetic_prompts, train_router
from fusec.coe.switching import compare, format_table as rdu_table
from fusec.generate import eager_generator
from fusec.models.causal_lm import CausalLM, config_to_hf, load_safetensors
from fusec.models.llama import LlamaConfig

DEFAULT_DIR = Path(os.environ.get("FUSEC_CACHE_DIR", Path.home() / ".cache" / "fusec")) / "coe-experts"
SMOKE = dict(experts=4, hbm_experts=2, requests=8, tokens=8, baseline_requests=2, preset="tiny",
             max_seq_len=64, buckets=(16, 32))


def write_random_experts(folder: Path, count: int, preset: str, seed: int = 0) -> dict[str, Path]:
    """`count` expert files of `preset` with random bf16 weights (std 0.02, unit norms), reused when present."""
    from safetensors.torch import save_file  # an optional package (the `models` extra): loaded on use
    config = LlamaConfig.preset(preset)
    arch = Architecture(config, tied=preset.startswith("stories"))
    folder = folder / f"{preset}-bf16"
    folder.mkdir(parents=True, exist_ok=True)
    metadata = {CONFIG_KEY: json.dumps(config_to_hf(config, arch.tied)), "format": "pt"}
    paths = {}
    for i in range(count):
        name, path = f"expert{i:03d}", folder / f"expert{i:03d}.safetensors"
        paths[name] = path
        if path.is_file():
            try:
                FileExpert(name, path)
                continue
            except Exception:  # damaged by an interrupted run: write it again
                pass
        generator = torch.Generator().manual_seed(seed * 100003 + i)
        tensors = {key: (torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=generator) * 0.02)
                   .to(torch.bfloat16) for key, shape in expected_shapes(arch).items()}
        partial = path.with_suffix(".partial")
        save_file(tensors, str(partial), metadata=metadata)
        partial.replace(path)
    return paths


def zipf_choices(count: int, requests: int, exponent: float, seed: int) -> list[int]:
    """Expert indices of a request stream with Zipf popularity (rank r has weight 1 / r**exponent); which
    expert has which rank is shuffled."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, count + 1) ** exponent
    ranks = rng.choice(count, size=requests, p=weights / weights.sum())
    return [int(i) for i in rng.permutation(count)[ranks]]


class PeakRSS:
    """The process's resident set size, sampled every few ms in a thread: its peak over a `with` block."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    @staticmethod
    def now() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = self.now()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def naive_baseline(paths: list[Path], prompts: list, tokens: int, max_seq_len: int) -> dict:
    """Per request: a fresh PyTorch model built from the expert's file, then eager generation with a KV cache."""
    start, new = time.perf_counter(), 0
    for path, prompt in zip(paths, prompts):
        model = load_safetensors(path)
        out = eager_generator(model, max_seq_len).generate(prompt, max_new_tokens=tokens)
        new += int(out.shape[-1]) - len(prompt)
    seconds = time.perf_counter() - start
    return dict(requests=len(paths), new_tokens=new, seconds=seconds, tokens_per_s=new / seconds)


def run(experts: int = 150, hbm_experts: int = 20, requests: int = 200, tokens: int = 64, baseline_requests: int = 12,
        preset: str = "stories15M", zipf: float = 1.1, policy: str = "lru", prefetch: bool = True,
        folder: Path = DEFAULT_DIR, max_seq_len: int = 256, buckets: tuple = (16, 32, 64, 128),
        threads: int | None = None, seed: int = 0, log=print) -> dict:
    """The whole benchmark; returns every figure (see the module docstring)."""
    threads = set_threads(threads or os.cpu_count() or 1)
    start = time.perf_counter()
    paths = write_random_experts(Path(folder), experts, preset, seed)
    names = list(paths)
    setup = dict(write_seconds=time.perf_counter() - start)
    config = LlamaConfig.preset(preset)
    vocab = config.vocab_size
    train_prompts, labels = synthetic_prompts(names, 8, vocab, seed=seed)
    router = train_router(train_prompts, labels, vocab, experts=names, seed=seed)
    set_threads(threads)  # training runs single-threaded and restores; make sure
    setup.update(router_seconds=router.training_seconds, router_training_accuracy=router.training_accuracy)
    log(f"{experts} experts in {folder}; router trained in {router.training_seconds:.1f} s "
        f"(accuracy {router.training_accuracy:.1%})")

    one = FileExpert(names[0], paths[names[0]]).data_bytes
    budget = hbm_experts * one + one // 2
    coe = CoE(router, paths, hbm_bytes=budget, max_seq_len=max_seq_len, prompt_buckets=buckets, policy=policy,
              prefetch=prefetch)
    begin = time.perf_counter()
    for length in buckets:  # compile every prompt bucket and the decode program
        if length + tokens <= max_seq_len:
            coe.generate([1] * (length - 1), max_new_tokens=2, expert=names[0])
    setup["compile_seconds"] = time.perf_counter() - begin
    coe.reset_stats(evict=True)

    wanted = zipf_choices(experts, requests, zipf, seed + 1)
    per_expert = max(wanted.count(i) for i in set(wanted))
    pool, pool_labels = synthetic_prompts(names, per_expert, vocab, seed=seed + 1000)  # unseen by the router
    by_expert = {name: [p for p, label in zip(pool, pool_labels) if label == name] for name in names}
    longest = max(b for b in buckets if b + tokens <= max_seq_len)
    stream = [by_expert[names[idx]][wanted[:i].count(idx)][:longest] for i, idx in enumerate(wanted)]
    intended = [names[idx] for idx in wanted]
    log(f"stream: {requests} requests over {len(set(wanted))} experts (Zipf {zipf}), {tokens} new tokens each")
    with PeakRSS() as rss:
        results = coe.generate_many(stream, max_new_tokens=tokens)
    stats, tiers = coe.stats, coe.tiers()
    coe.close()

    gen = [r.generate_seconds for r in results]
    misses = [r.switch_seconds for r in results if r.outcome in ("miss", "waited")]
    per_request_gen = float(np.median(gen))
    measured = dict(
        requests=requests, tokens_per_request=tokens, tokens_per_s=stats["tokens_per_s"], hit_rate=stats["hit_rate"],
        outcomes=stats["outcomes"], switches=stats["switches"], switch_p50_s=stats["switch_p50_s"],
        switch_p99_s=stats["switch_p99_s"], miss_switch_p50_s=_pct(misses, 50), miss_switch_p99_s=_pct(misses, 99),
        generate_median_s=per_request_gen, load_p50_s=stats["load_p50_s"], load_p99_s=stats["load_p99_s"],
        loads=stats["loads"], evictions=stats["evictions"], prefetches=stats["prefetches"], prefetches_used=stats["prefetches_used"],
        routing_accuracy=float(np.mean([r.expert == w for r, w in zip(results, intended)])),
        route_confidence_mean=stats["route_confidence_mean"],
        expert_bytes=one, hbm_bytes=budget, peak_resident_bytes=stats["peak_bytes"],
        rss_growth_bytes=rss.peak - rss.start, threads=threads, ddr_bytes=tiers["ddr_bytes"],
        sram_bytes=next(iter(tiers["sram_bytes"].values()), None))
    measured["switch_fraction_p50"] = (stats["switch_p50_s"] or 0) / per_request_gen
    measured["switch_fraction_p99"] = (stats["switch_p99_s"] or 0) / per_request_gen
    measured["memory_ok"] = measured["rss_growth_bytes"] <= budget + one

    baseline = naive_baseline([paths[r.expert] for r in results[:baseline_requests]], stream[:baseline_requests],
                              tokens, max_seq_len)
    measured["naive_tokens_per_s"] = baseline["tokens_per_s"]
    measured["speedup_vs_naive"] = stats["tokens_per_s"] / baseline["tokens_per_s"]

    with torch.device("meta"):
        per_token = CausalLM(config, preset.startswith("stories")).weight_bytes_per_token(2)
    miss_rate = 1 - stats["hit_rate"]
    rows = compare(one, per_token, tokens, miss_rate, measured=dict(
        switch_p50_s=stats["switch_p50_s"], switch_p99_s=stats["switch_p99_s"], tokens_per_s=stats["tokens_per_s"],
        switch_fraction=measured["switch_fraction_p50"]))
    return dict(setup=setup, measured=measured, baseline=baseline, rdu=rows,
                config=dict(experts=experts, hbm_experts=hbm_experts, preset=preset, zipf=zipf, policy=policy,
                            prefetch=prefetch, max_seq_len=max_seq_len, buckets=list(buckets)))


def _pct(values: list, q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def report_rows(result: dict) -> list[dict]:
    """The run's figures as {"what", "value"} text rows (the printed report and the docs' table)."""
    m, b = result["measured"], result["baseline"]
    ms = lambda s: None if s is None else s * 1e3  # noqa: E731
    rows = [
        dict(what="fusec CoE tokens/s", value=f"{m['tokens_per_s']:.0f}"),
        dict(what="naive (fresh PyTorch model per request) tokens/s", value=f"{b['tokens_per_s']:.0f}"),
        dict(what="speedup vs naive", value=f"{m['speedup_vs_naive']:.1f}x"),
        dict(what="hit rate (expert resident when asked for)", value=f"{m['hit_rate']:.1%}"),
        dict(what="outcomes", value=" ".join(f"{k}={v}" for k, v in m["outcomes"].items())),
        dict(what="switches; switch time p50 / p99 (ms)",
             value=f"{m['switches']}; {ms(m['switch_p50_s']) or 0:.2f} / {ms(m['switch_p99_s']) or 0:.2f}"),
        dict(what="switch on a miss p50 / p99 (ms)",
             value=f"{ms(m['miss_switch_p50_s']) or 0:.2f} / {ms(m['miss_switch_p99_s']) or 0:.2f}"),
        dict(what=f"generate {m['tokens_per_request']} tokens, median (ms)", value=f"{m['generate_median_s'] * 1e3:.1f}"),
        dict(what="switch / generate, p50 / p99", value=f"{m['switch_fraction_p50']:.1%} / {m['switch_fraction_p99']:.1%}"),
        dict(what="loads; evictions; prefetches (used)",
             value=f"{m['loads']}; {m['evictions']}; {m['prefetches']} ({m['prefetches_used']})"),
        dict(what="routing accuracy; mean confidence",
             value=f"{m['routing_accuracy']:.1%}; {m['route_confidence_mean']:.2f}"),
        dict(what="tiers: DDR (all experts); HBM budget; SRAM working set, modelled (MiB)",
             value=f"{m['ddr_bytes'] / 2**20:.0f}; {m['hbm_bytes'] / 2**20:.0f}; {(m['sram_bytes'] or 0) / 2**20:.1f}"),
        dict(what="expert size (MiB)", value=f"{m['expert_bytes'] / 2**20:.1f}"),
        dict(what="peak resident; process memory growth (MiB)",
             value=f"{m['peak_resident_bytes'] / 2**20:.0f}; {m['rss_growth_bytes'] / 2**20:.0f} "
                   f"({'within' if m['memory_ok'] else 'OVER'} budget + one expert)"),
    ]
    return rows


def format_report(result: dict) -> str:
    m, c = result["measured"], result["config"]
    head = (f"{c['experts']} x {c['preset']} experts (bf16), HBM budget {c['hbm_experts']} experts, "
            f"{m['requests']} requests (Zipf {c['zipf']}), {c['policy']}, prefetch {'on' if c['prefetch'] else 'off'}, "
            f"{m['threads']} threads")
    table = format_table(report_rows(result), [("what", "measure", ""), ("value", "value", "")])
    return f"{head}\n{table}\n\nRDU model of switching (same expert size; miss rate as measured):\n{rdu_table(result['rdu'])}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fusec coe bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=positive_int, default=150)
    p.add_argument("--hbm-experts", type=positive_int, default=20, help="HBM budget, in experts")
    p.add_argument("--requests", type=positive_int, default=200)
    p.add_argument("--tokens", type=positive_int, default=64, help="new tokens per request")
    p.add_argument("--baseline-requests", type=nonnegative_int, default=12, help="requests the naive baseline runs")
    p.add_argument("--preset", default="stories15M")
    p.add_argument("--zipf", type=nonnegative_float, default=1.1, help="popularity exponent")
    p.add_argument("--policy", default="lru", choices=("lru", "lfu"))
    p.add_argument("--no-prefetch", action="store_true")
    p.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="where the expert files are written")
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--smoke", action="store_true", help="a few tiny experts: checks the benchmark runs")
    p.add_argument("--json", type=Path, default=None, help="also write every figure to this file")
    p.add_argument("--out", type=Path, default=None,
                   help="also write every figure to OUT/bench_coe.json (what benchmarks/tables.py reads)")
    args = p.parse_args(argv)
    run_record()  # the run's commit and date as it starts
    options = dict(experts=args.experts, hbm_experts=args.hbm_experts, requests=args.requests, tokens=args.tokens,
                   baseline_requests=args.baseline_requests, preset=args.preset)
    if args.smoke:
        options = dict(SMOKE)
    for key, value in options.items():
        if key in ("experts", "hbm_experts", "requests", "tokens") and value < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be at least 1, given {value}")
    if options["hbm_experts"] > options["experts"]:
        raise ValueError(f"--hbm-experts ({options['hbm_experts']}) cannot exceed --experts ({options['experts']})")
    with quiet_warnings():
        result = run(**options, zipf=args.zipf, policy=args.policy, prefetch=not args.no_prefetch, folder=args.dir,
                     threads=args.threads)
    print(format_report(result))
    for path in filter(None, (args.json, args.out and args.out / "bench_coe.json")):
        write_json(path, result)
    return 0
