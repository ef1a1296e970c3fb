"""The checksums that decide whether Numba's cache files of a generated module may be loaded.

Numba's files are pickles: loading one runs the code it names. So after a module's kernels ran, fusec
records the SHA-256 of each of its Numba files in `<name>.manifest.json` beside the module (under the
cache's lock), and before Numba reads them checks them against that record without unpickling any:
files that match are kept, a mismatch is damage (discarded with a warning), files with no record are
discarded quietly (an interrupted compile, one still running elsewhere, a lost manifest). Whether the
directory itself may be trusted to hold such a record is `fusec.cache_trust`'s question; where the
modules live and how they are loaded is `fusec.cache`'s.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import tempfile
import warnings

from fusec.cache_trust import locked


def write_atomic(path: str, data: bytes) -> None:
    """Write `path` whole or not at all: a temporary file beside it, then `os.replace`."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def numba_files(ndir: str, name: str, function: str = "*") -> list[str]:
    """Numba's index and data files for module `name` in `ndir` (one kernel function, or all)."""
    base = os.path.join(ndir, f"{name}.{function}-")
    return sorted(glob.glob(base + "*.nbi") + glob.glob(base + "*.nbc"))


def _manifest_path(directory: str, name: str) -> str:
    return os.path.join(directory, name + ".manifest.json")


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def purge(directory: str, ndir: str, name: str, function: str = "*", source: bool = False) -> int:
    """Remove Numba's files of module `name` (and its manifest; with `source`, the `.py` too)."""
    paths = numba_files(ndir, name, function)
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


def verify_numba_files(directory: str, ndir: str, name: str) -> bool:
    """Keep Numba's files of `name` only when every one matches the checksum recorded after its kernels
    ran; none is unpickled to check it (they are pickles: loading runs code). A mismatch is damage,
    discarded with a warning; files with no record (a compile interrupted before its first run, or
    still running in another process, or a lost manifest) are discarded quietly and compiled again.
    Returns whether they were kept."""
    try:
        with open(_manifest_path(directory, name)) as f:
            recorded = json.load(f)
        if not isinstance(recorded, dict):
            raise ValueError("not a mapping")
    except FileNotFoundError:
        recorded = {}
    except (OSError, ValueError) as e:
        return _discard(directory, ndir, name, f"its manifest is unreadable ({e})")
    present = numba_files(ndir, name)
    for path in present:
        want = recorded.get(os.path.basename(path))
        try:
            if want is not None and _sha256(path) != want:
                return _discard(directory, ndir, name, f"{os.path.basename(path)} is truncated or corrupted")
        except FileNotFoundError:
            continue
    if any(os.path.basename(p) not in recorded for p in present):
        purge(directory, ndir, name)
        return False
    _unchanged[directory, name] = _stats(present)
    return True


# (cache directory, module) -> the stats of its Numba files when last verified or recorded: a run that
# compiled nothing leaves them as they were, and recording them again (hashing every file) is skipped
_unchanged: dict[tuple[str, str], dict] = {}


def _stats(paths: list[str]) -> dict:
    out = {}
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(p)
            out[p] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return out


def _discard(directory: str, ndir: str, name: str, why: str) -> bool:
    warnings.warn(f"fusec: the compile cache of {name} in {ndir} is damaged ({why}); discarding it "
                  "and compiling again", stacklevel=5)
    purge(directory, ndir, name)
    return False


def record_manifest(directory: str, ndir: str, name: str) -> None:
    """Record the checksums of Numba's files of `name`, after a run that used them succeeded."""
    if _unchanged.get((directory, name)) == _stats(numba_files(ndir, name)):
        return  # the files verified (or recorded) before: their record stands
    try:
        with locked(directory):
            paths = numba_files(ndir, name)
            before = _stats(paths)  # (taken first: a file replaced while hashed is recorded again next time)
            sums = {os.path.basename(p): _sha256(p) for p in paths}
            write_atomic(_manifest_path(directory, name), json.dumps(sums, indent=1).encode())
            _unchanged[directory, name] = before
    except OSError:
        pass  # unrecorded files are compiled again by the next process
