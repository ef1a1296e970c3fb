"""The library's own compiled functions are cached under the digest of the whole library
(backends/numba_cpu/library_cache.py): Numba checks only the file a function is defined in."""
import numpy as np
from numba import config, njit
from numba.core.caching import FunctionCache

from fusec import cache
from fusec.backends.numba_cpu import library_cache, matvec


def test_a_library_function_compiled_before_any_library_file_changed_is_not_loaded_after(tmp_path, monkeypatch):
    """matvec (matvec.py) inlines simd.py's dot products: once simd.py (or any library file) changes, its
    cached machine code must not load, though matvec.py is as it was."""
    monkeypatch.setattr(config, "CACHE_DIR", str(tmp_path))  # Numba's first locator: this test's own files
    fn = matvec.matvec
    a, w, c = np.ones((1, 32), np.float32), np.ones((8, 32), np.float32), np.empty((1, 8), np.float32)
    matvec.with_group(fn, 8, 3)(a, w, c)
    np.testing.assert_array_equal(c, np.full((1, 8), 32, np.float32))
    sig = next(s for s in fn.overloads if s[-1].literal_value == 8)
    saved = FunctionCache(fn.py_func)
    assert type(saved._impl.locator).__name__ == "LibraryUserProvidedCacheLocator"
    assert saved._impl.locator.get_source_stamp() == "fusec library " + cache.library_digest()
    saved.save_overload(sig, fn.overloads[sig])
    assert list(tmp_path.rglob("matvec.matvec-*.nbi")), "nothing was written where the test put Numba's cache"
    assert FunctionCache(fn.py_func).load_overload(sig, fn.targetctx) is not None  # the same library: found

    monkeypatch.setattr(library_cache, "_stamp", lambda: "fusec library after an edit")
    assert FunctionCache(fn.py_func).load_overload(sig, fn.targetctx) is None  # compiled again


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
        module = __import__(f"fusec.backends.numba_cpu.{name}", fromlist=["_"])
        assert library_cache.in_library(module.__file__), name
