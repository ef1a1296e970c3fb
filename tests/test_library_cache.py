"""The library's own compiled functions are cached under the digest of the whole library
(backends/numba_cpu/library_cache.py): Numba checks only the file a function is defined in."""
import importlib

import numpy as np
from numba import config, njit
from numba.core.caching import FunctionCache

from fusec import cache
from fusec.backends.numba_cpu import fastexp, library_cache


def _decorated(py_func):
    """A new dispatcher of a library function (fastexp.exp32's options): it looks in Numba's cache as a new
    process would."""
    return njit(fastmath={"contract"}, error_model="numpy", cache=True)(py_func)


def test_a_library_function_compiled_before_any_library_file_changed_is_not_loaded_after(tmp_path, monkeypatch):
    """matvec (matvec.py) inlines simd.py's dot products: once simd.py, or any library file, changes, the
    cached machine code of a library function must not load, though its own file is as it was."""
    monkeypatch.setattr(config, "CACHE_DIR", str(tmp_path))  # Numba's first locator: this test's own files
    py_func = fastexp.exp32.py_func
    first = _decorated(py_func)
    assert first(np.float32(0.0)) == np.float32(1.0)
    locator = first._cache._impl.locator
    assert type(locator).__name__ == "LibraryUserProvidedCacheLocator"
    assert locator.get_source_stamp() == "fusec library " + cache.library_digest()
    assert list(tmp_path.rglob("fastexp.exp32-*.nbi")), "nothing was written where the test put Numba's cache"

    again = _decorated(py_func)  # the same library: loaded
    assert again(np.float32(0.0)) == np.float32(1.0)
    assert sum(again.stats.cache_hits.values()) == 1 and not again.stats.cache_misses

    monkeypatch.setattr(library_cache, "_stamp", lambda: "fusec library after an edit")
    edited = _decorated(py_func)  # another library: compiled again
    assert edited(np.float32(0.0)) == np.float32(1.0)
    assert sum(edited.stats.cache_misses.values()) == 1 and not edited.stats.cache_hits


def test_functions_outside_the_library_keep_numbas_own_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "CACHE_DIR", str(tmp_path))

    @njit(cache=True)
    def double(x):
        return 2 * x
    locator = FunctionCache(double.py_func)._impl.locator
    assert not library_cache.in_library(__file__)
    assert not getattr(type(locator), "_fusec_library", False)
    assert type(locator).__name__.lstrip("_") == "UserProvidedCacheLocator"


def test_every_library_module_is_a_file_the_locators_know():
    for name in cache.LIBRARY:
        module = importlib.import_module(f"fusec.backends.numba_cpu.{name}")
        assert library_cache.in_library(module.__file__), name
