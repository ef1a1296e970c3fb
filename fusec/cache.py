"""The on-disk compile cache of the Numba backend: where it is, what its keys cover, and how it survives
damage and concurrency.

One generated module per program, `fusec_gen_<key>.py`, where the key hashes the generated source (which
holds the graph's ops, shapes, dtypes and options) with the versions of fusec, Numba, llvmlite, NumPy,
torch and Python and the host CPU's name and features. Numba's own cache (`cache=True`) keeps the machine
code beside it in `__pycache__/fusec_gen_<key>.<kernel>-<line>.pyXY.{nbi,nbc}`.

- Damage: before a module is used, its `.py` must equal the source it names and its Numba files must
  match the checksums recorded after their first successful run (`<name>.manifest.json`), or, when not
  recorded yet, unpickle cleanly. Anything else is discarded with a warning and rebuilt. The module is
  executed from the verified source in memory, never from a `.pyc`.
- Concurrency: the `.py` is written once, under an advisory file lock, through a temporary file and
  `os.replace`; Numba writes its files the same way, so processes compiling the same program at once
  each see either no file or a whole one.
- An unwritable directory: the cache moves to a per-user temporary directory, and when that fails too,
  programs compile in memory without Numba's cache; each with a warning.
"""
from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import json
import os
import pickle
import sys
import tempfile
import types
import warnings

PREFIX = "fusec_gen_"
LOCK_NAME = ".fusec.lock"


def default_dir() -> str:
    """FUSEC_CACHE_DIR, or ~/.cache/fusec."""
    return os.environ.get("FUSEC_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fusec")


def _writable(path: str) -> bool:
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
        return True
    except OSError:
        return False


def writable_dir() -> str | None:
    """The cache directory to use: the configured one when writable, else a per-user temporary one
    (with a warning), else None: compile in memory (with a warning)."""
    path = default_dir()
    if _writable(path):
        return path
    fallback = os.path.join(tempfile.gettempdir(), f"fusec-{os.getuid()}")
    if _writable(fallback):
        warnings.warn(f"fusec: cache directory {path} is not writable; using {fallback}", stacklevel=3)
        return fallback
    warnings.warn(f"fusec: neither {path} nor {fallback} is writable; compiling in memory, without a "
                  "compile cache", stacklevel=3)
    return None


@functools.lru_cache(maxsize=None)
def environment_key() -> str:
    """What besides the source decides the machine code: versions and the host CPU."""
    import platform
    from importlib import metadata

    import llvmlite
    import numba
    import numpy
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
             f"cpu {cpu} {features}", f"kernels {_library_digest()}"]
    return "\n".join(parts)


def _library_digest() -> str:
    """A hash of the Numba functions generated code calls (backends/numba_cpu/blas.py): Numba's cache of a
    generated module embeds their machine code and does not notice when they change, so a changed
    library must mean new module names (a stale one crashed with a segmentation fault)."""
    from backends.numba_cpu import blas
    with open(blas.__file__, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def module_name(source: str) -> str:
    digest = hashlib.sha256((source + "\n" + environment_key()).encode()).hexdigest()[:24]
    return PREFIX + digest


@contextlib.contextmanager
def locked(directory: str):
    """An advisory lock on the cache directory (fcntl; a no-op where that does not exist)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(os.path.join(directory, LOCK_NAME), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_atomic(path: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --- Numba's files -------------------------------------------------------------------------------------

def numba_files(directory: str, name: str, function: str = "*") -> list[str]:
    """Numba's index and data files for module `name` (one kernel function, or all)."""
    base = os.path.join(directory, "__pycache__", f"{name}.{function}-")
    return sorted(glob.glob(base + "*.nbi") + glob.glob(base + "*.nbc"))


def _manifest_path(directory: str, name: str) -> str:
    return os.path.join(directory, name + ".manifest.json")


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _unpickles(path: str) -> bool:
    """A structural check of one Numba file: an index is a pickled version then a pickled pair; a data
    file is one pickle."""
    try:
        with open(path, "rb") as f:
            if path.endswith(".nbi"):
                pickle.load(f)
                stamp, overloads = pickle.loads(f.read())
                return isinstance(overloads, dict)
            pickle.loads(f.read())
            return True
    except FileNotFoundError:
        return True  # removed meanwhile: Numba recompiles
    except Exception:
        return False


def purge(directory: str, name: str, function: str = "*", source: bool = False) -> int:
    """Remove Numba's files of module `name` (and its manifest; with `source`, the `.py` too)."""
    paths = numba_files(directory, name, function)
    paths.append(_manifest_path(directory, name))
    paths += glob.glob(os.path.join(directory, "__pycache__", f"{name}.*.pyc"))
    if source:
        paths.append(os.path.join(directory, name + ".py"))
    removed = 0
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
            removed += 1
    return removed


def verify_numba_files(directory: str, name: str) -> bool:
    """Check Numba's files of `name` against the manifest (or unpickle them when unrecorded); on a bad
    file, discard all of the module's Numba files with a warning. Returns whether they were kept."""
    try:
        with open(_manifest_path(directory, name)) as f:
            recorded = json.load(f)
        if not isinstance(recorded, dict):
            raise ValueError("not a mapping")
    except FileNotFoundError:
        recorded = {}
    except (OSError, ValueError) as e:
        return _discard(directory, name, f"its manifest is unreadable ({e})")
    for path in numba_files(directory, name):
        want = recorded.get(os.path.basename(path))
        try:
            bad = (_sha256(path) != want) if want else not _unpickles(path)
        except FileNotFoundError:
            continue
        if bad:
            return _discard(directory, name, f"{os.path.basename(path)} is truncated or corrupted")
    return True


def _discard(directory: str, name: str, why: str) -> bool:
    warnings.warn(f"fusec: the compile cache of {name} in {directory} is damaged ({why}); discarding it "
                  "and compiling again", stacklevel=4)
    purge(directory, name)
    return False


def record_manifest(directory: str, name: str) -> None:
    """Record the checksums of Numba's files of `name`, after a run that used them succeeded."""
    try:
        with locked(directory):
            sums = {os.path.basename(p): _sha256(p) for p in numba_files(directory, name)}
            _write_atomic(_manifest_path(directory, name), json.dumps(sums, indent=1).encode())
    except OSError:
        pass  # an unrecorded cache is still checked structurally


# --- loading a generated module -------------------------------------------------------------------------

def load_source(source: str) -> types.ModuleType:
    """The module for generated `source`: from this process, from the cache (verified, rebuilt when
    damaged), or compiled in memory when no cache directory is writable."""
    name = module_name(source)
    if name in sys.modules:
        return sys.modules[name]
    directory = writable_dir()
    path = None
    if directory is not None:
        try:
            path = os.path.join(directory, name + ".py")
            with locked(directory):
                _ensure_source(directory, name, path, source)
                verify_numba_files(directory, name)
        except OSError as e:
            warnings.warn(f"fusec: cannot write the compile cache in {directory} ({e}); compiling in memory",
                          stacklevel=3)
            path = None
    module = types.ModuleType(name)
    if path is None:  # no file for Numba to key its cache on
        source = source.replace("cache=True", "cache=False")
        module.__file__ = f"<fusec {name}>"
    else:
        module.__file__ = path
    module.__fusec_cache__ = (directory, name) if path else None
    code = compile(source, module.__file__, "exec")  # the verified text, never a .pyc
    sys.modules[name] = module
    try:
        exec(code, module.__dict__)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _ensure_source(directory: str, name: str, path: str, source: str) -> None:
    """Write `source` at `path` unless the file already holds exactly it; a differing file is damage."""
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
                      "discarding its compiled code", stacklevel=4)
    purge(directory, name)  # Numba files of an older or damaged .py are stale
    _write_atomic(path, source.encode("utf-8"))


def recover(module: types.ModuleType, function: str, error: BaseException) -> bool:
    """After kernel `function` of `module` failed on its first call: if Numba has cache files for it
    (a damaged cache can fail while loading), discard them with a warning and return True (retry)."""
    where = getattr(module, "__fusec_cache__", None)
    if not where or not numba_files(where[0], where[1], function):
        return False
    warnings.warn(f"fusec: loading the cached code of {function} in {where[1]} failed "
                  f"({type(error).__name__}: {error}); discarding it and compiling again", stacklevel=3)
    purge(where[0], where[1], function)
    return True


def recorded(module: types.ModuleType) -> None:
    """Record the module's Numba checksums (once its kernels ran), when it lives in a cache directory."""
    where = getattr(module, "__fusec_cache__", None)
    if where:
        record_manifest(*where)


# --- the `fusec cache` command ------------------------------------------------------------------------

def _entries(directory: str) -> list[str]:
    files = glob.glob(os.path.join(directory, PREFIX + "*"))
    files += glob.glob(os.path.join(directory, "__pycache__", PREFIX + "*"))
    return [f for f in files if os.path.isfile(f)]


def info(directory: str | None = None) -> dict:
    """The cache directory, the number of cached programs and their total size (Numba's files included)."""
    directory = directory or default_dir()
    files = _entries(directory) if os.path.isdir(directory) else []
    programs = [f for f in files if os.path.dirname(f) == directory and f.endswith(".py")]
    compiled = {os.path.basename(f).split(".")[0] for f in files if f.endswith(".nbi")}
    size = 0
    for f in files:
        with contextlib.suppress(OSError):
            size += os.path.getsize(f)
    return {"dir": directory, "programs": len(programs), "compiled": len(compiled), "files": len(files),
            "bytes": size}


def clear(directory: str | None = None) -> dict:
    """Remove every cached program (and Numba's files of them); returns what was removed."""
    directory = directory or default_dir()
    before = info(directory)
    if os.path.isdir(directory):
        with locked(directory):
            for f in _entries(directory):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f)
    return before
