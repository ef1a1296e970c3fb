"""CoE over Ray actors (fusec.coe.cluster): one local Ray instance with two worker actors for the module.
The tokens equal each expert run alone; experts spread over both workers; store figures add up over the
workers and each keeps to its budget; a missing or damaged file names the expert while the others keep
serving; concurrent requests give the serial answers; close() shuts down the Ray it started."""
from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

ray = pytest.importorskip("ray")

from fusec.coe import CoE, ExpertError, save_expert
from fusec.coe.cluster import RayPools, place
from fusec.coe.experts import FileExpert
from fusec.models.causal_lm import random_model

import coe_common as common
from coe_common import CONFIG, OPTIONS, PROMPT, run_alone

pytestmark = pytest.mark.filterwarnings("ignore::numba.NumbaPerformanceWarning")

NAMES = ("math", "code", "poetry", "law")
TOKENS = 8


def ByFirstToken() -> common.ByFirstToken:  # noqa: N802 - reads like the class it makes
    return common.ByFirstToken(NAMES)


def prompt_for(name: str) -> list[int]:
    return common.prompt_for(name, NAMES)


@pytest.fixture(scope="module")
def expert_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("experts")
    # two architectures (tied and untied heads), two experts each
    return {name: save_expert(random_model(CONFIG, seed=i, tie_embeddings=i < 2), folder / f"{name}.safetensors")
            for i, name in enumerate(NAMES)}


@pytest.fixture(scope="module")
def want(expert_files):
    """Each expert's answer run alone: its file loaded as a model, compiled on its own."""
    return {name: run_alone(path, prompt_for(name), TOKENS) for name, path in expert_files.items()}


@pytest.fixture(scope="module")
def budget(expert_files):
    return 3 * FileExpert("poetry", expert_files["poetry"]).data_bytes  # per worker


@pytest.fixture(scope="module")
def cluster(expert_files, budget, tmp_path_factory):
    """The CoE over two actors, with a missing file ("ghost") and one damaged after start ("shrinking")."""
    assert not ray.is_initialized()
    folder = tmp_path_factory.mktemp("damaged")
    shrinking = folder / "shrinking.safetensors"
    shrinking.write_bytes(expert_files["law"].read_bytes())
    files = dict(expert_files, ghost=folder / "ghost.safetensors", shrinking=shrinking)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        coe = CoE(ByFirstToken(), files, hbm_bytes=budget, cluster="ray", workers=2, **OPTIONS)
    coe.pool.warm()
    yield SimpleNamespace(coe=coe, warnings=[str(w.message) for w in caught], shrinking=shrinking)
    coe.close()


def test_tokens_equal_each_expert_alone_and_experts_spread_over_both_workers(cluster, want):
    coe = cluster.coe
    assert isinstance(coe.pool, RayPools) and len(coe.pool.actors) == 2
    assert set(coe.pool.placement) == {*NAMES, "ghost", "shrinking"}
    assert set(coe.pool.placement.values()) == {0, 1}
    assert {coe.pool.placement[n] for n in NAMES} == {0, 1}
    assert sorted(coe.experts) == sorted([*NAMES, "shrinking"])
    for name in [*NAMES, "math"]:
        result = coe.generate(prompt_for(name), max_new_tokens=TOKENS)
        assert result.expert == name and result.route is not None
        assert result.tokens.dtype == torch.int64 and result.tokens.shape == want[name].shape
        assert torch.equal(result.tokens, want[name]), name
        assert result.new_tokens == TOKENS and result.generate_seconds > 0


def test_stats_add_up_over_the_workers_and_each_keeps_to_its_budget(cluster, budget):
    coe = cluster.coe
    for name in NAMES:
        coe.generate(prompt_for(name), max_new_tokens=2)
    stats = coe.stats
    workers = stats["workers"]
    assert len(workers) == 2 and stats["requests"] >= 4 and stats["new_tokens"] >= 8
    for key in ("loads", "evictions", "resident_bytes", "peak_bytes", "load_failures"):
        assert stats[key] == sum(w[key] for w in workers), key
    assert all(w["hbm_bytes"] == budget and 0 < w["peak_bytes"] <= budget for w in workers)
    assert stats["hbm_bytes"] == 2 * budget and stats["loads"] >= 4
    assert stats["load_p50_s"] > 0 and stats["load_p99_s"] >= stats["load_p50_s"]
    assert stats["requests_by_expert"]["math"] >= 2
    tiers = coe.tiers()
    assert len(tiers["workers"]) == 2 and tiers["hbm_bytes"] == 2 * budget
    assert tiers["ddr_bytes"] == sum(w["ddr_bytes"] for w in tiers["workers"]) > 0
    assert len(tiers["sram_bytes"]) == 2  # two architectures
    coe.reset_stats(evict=True)
    assert coe.stats["requests"] == 0 and coe.stats["loads"] == 0 and coe.stats["resident_bytes"] == 0


def test_missing_and_damaged_files_name_the_expert_and_the_others_keep_serving(cluster, want):
    coe = cluster.coe
    assert set(coe.unavailable) == {"ghost"} and "ghost.safetensors does not exist" in coe.unavailable["ghost"]
    assert any("expert 'ghost': file" in w and "serving without it" in w for w in cluster.warnings)
    with pytest.raises(ExpertError, match="expert 'ghost': unavailable"):
        coe.generate(PROMPT, expert="ghost")
    with pytest.raises(KeyError, match="no expert named 'nobody'; experts: code, law, math"):
        coe.generate(PROMPT, expert="nobody")
    with open(cluster.shrinking, "r+b") as f:  # damaged after the actors opened it: found when loaded
        f.truncate(cluster.shrinking.stat().st_size // 2)
    with pytest.raises(ExpertError, match="expert 'shrinking': .*truncated") as raised:
        coe.generate(PROMPT, expert="shrinking")
    assert raised.value.expert == "shrinking"  # the actor's ExpertError itself, not Ray's wrapper
    assert coe.stats["load_failures"] == 1
    assert torch.equal(coe.generate(prompt_for("law"), max_new_tokens=TOKENS).tokens, want["law"])


def test_concurrent_requests_to_both_workers_give_the_serial_answers(cluster, want):
    coe = cluster.coe
    names = list(NAMES) * 2
    got = common.ask_concurrently(coe, names, prompt_for, TOKENS)
    for i, name in enumerate(names):
        assert got[i].expert == name and torch.equal(got[i].tokens, want[name]), name
    assert all(w["peak_bytes"] <= w["hbm_bytes"] for w in coe.stats["workers"])


def test_generate_many_prefetches_on_the_workers(cluster, want):
    coe = cluster.coe
    order = ["poetry", "math", "law", "code"]
    results = coe.generate_many([prompt_for(n) for n in order], max_new_tokens=TOKENS)
    assert [r.expert for r in results] == order
    assert all(torch.equal(r.tokens, want[r.expert]) for r in results)
    assert coe.pool.prefetch("math") is True and coe.pool.prefetch("nobody") is False


def test_placement_balances_bytes_and_keeps_architectures_together(expert_files):
    assert place(expert_files, 2) == {"poetry": 0, "law": 0, "math": 1, "code": 1}  # untied (larger) first
    one_arch = {name: expert_files[source] for name, source in zip("abcd", ["poetry", "law"] * 2)}
    assert sorted(place(one_arch, 2).values()) == [0, 0, 1, 1]
    models = {"x": random_model(CONFIG, seed=5), "y": random_model(CONFIG, seed=6, tie_embeddings=True)}
    assert set(place(models, 2).values()) == {0, 1}
    with pytest.raises(TypeError, match="expert 'odd': expected a safetensors path or a Llama model, given int"):
        place({"odd": 3}, 2)
    assert set(place(expert_files, 8).values()) == {0, 1, 2, 3}  # no more actors than experts
    assert set(place({"a": expert_files["math"]}, 3).values()) == {0}
    with pytest.raises(ValueError, match="workers must be a positive number of Ray actors, given 0"):
        RayPools(expert_files, workers=0, hbm_bytes=1 << 30)


def test_close_shuts_down_the_ray_it_started(cluster):
    assert ray.is_initialized() and cluster.coe.pool.started_ray
    cluster.coe.close()
    assert not ray.is_initialized() and cluster.coe.pool.actors == []
    cluster.coe.close()  # twice is fine


def test_models_are_sent_by_value_and_a_ray_already_running_is_left_running(cluster):
    """With the module's CoE closed (its actors held all its Ray's CPUs), Ray started here."""
    from fusec.generate import eager_generate
    cluster.coe.close()
    model = random_model(CONFIG, seed=7)
    assert not ray.is_initialized()
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    with pytest.raises(TimeoutError, match="1 Ray actors of 2 CPU each did not start in 2 s; the cluster has 1 CPUs"):
        RayPools({"mem": model}, workers=1, hbm_bytes=1 << 30, cpus_per_worker=2, start_timeout=2)
    pools = RayPools({"mem": model}, workers=1, hbm_bytes=1 << 30, weights="fp32", **OPTIONS)
    try:
        assert not pools.started_ray and pools.placement == {"mem": 0} and dict(pools.experts) == {"mem": 0}
        out = pools.generate("mem", PROMPT, 6)
        expected, _ = eager_generate(model, torch.tensor([PROMPT]), 6, max_seq_len=64)
        assert torch.equal(out["tokens"], expected[0]) and out["expert"] == "mem" and out["outcome"] == "miss"
        assert set(out) == {"tokens", "expert", "outcome", "switched", "switch_seconds", "generate_seconds",
                            "new_tokens"}
    finally:
        pools.close()
        assert ray.is_initialized()  # not started by the pools: left running
        ray.shutdown()
