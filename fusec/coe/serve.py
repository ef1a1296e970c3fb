"""Composition of Experts: a router picks one expert per request, and the expert answers.

    coe = fusec.CoE(router, experts={"math": "experts/math.safetensors", ...}, hbm_bytes=600 << 20)
    result = coe.generate(prompt_ids, max_new_tokens=64)    # result.tokens, result.expert, result.route
    results = coe.generate_many(prompts)                     # prefetches each next expert meanwhile
    coe.stats                                                # switches, hit rate, switch-time percentiles

All experts live in the DDR tier (their files); the HBM tier holds the resident ones under `hbm_bytes`
(`fusec.coe.store`); experts of one architecture share one compiled program (`fusec.coe.pool`). With
`cluster="ray"` the experts are spread over Ray actors, each with its own store and programs
(`fusec.coe.cluster`); routing stays here.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from torch import Tensor

from fusec.coe.pool import ExpertPool

HIT_OUTCOMES = ("hit", "prefetched")  # the expert was resident when its request came


@dataclass
class CoEResult:
    """One answered request."""

    tokens: Tensor            # the prompt followed by the new tokens, as `Generator.generate` returns them
    expert: str               # which expert answered
    route: Any                # the router's decision (`fusec.coe.router.Route`), None when the caller chose
    outcome: str              # "hit", "prefetched", "waited" or "miss" (see `WeightStore.use`)
    switched: bool            # another expert was bound to the program before this request
    switch_seconds: float     # request to weights bound: the load on a miss, the binding on a hit
    generate_seconds: float
    new_tokens: int


class CoE:
    """A router and experts `{name: safetensors path or Llama model}` under an HBM budget of `hbm_bytes`.

    `weights` ("bf16" default, "fp32" or "int8") is the resident format; every prompt length runs through
    one symbolic prefill program per architecture (`prompt_buckets`, e.g. (16, 64), pads prompts to static
    programs instead); `policy` ("lru", "lfu" or an object,
    see `fusec.coe.store.Policy`) chooses evictions; `prefetch` loads the next request's expert during
    the current one's generation in `generate_many`. `cluster="ray"` serves the experts from
    `workers` Ray actors (`ray_address` to join a running cluster; see `fusec.coe.cluster`).
    """

    def __init__(self, router, experts: Mapping[str, Any], hbm_bytes: int, *, weights: str = "bf16",
                 max_seq_len: int = 256, prompt_buckets: Sequence[int] | None = None,
                 policy: Any = "lru", prefetch: bool = True, cluster: str | None = None, workers: int = 2,
                 ray_address: str | None = None, backend: str = "numba"):
        if router is not None:
            unknown = [e for e in getattr(router, "experts", ()) if e not in experts]
            if unknown:
                raise ValueError(f"the router can choose experts that are not given: {', '.join(unknown)}; "
                                 f"experts given: {', '.join(experts)}")
        options = dict(hbm_bytes=hbm_bytes, weights=weights, max_seq_len=max_seq_len,
                       prompt_buckets=tuple(prompt_buckets) if prompt_buckets else None, policy=policy,
                       backend=backend)
        if cluster is None:
            self.pool = ExpertPool(experts, **options)
        elif cluster == "ray":
            from fusec.coe.cluster import RayPools  # imports Ray (optional, slow to load): only for "ray"
            self.pool = RayPools(experts, workers=workers, address=ray_address, **options)
        else:
            raise ValueError(f"cluster must be None (this process) or 'ray', given {cluster!r}")
        self.router, self.prefetch_next = router, prefetch
        self._lock = threading.Lock()
        self._requests: list[CoEResult] = []
        self._seconds = 0.0

    @property
    def experts(self) -> list[str]:
        return list(self.pool.experts)

    @property
    def unavailable(self) -> dict[str, str]:
        """{expert: why it cannot serve} for experts left out when the CoE was built."""
        return dict(self.pool.unavailable)

    def route(self, prompt_ids):
        if self.router is None:
            raise ValueError("this CoE has no router: pass expert= to generate")
        return self.router.route(prompt_ids)

    def generate(self, prompt_ids, max_new_tokens: int = 32, expert: str | None = None, **options) -> CoEResult:
        """Route `prompt_ids` (unless `expert` names one) and generate with the chosen expert; `options`
        are `Generator.generate`'s (temperature, seed, top_k, stop_token). Safe from several threads."""
        route = None if expert is not None else self.route(prompt_ids)
        return self._answer(prompt_ids, route, expert or route.expert, max_new_tokens, options)

    def generate_many(self, prompts: Sequence, max_new_tokens: int = 32, **options) -> list[CoEResult]:
        """Answer `prompts` in order, routing each before the previous one generates so that the next
        expert loads in the background (when it fits without evicting the one in use)."""
        routes = [self.route(p) for p in prompts]
        results = []
        for i, (prompt, route) in enumerate(zip(prompts, routes)):
            if self.prefetch_next and i + 1 < len(routes) and routes[i + 1].expert != route.expert:
                self.pool.prefetch(routes[i + 1].expert)
            results.append(self._answer(prompt, route, route.expert, max_new_tokens, options))
        return results

    def _answer(self, prompt_ids, route, expert: str, max_new_tokens: int, options: dict) -> CoEResult:
        start = time.perf_counter()
        out = self.pool.generate(expert, prompt_ids, max_new_tokens, **options)
        result = CoEResult(out["tokens"], out["expert"], route, out["outcome"], out["switched"],
                           out["switch_seconds"], out["generate_seconds"], out["new_tokens"])
        with self._lock:
            self._requests.append(result)
            self._seconds += time.perf_counter() - start
        return result

    @property
    def stats(self) -> dict:
        """Requests, new tokens and tokens/s; switches and the switch time's p50/p99 (seconds, requests
        that bound another expert); hit rate (the expert was resident when asked for); loads and their
        time; evictions; prefetches; resident and peak bytes against the budget; routing confidence."""
        with self._lock:
            requests = list(self._requests)
            seconds = self._seconds
        store = self.pool.store_stats()
        switches = [r.switch_seconds for r in requests if r.switched]
        confidences = [r.route.confidence for r in requests if r.route is not None]
        new_tokens = sum(r.new_tokens for r in requests)
        by_expert: dict[str, int] = {}
        for r in requests:
            by_expert[r.expert] = by_expert.get(r.expert, 0) + 1
        return dict(
            requests=len(requests), new_tokens=new_tokens, seconds=seconds,
            tokens_per_s=new_tokens / seconds if seconds else 0.0,
            switches=len(switches), switch_p50_s=_percentile(switches, 50), switch_p99_s=_percentile(switches, 99),
            hit_rate=sum(r.outcome in HIT_OUTCOMES for r in requests) / len(requests) if requests else 0.0,
            outcomes={o: sum(r.outcome == o for r in requests) for o in ("hit", "prefetched", "waited", "miss")},
            generate_seconds=sum(r.generate_seconds for r in requests),
            route_confidence_mean=float(np.mean(confidences)) if confidences else None,
            requests_by_expert=by_expert, **store)

    def tiers(self) -> dict:
        """Bytes in each tier: DDR (all experts), HBM (resident and budget), SRAM (modelled working set)."""
        return self.pool.tiers()

    def reset_stats(self, evict: bool = False) -> None:
        """Forget the requests answered so far (and, with `evict`, every resident expert): benchmarks
        call it after warming up."""
        if evict:
            self.pool.evict_all()
        self.pool.reset_stats()
        with self._lock:
            self._requests, self._seconds = [], 0.0

    def close(self) -> None:
        self.pool.close()

    def __enter__(self) -> CoE:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<fusec CoE: {len(self.experts)} experts, {type(self.pool).__name__}>"


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None
