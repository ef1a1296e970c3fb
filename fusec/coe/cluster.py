"""Experts spread over Ray actors: `RayPools` stands in for `ExpertPool` when experts outgrow one machine.

    coe = fusec.CoE(router, experts, hbm_bytes=600 << 20, cluster="ray", workers=4, ray_address="auto")

Each worker is a Ray actor (one Python process, `num_cpus=1` by default) holding an `ExpertPool` of its
share of the experts, with its own weight store of `hbm_bytes` (the budget is per actor: the cluster
holds up to `workers * hbm_bytes`) and its own compiled programs. The driver routes and sends each
request to the actor that holds the expert; requests to different actors run in parallel (each calling
thread waits on its own `ray.get`). Placement (`RayPools.placement`) balances bytes, largest expert
first to the lightest actor, and keeps the experts of one architecture on one actor while that actor
stays near its fair share, so an architecture is compiled on as few actors as possible.

Experts given as paths are sent as paths: each actor opens its own files, so on a cluster the files must
be on shared storage, at the same path on every node. Experts given as models are sent by value (their
pickled weights). Kernels compile in each actor, cached under FUSEC_CACHE_DIR (shared by the actors of
a node). The actors must import fusec: installed on every node, or the repository at the same path on
every node (this module puts its root on the actors' PYTHONPATH).

On a cluster: `ray start --head` on one node, `ray start --address=HEAD:6379` on the others, then in the
driver `fusec.CoE(router, experts, hbm_bytes=..., cluster="ray", ray_address="auto", workers=N)` (or
`ray_address="HEAD:6379"`, or `"ray://HEAD:10001"` through Ray Client). With `ray_address=None` and Ray
not yet initialized, a local Ray instance with a CPU per actor is started, and `close()` shuts it down.
"""
from __future__ import annotations

import os
import statistics
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numba
import numpy as np
import torch

from fusec.benchtools import set_threads
from fusec.coe.experts import ExpertError, FileExpert, ModuleExpert, as_expert, nbytes
from fusec.coe.pool import ExpertPool, store_summary

try:
    import ray
except ImportError:  # pragma: no cover - exercised where Ray is absent
    ray = None

REPO_ROOT = str(Path(__file__).resolve().parents[2])  # the directory holding the fusec package
COUNTS = ("loads", "evictions", "prefetches", "prefetches_used", "prefetches_skipped", "load_failures",
          "resident_experts", "resident_bytes", "peak_bytes", "hbm_bytes")


class PoolActor:
    """One worker: an ExpertPool of its experts, on `threads` threads (run as a Ray actor)."""

    def __init__(self, experts: dict, threads: int, pool_options: dict):
        # this process's CPU share, so that the actors of a node do not oversubscribe it
        self.numba_threads = set_threads(threads)
        with warnings.catch_warnings():  # the driver warns about unavailable experts
            warnings.simplefilter("ignore")
            self.pool = ExpertPool(experts, **pool_options)

    def describe(self) -> tuple[list[str], dict[str, str]]:
        return list(self.pool.experts), dict(self.pool.unavailable)

    def generate(self, name: str, prompt_ids, max_new_tokens: int, options: dict) -> dict:
        numba.set_num_threads(self.numba_threads)  # numba's count is per thread; the actor's calls run on several
        out = self.pool.generate(name, prompt_ids, max_new_tokens, **options)
        return {**out, "tokens": out["tokens"].tolist()}

    def prefetch(self, name: str) -> bool:
        return self.pool.prefetch(name)

    def store_stats(self) -> dict:
        return {**store_summary(self.pool.store), "load_seconds": list(self.pool.store.stats.load_seconds)}

    def call(self, method: str):  # warm, tiers, reset_stats, evict_all, close
        return getattr(self.pool, method)()


class RayPools:
    """`ExpertPool`'s interface over `workers` Ray actors; `hbm_bytes` is each actor's budget.

    `address` joins a running cluster ("auto", "HOST:6379", "ray://HOST:10001"); None starts a local
    instance unless Ray is initialized already. `cpus_per_worker` is each actor's CPU reservation and
    thread count; actors not started within `start_timeout` seconds raise TimeoutError (too few free
    CPUs). `pool_options` are ExpertPool's (weights, max_seq_len, prompt_buckets, policy, backend); a
    policy object is copied to each actor.
    """

    def __init__(self, experts: Mapping[str, Any], workers: int = 2, address: str | None = None, *,
                 hbm_bytes: int, cpus_per_worker: int = 1, runtime_env: dict | None = None,
                 start_timeout: float = 300.0, **pool_options):
        if ray is None:
            raise ImportError("cluster='ray' needs Ray: pip install 'ray==2.60.0'")
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive number of Ray actors, given {workers!r}")
        if not experts:
            raise ValueError("a pool needs at least one expert, given none")
        self.placement = place(experts, workers)
        self.started_ray = False
        if not ray.is_initialized():
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a library does not report usage unasked
            # RAY_ADDRESS joins a running cluster, like address= (which refuses num_cpus)
            joining = address is not None or os.environ.get("RAY_ADDRESS")
            local = {} if joining else dict(num_cpus=workers * cpus_per_worker, include_dashboard=False)
            ray.init(address=address, log_to_driver=False, ignore_reinit_error=True, **local)
            self.started_ray = True
        if runtime_env is None:
            path = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
            runtime_env = {"env_vars": {"PYTHONPATH": path, "NUMBA_NUM_THREADS": str(cpus_per_worker)}}
        remote = ray.remote(PoolActor).options(num_cpus=cpus_per_worker, max_concurrency=8, runtime_env=runtime_env)
        options = dict(pool_options, hbm_bytes=hbm_bytes)
        self.actors = []
        try:
            for worker in range(max(self.placement.values()) + 1):
                share = {name: _sendable(experts[name]) for name, w in self.placement.items() if w == worker}
                self.actors.append(remote.remote(share, cpus_per_worker, options))
            described = ray.get([a.describe.remote() for a in self.actors], timeout=start_timeout)
        except ray.exceptions.GetTimeoutError:
            count, free = len(self.actors), ray.available_resources().get("CPU", 0)
            self.close()
            raise TimeoutError(f"fusec CoE: {count} Ray actors of {cpus_per_worker} CPU each did not start in "
                               f"{start_timeout:g} s; the cluster has {free:g} CPUs free") from None
        except BaseException:
            self.close()
            raise
        self.experts: dict[str, int] = {}
        self.unavailable: dict[str, str] = {}
        for worker, (names, unavailable) in enumerate(described):
            self.experts.update((name, worker) for name in names)
            self.unavailable.update(unavailable)
        for reason in self.unavailable.values():
            warnings.warn(f"fusec CoE: {reason}; serving without it", stacklevel=3)

    def _worker(self, name: str) -> int:
        if name in self.unavailable:
            raise ExpertError(name, f"unavailable ({self.unavailable[name]})")
        if name not in self.experts:
            raise KeyError(f"no expert named {name!r}; experts: {', '.join(sorted(self.experts))}")
        return self.experts[name]

    def _get(self, ref, name: str | None = None, worker: int | None = None):
        """ray.get, raising an actor's exception as itself (an ExpertError stays an ExpertError)."""
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, BaseException):
                raise e.cause from e
            raise
        except ray.exceptions.RayActorError as e:
            about = f" {worker} serving expert {name!r}" if name else ""
            raise RuntimeError(f"fusec CoE: a Ray worker{about} died: {e}") from e

    def generate(self, name: str, prompt_ids, max_new_tokens: int = 32, **options) -> dict:
        """ExpertPool.generate on the actor that holds `name`: the same keys, tokens a torch int64 tensor."""
        worker = self._worker(name)
        out = self._get(self.actors[worker].generate.remote(name, prompt_ids, max_new_tokens, options), name, worker)
        out["tokens"] = torch.tensor(out["tokens"], dtype=torch.int64)
        return out

    def prefetch(self, name: str) -> bool:
        """Ask the expert's actor to load it in the background (not waited for)."""
        if name not in self.experts:
            return False
        self.actors[self.experts[name]].prefetch.remote(name)
        return True

    def store_stats(self) -> dict:
        """`fusec.coe.pool.store_summary`'s keys summed over the actors (hbm_bytes: the cluster's total
        budget; peak_bytes: the sum of the actors' peaks, a bound on the cluster's), load percentiles over
        all loads, and `workers`: each actor's own summary."""
        per = self._get([a.store_stats.remote() for a in self.actors])
        loads = [s for w in per for s in w.pop("load_seconds")]
        total = {key: sum(w[key] for w in per) for key in COUNTS}
        return dict(total, load_p50_s=_percentile(loads, 50), load_p99_s=_percentile(loads, 99), workers=per)

    def _all(self, method: str) -> list:
        """ExpertPool.`method`() on every actor, in parallel."""
        return self._get([a.call.remote(method) for a in self.actors])

    def warm(self) -> None:
        """Compile every actor's programs now, the actors in parallel."""
        self._all("warm")

    def reset_stats(self) -> None:
        self._all("reset_stats")

    def evict_all(self) -> None:
        self._all("evict_all")

    def tiers(self) -> dict:
        """ExpertPool.tiers summed over the actors (SRAM per architecture: the largest), and `workers`."""
        per = self._all("tiers")
        sram = {}
        for w in per:
            for arch, size in w["sram_bytes"].items():
                sram[arch] = size if sram.get(arch) is None else max(sram[arch], size or 0)
        total = {key: sum(w[key] for w in per) for key in ("ddr_bytes", "hbm_bytes", "hbm_resident_bytes")}
        return dict(total, sram_bytes=sram, workers=per)

    def close(self) -> None:
        """Stop the actors, and Ray if this object started it. Safe to call twice."""
        if ray is None:
            return
        if ray.is_initialized():
            for actor in self.actors:
                ray.kill(actor)
        self.actors = []
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False

    def __repr__(self) -> str:
        return f"<fusec RayPools: {len(self.placement)} experts over {len(self.actors)} Ray actors>"


def place(experts: Mapping[str, Any], workers: int) -> dict[str, int]:
    """{expert: worker index}: largest first, to an actor already holding its architecture if that
    actor stays within the fair share (total / workers) give or take half the expert, else to the lightest
    actor. Only as many actors as experts are used. Experts the driver cannot open (files it cannot see)
    count as a typical size."""
    sizes, archs = {}, {}
    for name, source in experts.items():
        try:
            expert = as_expert(name, source)  # TypeError for a source that is neither path nor model
        except ExpertError:
            continue  # the actor reports it
        archs[name] = expert.architecture
        sizes[name] = expert.data_bytes if isinstance(expert, FileExpert) else nbytes(expert.load())
    typical = int(statistics.median(sizes.values())) if sizes else 1
    sizes = {name: sizes.get(name, typical) for name in experts}
    n = min(workers, len(experts))
    fair = sum(sizes.values()) / n
    load, held = [0] * n, [set() for _ in range(n)]
    placement = {}
    for name in sorted(experts, key=lambda e: (-sizes[e], str(archs.get(e, "")), e)):
        arch = archs.get(name)
        same = [w for w in range(n) if arch is not None and arch in held[w] and load[w] + sizes[name] / 2 <= fair]
        worker = min(same or range(n), key=lambda w: load[w])
        placement[name] = worker
        load[worker] += sizes[name]
        held[worker].add(arch)
    return {name: placement[name] for name in experts}


def _sendable(source):
    """What an actor is sent for an expert: a path as a string, a model by value."""
    if isinstance(source, FileExpert):
        return str(source.path)
    if isinstance(source, ModuleExpert):
        return source.model
    return str(source) if isinstance(source, os.PathLike) else source


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None
