"""The compile cache never runs code it did not write and record: planted pickles are never unpickled,
directories others can write (or own) are refused, the lock is private and bounded; Numba's files are
checked wherever NUMBA_CACHE_DIR puts them; threads compiling one program at once share one module."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import pytest
import torch

import fusec
import fusec.cache as cache
import fusec.cache_trust as trust
from test_cache import GRAPH, ROOT, cache_dir, files, hits, load_and_run  # noqa: F401 (cache_dir is a fixture)

pytestmark = pytest.mark.filterwarnings("ignore::numba.NumbaPerformanceWarning")

OTHER_UID = 54321  # a user that is not us

RUN = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    sys.path.insert(0, {tests!r})
    from test_cache import GRAPH, X, WANT
    import numpy as np
    from fusec.backends.numba_cpu.runtime import Program
    got = Program(GRAPH).run([X])
    for g, w in zip(got, WANT):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    print("ok", sum(sum(s.fn.stats.cache_hits.values()) for s in Program(GRAPH).steps))
""").format(root=ROOT, tests=os.path.join(ROOT, "tests"))


def run_in_new_process(env_extra: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra, "PYTHONWARNINGS": "ignore::FutureWarning"}
    return subprocess.run([sys.executable, "-c", RUN], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)


class Planted:
    """A pickle whose loading creates a marker directory: the proof that something unpickled it."""
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def plant(path, marker) -> bytes:
    data = pickle.dumps(Planted(str(marker))) + pickle.dumps(("stamp", {}))
    path.write_bytes(data)
    return data


# the test program's generated modules: one per distinct kernel body
MODULES = sum(1 for n in GRAPH.nodes if n.op == "kernel")


# --- planted code -------------------------------------------------------------------------------------

def test_planted_index_with_no_record_is_never_unpickled(cache_dir, tmp_path):
    for module in load_and_run().modules:
        os.unlink(cache_dir / f"{module.__name__}.manifest.json")
    marker = tmp_path / "planted-code-ran"
    for path in files(cache_dir, ".nbc"):
        os.unlink(path)  # only the planted index is left to look at
    for path in files(cache_dir, ".nbi"):
        plant(path, marker)
    out = run_in_new_process({"FUSEC_CACHE_DIR": str(cache_dir)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert not marker.exists()
    assert "damaged" not in out.stderr  # unrecorded code is compiled again, plainly: no damage to report


def test_planted_index_with_a_forged_record_in_a_writable_directory_is_not_loaded(cache_dir, tmp_path):
    name = load_and_run().modules[0].__name__
    marker = tmp_path / "planted-code-ran"
    forged = {p.name: hashlib.sha256(plant(p, marker)).hexdigest() for p in files(cache_dir, ".nbi")}
    forged.update({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files(cache_dir, ".nbc")})
    (cache_dir / f"{name}.manifest.json").write_text(json.dumps(forged))
    os.chmod(cache_dir, 0o777)  # anyone could have written the manifest
    out = run_in_new_process({"FUSEC_CACHE_DIR": str(cache_dir), "TMPDIR": str(tmp_path / "tmp")})
    assert out.returncode == 0, out.stderr[-3000:]
    assert not marker.exists()
    assert str(cache_dir) in out.stderr and "writable by others" in out.stderr


def test_recorded_file_with_a_wrong_checksum_is_never_unpickled(cache_dir, tmp_path):
    load_and_run()
    marker = tmp_path / "planted-code-ran"
    planted = files(cache_dir, ".nbc")[0]
    plant(planted, marker)
    with pytest.warns(UserWarning, match="damaged"):
        program = load_and_run()
    steps = [s for s in program.steps if s.module.__name__ == planted.name.split(".")[0]]
    assert steps and sum(sum(s.fn.stats.cache_hits.values()) for s in steps) == 0
    assert not marker.exists()


# --- whose directory ----------------------------------------------------------------------------------

@pytest.fixture
def temp_root(tmp_path, monkeypatch):
    path = tmp_path / "tmp"
    monkeypatch.setattr(cache.tempfile, "gettempdir", lambda: str(path))
    return path


def test_new_directory_is_private_and_lock_file_is_0600(cache_dir, temp_root):
    load_and_run()
    assert os.stat(cache_dir).st_mode & 0o777 == 0o700
    assert os.stat(cache_dir / cache.LOCK_NAME).st_mode & 0o777 == 0o600


def test_existing_lock_file_readable_by_others_is_made_private(cache_dir, temp_root):
    cache_dir.mkdir(mode=0o700)
    (cache_dir / cache.LOCK_NAME).touch(mode=0o666)
    os.chmod(cache_dir / cache.LOCK_NAME, 0o666)
    load_and_run()
    assert os.stat(cache_dir / cache.LOCK_NAME).st_mode & 0o777 == 0o600


@pytest.mark.parametrize("how", ["world-writable", "group-writable", "chown", "uid"])
def test_directory_others_can_write_or_own_is_refused(cache_dir, temp_root, monkeypatch, how):
    cache_dir.mkdir(mode=0o700)
    if how == "world-writable":
        os.chmod(cache_dir, 0o777)
    elif how == "group-writable":
        os.chmod(cache_dir, 0o770)
    elif how == "chown":
        os.chown(cache_dir, OTHER_UID, -1)
    else:  # we are someone else than the directory's owner
        monkeypatch.setattr(trust, "current_uid", lambda: OTHER_UID)
        monkeypatch.setattr(cache, "_fallback", lambda: str(temp_root / "fallback"))
    why = "owned by uid" if how in ("chown", "uid") else "writable by others"
    with pytest.warns(UserWarning, match=why) as caught:
        program = load_and_run()
    assert any(str(cache_dir) in str(w.message) for w in caught)
    assert not program.modules[0].__file__.startswith(str(cache_dir) + os.sep)
    assert not list(cache_dir.glob(f"{cache.PREFIX}*"))  # nothing written there either


def test_directory_under_a_directory_others_can_write_is_refused(tmp_path, temp_root, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # no sticky bit: anyone can rename our directory away and put theirs
    monkeypatch.setenv("FUSEC_CACHE_DIR", str(shared / "cache"))
    with pytest.warns(UserWarning, match="writable by others"):
        program = load_and_run()
    assert program.modules[0].__file__.startswith(str(temp_root))


@pytest.mark.parametrize("owner", ["us", "other"])
def test_link_to_the_directory_only_trusted_when_others_cannot_change_it(tmp_path, temp_root, monkeypatch, owner):
    real, sticky = tmp_path / "real", tmp_path / "sticky"
    real.mkdir(mode=0o700)
    sticky.mkdir()
    os.chmod(sticky, 0o1777)  # like /tmp: others cannot replace a link we own there
    (sticky / "cache").symlink_to(real)
    if owner == "other":
        os.lchown(sticky / "cache", OTHER_UID, -1)
    monkeypatch.setenv("FUSEC_CACHE_DIR", str(sticky / "cache"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        program = load_and_run()
    refused = [w for w in caught if "link" in str(w.message) and "owned by uid" in str(w.message)]
    assert bool(refused) == (owner == "other")
    assert program.modules[0].__file__.startswith(str(sticky / "cache")) == (owner == "us")


def test_fallback_directory_created_by_another_user_is_refused(tmp_path, temp_root, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("FUSEC_CACHE_DIR", str(blocker / "cache"))  # never usable
    fallback = temp_root / f"fusec-{os.getuid()}"
    fallback.mkdir(parents=True)
    os.chmod(fallback, 0o777)
    os.chown(fallback, OTHER_UID, -1)
    with pytest.warns(UserWarning, match="in memory") as caught:
        program = load_and_run()
    assert program.modules[0].__file__.startswith("<fusec")
    assert any(str(fallback) in str(w.message) and "owned by uid" in str(w.message) for w in caught)
    assert not list(fallback.iterdir())


def test_held_lock_times_out_and_compiles_in_memory(cache_dir, monkeypatch):
    import fcntl
    load_and_run()
    monkeypatch.setattr(trust, "LOCK_TIMEOUT", 0.3)
    with open(cache_dir / cache.LOCK_NAME, "a") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        start = time.monotonic()
        with pytest.warns(UserWarning, match="locked") as caught:
            program = load_and_run()
        assert time.monotonic() - start < 60
    assert program.modules[0].__file__.startswith("<fusec")
    assert any(str(cache_dir) in str(w.message) for w in caught)


# --- NUMBA_CACHE_DIR ----------------------------------------------------------------------------------

def numba_cache_files(numba_dir, suffix):
    return sorted(numba_dir.rglob(f"{cache.PREFIX}*{suffix}"))


@pytest.mark.parametrize("which, damage", [(".nbc", "flip"), (".nbi", "truncate")])
def test_damaged_files_under_numba_cache_dir_are_found_and_rebuilt(tmp_path, which, damage):
    # (no compile workers: "ok 0" below means every kernel compiled in the process that found the damage)
    env = {"FUSEC_CACHE_DIR": str(tmp_path / "cache"), "NUMBA_CACHE_DIR": str(tmp_path / "numba"),
           "FUSEC_COMPILE_WORKERS": "0"}
    out = run_in_new_process(env)
    assert out.returncode == 0, out.stderr[-3000:]
    found = numba_cache_files(tmp_path / "numba", which)
    assert found and not list((tmp_path / "cache").rglob("*.nbi"))
    for path in found:
        data = path.read_bytes()
        if damage == "flip":  # every byte of the machine code's half: an illegal instruction before
            data = data[:len(data) // 2] + bytes(b ^ 0xFF for b in data[len(data) // 2:])
        path.write_bytes(data if damage == "flip" else data[:len(data) // 2])
    out = run_in_new_process(env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "damaged" in out.stderr and out.stdout.split() == ["ok", "0"]
    if which == ".nbc":
        out = run_in_new_process(env)  # and cached again
        assert out.returncode == 0 and "damaged" not in out.stderr, out.stderr[-3000:]
        assert out.stdout.split() != ["ok", "0"]


def test_cache_info_and_clear_cover_numba_cache_dir(tmp_path, monkeypatch):
    import numba
    env = {"FUSEC_CACHE_DIR": str(tmp_path / "cache"), "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    assert run_in_new_process(env).returncode == 0
    assert numba_cache_files(tmp_path / "numba", ".nbc")
    out = subprocess.run([sys.executable, "-m", "fusec", "cache", "info"], capture_output=True, text=True,
                         env={**os.environ, **env}, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and f"({MODULES} with compiled code)" in out.stdout, out.stdout + out.stderr
    assert str(tmp_path / "numba") in out.stdout
    monkeypatch.setenv("FUSEC_CACHE_DIR", env["FUSEC_CACHE_DIR"])
    monkeypatch.setattr(numba.config, "CACHE_DIR", env["NUMBA_CACHE_DIR"])  # as the variable sets it
    assert cache.clear()["compiled"] == MODULES
    assert not numba_cache_files(tmp_path / "numba", ".nbc") and not numba_cache_files(tmp_path / "numba", ".nbi")


# --- a missing manifest; info and clear show the directory in use ---------------------------------------

def test_missing_manifest_recompiles_without_a_damage_warning(cache_dir):
    names = [m.__name__ for m in load_and_run().modules]
    for name in names:
        os.unlink(cache_dir / f"{name}.manifest.json")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fusec")
        again = load_and_run()
    assert hits(again) == 0  # unrecorded code is not trusted
    assert all((cache_dir / f"{name}.manifest.json").exists() for name in names)
    assert hits(load_and_run()) == len(again.steps)


def test_info_shows_the_directory_in_use_and_why(tmp_path, temp_root, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("FUSEC_CACHE_DIR", str(blocker / "cache"))
    with pytest.warns(UserWarning):
        load_and_run()
    info = cache.info()
    assert info["dir"] == str(temp_root / f"fusec-{os.getuid()}") and info["programs"] == MODULES
    assert len(info["refused"]) == 1 and str(blocker / "cache") in info["refused"][0]
    env = {**os.environ, "FUSEC_CACHE_DIR": str(blocker / "cache"), "TMPDIR": str(temp_root)}
    out = subprocess.run([sys.executable, "-m", "fusec", "cache", "info"], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and str(temp_root / f"fusec-{os.getuid()}") in out.stdout, out.stdout + out.stderr
    assert str(blocker / "cache") in out.stdout and f"programs   {MODULES}" in out.stdout


# --- threads ------------------------------------------------------------------------------------------

class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.tanh(self.lin(x)).softmax(-1)


def test_threads_compiling_the_same_model_at_once(cache_dir, monkeypatch):
    """The first thread to build the module waits, inside the module's code, until every thread has
    asked for the module: the others then find it half-built unless they wait for it."""
    import numba
    njit, name_of, arrived, everyone = numba.njit, cache.module_name, [], threading.Event()

    def counting_module_name(source):
        arrived.append(1)
        if len(arrived) >= 4:
            everyone.set()
        return name_of(source)

    def waiting_njit(*args, **kwargs):
        everyone.wait(timeout=60)
        time.sleep(0.2)  # time for the others to look for the module once they asked for it
        return njit(*args, **kwargs)
    monkeypatch.setattr(cache, "module_name", counting_module_name)
    monkeypatch.setattr(numba, "njit", waiting_njit)
    torch.manual_seed(0)
    model, x = Small().eval(), torch.randn(2, 8)
    for name in [n for n in sys.modules if n.startswith(cache.PREFIX)]:
        del sys.modules[name]
    barrier, results, errors = threading.Barrier(4), [None] * 4, []

    def work(k):
        try:
            barrier.wait()
            results[k] = fusec.compile(model, (x,))(x)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, repr(errors[0])
    with torch.no_grad():
        want = model(x)
    for got in results:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
