"""The trace cache (`fusec.trace_cache`): a warm compile of a module fusec owns runs neither torch.export
nor the passes and gives the same results; anything the trace depends on changes the key; a damaged or
planted entry is refused with a warning; modules fusec does not own are traced every time."""
from __future__ import annotations

import dataclasses
import os
import warnings

import pytest
import torch

import fusec
from fusec.export import graph_from_data, graph_to_data
from fusec.models.causal_lm import DecodeStep, Prefill, decode_example, random_model
from fusec.models.llama import LlamaBlock, LlamaConfig
from fusec.trace_key import NoKey, trace_key

pytestmark = pytest.mark.filterwarnings("ignore::numba.NumbaPerformanceWarning")

TINY = LlamaConfig(dim=32, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=61, max_seq_len=16, n_layers=2)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("FUSEC_CACHE_DIR", str(path))
    return path


def model(seed: int = 0, config: LlamaConfig = TINY):
    return random_model(config, seed)


def tokens(length: int = 5) -> torch.Tensor:
    return torch.randint(0, TINY.vocab_size, (1, length), generator=torch.Generator().manual_seed(3))


def compile_prefill(m, length: int = 5, **options):
    return fusec.compile(Prefill(m, length), (tokens(length),), backend="reference", **options)


def no_export(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.export ran on a warm compile")
    monkeypatch.setattr(torch.export, "export", refuse)


def assert_like_eager(compiled, module, *inputs):
    with torch.no_grad():
        want = module(*inputs)
    for g, w in zip(compiled(*inputs), want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


# --- warm compiles -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_warm_compile_runs_no_export_and_gives_eager_results(cache_dir, monkeypatch, backend):
    m = model()
    first = fusec.compile(DecodeStep(m), decode_example(m, 1, TINY.max_seq_len), backend=backend)
    assert first.stats["trace_cache"] == "stored"
    no_export(monkeypatch)
    example = decode_example(m, 1, TINY.max_seq_len)
    warm = fusec.compile(DecodeStep(m), example, backend=backend)
    assert warm.stats["trace_cache"] == "hit"
    assert warm.traced.fx_graph is None and warm.traced.graph == first.traced.graph
    assert warm.graph == first.graph
    # the time of each phase (FUSEC_DEBUG=1 prints them): a hit has no trace and no passes
    assert {"trace", "passes"} <= set(first.stats["phase_seconds"])
    assert not {"trace", "passes"} & set(warm.stats["phase_seconds"])
    if backend == "numba":
        assert {"generate", "finish", "run"} <= set(warm.stats["phase_seconds"])
    token, pos, k, v = example
    k.normal_(generator=torch.Generator().manual_seed(1))
    v.normal_(generator=torch.Generator().manual_seed(2))
    assert_like_eager(warm, DecodeStep(m), token, torch.tensor([3]), k, v)


def test_hit_reads_the_weights_of_the_module_compiled_now(cache_dir, monkeypatch):
    """Parameters are not part of the key: a model of the same shapes with other weights hits, and the
    program reads its weights, not those of the model first traced (tied weights too)."""
    compile_prefill(model(seed=0))
    no_export(monkeypatch)
    other = random_model(TINY, seed=7, tie_embeddings=False)
    compiled = compile_prefill(other)
    assert compiled.stats["trace_cache"] == "hit"
    assert_like_eager(compiled, Prefill(other, 5), tokens())


@pytest.mark.parametrize("weights", ["bf16", "int8"])
def test_warm_low_precision_weights_equal_a_cold_compile(tmp_path, monkeypatch, weights):
    """The stored weights of a hit are made from the module's own, as the weights pass makes them."""
    config = dataclasses.replace(TINY, dim=64, hidden_dim=128)  # matrices big enough to be stored so
    m = model(seed=5, config=config)
    monkeypatch.setenv("FUSEC_CACHE_DIR", str(tmp_path / "cold"))
    cold = compile_prefill(m, weights=weights)
    monkeypatch.setenv("FUSEC_CACHE_DIR", str(tmp_path / "warm"))
    compile_prefill(model(seed=0, config=config), weights=weights)
    no_export(monkeypatch)
    warm = compile_prefill(m, weights=weights)
    assert warm.stats["trace_cache"] == "hit" and warm.graph == cold.graph
    for g, w in zip(warm(tokens()), cold(tokens())):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_symbolic_program_round_trips(cache_dir, monkeypatch):
    m = model()
    dynamic = {"tokens": {1: (1, TINY.max_seq_len)}}
    first = fusec.compile(Prefill(m, None), (tokens(8),), backend="reference", dynamic=dynamic)
    no_export(monkeypatch)
    warm = fusec.compile(Prefill(m, None), (tokens(8),), backend="reference", dynamic=dynamic)
    assert warm.stats["trace_cache"] == "hit" and warm.graph.sizes == first.graph.sizes
    assert_like_eager(warm, Prefill(m, None), tokens(11))


def test_options_of_the_passes_have_their_own_lowered_entries(cache_dir, monkeypatch):
    m = model()
    compile_prefill(m)
    no_export(monkeypatch)
    unfused = compile_prefill(m, fuse=False)
    assert unfused.stats["trace_cache"] == "lowered"  # the trace was cached, the passes ran
    assert compile_prefill(m, fuse=False).stats["trace_cache"] == "hit"
    assert compile_prefill(m).stats["trace_cache"] == "hit"
    assert_like_eager(unfused, Prefill(m, 5), tokens())


# --- keys ---------------------------------------------------------------------------------------------------

def key(module, *inputs, dynamic=None, strict=False):
    return trace_key(module, inputs, {}, dynamic, strict)


def test_key_changes_with_everything_the_trace_depends_on():
    m = model()
    base = key(Prefill(m, 5), tokens())
    assert key(Prefill(model(), 5), tokens()) == base  # equal in all that matters
    assert key(Prefill(model(seed=9), 5), tokens()) == base  # weights are read, not traced
    assert key(Prefill(model(config=dataclasses.replace(TINY, norm_eps=1e-6)), 5), tokens()) != base  # config
    assert key(Prefill(m, 5, "all"), tokens()) != base  # a module attribute
    assert key(Prefill(m, 6), tokens(6)) != base  # a shape
    assert key(Prefill(m, 5), tokens().to(torch.int32)) != base  # an input dtype
    assert key(Prefill(m, 5), tokens(), strict=True) != base
    assert key(Prefill(m, 5), tokens(), dynamic={"tokens": {1: (1, 16)}}) != base
    assert key(Prefill(m, 5), tokens(), dynamic={"tokens": {1: (1, 15)}}) != \
        key(Prefill(m, 5), tokens(), dynamic={"tokens": {1: (1, 16)}})
    changed = model()
    changed.rope_cos[3, 0] += 1e-3  # a buffer's value: folded into the program as a constant
    assert key(Prefill(changed, 5), tokens()) != base
    half = model()
    half.layers[0].attention.wq.to(torch.float64)  # a parameter's dtype
    assert key(Prefill(half, 5), tokens()) != base
    frozen = model()
    frozen.norm.weight.requires_grad_(False)
    assert key(Prefill(frozen, 5), tokens()) != base
    tied = random_model(TINY, 0, tie_embeddings=True)  # parameter sharing
    assert key(Prefill(tied, 5), tokens()) != base


def test_a_changed_buffer_misses_and_the_result_follows_it(cache_dir):
    m = model()
    compile_prefill(m)
    m.rope_sin.mul_(0.5)
    compiled = compile_prefill(m)
    assert compiled.stats["trace_cache"] == "stored"
    assert_like_eager(compiled, Prefill(m, 5), tokens())


class MyPrefill(Prefill):
    """A user's subclass: its code is not fusec's."""

    def forward(self, tokens, at=None):
        logits, k, v = super().forward(tokens, at)
        return logits * 2, k, v


def test_modules_fusec_does_not_own_are_traced_every_time(cache_dir):
    m = model()
    compile_prefill(m)
    with pytest.raises(NoKey, match="MyPrefill"):
        key(MyPrefill(m, 5), tokens())
    compiled = fusec.compile(MyPrefill(m, 5), (tokens(),), backend="reference")
    assert compiled.stats["trace_cache"].startswith("uncached")
    assert_like_eager(compiled, MyPrefill(m, 5), tokens())


def test_hooks_functions_and_foreign_lowerings_have_no_key(monkeypatch):
    block = LlamaBlock(dataclasses.replace(TINY, n_layers=1))
    x = torch.randn(1, 4, TINY.dim)
    key(block, x)
    handle = block.attention.register_forward_hook(lambda module, args, out: out * 2)
    with pytest.raises(NoKey, match="hook"):
        key(block, x)
    handle.remove()
    key(block, x)
    block.feed_forward.act = torch.nn.functional.relu  # a function on a module: code fusec cannot hash
    with pytest.raises(NoKey, match="function"):
        key(block, x)
    del block.feed_forward.act
    from fusec.lowering import LOWERINGS
    monkeypatch.setitem(LOWERINGS, "aten.exp", lambda cx, x: x)
    with pytest.raises(NoKey, match="aten.exp"):
        key(block, x)


# --- damage ---------------------------------------------------------------------------------------------------

def entries(cache_dir, kind):
    return sorted((cache_dir / "traces").glob(f"*.{kind}"))


@pytest.fixture(scope="module")
def two_entries(tmp_path_factory):
    """A cache directory holding the entries of two prefill programs (lengths 5 and 6)."""
    path = tmp_path_factory.mktemp("two") / "cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FUSEC_CACHE_DIR", str(path))
        compile_prefill(model())
        compile_prefill(model(), length=6)
    return path


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "other entry"])
def test_damaged_or_planted_entry_is_refused_and_traced_again(two_entries, cache_dir, damage):
    import shutil
    shutil.copytree(two_entries, cache_dir)
    m = model()
    first, second = entries(cache_dir, "trace")
    data = first.read_bytes()
    if damage == "flip":
        data = data[:-100] + bytes([data[-100] ^ 1]) + data[-99:]
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = b"PK\x03\x04" + os.urandom(200)
    else:
        data = second.read_bytes()  # a valid file, with its checksum, of another key
    first.write_bytes(data)
    with pytest.warns(UserWarning, match="damaged or was not written by fusec") as caught:
        a = compile_prefill(m)
        b = compile_prefill(m, length=6)
    assert sum("damaged" in str(w.message) for w in caught) == 1
    assert sorted(c.stats["trace_cache"] for c in (a, b)) == ["hit", "stored"]
    for compiled, length in ((a, 5), (b, 6)):
        assert_like_eager(compiled, Prefill(m, length), tokens(length))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # written again whole
        assert compile_prefill(m).stats["trace_cache"] == "hit"


def test_no_usable_cache_directory_traces_every_time(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("FUSEC_CACHE_DIR", str(blocker / "cache"))
    import fusec.cache as cache
    monkeypatch.setattr(cache, "_fallback", lambda: str(blocker / "tmp"))
    m = model()
    compiled = compile_prefill(m)
    assert compiled.stats["trace_cache"] == "uncached: no cache directory"
    assert_like_eager(compiled, Prefill(m, 5), tokens())


def test_data_form_round_trips_graphs_with_sizes_bodies_and_constants():
    from fusec.api import lower
    from fusec.tracing import trace
    m = model()
    traced = trace(Prefill(m, None), (tokens(8),), dynamic={"tokens": {1: (1, 16)}})
    for graph in (traced.graph, lower(traced.graph, loop=False)):
        pool: dict = {}
        import json
        back = graph_from_data(json.loads(json.dumps(graph_to_data(graph, pool))), pool)
        assert back == graph and repr(back) == repr(graph)
        assert [n.origin for n in back.walk()] == [n.origin for n in graph.walk()]


WARM = """
import sys, torch, fusec
from fusec.models.causal_lm import Prefill, random_model
from fusec.models.llama import LlamaConfig
config = LlamaConfig(dim=32, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=61, max_seq_len=16, n_layers=2)
compiled = fusec.compile(Prefill(random_model(config), None), (torch.zeros(1, 8, dtype=torch.int64),),
                         backend="reference", dynamic={"tokens": {1: (1, 16)}})
print(compiled.stats["trace_cache"], "sympy" in sys.modules, "scipy" in sys.modules)
"""


def test_a_warm_process_imports_neither_sympy_nor_scipy(cache_dir):
    """torch.export's Dims import sympy, and the reference backend SciPy (for erf): a program from the
    cache needs neither, and each costs a warm start a large part of a second."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "PYTHONWARNINGS": "ignore"}
    runs = [subprocess.run([sys.executable, "-c", WARM], capture_output=True, text=True, env=env, cwd=root,
                           timeout=300) for _ in range(2)]
    assert [r.stdout.split() for r in runs] == [["stored", "True", "False"], ["hit", "False", "False"]], \
        runs[-1].stderr[-2000:]


def test_cache_info_counts_traces_and_clear_removes_them(cache_dir):
    import fusec.cache as cache
    compile_prefill(model())
    assert cache.info()["traces"] == 1 and entries(cache_dir, "lowered")
    assert cache.clear()["traces"] == 1
    assert not entries(cache_dir, "trace") and not entries(cache_dir, "lowered")
    assert compile_prefill(model()).stats["trace_cache"] == "stored"
