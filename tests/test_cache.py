"""The on-disk compile cache: keys, damage (corrupt, truncated, deleted files) detected and rebuilt with a
warning, two processes compiling at once, unwritable directories, and `fusec cache {info,clear}`."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

import fusec.cache as cache
import fusec.cache_manifest as cache_manifest
from fusec.backends.numba_cpu.runtime import Program
from fusec.backends.reference import run_graph
from fusec.api import lower
from fusec.printer import parse_graph
from graphs import SOFTMAX_TANH

pytestmark = pytest.mark.filterwarnings("ignore::numba.NumbaPerformanceWarning")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = SOFTMAX_TANH
X = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
GRAPH = lower(parse_graph(TEXT))
WANT = run_graph(parse_graph(TEXT), [X])


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("FUSEC_CACHE_DIR", str(path))
    return path


def load_and_run() -> Program:
    """A Program built as a new process would: not from this process's module table."""
    for name in [n for n in sys.modules if n.startswith(cache.PREFIX)]:
        del sys.modules[name]
    program = Program(GRAPH)
    got = program.run([X])
    for g, w in zip(got, WANT):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    return program


def hits(program: Program, module: str | None = None) -> int:
    """Kernel calls whose function was loaded from Numba's cache (only those of `module`, when given)."""
    return sum(sum(step.fn.stats.cache_hits.values()) for step in program.steps
               if module is None or step.module.__name__ == module)


def module_of(path) -> str:
    """The generated module a cache file belongs to."""
    return path.name.split(".")[0]


def files(cache_dir, suffix: str) -> list:
    return sorted(p for p in (cache_dir / "__pycache__").glob(f"{cache.PREFIX}*{suffix}"))


def no_fusec_warnings():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.filterwarnings("error", message="fusec")
    return ctx


def test_second_load_uses_numba_cache_and_records_checksums(cache_dir):
    first = load_and_run()
    for module in first.modules:  # one module per distinct kernel, named by the hash of its text
        name = module.__name__
        assert cache.module_name((cache_dir / f"{name}.py").read_text()) == name
        assert (cache_dir / f"{name}.manifest.json").exists()
    assert files(cache_dir, ".nbi") and files(cache_dir, ".nbc")
    ctx = no_fusec_warnings()
    try:
        again = load_and_run()
    finally:
        ctx.__exit__(None, None, None)
    assert hits(again) == len(again.steps)


@pytest.mark.parametrize("damage", ["garbage", "truncate", "empty"])
def test_damaged_generated_module_is_rebuilt_with_a_warning(cache_dir, damage):
    first = load_and_run()
    path = cache_dir / f"{first.modules[0].__name__}.py"
    text = path.read_text()
    path.write_text({"garbage": "def k0(:\n  ???", "truncate": text[: len(text) // 2], "empty": ""}[damage])
    with pytest.warns(UserWarning, match="truncated or corrupted"):
        load_and_run()
    assert path.read_text() == text


@pytest.mark.parametrize("which, damage", [(".nbc", "flip"), (".nbc", "truncate"), (".nbi", "truncate"),
                                           (".nbi", "garbage"), (".nbc", "empty")])
def test_damaged_numba_cache_is_discarded_with_a_warning(cache_dir, which, damage):
    load_and_run()
    path = files(cache_dir, which)[0]
    damaged = module_of(path)
    data = path.read_bytes()
    middle = len(data) // 2
    path.write_bytes({"flip": data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:],
                      "truncate": data[:middle], "garbage": b"\x80\x04garbage" * 10, "empty": b""}[damage])
    with pytest.warns(UserWarning, match="damaged"):
        again = load_and_run()
    assert hits(again, damaged) == 0  # recompiled, not loaded from the damaged files
    assert hits(again) == sum(step.module.__name__ != damaged for step in again.steps)  # the others loaded
    ctx = no_fusec_warnings()
    try:
        assert hits(load_and_run()) == len(again.steps)  # and cached again
    finally:
        ctx.__exit__(None, None, None)


def test_unrecorded_file_is_discarded_unread(cache_dir, monkeypatch):
    load_and_run()
    path = files(cache_dir, ".nbc")[0]
    name = module_of(path)
    os.unlink(cache_dir / f"{name}.manifest.json")
    path.write_bytes(b"not a pickle")
    read = []
    monkeypatch.setattr(cache_manifest, "_sha256", lambda path: read.append(path))
    assert not cache.verify_numba_files(str(cache_dir), str(cache_dir / "__pycache__"), name)
    assert not read and not [f for f in files(cache_dir, ".nb") if module_of(f) == name]


def test_failure_loading_cached_code_is_repaired_on_first_call(cache_dir, monkeypatch):
    load_and_run()
    monkeypatch.setattr(cache, "verify_numba_files", lambda *where: True)  # let the damage through
    for path in files(cache_dir, ".nbi"):
        path.write_bytes(path.read_bytes()[:40])
    with pytest.warns(UserWarning, match="loading the cached code"):
        load_and_run()


@pytest.mark.parametrize("what", ["pycache", "source", "manifest"])
def test_deleted_files_are_rebuilt_silently(cache_dir, what):
    import shutil
    first = load_and_run()
    name = first.modules[0].__name__
    if what == "pycache":
        shutil.rmtree(cache_dir / "__pycache__")
    else:
        os.unlink(cache_dir / (f"{name}.py" if what == "source" else f"{name}.manifest.json"))
    ctx = no_fusec_warnings()
    try:
        load_and_run()
    finally:
        ctx.__exit__(None, None, None)


def test_key_covers_versions_and_cpu(monkeypatch):
    key = cache.environment_key()
    for part in ("fusec", "numba", "llvmlite", "numpy", "torch", "python", "cpu"):
        assert part in key
    name = cache.module_name("source")
    monkeypatch.setattr(cache, "environment_key", lambda: key + " other cpu")
    assert cache.module_name("source") != name


def test_unwritable_directory_falls_back_to_temp_then_memory(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("FUSEC_CACHE_DIR", str(blocker / "cache"))  # under a file: never writable
    monkeypatch.setattr(cache.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    with pytest.warns(UserWarning, match="not writable"):
        program = load_and_run()
    assert program.modules[0].__file__.startswith(str(tmp_path / "tmp"))
    assert os.stat(tmp_path / "tmp" / f"fusec-{os.getuid()}").st_mode & 0o777 == 0o700
    monkeypatch.setattr(cache.tempfile, "gettempdir", lambda: str(blocker / "tmp"))
    with pytest.warns(UserWarning, match="in memory"):
        program = load_and_run()
    assert program.modules[0].__file__.startswith("<fusec")


WORKER = textwrap.dedent("""
    import sys, warnings
    import numpy as np
    sys.path.insert(0, {root!r})
    sys.path.insert(0, {tests!r})
    warnings.filterwarnings("error", message="fusec")
    from test_cache import GRAPH, X
    from fusec.backends.numba_cpu.runtime import Program
    out = Program(GRAPH).run([X])
    print(float(np.asarray(out[0], np.float64).sum()), float(np.asarray(out[1], np.float64).sum()))
""")


def test_two_processes_compiling_the_same_program_at_once(cache_dir):
    script = WORKER.format(root=ROOT, tests=os.path.join(ROOT, "tests"))
    env = {**os.environ, "FUSEC_CACHE_DIR": str(cache_dir), "PYTHONWARNINGS": "ignore::FutureWarning"}
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env, cwd=ROOT) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert outs[0][0] == outs[1][0]
    ctx = no_fusec_warnings()
    try:
        again = load_and_run()
        assert hits(again) == len(again.steps)  # one of them compiled, the other loaded or compiled too
    finally:
        ctx.__exit__(None, None, None)


def test_info_and_clear(cache_dir):
    modules = len(load_and_run().modules)  # a generated module per distinct kernel
    info = cache.info()
    assert info["dir"] == str(cache_dir)
    assert info["programs"] == modules and info["compiled"] == modules and info["bytes"] > 0
    env = {**os.environ, "FUSEC_CACHE_DIR": str(cache_dir)}
    fusec_cli = [sys.executable, "-m", "fusec"]
    out = subprocess.run(fusec_cli + ["cache", "info"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0 and str(cache_dir) in out.stdout and f"programs   {modules}" in out.stdout
    out = subprocess.run(fusec_cli + ["cache", "clear"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0 and f"removed programs   {modules}" in out.stdout
    assert cache.info()["programs"] == 0 and cache.info()["files"] == 0


SERIAL_CALLS_PARALLEL = """
import sys
import torch
sys.path.insert(0, {root!r})
import fusec
from fusec.models.llama import LlamaBlock, LlamaConfig
torch.manual_seed(0)
block = LlamaBlock(LlamaConfig.preset("tiny")).eval()
x = torch.randn(1, 8, block.config.dim)
print(float((fusec.compile(block, (x,))(x) - block(x)).abs().max()) < 1e-4)
"""


def test_cached_serial_kernel_calling_parallel_matvec_runs_in_a_new_process(cache_dir):
    """A kernel with no parallel loop of its own calls the parallel matvec; loaded from the cache in a
    new process it used to segfault, because nothing had started Numba's threading layer."""
    env = {**os.environ, "FUSEC_CACHE_DIR": str(cache_dir)}  # (ignoring warnings hid the crash)
    env.pop("PYTHONWARNINGS", None)
    for _ in range(2):  # compiles, then loads from the cache
        out = subprocess.run([sys.executable, "-c", SERIAL_CALLS_PARALLEL.format(root=ROOT)], capture_output=True,
                             text=True, env=env, cwd=ROOT, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.strip() == "True"


def test_a_run_that_compiled_nothing_does_not_hash_numba_files_again(cache_dir, monkeypatch):
    """A warm load checks every Numba file against its record once; the record after the run stands when
    the files did not change (hashing them again cost a warm start a large part of its time)."""
    load_and_run()
    hashed, real = [], cache_manifest._sha256
    monkeypatch.setattr(cache_manifest, "_sha256", lambda path: hashed.append(path) or real(path))
    program = load_and_run()
    assert hits(program) == len(program.steps)
    assert sorted(hashed) == sorted(set(hashed)) == sorted(str(p) for p in files(cache_dir, ".nb?"))


def _library_modules() -> set[str]:
    """The backend modules whose code a generated module embeds: those its header imports from, and those
    their functions come from, transitively."""
    import importlib
    import re
    from fusec.backends.numba_cpu.generated import HEADER
    package = "fusec.backends.numba_cpu."
    todo = re.findall(r"from fusec\.backends\.numba_cpu\.(\w+) import", HEADER)
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for value in vars(importlib.import_module(package + name)).values():
            for owner in (value, getattr(value, "py_func", None), getattr(value, "_defn", None)):
                module = getattr(owner, "__module__", None) or ""
                if module.startswith(package):
                    todo.append(module[len(package):])
    return seen


def test_library_digest_covers_every_module_generated_code_embeds(monkeypatch):
    """Generated modules embed the machine code of the backend functions they call (matvec loops, their
    LLVM IR dot products, exp32): a change to any of those modules must give new module names, else Numba
    loads stale code (it does not check callees)."""
    import builtins
    import importlib
    real_open = builtins.open
    before = cache.library_digest()
    for name in sorted(_library_modules()):
        path = importlib.import_module(f"fusec.backends.numba_cpu.{name}").__file__

        def edited(file, mode="r", *args, _path=path, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            if os.path.abspath(str(file)) == os.path.abspath(_path) and "b" in mode:
                import io
                return io.BytesIO(f.read() + b"\n# edited\n")
            return f
        monkeypatch.setattr(builtins, "open", edited)
        assert cache.library_digest() != before, f"a change to {name}.py leaves the library digest as it was"
        monkeypatch.setattr(builtins, "open", real_open)
