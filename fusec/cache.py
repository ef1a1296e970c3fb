"""The on-disk compile cache of the Numba backend: where it is, what its keys cover, what it trusts, and
how it survives damage and concurrency.

One generated module per distinct kernel (`backends.numba_cpu.kernels`), `fusec_gen_<key>.py`, where the
key hashes the generated source (which holds the kernel's ops, shapes, dtypes and options) with the
versions of fusec, Numba, llvmlite, NumPy, torch and Python and the host CPU's name and features. Numba's own cache (`cache=True`) keeps the machine
code in `fusec_gen_<key>.<kernel>-<line>.pyXY.{nbi,nbc}`, in `__pycache__` beside it or wherever Numba's
locators say (NUMBA_CACHE_DIR: `<it>/<dir name>_<hash of dir>/`; see `numba_dir`).

- Trust: Numba's files are pickles, and loading a pickle runs the code it names. So a Numba file is
  loaded only when it matches the checksum fusec recorded (`<name>.manifest.json`) after the kernels it
  holds ran; fusec itself only hashes them, never unpickles one (`fusec.cache_manifest`). A file with no
  record is deleted and compiled again (quietly: an interrupted compile, one still running in another
  process, or a lost manifest leave such files); a file whose checksum differs is damage (a warning). A
  record is evidence only when nobody else could have written it: the cache directory, and Numba's,
  must be owned by this user and writable by no one else, the directories above them too (or sticky),
  as ssh requires of ~/.ssh (`fusec.cache_trust`). One that is not is refused with a warning naming it and why; a new one
  is created 0700.
- Damage: before a module is used, its `.py` must equal the source it names and its Numba files must
  match their checksums; anything else is discarded (with a warning) and rebuilt. The module is executed
  from the verified source in memory, never from a `.pyc`.
- Concurrency: the `.py` is written once, under an advisory file lock (0600, taken within
  `cache_trust.LOCK_TIMEOUT` or given up: a warning and an in-memory compile), through a temporary file
  and `os.replace`; Numba writes its files the same way, so processes compiling the same program at once
  each see either no file or a whole one. Threads of one process build a module once, and see it only
  once whole.
- A directory that cannot be used: the cache moves to a per-user temporary directory
  (`<tmp>/fusec-<uid>`, under the same rules), and when that cannot be used either, programs compile in
  memory without Numba's cache; each with a warning.
"""
from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import importlib
import importlib.util
import os
import platform
import sys
import tempfile
import threading
import types
import warnings
from importlib import metadata

import numpy

from fusec.cache_manifest import numba_files, purge, record_manifest, verify_numba_files, write_atomic
from fusec.cache_trust import LOCK_NAME, CacheLocked, locked, unusable, untrusted

PREFIX = "fusec_gen_"


def default_dir() -> str:
    """FUSEC_CACHE_DIR, or ~/.cache/fusec."""
    return os.environ.get("FUSEC_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fusec")


def _fallback() -> str:
    return os.path.join(tempfile.gettempdir(), f"fusec-{os.getuid() if hasattr(os, 'getuid') else 'user'}")


def choose_dir() -> tuple[str | None, list[str]]:
    """The cache directory in use and why the ones before it were not: the configured one, else a
    per-user temporary one, else None (compile in memory). Each must be writable and trusted
    (`fusec.cache_trust`); a missing one is created private (0700)."""
    refused = []
    for path in (default_dir(), _fallback()):
        why = unusable(path)
        if why is None:
            return path, refused
        refused.append(f"{path}: {why}")
    return None, refused


def writable_dir() -> str | None:
    """The cache directory to use (`choose_dir`), warning when it is not the configured one."""
    path, refused = choose_dir()
    if refused and path is not None:
        warnings.warn(f"fusec: not using the cache directory {refused[0]}; using {path}", stacklevel=3)
    elif path is None:
        warnings.warn(f"fusec: no usable compile cache directory ({'; '.join(refused)}); compiling in memory, "
                      "without a compile cache", stacklevel=3)
    return path


@functools.lru_cache(maxsize=None)
def environment_key() -> str:
    """What besides the source decides the machine code: versions and the host CPU."""
    import llvmlite  # Numba and llvmlite load in seconds: only a compile needs them
    import numba
    from llvmlite import binding

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "?"
    cpu = numba.config.CPU_NAME or binding.get_host_cpu_name()
    features = numba.config.CPU_FEATURES or binding.get_host_cpu_features().flatten()
    parts = [f"fusec {version('fusec')}", f"numba {numba.__version__}", f"llvmlite {llvmlite.__version__}",
             f"numpy {numpy.__version__}", f"torch {version('torch')}", f"python {platform.python_version()}",
             f"cpu {cpu} {features}", f"kernels {library_digest()}"]
    return "\n".join(parts)


# The modules of the Numba functions generated code calls (the header's imports) and of what those inline
# (the matrix-vector loop and its LLVM IR): tests/test_cache.py checks that none is missing.
LIBRARY = ("attention_block", "blas", "mkl", "lowp", "int8", "int8_dot", "gemm_widen", "gemm_call", "matvec",
           "matvec_blocked", "matvec_plain", "matvec_call", "entries", "rowops", "simd", "fastexp", "borrowed",
           "call_at", "onednn")


def library_digest() -> str:
    """A hash of the Numba functions generated code calls (the `LIBRARY` modules of backends/numba_cpu):
    Numba's cache of a generated module embeds their machine code and does not notice when they change, so
    a changed library must mean new module names (a stale one crashed with a segmentation fault); the
    library's own functions are cached under it too (`backends.numba_cpu.library_cache`). Read from the
    files without importing them: the library's functions ask for it while their modules import."""
    digest = hashlib.sha256()
    for path in library_files():
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def library_files() -> list[str]:
    """The paths of the library's modules (`LIBRARY`, in backends/numba_cpu), found without importing the
    package."""
    spec = importlib.util.find_spec("fusec.backends.numba_cpu")
    directory = os.path.abspath(spec.submodule_search_locations[0])
    return [os.path.join(directory, name + ".py") for name in LIBRARY]


def module_name(source: str) -> str:
    digest = hashlib.sha256((source + "\n" + environment_key()).encode()).hexdigest()[:24]
    return PREFIX + digest


# --- Numba's files -------------------------------------------------------------------------------------

def numba_dir(py_file: str) -> str | None:
    """Where Numba keeps the cache files of functions defined in files beside the existing `py_file`,
    asked of Numba's own locators: NUMBA_CACHE_DIR (`<it>/<dir name>_<hash of dir>`), `__pycache__`, or
    Numba's per-user directory when that is not writable. None when Numba cannot cache them."""
    from numba.core.caching import CompileResultCacheImpl

    def probe():
        pass
    probe.__code__ = probe.__code__.replace(co_filename=py_file)
    try:
        return CompileResultCacheImpl(probe).locator.get_cache_path()
    except RuntimeError:  # no locator found
        return None


# --- loading a generated module -------------------------------------------------------------------------

_name_locks_lock = threading.Lock()
_name_locks: dict[str, threading.Lock] = {}


def load_source(source: str) -> types.ModuleType:
    """The module for generated `source`: from this process, from the cache (verified, rebuilt when
    damaged), or compiled in memory when no cache directory can be used. Threads asking for the same
    module at once build it once; it is in `sys.modules` only once whole."""
    name = module_name(source)
    module = sys.modules.get(name)
    if module is None:
        with _name_locks_lock:
            lock = _name_locks.setdefault(name, threading.Lock())
        with lock:
            module = sys.modules.get(name)
            if module is None:
                module = _build(name, source)
                sys.modules[name] = module
    return module


def _build(name: str, source: str) -> types.ModuleType:
    where = _cache_place(name, source)
    module = types.ModuleType(name)
    if where is None:  # no file for Numba to key its cache on
        source = source.replace("cache=True", "cache=False")
        module.__file__ = f"<fusec {name}>"
    else:
        module.__file__ = os.path.join(where[0], name + ".py")
    module.__fusec_cache__ = (*where, name) if where else None
    module.__fusec_source__ = source  # what a compile worker loads (`backends.numba_cpu.compile_pool`)
    exec(compile(source, module.__file__, "exec"), module.__dict__)  # the verified text, never a .pyc
    return module


def _cache_place(name: str, source: str) -> tuple[str, str] | None:
    """(cache directory, Numba's directory) holding `name`'s verified source and Numba files, or None
    (with a warning) to compile in memory."""
    directory = writable_dir()
    if directory is None:
        return None
    try:
        with locked(directory):
            os.makedirs(os.path.join(directory, "__pycache__"), mode=0o700, exist_ok=True)
            ndir = numba_dir(os.path.join(directory, LOCK_NAME))  # any file there: Numba keys on its directory
            why = "Numba cannot cache there" if ndir is None else untrusted(ndir)
            if why:
                warnings.warn(f"fusec: not using Numba's cache directory {ndir} for {directory}: {why}; "
                              "compiling in memory", stacklevel=5)
                return None
            _ensure_source(directory, ndir, name, source)
            verify_numba_files(directory, ndir, name)
        return directory, ndir
    except CacheLocked as e:
        warnings.warn(f"fusec: {e}; compiling in memory", stacklevel=5)
    except OSError as e:
        warnings.warn(f"fusec: cannot write the compile cache in {directory} ({e}); compiling in memory",
                      stacklevel=5)
    return None


def _ensure_source(directory: str, ndir: str, name: str, source: str) -> None:
    """Write `source` as `name`.py unless the file already holds exactly it; a differing file is damage."""
    path = os.path.join(directory, name + ".py")
    try:
        with open(path, encoding="utf-8") as f:
            if f.read() == source:
                return  # never rewritten: Numba's cache is keyed on the file's timestamp
        damaged = True
    except FileNotFoundError:
        damaged = False
    except (OSError, UnicodeDecodeError):
        damaged = True
    if damaged:
        warnings.warn(f"fusec: the cached module {path} is truncated or corrupted; writing it again and "
                      "discarding its compiled code", stacklevel=6)
    purge(directory, ndir, name)  # Numba files of an older or damaged .py are stale
    write_atomic(path, source.encode("utf-8"))


def recover(module: types.ModuleType, function: str, error: BaseException) -> bool:
    """After kernel `function` of `module` failed on its first call: if Numba has cache files for it
    (a damaged cache can fail while loading), discard them with a warning and return True (retry)."""
    where = getattr(module, "__fusec_cache__", None)
    if not where or not numba_files(where[1], where[2], function):
        return False
    warnings.warn(f"fusec: loading the cached code of {function} in {where[2]} failed "
                  f"({type(error).__name__}: {error}); discarding it and compiling again", stacklevel=3)
    purge(*where, function)
    return True


def recorded(module: types.ModuleType) -> None:
    """Record the module's Numba checksums (once its kernels ran), when it lives in a cache directory."""
    where = getattr(module, "__fusec_cache__", None)
    if where:
        record_manifest(*where)


# --- the `fusec cache` command ------------------------------------------------------------------------

def _numba_dirs(directory: str) -> list[str]:
    """Where Numba's files of the programs in `directory` may be: `__pycache__`, and where Numba puts
    them now (NUMBA_CACHE_DIR)."""
    dirs = [os.path.join(directory, "__pycache__")]
    lock = os.path.join(directory, LOCK_NAME)
    ndir = numba_dir(lock) if os.path.exists(lock) else None
    return dirs + [ndir] if ndir and os.path.realpath(ndir) != os.path.realpath(dirs[0]) else dirs


def _entries(directory: str) -> list[str]:
    files = glob.glob(os.path.join(directory, PREFIX + "*"))
    files += glob.glob(os.path.join(directory, "traces", "*.trace"))  # the trace cache (fusec.trace_cache)
    files += glob.glob(os.path.join(directory, "traces", "*.lowered"))
    for ndir in _numba_dirs(directory):
        files += glob.glob(os.path.join(ndir, PREFIX + "*"))
    return [f for f in files if os.path.isfile(f)]


def info(directory: str | None = None) -> dict:
    """The cache directory in use (and why others were not used), Numba's directories, the number of
    cached programs, of cached traces (`fusec.trace_cache`), and their total size (Numba's files included)."""
    refused: list[str] = []
    if directory is None:
        directory, refused = choose_dir()
    if directory is None or not os.path.isdir(directory):
        return {"dir": directory, "refused": refused, "numba_dirs": [], "programs": 0, "compiled": 0, "traces": 0,
                "files": 0, "bytes": 0}
    files = _entries(directory)
    programs = [f for f in files if os.path.dirname(f) == directory and f.endswith(".py")]
    compiled = {os.path.basename(f).split(".")[0] for f in files if f.endswith(".nbi")}
    size = 0
    for f in files:
        with contextlib.suppress(OSError):
            size += os.path.getsize(f)
    return {"dir": directory, "refused": refused, "numba_dirs": _numba_dirs(directory), "programs": len(programs),
            "compiled": len(compiled), "traces": sum(f.endswith(".trace") for f in files), "files": len(files),
            "bytes": size}


def clear(directory: str | None = None) -> dict:
    """Remove every cached program (and Numba's files of them) from the directory in use; returns what
    was removed."""
    before = info(directory)
    if before["files"]:
        with locked(before["dir"]):
            for f in _entries(before["dir"]):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f)
    return before
