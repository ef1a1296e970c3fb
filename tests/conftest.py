"""Settings for the whole test session.

`make test` runs the suite in two test processes (pytest-xdist, one per core of the machines it runs on,
each given whole files so that a module's compiled fixtures are built once). Each process then keeps a
core busy by itself, so compile worker processes (backends/numba_cpu/compile_pool.py) would only take
turns with the other test process, and start again, importing torch, whenever a test changes
FUSEC_CACHE_DIR or another FUSEC_ setting. They are off unless FUSEC_COMPILE_WORKERS is set, in a
single-process run too (with workers, whether a generator's first prompts run before its prefill program
is done depends on timing, and tests that count programs would see either); tests/test_compile_pool.py
and tests/test_background_prefill.py turn them on for their own tests, which cover them.
"""
from __future__ import annotations

import os

os.environ.setdefault("FUSEC_COMPILE_WORKERS", "0")

# The session's compile and trace caches live in a directory of its own (shared by the test processes,
# which inherit it, and removed at the end), not in the user's: a run then starts from the same state every
# time, and a test that counts traces or compiles does not meet entries left by an earlier run.
if "FUSEC_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["FUSEC_CACHE_DIR"] = tempfile.mkdtemp(prefix="fusec-tests-")
    atexit.register(shutil.rmtree, os.environ["FUSEC_CACHE_DIR"], ignore_errors=True)
