"""The HBM tier: expert weights resident in memory under a byte budget, with a pluggable eviction policy
and background prefetch.

    store = WeightStore(hbm_bytes=600 << 20, load=pool.load_expert, policy="lru")
    with store.use("math") as weights:     # resident (loaded now on a miss), pinned while in use
        ...
    store.prefetch("code")                 # load in the background if it fits without evicting a pinned one

Before an expert is admitted, unpinned experts are evicted (the policy picks which) until it fits, so the
resident bytes never exceed the budget; a load that cannot fit because everything else is pinned waits
for a release. Loads of one expert are never duplicated: a request for an expert that is being loaded
(by a prefetch, say) waits for that load. Every load and every `use` is timed (`stats`).
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

from fusec.coe.experts import ExpertError


class Policy(Protocol):
    """Chooses which resident expert to evict. The store tells it about every access, admission and
    eviction; `victim` picks among the experts that may go (never a pinned one)."""

    def accessed(self, name: str) -> None: ...
    def admitted(self, name: str) -> None: ...
    def evicted(self, name: str) -> None: ...
    def victim(self, candidates: list[str]) -> str: ...


class LRU:
    """Evict the expert used least recently."""

    def __init__(self):
        self.order: OrderedDict[str, None] = OrderedDict()

    def accessed(self, name: str) -> None:
        self.order[name] = None
        self.order.move_to_end(name)

    admitted = accessed

    def evicted(self, name: str) -> None:
        self.order.pop(name, None)

    def victim(self, candidates: list[str]) -> str:
        allowed = set(candidates)
        return next(name for name in self.order if name in allowed)


class LFU(LRU):
    """Evict the expert used least often over the store's life (ties: least recently). Keeps the head of
    a skewed popularity resident even when the tail comes in bursts."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def accessed(self, name: str) -> None:
        super().accessed(name)
        self.counts[name] = self.counts.get(name, 0) + 1

    def admitted(self, name: str) -> None:
        super().accessed(name)

    def victim(self, candidates: list[str]) -> str:
        recency = {name: i for i, name in enumerate(self.order)}
        return min(candidates, key=lambda n: (self.counts.get(n, 0), recency.get(n, -1)))


POLICIES: dict[str, Callable[[], Policy]] = {"lru": LRU, "lfu": LFU}


def make_policy(policy: str | Policy) -> Policy:
    if isinstance(policy, str):
        if policy not in POLICIES:
            raise ValueError(f"unknown eviction policy {policy!r}; expected one of {', '.join(POLICIES)} "
                             f"or an object with accessed/admitted/evicted/victim")
        return POLICIES[policy]()
    missing = [m for m in ("accessed", "admitted", "evicted", "victim") if not callable(getattr(policy, m, None))]
    if missing:
        raise TypeError(f"an eviction policy needs the methods {', '.join(missing)}; given "
                        f"{type(policy).__name__}")
    return policy


@dataclass
class Resident:
    name: str
    weights: dict
    nbytes: int
    load_seconds: float
    prefetched: bool = False
    pins: int = 0


@dataclass
class StoreStats:
    uses: int = 0
    hits: int = 0                 # `use` found the expert resident
    waited: int = 0               # found it being loaded (by a prefetch) and waited
    misses: int = 0               # loaded it on demand
    loads: int = 0
    load_seconds: list = field(default_factory=list)
    evictions: int = 0
    prefetches: int = 0
    prefetches_used: int = 0      # prefetched, then used before eviction
    prefetches_skipped: int = 0   # would not have fit without evicting a pinned expert
    failures: int = 0
    peak_bytes: int = 0


class WeightStore:
    """Resident expert weights under `hbm_bytes`. `load(name) -> (weights, nbytes)` reads an expert
    (from the DDR tier); `size(name)` is its resident size, known before loading; `evicted(name)` hears
    of every eviction (called holding the store's lock), so that its memory can be reused."""

    def __init__(self, hbm_bytes: int, load: Callable[[str], tuple[dict, int]], size: Callable[[str], int],
                 policy: str | Policy = "lru", evicted: Callable[[str], None] | None = None):
        if not isinstance(hbm_bytes, int) or hbm_bytes <= 0:
            raise ValueError(f"hbm_bytes must be a positive number of bytes, given {hbm_bytes!r}")
        self.hbm_bytes, self._load, self._size, self._evicted = hbm_bytes, load, size, evicted
        self.policy = make_policy(policy)
        self.resident: dict[str, Resident] = {}
        self.loading: dict[str, Future] = {}
        self.stats = StoreStats()
        self._cond = threading.Condition()
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fusec-prefetch")

    @property
    def resident_bytes(self) -> int:
        return sum(r.nbytes for r in self.resident.values())

    @contextmanager
    def use(self, name: str) -> Iterator[tuple[Resident, str]]:
        """(the expert, resident and pinned (not evictable) inside the block; how it was found: "hit",
        "prefetched" (loaded ahead and not used yet), "waited" (a load in flight) or "miss" (loaded now))."""
        resident, outcome = self._acquire(name)
        try:
            yield resident, outcome
        finally:
            with self._cond:
                resident.pins -= 1
                self._cond.notify_all()

    def prefetch(self, name: str) -> bool:
        """Start loading `name` in the background; False when it is resident, being loaded, or would not
        fit without evicting an expert in use."""
        with self._cond:
            if name in self.resident or name in self.loading:
                return False
            if not self._make_room(self._size(name), wait=False):
                self.stats.prefetches_skipped += 1
                return False
            self.stats.prefetches += 1
            future = self.loading[name] = Future()
        self._loader.submit(self._fill, name, future, True)
        return True

    def _acquire(self, name: str) -> tuple[Resident, str]:
        self._size(name)  # known before the lock is taken (it may compile the expert's program)
        with self._cond:
            self.stats.uses += 1
            resident = self.resident.get(name)
            future = self.loading.get(name) if resident is None else None
            if resident is None and future is None:
                self.stats.misses += 1
                self._make_room(self._size(name), wait=True)
                future = self.loading[name] = Future()
                load_here = True
                outcome = "miss"
            else:
                load_here = False
                if resident is None:
                    self.stats.waited += 1
                    outcome = "waited"
                else:
                    self.stats.hits += 1
                    outcome = "prefetched" if resident.prefetched else "hit"
        if load_here:
            self._fill(name, future, False)
        if future is not None:
            future.result()  # raises the load's ExpertError
        with self._cond:
            resident = self.resident.get(name)
            if resident is None:  # evicted between its load and now (a tiny budget): load it again
                self.stats.uses -= 1
                return self._acquire(name)
            resident.pins += 1
            if resident.prefetched:
                resident.prefetched = False
                self.stats.prefetches_used += 1
            self.policy.accessed(name)
            return resident, outcome

    def _fill(self, name: str, future: Future, prefetched: bool) -> None:
        """Load `name` (room was made for it) and admit it; failures reach whoever waits on `future`."""
        start = time.perf_counter()
        try:
            weights, nbytes = self._load(name)
        except Exception as e:
            with self._cond:
                self.loading.pop(name, None)
                self.stats.failures += 1
                self._cond.notify_all()
            future.set_exception(e if isinstance(e, ExpertError) else ExpertError(name, f"failed to load: {e}"))
            return
        seconds = time.perf_counter() - start
        with self._cond:
            self.resident[name] = Resident(name, weights, nbytes, seconds, prefetched)
            self.loading.pop(name, None)
            self.policy.admitted(name)
            self.stats.loads += 1
            self.stats.load_seconds.append(seconds)
            self.stats.peak_bytes = max(self.stats.peak_bytes, self.resident_bytes + self._loading_bytes())
            self._cond.notify_all()
        future.set_result(None)

    def _loading_bytes(self) -> int:
        return sum(self._size(n) for n in self.loading)

    def _make_room(self, size: int, wait: bool) -> bool:
        """Evict unpinned experts until `size` more bytes fit (called holding the lock). With `wait`, wait
        for pinned experts to be released; without, give up (False) rather than evict one."""
        if size > self.hbm_bytes:
            raise ValueError(f"an expert of {size} bytes does not fit hbm_bytes={self.hbm_bytes}")
        while self.resident_bytes + self._loading_bytes() + size > self.hbm_bytes:
            # a prefetch never evicts another prefetched expert before its request used it (under LFU that
            # one, never accessed yet, would otherwise always be the victim)
            candidates = [n for n, r in self.resident.items() if r.pins == 0 and (wait or not r.prefetched)]
            if not candidates:
                if not wait:
                    return False
                self._cond.wait()
                continue
            victim = self.policy.victim(candidates)
            del self.resident[victim]
            self.policy.evicted(victim)
            self.stats.evictions += 1
            if self._evicted is not None:
                self._evicted(victim)
        return True

    def reset_stats(self) -> None:
        """Start counting anew (residency is kept); benchmarks call it after warming up."""
        with self._cond:
            self.stats = StoreStats(peak_bytes=self.resident_bytes)

    def evict_all(self) -> None:
        """Drop every unpinned expert (tests, benchmarks)."""
        with self._cond:
            for name in [n for n, r in self.resident.items() if r.pins == 0]:
                del self.resident[name]
                self.policy.evicted(name)

    def close(self) -> None:
        self._loader.shutdown(wait=True)
