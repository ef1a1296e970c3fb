"""CoE routers: the keyword router's counting rules, the trained embedding-bag router's held-out accuracy,
fusec's compiled router against the eager module, save/load, and errors that name what was expected and
what was given."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import fusec
from fusec.coe.router import (CompiledRouter, EmbeddingBagRouter, KeywordRouter, Route, pad, synthetic_prompts,
                              train_router)

EXPERTS = [f"expert{i}" for i in range(8)]
VOCAB = 1000
MAX_LEN = 64


@pytest.fixture(scope="module")
def router() -> CompiledRouter:
    prompts, labels = synthetic_prompts(EXPERTS, 75, VOCAB, seed=0)  # 600 prompts
    return train_router(prompts, labels, VOCAB, experts=EXPERTS, max_len=MAX_LEN, seed=0)


@pytest.fixture(scope="module")
def small() -> CompiledRouter:
    """A tiny untrained router (max_len 8) for the input checks: quick to compile."""
    torch.manual_seed(0)
    return CompiledRouter(EmbeddingBagRouter(50, 3, dim=8, max_len=8), ["a", "b", "c"])


# --- trained embedding-bag router -------------------------------------------------------------------

def test_training_generalizes_to_held_out_prompts(router):
    assert router.experts == tuple(EXPERTS)
    assert router.training_accuracy >= 0.95 and router.training_seconds > 0
    prompts, labels = synthetic_prompts(EXPERTS, 25, VOCAB, seed=1)
    routes = router.route_many(prompts)
    accuracy = sum(r.expert == label for r, label in zip(routes, labels)) / len(labels)
    assert accuracy >= 0.90


@pytest.mark.parametrize("length", [1, 17, MAX_LEN - 1, MAX_LEN, MAX_LEN + 1, 3 * MAX_LEN])
def test_compiled_matches_eager_for_short_full_and_long_prompts(router, length):
    prompts, _ = synthetic_prompts(EXPERTS, 1, VOCAB, length_range=(length, length), seed=2)
    for prompt in prompts:
        fast, eager = router.route(prompt), router.eager_route(prompt)
        assert fast.expert == eager.expert
        assert fast.confidence == pytest.approx(eager.confidence, abs=1e-5)
        assert fast.scores == pytest.approx(eager.scores, abs=1e-5)
        assert sum(fast.scores.values()) == pytest.approx(1.0, abs=1e-5)
        assert fast.confidence == max(fast.scores.values()) == fast.scores[fast.expert]
        assert fast.router == "embedding-bag (fusec numba)"


def test_long_prompts_keep_their_last_tokens(router):
    prompts, _ = synthetic_prompts(EXPERTS, 1, VOCAB, length_range=(150, 150), seed=3)
    for prompt in prompts:
        assert router.route(prompt) == router.route(prompt[-MAX_LEN:])
    tokens, length = pad(list(range(1, 101)), MAX_LEN)
    assert tokens[0, 0].item() == 37 and tokens[0, -1].item() == 100 and length.item() == MAX_LEN
    tokens, length = pad([5, 6], MAX_LEN)
    assert tokens[0, :3].tolist() == [5, 6, 0] and length.item() == 2


def test_prompt_forms_give_the_same_route(router):
    prompt = synthetic_prompts(EXPERTS, 1, VOCAB, seed=4)[0][0]
    route = router.route(prompt)
    assert router.route(torch.tensor(prompt)) == route
    assert router.route(torch.tensor([prompt])) == route
    assert router.route(torch.tensor(prompt, dtype=torch.int32)) == route


def test_the_mean_covers_exactly_the_first_length_tokens():
    torch.manual_seed(0)
    module = EmbeddingBagRouter(100, 4, dim=16, max_len=12)
    tokens = torch.randint(0, 100, (5, 12))
    length = torch.tensor([1, 4, 11, 12, 7])
    means = torch.stack([module.embedding(tokens[b, :n]).mean(0) for b, n in enumerate(length.tolist())])
    torch.testing.assert_close(module.logits(tokens, length), module.classifier(means))
    assert module(tokens, length).shape == (5, 4)


def test_router_compiles_without_fallback_ops():
    torch.manual_seed(0)
    module = EmbeddingBagRouter(100, 5, dim=16, max_len=16).eval()
    compiled = fusec.compile(module, pad([1, 2, 3], 16), strict=True)
    for ids in ([7], list(range(10, 26)), list(range(40))):
        inputs = pad(ids, 16)
        torch.testing.assert_close(compiled(*inputs), module(*inputs), atol=1e-6, rtol=1e-5)


def test_training_is_deterministic_and_leaves_the_global_rng_alone():
    prompts, labels = synthetic_prompts(EXPERTS[:3], 10, 200, seed=5)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = train_router(prompts, labels, 200, dim=8, max_len=16, epochs=20, seed=7)
    assert torch.equal(torch.rand(3), before)
    b = train_router(prompts, labels, 200, dim=8, max_len=16, epochs=20, seed=7)
    c = train_router(prompts, labels, 200, dim=8, max_len=16, epochs=20, seed=8)
    assert a.experts == tuple(EXPERTS[:3])  # order of first appearance
    for name, value in a.module.state_dict().items():
        assert torch.equal(value, b.module.state_dict()[name])
    assert not torch.equal(a.module.embedding.weight, c.module.embedding.weight)


def test_synthetic_prompts_are_deterministic_and_share_topics_across_seeds():
    p0, l0 = synthetic_prompts(EXPERTS, 3, VOCAB, seed=0)
    assert (p0, l0) == synthetic_prompts(EXPERTS, 3, VOCAB, seed=0)
    p1, _ = synthetic_prompts(EXPERTS, 3, VOCAB, seed=1)
    assert p0 != p1 and len(p0) == 24 and l0[:8] == EXPERTS
    assert all(8 <= len(p) <= 48 and all(0 <= t < VOCAB for t in p) for p in p0 + p1)
    many0, labels0 = synthetic_prompts(EXPERTS, 50, VOCAB, seed=0)
    many1, labels1 = synthetic_prompts(EXPERTS, 50, VOCAB, seed=1)

    def common_per_expert(prompts, labels):  # tokens seen with one expert only are (mostly) its topic
        seen = {e: set() for e in EXPERTS}
        for p, label in zip(prompts, labels):
            seen[label].update(p)
        return seen
    s0, s1 = common_per_expert(many0, labels0), common_per_expert(many1, labels1)
    for e in EXPERTS:
        others = set().union(*(s0[o] for o in EXPERTS if o != e))
        assert s0[e] - others and (s0[e] - others) & s1[e]


# --- save / load ------------------------------------------------------------------------------------

def test_save_load_round_trip(router, tmp_path):
    path = tmp_path / "router.safetensors"
    router.save(path)
    loaded = CompiledRouter.load(path)
    assert loaded.experts == router.experts and loaded.module.max_len == MAX_LEN
    prompts, _ = synthetic_prompts(EXPERTS, 2, VOCAB, length_range=(1, 100), seed=6)
    assert loaded.route_many(prompts) == router.route_many(prompts)
    reference = CompiledRouter.load(path, backend="reference")
    for prompt in prompts[:4]:
        assert reference.route(prompt).scores == pytest.approx(router.route(prompt).scores, abs=1e-5)


def test_load_rejects_files_that_are_not_routers(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match=r"expected a router file .* got format None"):
        CompiledRouter.load(path)


# --- keyword router ---------------------------------------------------------------------------------

def test_keyword_router_picks_the_expert_with_most_matches():
    r = KeywordRouter({"math": [1, 2], "code": [3, 4, 5]})
    route = r.route([1, 3, 9, 4, 4])
    assert route == Route("code", 0.75, {"math": 0.25, "code": 0.75}, "keyword")
    assert r.counts([1, 3, 9, 4, 4]) == {"math": 1, "code": 3}
    assert r.route(torch.tensor([[2, 2, 5]])).expert == "math"


def test_keyword_router_counts_ngrams():
    r = KeywordRouter({"math": [(7, 8)], "code": [8]})
    assert r.counts([7, 8, 7, 8, 8]) == {"math": 2, "code": 3}
    assert r.counts([7, 9, 8]) == {"math": 0, "code": 1}       # not adjacent: no n-gram match
    assert KeywordRouter({"x": [[5, 5]]}).counts([5, 5, 5]) == {"x": 2}  # overlapping occurrences


def test_keyword_router_ties_go_to_the_expert_listed_first():
    assert KeywordRouter({"a": [1], "b": [2]}).route([2, 1]).expert == "a"
    route = KeywordRouter({"b": [2], "a": [1]}).route([1, 2])
    assert route.expert == "b" and route.confidence == 0.5


def test_keyword_router_default_and_no_default():
    r = KeywordRouter({"math": [1], "code": [2]}, default="chat")
    assert r.experts == ("math", "code", "chat")
    route = r.route([9, 9])
    assert route.expert == "chat" and route.confidence == 0.0
    assert route.scores == pytest.approx({"math": 1 / 3, "code": 1 / 3, "chat": 1 / 3})
    assert r.route([1]).scores == {"math": 1.0, "code": 0.0, "chat": 0.0}
    assert KeywordRouter({"math": [1], "code": [2]}, default="code").experts == ("math", "code")
    with pytest.raises(ValueError, match="no keyword of any expert in the prompt and no default expert"):
        KeywordRouter({"math": [1]}).route([2, 3])


def test_keyword_router_from_words():
    def encode(text):  # a toy tokenizer: one token per character
        return [ord(c) for c in text]
    r = KeywordRouter.from_words({"math": ["sum", "x"], "code": ["def"]}, encode, default="chat")
    assert r.keywords["math"] == [(115, 117, 109), (120,)]
    assert r.route(encode("def f(x): return sum(x)")).expert == "math"   # sum, x, x against def
    assert r.route(encode("def g(): pass")).expert == "code"
    assert r.route(encode("hello")).expert == "chat"
    with pytest.raises(ValueError, match=r"keyword '' of expert 'math': expected .* got none"):
        KeywordRouter.from_words({"math": [""]}, encode)


# --- bad inputs -------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt, message", [
    ([], r"expected at least one token id, got an empty prompt"),
    (torch.tensor([], dtype=torch.int64), r"expected at least one token id, got an empty prompt"),
    (torch.tensor([1.0, 2.0]), r"expected integer token ids, got a tensor of dtype torch.float32"),
    (torch.tensor([True]), r"expected integer token ids, got a tensor of dtype torch.bool"),
    ([1, 2.5], r"expected integer token ids, got 2.5 \(float\)"),
    ([1, "a"], r"expected integer token ids, got 'a' \(str\)"),
    ("abc", r"expected a sequence or tensor of integer token ids, got 'abc' \(str\)"),
    (7, r"expected a sequence or tensor of integer token ids, got 7 \(int\)"),
    ([1, 50], r"expected token ids in 0..49, got \[50\]"),
    ([-1, 3], r"expected token ids in 0..49, got \[-1\]"),
    (torch.zeros(2, 3, dtype=torch.int64), r"expected a 1-d or \[1, T\] tensor of token ids, got shape \[2, 3\]"),
])
def test_bad_prompts(small, prompt, message):
    with pytest.raises(ValueError, match=message):
        small.route(prompt)
    with pytest.raises(ValueError, match=message):
        small.eager_route(prompt)


def test_keyword_router_bad_inputs():
    with pytest.raises(ValueError, match=r"keyword of expert 'a': expected a sequence or tensor of integer token "
                                         r"ids, got 1.5 \(float\)"):
        KeywordRouter({"a": [1.5]})
    with pytest.raises(ValueError, match=r"expected integer token ids, got 1.5 \(float\)"):
        KeywordRouter({"a": [(1, 1.5)]})
    with pytest.raises(ValueError, match=r"keyword of expert 'a': expected at least one token id, got an empty"):
        KeywordRouter({"a": [[]]})
    with pytest.raises(ValueError, match="expected at least one expert with keywords or a default expert, got"):
        KeywordRouter({})
    with pytest.raises(ValueError, match="expected at least one token id, got an empty prompt"):
        KeywordRouter({"a": [1]}, default="a").route([])


def test_train_router_bad_inputs():
    prompts, labels = [[1, 2], [3, 4]], ["a", "b"]
    cases = [
        (([[1, 2]], labels, 10), r"expected one label per prompt, got 1 prompts and 2 labels"),
        (([], [], 10), r"expected at least one labelled prompt, got none"),
        ((prompts, ["a", "c"], 10, ["a", "b"]),
         r"label of prompt 1: expected one of the experts \['a', 'b'\], got 'c'"),
        ((prompts, labels, 10, ["a", "b", "a"]), r"expected distinct expert names, got \['a', 'b', 'a'\]"),
        (([[1, 2], []], labels, 10), r"prompt 1: expected at least one token id, got an empty prompt"),
        (([[1, 2], [3, 10]], labels, 10), r"prompt 1: expected token ids in 0..9, got \[10\]"),
        ((prompts, labels, 0), r"vocab_size: expected a positive int, got 0"),
        ((prompts, labels, 10, None, 8, 0), r"max_len: expected a positive int, got 0"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            train_router(*args, epochs=1)


def test_other_bad_arguments():
    with pytest.raises(ValueError, match=r"dim: expected a positive int, got 0"):
        EmbeddingBagRouter(10, 2, dim=0)
    with pytest.raises(ValueError, match=r"expected 2 distinct expert names \(the module's n_experts\), got \['a'\]"):
        CompiledRouter(EmbeddingBagRouter(10, 2, dim=4, max_len=4), ["a"])
    with pytest.raises(ValueError, match=r"vocab_size: expected at least 321 for 8 experts .* got 100"):
        synthetic_prompts(EXPERTS, 1, 100)
    with pytest.raises(ValueError, match=r"length_range: expected \(low, high\) with 1 <= low <= high, got \(5, 2\)"):
        synthetic_prompts(EXPERTS, 1, VOCAB, length_range=(5, 2))
