"""Llama-family architectures beyond Llama (Qwen2, Mistral, Gemma, Phi-3): tiny transformers models mapped
onto fusec's CausalLM, checked against transformers' own forward and greedy `generate`."""
from __future__ import annotations

import pytest
import torch

from fusec.generate import compile_generator, eager_generate
from fusec.models.architectures import config_from_hf
from fusec.models.causal_lm import from_hf, load_safetensors
from test_generate import BF16_TOLERANCE, assert_same_greedy

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning")

VOCAB = 97
COMMON = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
              num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=128, bos_token_id=None,
              eos_token_id=None, pad_token_id=0)
# each with what sets it apart: a window shorter than the prompts and generations below, Gemma's own
# head_dim (64 / 4 heads would be 16), Qwen2's tied head
CONFIGS = {
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=8),
    "gemma": lambda: transformers.GemmaConfig(**COMMON, head_dim=32),
    "phi3": lambda: transformers.Phi3Config(**COMMON, sliding_window=10),
}


def hf_model(arch: str, seed: int = 0):
    """A tiny transformers model of `arch` with random weights; its norm weights and biases are moved off
    their initial ones and zeros, so that a mapping which dropped them would show."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[arch]()).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def tokens(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_mapped_model_matches_transformers_forward_and_greedy_in_eager(arch):
    hf = hf_model(arch)
    model = from_hf(hf)
    prompt = tokens(20)
    with torch.no_grad():
        torch.testing.assert_close(model(prompt), hf(prompt).logits, rtol=0, atol=1e-5)
        want = hf.generate(prompt, max_new_tokens=24, do_sample=False)
    assert torch.equal(eager_generate(model, prompt, 24)[0], want)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_saved_directory_loads_as_the_same_model(arch, tmp_path):
    hf = hf_model(arch)
    hf.save_pretrained(tmp_path)
    prompt = tokens(12)
    with torch.no_grad():
        torch.testing.assert_close(load_safetensors(tmp_path)(prompt), hf(prompt).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_compiled_greedy_matches_transformers_for_64_steps_at_prompt_lengths_1_7_40(arch):
    hf = hf_model(arch)
    # one prefill program (padded to 40) and one decode program serve the three prompt lengths
    gen = compile_generator(hf, backend="numba", prompt_buckets=(40,))
    for length in (1, 7, 40):
        prompt = tokens(length, seed=length)
        ids, logits = gen.generate(prompt, max_new_tokens=64, return_logits=True)
        with torch.no_grad():
            ref = hf.generate(prompt, max_new_tokens=64, do_sample=False, return_dict_in_generate=True,
                              output_logits=True)
        assert ref.sequences.shape == ids.shape
        assert assert_same_greedy(ids, logits, ref.sequences, torch.stack(ref.logits, dim=1), length) >= 64


@pytest.mark.parametrize("change, field", [
    (dict(model_type="gpt2"), "unknown architecture 'gpt2'"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling"),
    (dict(use_sliding_window=True), "use_sliding_window"),
    (dict(hidden_act="gelu"), "hidden_act"),  # a Qwen2 with a GELU gate is not a model fusec knows
])
def test_configs_it_cannot_map_are_clear_errors(change, field):
    hf = dict(CONFIGS["qwen2"]().to_dict(), **change)
    with pytest.raises(ValueError, match=field):
        config_from_hf(hf)


def test_only_llama_checkpoints_are_written(tmp_path):
    from fusec.models.causal_lm import save_safetensors
    with pytest.raises(ValueError, match="writes Llama checkpoints only.*qkv_bias"):
        save_safetensors(from_hf(hf_model("qwen2")), tmp_path / "qwen2.safetensors")
    config = transformers.LlamaConfig(**COMMON, head_dim=32)  # a head width of its own round-trips
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    path = save_safetensors(from_hf(hf), tmp_path / "llama.safetensors")
    prompt = tokens(9)
    with torch.no_grad():
        torch.testing.assert_close(load_safetensors(path)(prompt), hf(prompt).logits, rtol=0, atol=1e-5)


def test_gemma_with_the_exact_gelu_its_first_configs_name():
    config = transformers.GemmaConfig(**COMMON, head_dim=32, hidden_act="gelu")
    torch.manual_seed(0)
    hf = transformers.GemmaForCausalLM(config).eval()
    model = from_hf(hf)
    assert model.config.activation == "gelu"
    prompt = tokens(11)
    with torch.no_grad():
        torch.testing.assert_close(model(prompt), hf(prompt).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["qwen2", "gemma"])
def test_bf16_weights_stay_within_the_bf16_tolerance_of_fp32(arch):
    model = from_hf(hf_model(arch))
    prompt = tokens(7)
    ids, logits = compile_generator(model, 64, weights="bf16").generate(prompt, max_new_tokens=8,
                                                                          return_logits=True)
    ref_ids, ref_logits = eager_generate(model, prompt, 8, max_seq_len=64)
    common = next((i for i in range(8) if ids[0, 7 + i] != ref_ids[0, 7 + i]), 8)
    error = float((logits[:, :common + 1] - ref_logits[:, :common + 1]).abs().max())
    assert error <= BF16_TOLERANCE * float(ref_logits.abs().max())


def test_mapped_models_serve_as_coe_experts_bound_at_run_time():
    """Two Qwen2 models (biases on q/k/v, tied head) as experts of one CoE: each request gives the tokens
    of its expert's eager generation."""
    from coe_common import ByFirstToken

    from fusec.coe import CoE
    names = ["first", "second"]
    models = {name: from_hf(hf_model("qwen2", seed=i)) for i, name in enumerate(names)}
    coe = CoE(ByFirstToken(names), models, hbm_bytes=1 << 30, weights="fp32", max_seq_len=64,
              prompt_buckets=(16, 32))
    for name in names:
        prompt = [names.index(name), 3, 17, 42, 7, 50]   # ByFirstToken sends it to `name`
        want, _ = eager_generate(models[name], torch.tensor([prompt]), 8, max_seq_len=64)
        assert torch.equal(coe.generate(prompt, max_new_tokens=8).tokens, want[0])
