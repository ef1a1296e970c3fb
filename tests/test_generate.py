"""Whole-model generation: the built-in causal LM, its static-KV-cache programs (Prefill, DecodeStep) and
`fusec.compile_generator`, checked token for token against PyTorch eager and `transformers`.

Random weights make near-ties between the two most likely tokens, where float rounding may pick either.
`assert_same_greedy` therefore compares the logits at every step along the common path and accepts a
different token only where the reference's top-2 logits are closer than TIE_TOLERANCE; after such a
step the paths differ and the comparison ends.
"""
from __future__ import annotations

import functools
import importlib.util
import json

import pytest
import torch

import fusec
from fusec.generate import Generator, compile_generator, eager_generate, eager_generator
from fusec.models.causal_lm import (CausalLM, DecodeStep, Prefill, decode_example, from_hf, load_safetensors,
                                   random_model, save_safetensors)
from fusec.models.llama import PRESETS, LlamaConfig

TINY = LlamaConfig(dim=64, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=97, max_seq_len=128, n_layers=2)
PROMPT_LEN = 8         # one prompt length for most tests: one prefill program to compile
NEW_TOKENS = 80        # at least 64: generation past a typical reply's length
TIE_TOLERANCE = 1e-4   # top-2 logits closer than this may legitimately order either way
LOGIT_TOLERANCE = 1e-4  # max abs logit error, relative to the logits' magnitude (the fp32 tolerance)
BF16_TOLERANCE = 3e-2  # bf16 weights (8 mantissa bits): max abs logit error relative to the magnitude

pytestmark = pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning")  # tiny kernels


def prompt(batch: int = 1, length: int = PROMPT_LEN, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, TINY.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_same_greedy(ids: torch.Tensor, logits: torch.Tensor, ref_ids: torch.Tensor, ref_logits: torch.Tensor,
                       prompt_len: int, tol: float = TIE_TOLERANCE) -> int:
    """Greedy tokens `ids` [B, T + n] with their logits [B, n, vocab] against a reference's, batch row by
    row: while the paths agree the logits must match; a token may differ only where the reference's
    top-2 logits are within `tol`, and the comparison of that row stops there. Returns the steps compared.
    """
    compared = 0
    for row in range(ids.shape[0]):
        scale = max(float(ref_logits[row].abs().max()), 1e-30)
        for step in range(ids.shape[1] - prompt_len):
            got, want = logits[row, step], ref_logits[row, step]
            error = float((got - want).abs().max())
            assert error <= LOGIT_TOLERANCE * scale, f"row {row} step {step}: logits differ by {error:.2e}"
            compared += 1
            token, ref_token = int(ids[row, prompt_len + step]), int(ref_ids[row, prompt_len + step])
            if token != ref_token:
                top2 = want.topk(2).values
                gap = float(top2[0] - top2[1])
                assert gap < tol, (f"row {row} step {step}: token {token} where the reference chose {ref_token} "
                                   f"by a margin of {gap:.2e} (not a tie)")
                break
    return compared


@pytest.fixture(scope="module")
def model() -> CausalLM:
    return random_model(TINY, seed=0)


@pytest.fixture(scope="module")
def gen(model) -> Generator:
    """The numba generator every test shares: its programs compile once."""
    return compile_generator(model, backend="numba")


# --- the tie rule itself --------------------------------------------------------------------------------

def test_tie_rule_accepts_a_near_tie_and_rejects_a_real_difference():
    ref_logits = torch.tensor([[[0.0, 1.0, 1.0 + 5e-5], [2.0, 0.0, 0.0]]])
    ref_ids = torch.tensor([[0, 2, 0]])
    assert assert_same_greedy(torch.tensor([[0, 1, 1]]), ref_logits, ref_ids, ref_logits, prompt_len=1) == 1
    wide = ref_logits.clone()
    wide[0, 0, 2] = 1.5
    with pytest.raises(AssertionError, match="not a tie"):
        assert_same_greedy(torch.tensor([[0, 1, 1]]), wide, ref_ids, wide, prompt_len=1)
    with pytest.raises(AssertionError, match="logits differ"):
        assert_same_greedy(ref_ids, ref_logits + 1e-2, ref_ids, ref_logits, prompt_len=1)


# --- the model and its programs in eager ----------------------------------------------------------------

def test_presets_have_the_published_shapes():
    dims = {name: (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.hidden_dim, c.vocab_size, c.max_seq_len)
            for name, c in ((n, LlamaConfig.preset(n)) for n in ("stories15M", "stories42M", "stories110M",
                                                                  "tinyllama_1b"))}
    assert dims == {"stories15M": (288, 6, 6, 6, 768, 32000, 256),
                    "stories42M": (512, 8, 8, 8, 1376, 32000, 1024),
                    "stories110M": (768, 12, 12, 12, 2048, 32000, 1024),
                    "tinyllama_1b": (2048, 22, 32, 4, 5632, 32000, 2048)}
    assert list(PRESETS)[:3] == ["tiny", "stories15M", "tinyllama_1b"]  # the block registry's order stays


def test_random_weights_are_seeded_and_tying_shares_one_matrix():
    a, b = random_model(TINY, seed=3), random_model(TINY, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.output.weight, random_model(TINY, seed=4).output.weight)
    tied = random_model(TINY, seed=3, tie_embeddings=True)
    assert tied.output.weight is tied.tok_embeddings.weight
    assert CausalLM.from_preset("stories15M").tie_embeddings and not CausalLM.from_preset("tiny").tie_embeddings
    untied_bytes = a.weight_bytes_per_token()
    assert untied_bytes == 4 * (sum(p.numel() for p in a.parameters()) - TINY.vocab_size * TINY.dim + TINY.dim)
    assert tied.weight_bytes_per_token(2) == 2 * sum(p.numel() for p in tied.parameters())


def test_prefill_and_decode_steps_match_the_full_forward_in_eager(model):
    tokens = prompt(length=12)
    with torch.no_grad():
        full = model(tokens)
        logits, k_all, v_all = Prefill(model, 7, logits="all")(tokens[:, :7])
        torch.testing.assert_close(logits, full[:, :7], rtol=0, atol=1e-5)
        token, pos, k_cache, v_cache = decode_example(model, max_seq_len=16)
        k_cache[:, :, :, :7], v_cache[:, :, :, :7] = k_all, v_all
        for p in range(7, 12):
            logits, k_new, v_new = DecodeStep(model)(tokens[:, p:p + 1], torch.tensor([p]), k_cache, v_cache)
            k_cache[:, :, :, p], v_cache[:, :, :, p] = k_new[:, :, :, 0], v_new[:, :, :, 0]
            torch.testing.assert_close(logits, full[:, p], rtol=0, atol=1e-5)


def test_prefill_rejects_a_prompt_longer_than_the_model():
    with pytest.raises(ValueError, match="max_seq_len"):
        Prefill(random_model(TINY), TINY.max_seq_len + 1)
    with pytest.raises(ValueError, match="logits must be one of"):
        Prefill(random_model(TINY), 4, logits="first")


# --- compiled generation against eager ------------------------------------------------------------------

def test_greedy_matches_eager_token_for_token(model, gen):
    tokens = prompt()
    ids, logits = gen.generate(tokens, max_new_tokens=NEW_TOKENS, return_logits=True)
    ref_ids, ref_logits = eager_generate(model, tokens, NEW_TOKENS)
    assert ids.shape == (1, PROMPT_LEN + NEW_TOKENS) and torch.equal(ids[:, :PROMPT_LEN], tokens)
    assert assert_same_greedy(ids, logits, ref_ids, ref_logits, PROMPT_LEN) >= 64


def test_cache_is_correct_across_prefill_and_many_decode_steps(model, gen):
    """Sampling walks a varied path; every step's logits must equal the full (cache-free) forward's at
    that position, and the cache must hold what a prefill of the whole sequence computes."""
    tokens = prompt(seed=1)
    ids, logits = gen.generate(tokens, max_new_tokens=100, temperature=1.0, seed=0, return_logits=True)
    fed = ids.shape[1] - 1  # the last token is generated, never fed back
    with torch.no_grad():
        full = model(ids[:, :fed])
        _, k_all, v_all = Prefill(model, fed)(ids[:, :fed])
    scale = float(full.abs().max())
    assert float((logits - full[:, PROMPT_LEN - 1:]).abs().max()) <= LOGIT_TOLERANCE * scale
    k_cache, v_cache = gen.caches(1)
    torch.testing.assert_close(k_cache[:, :, :, :fed], k_all, rtol=0, atol=1e-5)
    torch.testing.assert_close(v_cache[:, :, :, :fed], v_all, rtol=0, atol=1e-5)
    assert len(set(ids[0, PROMPT_LEN:].tolist())) > 10  # the path really varies


def test_no_recompilation_during_generation(gen):
    gen.generate(prompt(seed=2), max_new_tokens=4)  # compiles this prompt length's prefill if not yet done
    before = gen.stats
    gen.generate(prompt(seed=3), max_new_tokens=40)
    after = gen.stats
    assert after["compiles"] == before["compiles"] and gen.last["compiles"] == 0
    assert after["tokens_generated"] - before["tokens_generated"] == 40 and gen.last["decode_steps"] == 39
    assert gen.last["decode_seconds"] > 0 and gen.last["decode_tokens_per_s"] > 0
    assert gen.last["prompt_tokens"] == PROMPT_LEN and gen.last["prefill_tokens_per_s"] > 0
    assert len(gen._decode) == 1  # one decode program for every position


def test_a_parameter_replaced_between_generations_is_followed(model):
    """The decode loop looks for replaced parameters once per generation (at its first step): a new
    parameter set between two calls is what the second one runs on, as eager would."""
    gen = compile_generator(model)
    tokens = prompt(seed=4)
    gen.generate(tokens, max_new_tokens=2)
    layer = model.layers[1].feed_forward.w2
    old = layer.weight
    try:
        with torch.no_grad():
            layer.weight = torch.nn.Parameter(old * -2.0)
        ids, logits = gen.generate(tokens, max_new_tokens=12, return_logits=True)
        ref_ids, ref_logits = eager_generate(model, tokens, 12)
        assert assert_same_greedy(ids, logits, ref_ids, ref_logits, PROMPT_LEN) >= 12
    finally:
        layer.weight = old


def test_positions_past_max_seq_len_raise_before_running(gen):
    """Every token but the last new one goes through the model and into the cache: prompt + new tokens may
    be max_seq_len + 1 (the last token comes from the logits of position max_seq_len - 1), not more."""
    before = gen.stats
    with pytest.raises(ValueError, match=r"cache position 128, past max_seq_len=128"):
        gen.generate(prompt(), max_new_tokens=TINY.max_seq_len - PROMPT_LEN + 2)
    with pytest.raises(ValueError, match=r"cache position 128, past max_seq_len=128"):
        gen.generate(prompt(length=TINY.max_seq_len), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"129-token prompt.*past max_seq_len=128"):
        gen.generate(prompt(length=TINY.max_seq_len + 1), max_new_tokens=1)
    assert gen.stats == before  # nothing compiled, nothing ran
    assert gen.generate(prompt(), max_new_tokens=TINY.max_seq_len - PROMPT_LEN).shape[1] == TINY.max_seq_len


def test_a_full_length_prompt_still_gives_its_one_new_token(model):
    """A prompt of exactly max_seq_len tokens: its next token comes from the prompt pass (no cache row for
    it is needed); so do the last of a prompt + new tokens that end at max_seq_len + 1."""
    gen = compile_generator(model, max_seq_len=12, backend="reference")
    ids = prompt(length=12)
    got, logits = gen.generate(ids, max_new_tokens=1, return_logits=True)
    want, want_logits = eager_generate(model, ids, max_new_tokens=1, max_seq_len=12)
    assert got.shape == (1, 13) and torch.equal(got, want)
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)
    got = gen.generate(prompt(length=4), max_new_tokens=9)  # cache positions 0..11
    assert got.shape == (1, 13) and torch.equal(got, eager_generate(model, prompt(length=4), 9, 12)[0])


@pytest.mark.parametrize("top_k", [0, -3, 2.5])
def test_top_k_must_be_a_positive_count(gen, top_k):
    with pytest.raises(ValueError, match=f"top_k must be a positive.*{top_k}"):
        gen.generate(prompt(), max_new_tokens=3, temperature=0.8, seed=0, top_k=top_k)


def test_bad_prompts_are_clear_errors(gen):
    with pytest.raises(ValueError, match="token ids in 0..96"):
        gen.generate(torch.tensor([[1, 97]]), max_new_tokens=2)
    with pytest.raises(TypeError, match="integer token ids"):
        gen.generate(torch.ones(1, 4), max_new_tokens=2)
    with pytest.raises(ValueError, match="at least 1"):
        gen.generate(prompt(), max_new_tokens=0)
    with pytest.raises(ValueError, match="max_seq_len must be in 1..128"):
        compile_generator(random_model(TINY), max_seq_len=129, backend="reference")


def test_sampling_is_reproducible_with_a_seed_and_one_dim_prompts_stay_one_dim(gen):
    tokens = prompt(seed=4)[0]
    a = gen.generate(tokens, max_new_tokens=12, temperature=0.9, seed=7, top_k=20)
    b = gen.generate(tokens, max_new_tokens=12, temperature=0.9, seed=7, top_k=20)
    assert a.shape == (PROMPT_LEN + 12,) and torch.equal(a, b)


def test_stop_token_ends_generation(model, gen):
    ids = gen.generate(prompt(), max_new_tokens=20)
    stop = int(ids[0, PROMPT_LEN + 3])
    first = next(i for i in range(PROMPT_LEN, ids.shape[1]) if int(ids[0, i]) == stop)
    stopped = gen.generate(prompt(), max_new_tokens=20, stop_token=stop)
    assert torch.equal(stopped, ids[:, :first + 1])


def test_batch_and_prompt_buckets_match_eager(model):
    """Two prompts at once, padded to a bucket: one prefill program serves two prompt lengths."""
    gen = compile_generator(model, backend="reference", prompt_buckets=(16,), batch=2)
    for length in (5, 11):
        tokens = prompt(batch=2, length=length, seed=length)
        ids, logits = gen.generate(tokens, max_new_tokens=20, return_logits=True)
        ref_ids, ref_logits = eager_generate(model, tokens, 20)
        assert assert_same_greedy(ids, logits, ref_ids, ref_logits, length) >= 2
    assert gen.stats["compiles"] == 2  # one decode program, one prefill program for the bucket


def test_weights_bf16_follows_the_compiler(model):
    """bf16 logits stay within BF16_TOLERANCE of fp32 (relative to the logits' magnitude)."""
    gen16 = compile_generator(model, weights="bf16")
    tokens = prompt()
    ids, logits = gen16.generate(tokens, max_new_tokens=16, return_logits=True)
    ref_ids, ref_logits = eager_generate(model, tokens, 16)
    common = next((i for i in range(16) if ids[0, PROMPT_LEN + i] != ref_ids[0, PROMPT_LEN + i]), 16)
    error = float((logits[:, :common + 1] - ref_logits[:, :common + 1]).abs().max())
    assert error <= BF16_TOLERANCE * float(ref_logits.abs().max())


def test_unknown_weights_option_is_rejected(model):
    with pytest.raises(ValueError, match="weights must be one of fp32, bf16"):
        compile_generator(model, weights="int4")


# --- weights: safetensors and transformers --------------------------------------------------------------

@pytest.mark.parametrize("tied", [False, True])
def test_safetensors_round_trip(tmp_path, tied):
    model = random_model(TINY, seed=5, tie_embeddings=tied)
    path = save_safetensors(model, tmp_path / "model.safetensors")
    loaded = load_safetensors(path)
    assert loaded.config == TINY and loaded.tie_embeddings == tied
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
    assert "model.layers.1.self_attn.q_proj.weight" in names and "model.norm.weight" in names
    assert ("lm_head.weight" in names) != tied


def test_safetensors_errors_name_the_problem(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "partial.safetensors"
    save_file({"model.embed_tokens.weight": torch.zeros(97, 64)}, str(path))
    with pytest.raises(ValueError, match="records no config"):
        load_safetensors(path)
    with pytest.raises(ValueError, match="missing model.layers.0"):
        load_safetensors(path, config=TINY)
    with pytest.raises(ValueError, match="no safetensors weights"):
        load_safetensors(tmp_path / "absent.safetensors")


@pytest.fixture(scope="module")
def hf_model():
    transformers = pytest.importorskip("transformers")
    # The same shapes as TINY (and its norm eps), so the compiled programs are shared; no BOS/EOS, so that
    # transformers generates exactly max_new_tokens.
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                      num_key_value_heads=2, num_hidden_layers=2, vocab_size=97,
                                      max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=None,
                                      eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def test_from_hf_maps_weights_and_config(hf_model):
    model = from_hf(hf_model)
    assert model.config == TINY and not model.tie_embeddings
    tokens = prompt(length=10)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf_model(tokens).logits, rtol=0, atol=1e-5)


def test_from_hf_keeps_tied_embeddings_tied(hf_model):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(**dict(hf_model.config.to_dict(), tie_word_embeddings=True))
    tied_hf = transformers.LlamaForCausalLM(config).eval()
    model = from_hf(tied_hf)
    assert model.tie_embeddings and model.output.weight is model.tok_embeddings.weight
    tokens = prompt(length=10)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), tied_hf(tokens).logits, rtol=0, atol=1e-5)


def test_hf_checkpoint_directory_loads(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    loaded = load_safetensors(tmp_path)  # config.json beside the weights
    tokens = prompt(length=6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), hf_model(tokens).logits, rtol=0, atol=1e-5)


def test_hf_llama_greedy_matches_transformers_generate(hf_model):
    gen = compile_generator(hf_model, backend="numba")
    tokens = prompt(seed=6)
    ids, logits = gen.generate(tokens, max_new_tokens=NEW_TOKENS, return_logits=True)
    with torch.no_grad():
        ref = hf_model.generate(tokens, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True,
                                output_logits=True)
    ref_logits = torch.stack(ref.logits, dim=1)
    assert ref.sequences.shape == ids.shape
    assert assert_same_greedy(ids, logits, ref.sequences, ref_logits, PROMPT_LEN) >= 64


def test_from_hf_rejects_what_it_does_not_implement():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                      num_hidden_layers=1, vocab_size=97, attention_bias=True)
    with pytest.raises(ValueError, match="attention_bias"):
        from_hf(transformers.LlamaForCausalLM(config))
    with pytest.raises(TypeError, match="LlamaForCausalLM"):
        compile_generator(torch.nn.Linear(2, 2))


# --- the benchmark --------------------------------------------------------------------------------------

def test_eager_generator_is_the_reference_path(model):
    """The KV-cache path (Prefill + DecodeStep, uncompiled) gives the tokens of recomputing the whole
    sequence with the model's own forward at every step (no cache), the definition of greedy decoding."""
    tokens = prompt()
    eager = eager_generator(model)
    ids = eager.generate(tokens, max_new_tokens=6)
    want = tokens
    with torch.no_grad():
        for _ in range(6):
            want = torch.cat([want, model(want)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(ids, want) and eager.stats["compiles"] == 2


def test_bench_generate_smoke(tmp_path, monkeypatch):
    """`fusec bench generate tiny` end to end on the reference backend with a few tokens (the machine's
    bandwidth read on a small array: its field is checked, not its figure)."""
    from fusec import benchtools
    from fusec.cli import main
    monkeypatch.setattr(benchtools, "measure_memory_bandwidth",
                        functools.partial(benchtools.measure_memory_bandwidth, 8 << 20))
    out = tmp_path / "bench"
    argv = ["bench", "generate", "tiny", "--prompt-len", "4", "--new-tokens", "6", "--repeat", "1",
            "--backend", "reference", "--no-torch-compile", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "bench_generate.json").read_text())
    rows = {row["implementation"]: row for row in report["results"]}
    assert set(rows) == {"eager", "torch.compile", "fusec fp32", "fusec bf16", "fusec int8"}
    for name in ("eager", "fusec fp32", "fusec int8"):
        row = rows[name]
        assert row["status"] == "ok" and row["decode_tokens_per_s"] > 0 and row["prefill_tokens_per_s"] > 0
        assert 0 < row["roofline_fraction"] and row["new_tokens"] == 6
    assert rows["fusec fp32"]["tokens_match_eager"] == 6
    assert rows["torch.compile"]["status"] == "skipped"
    assert report["machine"]["bandwidth"]["best"] > 0 and report["presets"]["tiny"]["weight_bytes_fp32"] > 0
    sizes = report["presets"]["tiny"]  # int8's roofline counts 1.125 bytes per weight (its block scales)
    assert sizes["weight_bytes_int8"] == pytest.approx(sizes["weight_bytes_fp32"] * 1.125 / 4, abs=1)
    assert (out / "bench_generate.png").exists() or importlib.util.find_spec("matplotlib") is None
