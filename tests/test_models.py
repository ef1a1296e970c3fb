"""The built-in Llama block against independent references, and the model registry the CLI uses."""
from __future__ import annotations

import math

import pytest
import torch

from fusec.models import LlamaBlock, LlamaConfig, RMSNorm, example_inputs, list_models, load_model
from fusec.models.llama import PRESETS, init_weights
from fusec.models.registry import decode_inputs


def tiny_block(seed: int = 0) -> LlamaBlock:
    return init_weights(LlamaBlock(LlamaConfig.tiny()), seed=seed).eval()


# --- config ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, dims", [
    ("tiny", (64, 4, 2, 128, 16)),
    ("stories15M", (288, 6, 6, 768, 48)),
    ("tinyllama_1b", (2048, 32, 4, 5632, 64)),
])
def test_presets_have_the_stated_dims(name, dims):
    config = LlamaConfig.preset(name)
    assert (config.dim, config.n_heads, config.n_kv_heads, config.hidden_dim, config.head_dim) == dims
    assert config == getattr(LlamaConfig, name)()


def test_tiny_preset_is_short():
    assert LlamaConfig.tiny().max_seq_len == 128


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="tiny.*stories15M.*tinyllama_1b"):
        LlamaConfig.preset("llama-70b")


@pytest.mark.parametrize("kwargs, words", [
    (dict(dim=65, n_heads=4, n_kv_heads=2, hidden_dim=128), "dim.*n_heads.*65"),
    (dict(dim=64, n_heads=4, n_kv_heads=3, hidden_dim=128), "n_kv_heads.*3"),
])
def test_bad_config_raises_naming_expected_and_given(kwargs, words):
    with pytest.raises(ValueError, match=words):
        LlamaConfig(**kwargs)


# --- block ----------------------------------------------------------------------------------------------

def test_block_output_shape():
    (x,) = example_inputs(LlamaConfig.tiny(), batch=2, seq_len=10)
    assert x.shape == (2, 10, 64) and x.dtype == torch.float32
    assert tiny_block()(x).shape == (2, 10, 64)


def test_example_inputs_and_init_are_deterministic():
    config = LlamaConfig.tiny()
    assert torch.equal(example_inputs(config, seed=3)[0], example_inputs(config, seed=3)[0])
    assert not torch.equal(example_inputs(config, seed=3)[0], example_inputs(config, seed=4)[0])
    first, second = tiny_block(seed=1).state_dict(), tiny_block(seed=1).state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_parameter_names_and_rope_tables_stay_out_of_state_dict():
    names = set(tiny_block().state_dict())
    assert {"attention.wq.weight", "attention_norm.weight", "feed_forward.w1.weight"} <= names
    assert not any("rope" in name for name in names)


def test_norm_weights_are_not_all_ones():
    # Otherwise a backend that ignores the norm scale would pass every test.
    assert not torch.allclose(tiny_block().attention_norm.weight, torch.ones(64))


def test_rmsnorm_matches_formula():
    norm = RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 9.0))
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * torch.arange(1.0, 9.0)
    torch.testing.assert_close(norm(x), expected)


def test_causal_changing_a_later_token_leaves_earlier_outputs_alone():
    block = tiny_block()
    (x,) = example_inputs(LlamaConfig.tiny(), seq_len=12)
    changed = x.clone()
    changed[:, 8] += 1.0
    with torch.no_grad():
        before, after = block(x), block(changed)
    torch.testing.assert_close(after[:, :8], before[:, :8], rtol=0, atol=0)
    assert not torch.allclose(after[:, 8:], before[:, 8:])


def test_start_pos_beyond_max_seq_len_raises():
    (x,) = example_inputs(LlamaConfig.tiny(), seq_len=16)
    with pytest.raises(ValueError, match="start_pos=120"):
        tiny_block()(x, start_pos=120)


def rope_reference(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE via complex multiplication: channel i and channel i + d/2 form one complex number."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / theta ** (torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    rotation = torch.polar(torch.ones(len(positions), half, dtype=torch.float64),
                           positions.double()[:, None] * inv_freq)
    rotated = torch.complex(x[..., :half].double(), x[..., half:].double()) * rotation
    return torch.cat((rotated.real, rotated.imag), dim=-1)


def block_reference(block: LlamaBlock, x: torch.Tensor, start_pos: int) -> torch.Tensor:
    """The block written out in float64 with explicit loops over batch, query heads and query positions."""
    config = block.config
    weights = {name: value.double() for name, value in block.state_dict().items()}

    def rmsnorm(v, weight):
        return v / torch.sqrt((v * v).mean(-1, keepdim=True) + config.norm_eps) * weight

    x = x.double()
    seq_len, head_dim = x.shape[1], config.head_dim
    positions = torch.arange(start_pos, start_pos + seq_len)
    heads_per_kv = config.n_heads // config.n_kv_heads
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        h = rmsnorm(x[b], weights["attention_norm.weight"])
        q, k, v = (h @ weights[f"attention.{w}.weight"].T for w in ("wq", "wk", "wv"))
        head_outputs = []
        for head in range(config.n_heads):
            kv_head = head // heads_per_kv
            q_h = rope_reference(q[:, head * head_dim:(head + 1) * head_dim], positions, config.rope_theta)
            k_h = rope_reference(k[:, kv_head * head_dim:(kv_head + 1) * head_dim], positions, config.rope_theta)
            v_h = v[:, kv_head * head_dim:(kv_head + 1) * head_dim]
            rows = []
            for t in range(seq_len):  # query t sees keys 0..t only
                scores = k_h[:t + 1] @ q_h[t] / math.sqrt(head_dim)
                rows.append(torch.softmax(scores, dim=0) @ v_h[:t + 1])
            head_outputs.append(torch.stack(rows))
        attn = torch.cat(head_outputs, dim=-1) @ weights["attention.wo.weight"].T
        mid = x[b] + attn
        g = rmsnorm(mid, weights["ffn_norm.weight"])
        gate, up = g @ weights["feed_forward.w1.weight"].T, g @ weights["feed_forward.w3.weight"].T
        out[b] = mid + (torch.nn.functional.silu(gate) * up) @ weights["feed_forward.w2.weight"].T
    return out


@pytest.mark.parametrize("start_pos", [0, 5])
def test_gqa_block_matches_per_head_reference(start_pos):
    block = tiny_block(seed=7)
    (x,) = example_inputs(LlamaConfig.tiny(), batch=2, seq_len=9, seed=1)
    with torch.no_grad():
        got = block(x, start_pos=start_pos)
    torch.testing.assert_close(got.double(), block_reference(block, x, start_pos), rtol=1e-4, atol=1e-5)


def test_block_matches_transformers_decoder_layer():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama import modeling_llama

    config = LlamaConfig.tiny()
    hf_config = transformers.LlamaConfig(
        hidden_size=config.dim, num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads,
        intermediate_size=config.hidden_dim, rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta,
        max_position_embeddings=config.max_seq_len, attn_implementation="eager")
    layer = modeling_llama.LlamaDecoderLayer(hf_config, layer_idx=0).eval()
    block = tiny_block(seed=3)
    renames = {"attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
               "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
               "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
               "feed_forward.w2": "mlp.down_proj"}
    layer.load_state_dict({renames[name.rsplit(".", 1)[0]] + ".weight": value
                           for name, value in block.state_dict().items()})

    (x,) = example_inputs(config, batch=2, seq_len=10, seed=2)
    start_pos = 4
    position_ids = torch.arange(start_pos, start_pos + 10)[None].expand(2, -1)
    cos_sin = modeling_llama.LlamaRotaryEmbedding(hf_config)(x, position_ids)
    causal = torch.full((10, 10), float("-inf")).triu(1)[None, None].expand(2, 1, 10, 10)
    with torch.no_grad():
        expected = layer(x, attention_mask=causal, position_ids=position_ids, position_embeddings=cos_sin)
        got = block(x, start_pos=start_pos)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# --- past K/V (decode) ----------------------------------------------------------------------------------

@pytest.mark.parametrize("batch, past_len, new_len", [(1, 11, 1), (2, 7, 1), (2, 6, 3), (1, 0, 4)])
def test_block_with_past_matches_the_full_sequence(batch, past_len, new_len):
    # The block is causal, so the outputs of the last new_len tokens of the full sequence are exactly what
    # the block gives for those tokens with the K/V of the earlier ones passed in.
    block = tiny_block(seed=5)
    (x,) = example_inputs(LlamaConfig.tiny(), batch=batch, seq_len=past_len + new_len, seed=2)
    with torch.no_grad():
        full = block(x)
        past_k, past_v = block.kv(x[:, :past_len])
        got = block(x[:, past_len:], past_k=past_k, past_v=past_v)
        got_with_start = block(x[:, past_len:], start_pos=past_len, past_k=past_k, past_v=past_v)
    assert past_k.shape == (batch, 2, past_len, 16)
    torch.testing.assert_close(got, full[:, past_len:], rtol=0, atol=1e-5)
    torch.testing.assert_close(got_with_start, got, rtol=0, atol=0)


def test_block_with_past_matches_per_head_reference_for_the_last_token():
    block = tiny_block(seed=7)
    (x,) = example_inputs(LlamaConfig.tiny(), batch=2, seq_len=9, seed=1)
    with torch.no_grad():
        past_k, past_v = block.kv(x[:, :8])
        got = block(x[:, 8:], past_k=past_k, past_v=past_v)
    expected = block_reference(block, x, start_pos=0)[:, 8:]
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)


def test_past_keys_change_the_output():
    block = tiny_block()
    (x,), past = decode_inputs(LlamaConfig.tiny(), past_len=5)
    with torch.no_grad():
        before = block(x, **past)
        after = block(x, past_k=past["past_k"] + 1.0, past_v=past["past_v"])
    assert not torch.allclose(before, after)


def test_start_pos_conflicting_with_past_raises():
    block = tiny_block()
    (x,), past = decode_inputs(LlamaConfig.tiny(), past_len=5)
    with pytest.raises(ValueError, match="start_pos must be 5.*given start_pos=3"):
        block(x, start_pos=3, **past)


@pytest.mark.parametrize("make_kwargs, words", [
    (lambda k, v: {"past_k": k}, "together"),
    (lambda k, v: {"past_v": v}, "together"),
    (lambda k, v: {"past_k": k, "past_v": v[:, :, :4]}, r"shape.*\[1, 2, 5, 16\]"),
    (lambda k, v: {"past_k": k[:, :1], "past_v": v[:, :1]}, "n_kv_heads"),
])
def test_bad_past_raises_naming_what_was_given(make_kwargs, words):
    (x,), past = decode_inputs(LlamaConfig.tiny(), past_len=5)
    with pytest.raises(ValueError, match=words):
        tiny_block()(x, **make_kwargs(past["past_k"], past["past_v"]))


def test_past_beyond_max_seq_len_raises():
    (x,) = example_inputs(LlamaConfig.tiny(), seq_len=2)
    past_k = past_v = torch.zeros(1, 2, 127, 16)
    with pytest.raises(ValueError, match="start_pos=127"):
        tiny_block()(x, past_k=past_k, past_v=past_v)


def test_decode_inputs_shapes_and_determinism():
    config = LlamaConfig.tiny()
    (x,), past = decode_inputs(config, past_len=6, batch=2, seed=3)
    assert x.shape == (2, 1, 64) and set(past) == {"past_k", "past_v"}
    assert past["past_k"].shape == past["past_v"].shape == (2, 2, 6, 16)
    (x_again,), past_again = decode_inputs(config, past_len=6, batch=2, seed=3)
    assert torch.equal(x, x_again) and torch.equal(past["past_v"], past_again["past_v"])
    with pytest.raises(ValueError, match="past_len"):
        decode_inputs(config, past_len=128)


# --- registry -------------------------------------------------------------------------------------------

def test_list_models_names_every_preset():
    # Presets may be added after these; the first names and their order stay fixed.
    assert list_models()[:4] == ["llama-block", "llama-block:tiny", "llama-block:stories15M",
                                 "llama-block:tinyllama_1b"]
    assert list_models() == ["llama-block"] + [f"llama-block:{name}" for name in PRESETS]


@pytest.mark.parametrize("name, dim, seq_len", [
    ("llama-block", 64, 16),
    ("llama-block:tiny", 64, 16),
    ("llama-block:stories15M", 288, 32),
    ("llama-block:tinyllama_1b", 2048, 32),
])
def test_known_names_load_in_eval_mode_and_run(name, dim, seq_len):
    module, inputs = load_model(name)
    assert not module.training
    assert isinstance(inputs, tuple) and inputs[0].shape == (1, seq_len, dim)
    with torch.no_grad():
        assert module(*inputs).shape == (1, seq_len, dim)


def test_loading_twice_gives_the_same_weights_and_inputs():
    (first, first_inputs), (second, second_inputs) = load_model("llama-block"), load_model("llama-block")
    assert torch.equal(first_inputs[0], second_inputs[0])
    assert torch.equal(first.attention.wq.weight, second.attention.wq.weight)


def test_seq_len_overrides_the_default():
    _, (x,) = load_model("llama-block:stories15M", seq_len=5)
    assert x.shape == (1, 5, 288)


def test_unknown_name_raises_listing_known_names():
    with pytest.raises(ValueError, match="llama-block:tinyllama_1b") as info:
        load_model("gpt-block")
    assert "\n" not in str(info.value)


FACTORY_FILE = """
import torch

def make():
    return torch.nn.Linear(4, 3).train(), [torch.ones(2, 4)]

not_a_function = 3

def wrong_shape():
    return torch.nn.Linear(4, 3)
"""


def test_file_factory_spec_loads(tmp_path):
    path = tmp_path / "my_model.py"
    path.write_text(FACTORY_FILE)
    module, inputs = load_model(f"{path}:make")
    assert isinstance(module, torch.nn.Linear) and not module.training
    assert isinstance(inputs, tuple) and module(*inputs).shape == (2, 3)


@pytest.mark.parametrize("make_spec, words", [
    (lambda path: f"{path.parent / 'missing.py'}:make", "does not exist"),
    (lambda path: f"{path}:absent", "no function 'absent'"),
    (lambda path: f"{path}:not_a_function", "no function 'not_a_function'"),
    (lambda path: f"{path}:wrong_shape", r"must return \(module, example_inputs\)"),
    (lambda path: f"{path}:", "factory function name"),
])
def test_bad_file_spec_raises_one_line_value_error(tmp_path, make_spec, words):
    path = tmp_path / "my_model.py"
    path.write_text(FACTORY_FILE)
    with pytest.raises(ValueError, match=words) as info:
        load_model(make_spec(path))
    assert "\n" not in str(info.value)


def test_seq_len_with_a_file_spec_raises(tmp_path):
    path = tmp_path / "my_model.py"
    path.write_text(FACTORY_FILE)
    with pytest.raises(ValueError, match="built-in"):
        load_model(f"{path}:make", seq_len=8)


def test_rope_tables_are_float64_cos_and_sin_rounded_once_to_float32():
    # torch's float32 cos/sin may differ in the last bit from one process to the next; the tables are
    # buffers folded into programs and covered by the trace cache's key, so they must be the same bytes in
    # every process: float64 cos/sin (math's, here) rounded once to float32
    import math

    import numpy as np

    from fusec.models.llama import rope_tables
    cos, sin = rope_tables(48, 256, 10000.0)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 48, 2, dtype=torch.float32) / 48))
    freqs = torch.outer(torch.arange(256, dtype=torch.float32), inv_freq)
    angles = torch.cat((freqs, freqs), dim=-1).double().flatten().tolist()
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == (256, 48)
    assert cos.flatten().tolist() == [float(np.float32(math.cos(a))) for a in angles]
    assert sin.flatten().tolist() == [float(np.float32(math.sin(a))) for a in angles]


def test_rope_tables_follow_the_default_device():
    # models are built on "meta" before their weights are loaded: the tables must be meta tensors there
    from fusec.models.llama import rope_tables
    with torch.device("meta"):
        cos, sin = rope_tables(48, 256, 10000.0)
    assert cos.device.type == sin.device.type == "meta" and cos.shape == sin.shape == (256, 48)
