"""Settings for the whole test session.

`make test` runs the suite in two test processes (pytest-xdist, one per core of the machines it runs on,
each given whole files so that a module's compiled fixtures are built once). Each process then keeps a
core busy by itself, so compile worker processes (backends/numba_cpu/compile_pool.py) would only take
turns with the other test process, and start again, importing torch, whenever a test changes
FUSEC_CACHE_DIR or another FUSEC_ setting. They are off in those processes unless FUSEC_COMPILE_WORKERS
is set; tests/test_compile_pool.py turns them on for its own tests, which cover them. A single-process
run (`python -m pytest tests`) keeps the default, as a user's would.
"""
from __future__ import annotations

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
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
