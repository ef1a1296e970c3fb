"""A whole Llama causal language model in plain PyTorch, and the two static-shape programs that generate
with it: `Prefill` (the prompt, many tokens at once) and `DecodeStep` (one token at a runtime position).

The model is token embedding -> N decoder layers -> final RMSNorm -> LM head, with the layers' parameters
in llama2.c naming (`layers.0.attention.wq.weight`, ..., the same submodules as `LlamaBlock`). The LM head
is tied to the embedding (`output.weight is tok_embeddings.weight`) or separate.

The KV cache is static: `[n_layers, B, n_kv_heads, max_seq, head_dim]` arrays owned by the caller
(`fusec.generate.Generator`). `DecodeStep` takes the caches and the position as inputs and returns only
the new rows, so one traced program serves every position: the position is data (a gather of the RoPE
tables, an elementwise substitution of the new row, a mask of the keys after it), never a Python int.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from fusec.loaders.hf_files import CONFIG_KEY, read_json, read_tensors, weight_files
from fusec.models.architectures import config_from_hf, llama_layout
from fusec.models.llama import (Attention, FeedForward, LlamaConfig, RMSNorm, apply_rope, hidden_keys, init_weights,
                                rope_tables)


class DecoderLayer(nn.Module):
    """One pre-norm decoder layer with `LlamaBlock`'s submodules and parameter names, without its per-block
    RoPE tables (the model holds one pair for every layer)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config.dim, config.hidden_dim, config.activation)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x [B, T, dim] at the positions cos/sin [T, head_dim] describe, causal, no cache."""
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class CausalLM(nn.Module):
    """Llama causal LM. `forward(tokens [B, T]) -> logits [B, T, vocab]` over positions 0..T-1 (no cache).

    `tie_embeddings=True` shares one matrix between the embedding and the LM head (llama2.c's stories
    models do); the default is a separate head.
    """

    def __init__(self, config: LlamaConfig, tie_embeddings: bool = False):
        super().__init__()
        self.config = config
        self.tie_embeddings = tie_embeddings
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @classmethod
    def from_preset(cls, name: str, seed: int = 0, tie_embeddings: bool | None = None) -> CausalLM:
        """A preset's model (`LlamaConfig.preset(name)`) with random weights from `seed`, in eval mode.

        `tie_embeddings=None` follows the original: tied for llama2.c's `stories*` models, separate otherwise.
        """
        if tie_embeddings is None:
            tie_embeddings = name.startswith("stories")
        return random_model(LlamaConfig.preset(name), seed, tie_embeddings)

    def forward(self, tokens: Tensor) -> Tensor:
        seq_len = tokens.shape[1]
        check_length(self.config, seq_len)
        cos, sin = self.rope_cos[:seq_len], self.rope_sin[:seq_len]
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.output(self.norm(x))

    def embed(self, tokens: Tensor) -> Tensor:
        """The embeddings of `tokens`, scaled by config.embed_scale (Gemma scales them by sqrt(dim))."""
        x = self.tok_embeddings(tokens)
        return x if self.config.embed_scale == 1.0 else x * self.config.embed_scale

    def weight_bytes_per_token(self, bytes_per_weight: int = 4) -> int:
        """Bytes of weights one decode step reads: every matrix once, but only one row of the embedding
        (unless it doubles as the LM head, which reads all of it)."""
        total = sum(p.numel() for p in self.parameters())  # a tied matrix counts once
        if not self.tie_embeddings:
            total -= self.tok_embeddings.weight.numel() - self.config.dim
        return total * bytes_per_weight


def random_model(config: LlamaConfig, seed: int = 0, tie_embeddings: bool = False) -> CausalLM:
    """A `CausalLM` of `config` with deterministic random weights (`init_weights` plus the embedding)."""
    model = init_weights(CausalLM(config, tie_embeddings), seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        if not tie_embeddings:  # a tied embedding is the head, which init_weights drew already
            model.tok_embeddings.weight.copy_(torch.randn(model.tok_embeddings.weight.shape, generator=generator))
    return model.eval()


def check_length(config: LlamaConfig, length: int) -> None:
    """ValueError unless `length` tokens (positions 0..length-1) fit in config.max_seq_len."""
    if not 1 <= length <= config.max_seq_len:
        raise ValueError(f"{length} tokens do not fit a model of max_seq_len={config.max_seq_len} "
                         f"(positions 0..{config.max_seq_len - 1})")


# --- the two programs a generator compiles ----------------------------------------------------------------

def _heads(x: Tensor, n_heads: int, head_dim: int) -> Tensor:
    """[B, T, n_heads * head_dim] -> [B, n_heads, T, head_dim]."""
    batch, seq_len, _ = x.shape
    return x.view(batch, seq_len, n_heads, head_dim).transpose(1, 2)


def _attend(attention: Attention, q: Tensor, k: Tensor, v: Tensor, masked: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d), keys where `masked` is True hidden) v, then the output projection.
    q [B, H, Tq, d], k/v [B, n_kv, Tk, d]; `masked` broadcasts to [Tq, Tk]. Same form as `Attention`."""
    batch, _, seq_len, _ = q.shape
    repeats = attention.n_heads // attention.n_kv_heads
    k = k.repeat_interleave(repeats, dim=1)
    v = v.repeat_interleave(repeats, dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(attention.head_dim)
    scores = scores.masked_fill(masked, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).type_as(q)
    out = (probs @ v).transpose(1, 2).reshape(batch, seq_len, attention.n_heads * attention.head_dim)
    return attention.wo(out)


def _feed_forward(layer: DecoderLayer, h: Tensor) -> Tensor:
    return h + layer.feed_forward(layer.ffn_norm(h))


class Prefill(nn.Module):
    """The prompt program for a fixed length T: `forward(tokens [B, T]) -> (logits, k_all, v_all)`.

    k_all and v_all [n_layers, B, n_kv_heads, T, head_dim] are the keys (after RoPE) and values to store in
    rows 0..T-1 of the cache. `logits` selects what logits are computed:
    "last" the last position's [B, vocab]; "all" every position's [B, T, vocab]; "at" the position given
    by a second input, `forward(tokens, at [1] int64) -> ([B, vocab], ...)`, for a prompt padded on the
    right to T (causal attention keeps the padding from touching the real positions).
    `prompt_len=None`: T is the tokens' own length, so one (symbolic) program serves every length.
    """

    LOGITS = ("last", "all", "at")

    def __init__(self, model: CausalLM, prompt_len: int | None, logits: str = "last"):
        super().__init__()
        if logits not in self.LOGITS:
            raise ValueError(f"Prefill: logits must be one of {', '.join(self.LOGITS)}, given {logits!r}")
        if prompt_len is not None:
            check_length(model.config, prompt_len)
        self.model, self.prompt_len, self.logits = model, prompt_len, logits

    def forward(self, tokens: Tensor, at: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        model = self.model
        seq_len = tokens.shape[1] if self.prompt_len is None else self.prompt_len
        cos, sin = model.rope_cos[:seq_len], model.rope_sin[:seq_len]
        query_index = torch.arange(seq_len, device=tokens.device).view(seq_len, 1)
        causal = hidden_keys(query_index.view(1, seq_len), query_index, model.config.sliding_window)
        x = model.embed(tokens)
        keys, values = [], []
        for layer in model.layers:
            attention = layer.attention
            h = layer.attention_norm(x)
            q = apply_rope(_heads(attention.wq(h), attention.n_heads, attention.head_dim), cos, sin)
            k, v = attention.project_kv(h, cos, sin)
            keys.append(k)
            values.append(v)
            x = _feed_forward(layer, x + _attend(attention, q, k, v, causal))
        if self.logits == "last":
            x = x[:, -1, :]
        elif self.logits == "at":
            if at is None:
                raise ValueError("Prefill(logits='at') takes the position of the logits as a second input")
            x = torch.index_select(x, 1, at)[:, 0, :]
        return model.output(model.norm(x)), torch.stack(keys), torch.stack(values)


class DecodeStep(nn.Module):
    """One decode step at a runtime position, for every position with one traced program:
    `forward(token [B, 1] int64, pos [1] int64, k_cache, v_cache) -> (logits [B, vocab], k_new, v_new)`.

    The caches [n_layers, B, n_kv_heads, max_seq, head_dim] hold the keys and values of positions
    0..pos-1 (anything after them is ignored); k_new/v_new [n_layers, B, n_kv_heads, 1, head_dim] are the
    rows of position `pos`, which the caller writes into the caches. Nothing is written here: each layer
    attends to its cache with row `pos` replaced elementwise (`where(key_index == pos, new, cache)`), and
    keys after `pos` are masked (`key_index > pos`), their values zeroed: a stale row there (an earlier,
    longer sequence's, or an inf) weighs nothing, where softmax's 0 times an inf value would be nan. It
    also spares a compiled step reading those rows to look for infs (`attention_flash.decode_keys`).
    """

    def __init__(self, model: CausalLM):
        super().__init__()
        self.model = model

    def forward(self, token: Tensor, pos: Tensor, k_cache: Tensor,
                v_cache: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        model = self.model
        max_seq = k_cache.shape[3]
        cos = torch.index_select(model.rope_cos, 0, pos)  # [1, head_dim]: a gather, pos stays data
        sin = torch.index_select(model.rope_sin, 0, pos)
        key_index = torch.arange(max_seq, device=token.device).view(max_seq, 1)
        is_new = key_index == pos                      # [max_seq, 1]: the row this step writes
        stale = key_index > pos                        # [max_seq, 1]: rows after it
        after = hidden_keys(key_index.view(1, max_seq), pos, model.config.sliding_window)  # keys not to see
        x = model.embed(token)
        keys, values = [], []
        for i, layer in enumerate(model.layers):
            attention = layer.attention
            h = layer.attention_norm(x)
            q = apply_rope(_heads(attention.wq(h), attention.n_heads, attention.head_dim), cos, sin)
            k, v = attention.project_kv(h, cos, sin)   # [B, n_kv, 1, head_dim]
            keys.append(k)
            values.append(v)
            k_all = torch.where(is_new, k, k_cache[i])
            v_all = torch.where(stale, 0.0, torch.where(is_new, v, v_cache[i]))
            x = _feed_forward(layer, x + _attend(attention, q, k_all, v_all, after))
        logits = model.output(model.norm(x[:, -1, :]))
        return logits, torch.stack(keys), torch.stack(values)


def cache_shape(model: CausalLM, batch: int, max_seq_len: int) -> tuple[int, int, int, int, int]:
    """Shape of one static cache (keys or values): [n_layers, batch, n_kv_heads, max_seq_len, head_dim]."""
    config = model.config
    return (config.n_layers, batch, config.n_kv_heads, max_seq_len, config.head_dim)


def decode_example(model: CausalLM, batch: int = 1, max_seq_len: int | None = None,
                   pos: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Example inputs of `DecodeStep(model)`: (token, pos, k_cache, v_cache), the caches zero."""
    shape = cache_shape(model, batch, max_seq_len or model.config.max_seq_len)
    token = torch.zeros(batch, 1, dtype=torch.int64)
    return token, torch.tensor([pos], dtype=torch.int64), torch.zeros(shape), torch.zeros(shape)


# --- weights in the Hugging Face Llama layout -------------------------------------------------------------

# (fusec name, Hugging Face name); "{i}" is the layer index.
HF_NAMES = (
    ("tok_embeddings.weight", "model.embed_tokens.weight"),
    ("layers.{i}.attention_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("layers.{i}.attention.wq.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("layers.{i}.attention.wk.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("layers.{i}.attention.wv.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("layers.{i}.attention.wo.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("layers.{i}.feed_forward.w1.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("layers.{i}.feed_forward.w3.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("layers.{i}.feed_forward.w2.weight", "model.layers.{i}.mlp.down_proj.weight"),
    ("norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
)
HF_IGNORED = ("rotary_emb.inv_freq",)  # old checkpoints store RoPE frequencies; they derive from the config


def hf_names(config: LlamaConfig, tied: bool) -> dict[str, str]:
    """{fusec parameter name: Hugging Face name} for every parameter of a model of `config`."""
    names = {}
    for ours, theirs in HF_NAMES:
        if ours == "output.weight" and tied:
            continue  # HF leaves a tied lm_head out of the file
        layers = range(config.n_layers) if "{i}" in ours else [None]
        names.update({ours.format(i=i): theirs.format(i=i) for i in layers})
    if config.qkv_bias:  # Qwen2's q/k/v biases
        for i in range(config.n_layers):
            names.update({f"layers.{i}.attention.w{x}.bias": f"model.layers.{i}.self_attn.{x}_proj.bias"
                          for x in "qkv"})
    return names


LLAMA_SWITCHES = {"qkv_bias": False, "sliding_window": None, "embed_scale": 1.0, "activation": "silu"}  # LlamaConfig's architecture switches, at Llama's values


def config_to_hf(config: LlamaConfig, tied: bool) -> dict:
    """The Hugging Face `LlamaConfig` fields describing `config` (what `config_from_hf` reads back).
    ValueError for a config using another architecture's switches: only Llama checkpoints are written."""
    switches = {k: getattr(config, k) for k, plain in LLAMA_SWITCHES.items() if getattr(config, k) != plain}
    if switches:
        raise ValueError(f"fusec writes Llama checkpoints only; this model uses {switches} (another "
                         f"architecture's features): keep it in the format it came in")
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": config.dim,
            "intermediate_size": config.hidden_dim, "num_attention_heads": config.n_heads,
            "num_key_value_heads": config.n_kv_heads, "num_hidden_layers": config.n_layers,
            "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
            "max_position_embeddings": config.max_seq_len, "vocab_size": config.vocab_size,
            "tie_word_embeddings": tied, "hidden_act": "silu", "head_dim": config.head_dim}


def load_hf_weights(config: LlamaConfig, tied: bool, tensors: dict[str, Tensor], copy: bool = True) -> CausalLM:
    """A CausalLM of `config` holding `tensors` (HF names, any float dtype: stored as float32).
    ValueError naming the missing, unexpected or misshapen tensors.

    The model is built without weights (no random init of what the checkpoint replaces). `copy=False`
    adopts float32 tensors as they are, so views of a memory-mapped file stay views of it (loaders pass
    tensors nobody else holds); other dtypes are converted to float32 either way."""
    names = hf_names(config, tied)
    given = {k for k in tensors if not k.endswith(HF_IGNORED)}
    missing, unexpected = sorted(set(names.values()) - given), sorted(given - set(names.values()))
    if missing or unexpected:
        raise ValueError(f"weights do not match a Llama of this config: missing {_few(missing)}, "
                         f"unexpected {_few(unexpected)}")
    with torch.device("meta"):  # shapes only; every parameter is replaced below
        model = CausalLM(config, tied)
    model.rope_cos, model.rope_sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
    params = dict(model.named_parameters(remove_duplicate=False))
    for ours, theirs in names.items():
        tensor = tensors[theirs].detach()
        if tuple(tensor.shape) != tuple(params[ours].shape):
            raise ValueError(f"weight {theirs} has shape {list(tensor.shape)}, expected "
                             f"{list(params[ours].shape)} for this config")
        module_name, _, leaf = ours.rpartition(".")
        value = tensor.to(torch.float32, copy=copy)
        setattr(model.get_submodule(module_name), leaf, nn.Parameter(value))
    if tied:
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


def _few(names: list[str]) -> str:
    return "none" if not names else ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def save_safetensors(model: CausalLM, path: str | Path) -> Path:
    """Write the model's weights to `path` in the Hugging Face Llama layout (float32), its config as JSON
    in the file's metadata, so that `load_safetensors(path)` rebuilds the same model."""
    from safetensors.torch import save_file  # an optional package (the `models` extra): loaded on use
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    params = dict(model.named_parameters(remove_duplicate=False))
    tensors = {theirs: params[ours].detach().contiguous()
               for ours, theirs in hf_names(model.config, model.tie_embeddings).items()}
    metadata = {CONFIG_KEY: json.dumps(config_to_hf(model.config, model.tie_embeddings)), "format": "pt"}
    save_file(tensors, str(path), metadata=metadata)
    return path


def load_safetensors(path: str | Path, config: LlamaConfig | dict | None = None) -> CausalLM:
    """A CausalLM with the weights of a Hugging Face checkpoint: one `.safetensors` file or a model
    directory (every `*.safetensors` in it, sharded or not), of any architecture `from_hf` maps.

    The config is `config` (a LlamaConfig, tied if the file has no `lm_head.weight`, or a HF config dict),
    else the one `save_safetensors` stored in the file, else `config.json` beside the weights.
    """
    path = Path(path)
    files = weight_files(path)
    if not files:
        raise ValueError(f"no safetensors weights at {str(path)!r}" +
                         (" (pytorch_model.bin checkpoints are not read: save with safe_serialization)"
                          if path.is_dir() and any(path.glob("*.bin")) else ""))
    tensors, stored = read_tensors(files)
    beside = (path if path.is_dir() else path.parent) / "config.json"
    if isinstance(config, LlamaConfig):
        return load_hf_weights(config, "lm_head.weight" not in tensors, tensors, copy=False)
    if config is None and stored:
        config = json.loads(stored)
    elif config is None and beside.is_file():
        config = read_json(beside)
    if config is None:
        raise ValueError(f"{str(path)!r} records no config and has no config.json beside it; pass config=")
    llama, tied = config_from_hf(config)
    return load_hf_weights(llama, tied and "lm_head.weight" not in tensors, llama_layout(config, tensors),
                           copy=False)


def from_hf(hf_model: nn.Module) -> CausalLM:
    """The built-in CausalLM with the weights and config of a `transformers` causal LM of a Llama-family
    architecture (`architectures.ARCHITECTURES`: Llama, Mistral, Qwen2, Gemma, Phi-3), in float32."""
    hf_config = getattr(hf_model, "config", None)
    if hf_config is None or not hasattr(hf_config, "to_dict") or not hasattr(hf_model, "lm_head"):
        raise TypeError(f"from_hf expects a transformers causal LM (LlamaForCausalLM, MistralForCausalLM, "
                        f"...), got {type(hf_model).__name__}")
    hf = hf_config.to_dict()
    config, tied = config_from_hf(hf)
    state = hf_model.state_dict()
    tied = tied and hf_model.lm_head.weight is hf_model.model.embed_tokens.weight
    if tied:
        state.pop("lm_head.weight", None)
    return load_hf_weights(config, tied, llama_layout(hf, state))


__all__ = ["CausalLM", "DecodeStep", "DecoderLayer", "Prefill", "cache_shape", "check_length",
           "config_from_hf", "config_to_hf", "decode_example", "from_hf", "load_safetensors", "random_model",
           "save_safetensors"]
