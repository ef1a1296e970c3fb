"""The jobs of one program being compiled (`start`): handed to the worker processes at once,
finished by the program (`Batch.finish`: the rest compiled here, the workers waited for).

Batches of several programs may be in flight together (a generator's decode and prefill programs). The
workers serve the oldest batch first: the decode program, which the first token waits for, is not
held up behind the prefill's bodies. A function one batch is compiling is not compiled again for another
(that one waits for it, or compiles it if nobody took it yet). A batch never compiles another batch's
jobs while it waits for its own last ones: one of those can take longer than the wait (a prefill body
compiled here held the decode program back by seconds).
"""
from __future__ import annotations

import atexit
import threading
from typing import Callable

from fusec.backends.numba_cpu import compile_pool as pool
from fusec.debug import debug


def compile_all(jobs: list[tuple[object, str, list]]) -> dict:
    """Compile `jobs` ([(generated module, function, [Numba signature, ...])], see `compile_pool.pending`), spread over
    worker processes and this one. Returns counts for stats: {"in_process": n, "in_workers": n,
    "worker_failures": n}."""
    return start(jobs).finish()


def start(jobs: list[tuple[object, str, list]]):
    """Hand `jobs` (as for `compile_all`) to the workers now, without waiting: this process can meanwhile
    trace the next program (which must not overlap Numba compiling in this process: torch.export swaps
    `builtins.min`/`max` while it runs). `Batch.finish()` then compiles here what no worker took yet and
    waits for the rest. A function another unfinished batch is compiling is not compiled twice: `finish`
    waits for it (or, if nobody took it yet, compiles it)."""
    return Batch(jobs)


_FLIGHT_LOCK = threading.Lock()
_IN_FLIGHT: dict[tuple[str, str], Batch] = {}  # (module, function) -> the unfinished batch compiling it
_BATCHES: list[Batch] = []  # unfinished batches with workers, oldest first
_FEEDERS: dict[int, threading.Thread] = {}  # worker number -> the thread feeding it jobs (while any are queued)


def _key(job: tuple) -> tuple[str, str]:
    return job[0].__name__, job[1]


def _next_job(worker_number: int):
    """(its batch, the next queued job of the oldest batch that has one), or None (the feeder of
    `worker_number` then stops, in the same step, so a batch queued later starts a new one)."""
    with _FLIGHT_LOCK:
        for batch in _BATCHES:
            if batch.queue:
                return batch, batch.queue.pop(0)
        _FEEDERS.pop(worker_number, None)
        return None


def _feed(worker_number: int) -> None:  # a thread feeding one worker process, oldest batch first
    while (taken := _next_job(worker_number)) is not None:
        batch, job = taken
        ok, why = False, "the worker's feeder failed"
        try:
            ok, why = pool._POOL.run(worker_number, job)
            pool._after_worker(job[0])
        finally:  # whatever happened, `finish` must not wait for this job forever (it compiles on first call)
            with _FLIGHT_LOCK:
                batch.counts["in_workers" if ok else "worker_failures"] += 1
            batch.done[_key(job)].set()
        if not ok:
            debug(1, f"[fusec] a compile worker failed on {job[0].__name__} ({why}); it compiles here "
                     "on its first call")


def _feeders_alive() -> bool:
    return any(t.is_alive() for t in list(_FEEDERS.values()))


class Batch:
    """Jobs being compiled by the workers (`start`); `finish` completes them."""

    def __init__(self, jobs: list[tuple[object, str, list]]):
        self.counts = {"in_process": 0, "in_workers": 0, "worker_failures": 0}
        with _FLIGHT_LOCK:
            self.borrowed = [job for job in jobs if _IN_FLIGHT.get(_key(job)) not in (None, self)]
            self.queue = [job for job in jobs if _key(job) not in _IN_FLIGHT]
            self.done = {_key(job): threading.Event() for job in self.queue}
            workers = pool.worker_count(len(self.queue))
            if workers:  # (without workers each compiles on its first call, as always: nothing is in flight)
                _IN_FLIGHT.update((k, self) for k in self.done)
                _BATCHES.append(self)
            for number in range(workers):
                if number not in _FEEDERS or not _FEEDERS[number].is_alive():  # (none after a fork)
                    _FEEDERS[number] = threading.Thread(target=_feed, args=(number,), daemon=True)
                    _FEEDERS[number].start()  # (it takes its first job once this lock is released)

    @property
    def size(self) -> int:
        """The jobs `finish` completes: its own and those it waits for in other batches."""
        return len(self.done) + len(self.borrowed)

    def _take(self):
        with _FLIGHT_LOCK:
            return self.queue.pop(0) if self.queue else None

    def finish(self, observe: Callable[[], None] = lambda: None) -> dict:
        """Compile here the jobs no worker took yet, wait for the others (and for those borrowed from
        other batches), and return the counts ({"in_process", "in_workers", "worker_failures"}).
        `observe()` is called as each job is done (a progress line, `fusec.debug.Progress`)."""
        seen: set = set()

        def done_with(key) -> None:
            if key not in seen:
                seen.add(key)
                observe()
        while (job := self._take()) is not None:  # this process compiles too, taking jobs no worker took
            self._compile_here(job)
            done_with(_key(job))
        for key, done in self.done.items():  # (each taken by a feeder, which sets it whatever the outcome)
            done.wait()
            done_with(key)
        for job in self.borrowed:
            with _FLIGHT_LOCK:
                owner = _IN_FLIGHT.get(_key(job))
                queued = [j for j in owner.queue if _key(j) == _key(job)] if owner is not None else []
                for j in queued:
                    owner.queue.remove(j)
            if queued:  # its batch has not got to it: compiled here, for both
                _compile_here(queued[0])
                owner.done[_key(job)].set()
            elif owner is not None:
                owner.done[_key(job)].wait()
            done_with(_key(job))
        with _FLIGHT_LOCK:
            for k in self.done:
                if _IN_FLIGHT.get(k) is self:
                    del _IN_FLIGHT[k]
            if self in _BATCHES:
                _BATCHES.remove(self)
        return self.counts

    def compiling_elsewhere(self) -> bool:
        """True while worker processes hold or will take every job of this batch not done yet (and those it
        borrowed): they finish without this process, which meanwhile may run code compiled before instead
        of joining them in `finish`. False once nothing is left but loading, or when a job has no worker
        left to take it (`finish` compiles it here)."""
        with _FLIGHT_LOCK:
            waiting = False
            for batch, job in [(self, job) for job in self.queue] + [(_IN_FLIGHT.get(_key(job)), job)
                                                                      for job in self.borrowed]:
                if batch is not None and not batch.done[_key(job)].is_set():
                    if job in batch.queue and not _feeders_alive():
                        return False  # no worker left to take it: `finish` compiles it here
                    waiting = True
            return waiting or not all(done.is_set() for done in self.done.values())

    def _compile_here(self, job: tuple) -> None:
        """Compile one of this batch's jobs in this process, count it and mark it done."""
        _compile_here(job)
        with _FLIGHT_LOCK:
            self.counts["in_process"] += 1
        self.done[_key(job)].set()


def _drain() -> None:
    """At exit, let the workers finish the batches nobody finished (a generator's prefill program still
    compiling in the background, `fusec.generate.compile_generator`): their machine code and checksums
    then reach the cache, and the next process loads what this one compiled instead of compiling it again.
    Registered after the pool's own exit hook, so it runs before the workers are stopped."""
    for thread in list(_FEEDERS.values()):
        thread.join()


atexit.register(_drain)


def _compile_here(job: tuple) -> None:
    """Compile a job in this process and record its Numba files' checksums, as a worker does: the program
    that wanted it may never run in this process (a prefill finished in the background at exit)."""
    from fusec.cache import recorded
    module, function, signatures = job
    try:
        for sig in signatures:
            getattr(module, function).compile(sig)
    except Exception:  # noqa: BLE001 - compiled again on the first call, which raises it as always
        return
    recorded(module)
