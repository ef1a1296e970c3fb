"""Compiling a program's distinct kernel bodies at once, in worker processes.

Numba compiles one function at a time under a lock held with the GIL, and a cold start is mostly that
(a few seconds per kernel body). So before a program's first call, `compile_batch.start` hands the bodies that
are in no cache yet to worker processes (`python -c` running `serve`: no multiprocessing, so a user's
script is never imported again in a worker) while this process compiles some itself. A worker loads the
generated module through `fusec.cache.load_source` (the same file, under the cache's lock), compiles it
for the argument types this process will call it with, and records the checksums of the Numba files it
wrote, as this process does after a run. This process then verifies those files like any cached ones
(`fusec.cache.verify_numba_files`) and loads them on the kernel's first call instead of compiling it.

Nothing here changes what runs: when a worker cannot start, fails, or compiled for other types, the
kernel is compiled in this process on its first call, as without workers, raising the same error if it
fails. Workers are used only with a cache directory and two or more bodies to compile; they exit when
idle for `IDLE_SECONDS` or when this process exits. `FUSEC_COMPILE_WORKERS=N` sets their number
(default: one fewer than the CPUs this process may use, at most MAX_WORKERS; 0 turns them off).
"""
from __future__ import annotations

import atexit
import os
import pickle
import select
import struct
import subprocess
import sys
import threading
import time
import warnings

from fusec.debug import debug
from fusec.dtypes import to_numpy

IDLE_SECONDS = 60.0   # a worker exits after this long without a job (a later compile starts a new one)
JOB_SECONDS = 900.0   # a worker that does not answer within this long is killed (the job compiles here)
# default most workers: each imports torch (a few hundred MB while it lives), and a program has about 8
# distinct bodies, the largest of which bounds the time anyway
MAX_WORKERS = 4
WORKER_NICENESS = 19  # added to a worker's niceness (see `serve`)
_HEADER = struct.Struct("<Q")
# a worker's program: this fusec first on its path, whatever the parent's script or working directory
BOOT = "import sys; sys.path.insert(0, {root!r}); from fusec.backends.numba_cpu.compile_pool import serve; serve()"


def worker_count(jobs: int) -> int:
    """How many workers to use for `jobs` bodies: none for fewer than two (this process compiles one
    itself meanwhile), else FUSEC_COMPILE_WORKERS or one fewer than the usable CPUs (at most MAX_WORKERS),
    at most jobs - 1."""
    if jobs < 2:
        return 0
    setting = os.environ.get("FUSEC_COMPILE_WORKERS", "").strip()
    if setting:
        try:
            wanted = int(setting)
        except ValueError:
            warnings.warn(f"fusec: FUSEC_COMPILE_WORKERS must be a whole number, given {setting!r}; "
                          "using the default", stacklevel=3)
            wanted = min(_cpus() - 1, MAX_WORKERS)
    else:
        wanted = min(_cpus() - 1, MAX_WORKERS)
    return max(0, min(wanted, jobs - 1))


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def array_type(t):
    """The Numba type of a C-contiguous, writable array holding values of IR type `t` (what the runtime
    passes for a value it computes or takes as an input)."""
    import numba
    return numba.types.Array(numba.from_dtype(to_numpy(t.dtype)), len(t.shape), "C")


def pending(calls: list[tuple[object, str, tuple]]) -> list[tuple[object, str, list]]:
    """The jobs of `calls` ([(module, function, signature)] per call site) worth a worker: one per function
    of a module that lives in the cache directory and has neither compiled code there (loading it is
    quick) nor in this process; with its distinct signatures. Largest first (loop drivers, then kernels by
    the length of their text): the longest compiles start at once."""
    from fusec.cache import numba_files
    jobs: dict[tuple[str, str], tuple[object, str, list]] = {}
    for module, function, sig in calls:
        if getattr(module, "__fusec_cache__", None) and sig not in getattr(module, function).overloads:
            job = jobs.setdefault((module.__name__, function), (module, function, []))
            if sig not in job[2]:
                job[2].append(sig)
    cold = [(module, function, sigs) for module, function, sigs in jobs.values()  # (one look per module)
            if not numba_files(module.__fusec_cache__[1], module.__fusec_cache__[2], function)]
    return sorted(cold, key=lambda j: (j[1] != "driver", -len(j[0].__fusec_source__)))


def load_cached(calls: list[tuple[object, str, tuple]]) -> bool:
    """Load the machine code of every call of `calls` ([(module, function, signature)], as for `pending`)
    from the cache, running nothing: True when all of it was there (a warm start needs no example run),
    False as soon as one is not (it is then compiled here, as its first call would) or fails to load
    (its files discarded, as on a first call): the caller runs the program once, which compiles what is
    missing and records its checksums (`fusec.cache.recorded`)."""
    from fusec.cache import recover
    if not all(getattr(module, "__fusec_cache__", None) for module, _, _ in calls) or pending(calls):
        return False
    for module, function, sig in calls:
        fn = getattr(module, function)
        if sig in fn.overloads:
            continue
        misses = sum(fn.stats.cache_misses.values())
        try:
            fn.compile(sig)
        except Exception as e:
            if not recover(module, function, e):
                raise
            return False
        if sum(fn.stats.cache_misses.values()) != misses:
            return False
    return True


def prestart() -> None:
    """Start the workers a cold compile will use (they import torch and Numba meanwhile, a second or more),
    without waiting for them. For a program that is being traced: its kernels are most likely in no cache."""
    from fusec.cache import choose_dir
    n = worker_count(1 << 20)
    if n and choose_dir()[0] is not None:
        env = _settings()
        for k in range(n):
            _POOL._worker(k, restart=False, env=env)


SETTINGS = ("FUSEC_", "NUMBA_")  # environment variables a worker compiles under, as its parent


def _settings() -> dict:
    return {k: v for k, v in os.environ.items() if k.startswith(SETTINGS)}


def _after_worker(module) -> None:
    """Check the files a worker wrote like any cached ones: kept when they match the checksums recorded,
    discarded (compiled here on the first call) when not."""
    from fusec.cache import purge, verify_numba_files
    from fusec.cache_trust import locked
    directory, ndir, name = module.__fusec_cache__
    try:
        with locked(directory):
            verify_numba_files(directory, ndir, name)
    except OSError:  # not checked (the lock is held elsewhere): not used either
        try:
            purge(directory, ndir, name)
        except OSError:
            pass


class _Pool:
    """Worker processes, started on first need; each serves one job at a time."""

    def __init__(self):
        self.lock = threading.Lock()
        self.workers: dict[int, subprocess.Popen] = {}
        self.busy: dict[int, threading.Lock] = {}  # per worker: one request and its reply at a time
        self.envs: dict[int, dict] = {}  # per worker: the FUSEC_/NUMBA_ settings it was started with
        self.pid = os.getpid()

    def run(self, number: int, job: tuple) -> tuple[bool, str]:
        """Run one job on worker `number` (started, or restarted once if it had exited): (ok, why not).
        A worker silent for JOB_SECONDS is killed (the job then compiles here)."""
        module, function, signatures = job
        env = _settings()
        request = pickle.dumps((module.__fusec_source__, module.__fusec_cache__, function, signatures, env))
        with self.lock:
            busy = self.busy.setdefault(number, threading.Lock())
        with busy:
            why = ""
            for attempt in range(2):
                worker = self._worker(number, restart=attempt > 0, env=env)
                if worker is None:
                    return False, "it could not start"
                try:
                    _send(worker.stdin, request)
                    return pickle.loads(_read(worker.stdout.fileno(), JOB_SECONDS))  # noqa: S301 - our child
                except TimeoutError as e:
                    worker.kill()
                    return False, str(e)
                except (OSError, EOFError, pickle.UnpicklingError) as e:
                    why = f"{type(e).__name__}: {e}"
            return False, why

    def _worker(self, number: int, restart: bool, env: dict) -> subprocess.Popen | None:
        """Worker `number`, started with these settings: one started with others (the cache directory
        changed since, say) would compile into the wrong place, so it is replaced."""
        with self.lock:
            if self.pid != os.getpid():  # a forked child: its parent's workers are not its own
                self.workers, self.busy, self.envs, self.pid = {}, {}, {}, os.getpid()
            worker = self.workers.get(number)
            if worker is not None and (restart or worker.poll() is not None or self.envs.get(number) != env):
                _stop(worker)
                worker = None
            if worker is None:
                root = os.path.dirname(os.path.dirname(os.path.abspath(sys.modules["fusec"].__file__)))
                try:
                    worker = subprocess.Popen([sys.executable, "-c", BOOT.format(root=root)], stdin=subprocess.PIPE,
                                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                              env={k: v for k, v in os.environ.items()
                                                   if not k.startswith(SETTINGS)} | env)
                except OSError as e:
                    debug(1, f"[fusec] cannot start a compile worker ({e})")
                    return None
                self.workers[number], self.envs[number] = worker, dict(env)
            return worker

    def close(self) -> None:
        with self.lock:
            if self.pid == os.getpid():
                for worker in self.workers.values():
                    _stop(worker)
            self.workers.clear()


def _stop(worker: subprocess.Popen) -> None:
    """Close a worker's input (it exits at once when idle), then wait briefly, then kill it."""
    try:
        worker.stdin.close()
        worker.wait(timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        worker.kill()
        worker.wait()


_POOL = _Pool()
atexit.register(_POOL.close)


def _send(stream, data: bytes) -> None:
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _read(fd: int, seconds: float) -> bytes:
    """One message from file descriptor `fd`, waiting at most `seconds` for it (TimeoutError)."""
    deadline, data, size = time.monotonic() + seconds, b"", None
    while size is None or len(data) < _HEADER.size + size:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError(f"no answer within {seconds:.0f} s")
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            raise EOFError("the worker exited")
        data += chunk
        if size is None and len(data) >= _HEADER.size:
            size, = _HEADER.unpack(data[:_HEADER.size])
    return data[_HEADER.size:]


def _receive(stream) -> bytes:
    head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise EOFError("the worker exited")
    size, = _HEADER.unpack(head)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("the worker exited")
    return data


# --- the worker ---------------------------------------------------------------------------------------

def serve() -> None:
    """A worker's main loop: for each request (source, where the parent caches it, function, signatures,
    environment), load the module from the cache, compile the function for those signatures, record the
    checksums of its files, answer (ok, why not).
    Exits at the end of its input or after IDLE_SECONDS without a request."""
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed goes to stderr, never into the replies
    requests = sys.stdin.buffer
    try:  # the lowest priority: a worker compiles ahead of need, beside a parent whose work is awaited now
        os.nice(WORKER_NICENESS)  # (a cold start's prompt, run a token at a time, took 2-3x longer beside it)
    except OSError:
        pass
    import torch  # noqa: F401 - generated modules bind MKL's symbols from libtorch (backends.numba_cpu.mkl)

    from fusec.backends.numba_cpu.generated import HEADER
    from fusec.cache import load_source, recorded
    # what every generated module imports (Numba and the library its kernels call, about 1 s), now: a
    # worker starts while its program is traced (`prestart`), so this is done before the first job comes
    try:
        exec(compile(HEADER, "<generated modules' imports>", "exec"), {})  # noqa: S102 - our own constant text
    except Exception:  # noqa: BLE001 - only a head start: each job imports them again and reports a failure
        pass
    while True:
        ready, _, _ = select.select([requests], [], [], IDLE_SECONDS)
        if not ready:
            return
        try:
            data = _receive(requests)
        except EOFError:
            return
        source, where, function, signatures, env = pickle.loads(data)  # noqa: S301 - from our parent
        os.environ.update(env)
        try:
            module = load_source(source)
            if module.__fusec_cache__ != where:  # another directory or module name: useless to the parent
                raise RuntimeError(f"the worker's module is {module.__fusec_cache__}, not {where}")
            for sig in signatures:
                getattr(module, function).compile(sig)
            recorded(module)
            reply = (True, "")
        except Exception as e:  # noqa: BLE001 - reported; the kernel compiles in the parent
            reply = (False, f"{type(e).__name__}: {e}")
        _send(replies, pickle.dumps(reply))
