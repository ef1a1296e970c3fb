"""Numba's cache of the library (the backend's own compiled functions, `fusec.cache.LIBRARY`) keyed by the
whole library, not by each function's file.

Numba keys a function's cached machine code on the modification time and size of the file that defines
it, and does not notice when a function it calls, or an intrinsic it inlines, changes in another file.
After `simd.py` changed its prefetches, `matvec` (in `matvec.py`, unchanged) went on loading machine code
compiled from the old `simd.py`: the old prefetches ran, and with a changed layout or calling convention
stale code would read the wrong bytes. So every library function's cache index carries the digest of all
the library's files as its source stamp (`fusec.cache.library_digest`): a change to any of them makes each
library function compile again, once, as generated modules get new names. The locators are Numba's own
(NUMBA_CACHE_DIR, `__pycache__` beside the file, the per-user directory), in that order, with that stamp.

`install` runs when the package is imported (its `__init__`), before any library module defines its
functions: Numba picks a function's locator when the function is decorated.
"""
from __future__ import annotations

import functools
import os

from numba.core import caching

_MARK = "_fusec_library"


@functools.lru_cache(maxsize=None)
def _stamp() -> str:
    from fusec.cache import library_digest  # here: fusec.cache is light, but this module loads with numba
    return "fusec library " + library_digest()


@functools.lru_cache(maxsize=None)
def _library_files() -> frozenset[str]:
    from fusec.cache import library_files
    return frozenset(library_files())


def in_library(py_file: str) -> bool:
    """Whether functions defined in `py_file` belong to the library (`fusec.cache.LIBRARY`)."""
    return os.path.abspath(py_file) in _library_files()


class _LibraryStamp:
    """A Numba cache locator for the library's files only, whose source stamp is the library's digest."""

    @classmethod
    def from_function(cls, py_func, py_file):
        if not in_library(py_file):
            return None
        return super().from_function(py_func, py_file)

    def get_source_stamp(self):
        return _stamp()


def _numba(name: str):
    """A class of Numba's cache by its public name, or the private one of Numba before 0.61."""
    return getattr(caching, name, None) or getattr(caching, "_" + name)


def install() -> None:
    """Put the library's locators before Numba's own (once per process). NUMBA_CACHE_LOCATOR_CLASSES, where
    set, replaces every locator, these too."""
    locators = _numba("CacheImpl")._locator_classes
    if any(getattr(c, _MARK, False) for c in locators):
        return
    bases = [_numba(name) for name in ("UserProvidedCacheLocator", "InTreeCacheLocator", "UserWideCacheLocator")]
    locators[:0] = [type(f"Library{base.__name__.lstrip('_')}", (_LibraryStamp, base), {_MARK: True})
                    for base in bases]
