"""Composition of Experts: the CoE's tokens equal the chosen expert's alone; the store keeps to its budget
under each policy; damaged or missing expert files name the expert and leave the others serving;
concurrent requests are safe; prefetch loads the next expert; switching never recompiles."""
from __future__ import annotations

import os

import pytest
import torch

import fusec
from fusec.coe import LFU, CoE, ExpertError, save_expert
from fusec.coe.experts import FileExpert
from fusec.generate import eager_generate
from fusec.models.causal_lm import random_model
from fusec.models.llama import LlamaConfig

from coe_common import CONFIG, OPTIONS, PROMPT, ByFirstToken, ask_concurrently, run_alone
from coe_common import prompt_for as common_prompt_for

pytestmark = pytest.mark.filterwarnings("ignore::numba.NumbaPerformanceWarning")

NAMES = ("math", "code", "poetry", "law", "chat")


def router(experts=None) -> ByFirstToken:
    return ByFirstToken(NAMES, experts)


def prompt_for(name: str) -> list[int]:
    return common_prompt_for(name, NAMES)


@pytest.fixture(scope="module")
def expert_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("experts")
    return {name: save_expert(random_model(CONFIG, seed=i, tie_embeddings=i % 2 == 0), folder / f"{name}.safetensors")
            for i, name in enumerate(NAMES[:2])} | {
        name: save_expert(random_model(CONFIG, seed=i, tie_embeddings=False), folder / f"{name}.safetensors")
        for i, name in enumerate(NAMES[2:], start=2)}


@pytest.fixture(scope="module")
def expert_bytes(expert_files):
    return FileExpert("law", expert_files["law"]).data_bytes


def alone(path, prompt, tokens=12):
    return run_alone(path, prompt, tokens)


def test_tokens_equal_the_chosen_expert_run_alone_and_switching_never_recompiles(expert_files, expert_bytes):
    coe = CoE(router(), expert_files, hbm_bytes=3 * expert_bytes, **OPTIONS)
    order = ["math", "code", "poetry", "math", "law", "chat", "code"]
    results = [coe.generate(prompt_for(name), max_new_tokens=12) for name in order]
    assert [r.expert for r in results] == order
    for name in set(order):
        want = alone(expert_files[name], prompt_for(name))
        for r in results:
            if r.expert == name:
                assert torch.equal(r.tokens, want), name
    assert len(coe.pool.slots) == 2  # tied and untied heads: two architectures, one program each
    for slot in coe.pool.slots.values():
        programs = [*slot.generator._prefill.values(), *slot.generator._decode.values()]
        assert all(len(step.fn.signatures) == 1 for p in programs for step in p.program.steps)
    stats = coe.stats
    assert stats["requests"] == 7 and stats["new_tokens"] == 7 * 12
    assert stats["switches"] == 6 and stats["switch_p50_s"] > 0  # math comes back to its own program
    assert stats["outcomes"]["miss"] + stats["outcomes"]["hit"] == 7


def test_module_experts_and_fp32_weights_match_eager_generation():
    models = {name: random_model(CONFIG, seed=10 + i) for i, name in enumerate(NAMES)}
    coe = CoE(router(), models, hbm_bytes=1 << 30, weights="fp32", **OPTIONS)
    for name in ("poetry", "chat"):
        want, _ = eager_generate(models[name], torch.tensor([prompt_for(name)]), 8, max_seq_len=64)
        assert torch.equal(coe.generate(prompt_for(name), max_new_tokens=8).tokens, want[0])


def test_by_default_one_symbolic_prefill_program_serves_every_prompt_length():
    models = {name: random_model(CONFIG, seed=20 + i) for i, name in enumerate(NAMES[:2])}
    coe = CoE(router(NAMES[:2]), models, hbm_bytes=1 << 30, weights="fp32", max_seq_len=64)
    for extra in (0, 1, 6, 30):  # prompts of 6, 7, 12 and 36 tokens, each expert in turn
        for name in NAMES[:2]:
            prompt = [NAMES.index(name)] + PROMPT + [(5 * i + extra) % 256 for i in range(extra)]
            want, _ = eager_generate(models[name], torch.tensor([prompt]), 4, max_seq_len=64)
            assert torch.equal(coe.generate(prompt, max_new_tokens=4).tokens, want[0]), (name, len(prompt))
    slot, = coe.pool.slots.values()  # one architecture
    assert list(slot.generator._prefill) == [(1, "T")]  # one program for every length, no padding


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_the_store_keeps_to_its_budget_and_evicts_by_policy(expert_files, expert_bytes, policy):
    untied = {name: expert_files[name] for name in NAMES[2:]}
    coe = CoE(None, untied, hbm_bytes=5 * expert_bytes // 2, policy=policy, **OPTIONS)
    for name in ["poetry", "poetry", "poetry", "law", "chat", "law", "chat"]:
        coe.generate(prompt_for(name), max_new_tokens=2, expert=name)
        assert coe.pool.store.resident_bytes <= coe.pool.store.hbm_bytes
    stats = coe.stats
    assert stats["peak_bytes"] <= stats["hbm_bytes"] and stats["evictions"] >= 1
    resident = set(coe.pool.store.resident)
    # LRU keeps the two most recent; LFU keeps the most used (poetry, 3 uses) and the latest of the rest
    assert resident == ({"law", "chat"} if policy == "lru" else {"poetry", "chat"})


def test_a_custom_policy_object_and_bad_policies(expert_files, expert_bytes):
    class NewestFirst(LFU):
        def victim(self, candidates):
            return list(self.order)[-1] if list(self.order)[-1] in candidates else candidates[0]

    coe = CoE(None, {n: expert_files[n] for n in NAMES[2:]}, hbm_bytes=5 * expert_bytes // 2,
              policy=NewestFirst(), **OPTIONS)
    for name in ["poetry", "law", "chat"]:
        coe.generate(prompt_for(name), max_new_tokens=2, expert=name)
    assert set(coe.pool.store.resident) == {"poetry", "chat"}
    with pytest.raises(ValueError, match="unknown eviction policy 'fifo'; expected one of lru, lfu"):
        CoE(None, expert_files, hbm_bytes=1 << 30, policy="fifo")
    with pytest.raises(TypeError, match="needs the methods accessed, admitted, evicted, victim"):
        CoE(None, expert_files, hbm_bytes=1 << 30, policy=object())
    with pytest.raises(ValueError, match="hbm_bytes must be a positive number of bytes, given -1"):
        CoE(None, expert_files, hbm_bytes=-1)


def test_missing_and_damaged_files_name_the_expert_and_the_others_keep_serving(expert_files, expert_bytes, tmp_path):
    files = dict(expert_files)
    files["ghost"] = tmp_path / "ghost.safetensors"
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    files["garbage"] = garbage
    shrinking = tmp_path / "shrinking.safetensors"
    shrinking.write_bytes(open(expert_files["law"], "rb").read())
    files["shrinking"] = shrinking
    with pytest.warns(UserWarning, match="expert 'ghost': file .*ghost.safetensors does not exist"):
        coe = CoE(None, files, hbm_bytes=3 * expert_bytes, **OPTIONS)
    assert set(coe.unavailable) == {"ghost", "garbage"}
    assert "damaged safetensors header" in coe.unavailable["garbage"]
    with pytest.raises(ExpertError, match="expert 'ghost': unavailable"):
        coe.generate(PROMPT, expert="ghost")
    with open(shrinking, "r+b") as f:  # damaged after the CoE was built: found when loaded
        f.truncate(os.path.getsize(shrinking) // 2)
    with pytest.raises(ExpertError, match="expert 'shrinking': .*truncated"):
        coe.generate(PROMPT, expert="shrinking")
    assert coe.stats["load_failures"] == 1
    good = coe.generate(prompt_for("law"), max_new_tokens=6, expert="law")
    assert torch.equal(good.tokens, alone(expert_files["law"], prompt_for("law"), 6))


def test_files_of_the_wrong_shape_or_without_config_are_refused(tmp_path):
    from safetensors.torch import save_file
    wrong = random_model(LlamaConfig(**{**vars(CONFIG), "hidden_dim": 96}), seed=0)
    path = save_expert(wrong, tmp_path / "wrong.safetensors")
    header = path.read_bytes()
    assert FileExpert("ok", path).architecture.config.hidden_dim == 96
    save_file({"x": torch.zeros(3)}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(ExpertError, match="expert 'bare': .*records no model config"):
        FileExpert("bare", tmp_path / "bare.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(header[:5])
    with pytest.raises(ExpertError, match="expert 'tiny': .*not a safetensors file"):
        FileExpert("tiny", tmp_path / "tiny.safetensors")
    with pytest.raises(TypeError, match="expert 'odd': expected a safetensors path or a Llama model, given int"):
        CoE(None, {"odd": 3}, hbm_bytes=1 << 30)
    with pytest.raises(ValueError, match="the router can choose experts that are not given: code"):
        CoE(router(), {"math": path}, hbm_bytes=1 << 30)


def test_concurrent_requests_give_the_serial_answers(expert_files, expert_bytes):
    coe = CoE(router(), expert_files, hbm_bytes=5 * expert_bytes // 2, **OPTIONS)
    names = ["math", "code", "poetry", "law", "chat"] * 2
    want = {name: alone(expert_files[name], prompt_for(name), 6) for name in NAMES}
    got = ask_concurrently(coe, names, prompt_for, 6)
    for i, name in enumerate(names):
        assert got[i].expert == name and torch.equal(got[i].tokens, want[name])
    assert coe.stats["peak_bytes"] <= coe.stats["hbm_bytes"]


def test_generate_many_prefetches_the_next_expert(expert_files, expert_bytes):
    untied = {name: expert_files[name] for name in NAMES[2:]}
    coe = CoE(router(tuple(untied)), untied, hbm_bytes=4 * expert_bytes, **OPTIONS)  # all three fit
    coe.pool.warm()
    prompts = [prompt_for(n) for n in ["poetry", "law", "chat", "poetry"]]
    results = coe.generate_many(prompts, max_new_tokens=6)
    assert [r.expert for r in results] == ["poetry", "law", "chat", "poetry"]
    assert [r.outcome for r in results[1:3]] in (["prefetched"] * 2, ["waited"] * 2, ["prefetched", "waited"],
                                                 ["waited", "prefetched"])
    assert coe.stats["prefetches"] == 2 and coe.stats["prefetches_used"] == 2 and results[3].outcome == "hit"
    for r, name in zip(results, ["poetry", "law", "chat"]):
        assert torch.equal(r.tokens, alone(expert_files[name], prompt_for(name), 6))


def test_fusec_exposes_coe():
    assert fusec.CoE is CoE


def test_the_benchmark_smoke_run_reports_every_figure(tmp_path, capsys):
    """`fusec coe bench --smoke` end to end (no timing is asserted: the figures only have to exist)."""
    from fusec.cli import main
    assert main(["coe", "bench", "--smoke", "--dir", str(tmp_path), "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    for line in ("fusec CoE tokens/s", "naive (fresh PyTorch model per request)", "switch time p50 / p99",
                 "hit rate", "process memory growth", "SN40L node (8 sockets)", "DGX H100", "this CPU (measured)"):
        assert line in out
    import json
    result = json.loads((tmp_path / "r.json").read_text())
    m = result["measured"]
    assert m["requests"] == 8 and m["tokens_per_s"] > 0 and m["naive_tokens_per_s"] > 0
    assert m["peak_resident_bytes"] <= m["hbm_bytes"]
    assert sum(m["outcomes"].values()) == 8
    assert main(["coe", "bench", "--experts", "2", "--hbm-experts", "3"]) == 1
    assert "--hbm-experts (3) cannot exceed --experts (2)" in capsys.readouterr().err


def test_a_prefetch_does_not_evict_an_expert_prefetched_for_an_earlier_request(expert_files, expert_bytes):
    """Under LFU a prefetched expert, not accessed yet, would be the first victim of the next prefetch."""
    untied = {name: expert_files[name] for name in NAMES[2:]}
    coe = CoE(router(tuple(untied)), untied, hbm_bytes=5 * expert_bytes // 2, policy="lfu", **OPTIONS)
    coe.pool.warm()
    results = coe.generate_many([prompt_for(n) for n in ["poetry"] * 3 + ["law", "chat"]], max_new_tokens=2)
    outcomes = [r.outcome for r in results]
    assert outcomes[:3] == ["miss", "hit", "hit"]
    assert all(o in ("prefetched", "waited") for o in outcomes[3:]), outcomes  # loaded ahead, never a miss
    assert coe.stats["prefetches"] == coe.stats["prefetches_used"] == 2
