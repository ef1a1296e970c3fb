"""llama.cpp GGUF files, read with the `gguf` package: the model and the tokenizer the file embeds.

Architectures: llama (also Mistral's files), qwen2, gemma, phi3: the metadata becomes a Hugging Face
config for fusec.models.architectures, the tensors the HF Llama layout. What llama.cpp's converter did
is undone: q/k rows of "llama" files are permuted back from interleaved RoPE pairs to rotate-half;
Gemma's norm weights are already stored as 1 + w; Phi-3's fused attn_qkv and ffn_up are split.
Tensor types: F32 (memory-mapped views of the file), F16 and BF16 (converted to float32), Q8_0
(dequantized to float32, with a note: compiling with `weights="int8"` quantizes them back to the file's
own blocks of 32, exactly, since each block's largest value is 127 times its scale).

Tokenizers: "llama" (SentencePiece pieces, scores, types) as a PieceTokenizer; "gpt2" (byte-level BPE
vocab and merges) as a `tokenizers` BPE with the GPT-2 byte-level pre-tokenizer (llama.cpp's per-model
pre-tokenizer regexes, `tokenizer.ggml.pre`, are not reproduced: split points may differ on rare text).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fusec.loaders import require
from fusec.loaders.hf import load_tokenizer as hf_tokenizer
from fusec.loaders.llama2c import interleaved_to_half
from fusec.loaders.tokenize import HFTokenizer, PieceTokenizer
from fusec.models.architectures import config_from_hf, llama_layout
from fusec.models.causal_lm import load_hf_weights

ARCHS = ("llama", "qwen2", "gemma", "phi3")
TYPES = ("F32", "F16", "BF16", "Q8_0")
# GGUF tensor name -> Hugging Face name ("{i}" the block); phi3's attn_qkv / ffn_up are its fused ones
NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
         "output.weight": "lm_head.weight"}
BLOCK = {"attn_norm.weight": "input_layernorm.weight", "attn_q.weight": "self_attn.q_proj.weight",
         "attn_k.weight": "self_attn.k_proj.weight", "attn_v.weight": "self_attn.v_proj.weight",
         "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
         "attn_v.bias": "self_attn.v_proj.bias", "attn_output.weight": "self_attn.o_proj.weight",
         "ffn_norm.weight": "post_attention_layernorm.weight", "ffn_gate.weight": "mlp.gate_proj.weight",
         "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight",
         "attn_qkv.weight": "self_attn.qkv_proj.weight"}


def open_reader(path: Path):
    gguf = require("gguf", "reading GGUF files")
    try:
        return gguf.GGUFReader(str(path), "c")  # copy-on-write: F32 tensors become writable views
    except (ValueError, IndexError, OSError, KeyError) as e:
        raise ValueError(f"{path}: damaged or truncated GGUF file ({path.stat().st_size:,} bytes): {e}") from None


def metadata(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def hf_config(reader, path: Path, vocab: int, tied: bool) -> dict:
    """The Hugging Face config of the file's architecture, from its metadata."""
    arch = metadata(reader, "general.architecture")
    if arch not in ARCHS:
        raise ValueError(f"{path}: unknown architecture {arch!r}: fusec reads GGUF files of {', '.join(ARCHS)}")

    def get(key, default=None):
        value = metadata(reader, f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"{path}: no {arch}.{key} in its metadata")
        return value
    heads = get("attention.head_count")
    config = {"model_type": arch, "hidden_size": get("embedding_length"),
              "intermediate_size": get("feed_forward_length"), "num_hidden_layers": get("block_count"),
              "num_attention_heads": heads, "num_key_value_heads": get("attention.head_count_kv", heads),
              "rms_norm_eps": get("attention.layer_norm_rms_epsilon"), "rope_theta": get("rope.freq_base", 10000.0),
              "max_position_embeddings": get("context_length"), "vocab_size": vocab, "tie_word_embeddings": tied,
              "head_dim": get("attention.key_length", get("embedding_length") // heads),
              "hidden_act": "gelu_pytorch_tanh" if arch == "gemma" else "silu",
              "sliding_window": metadata(reader, f"{arch}.attention.sliding_window")}
    if get("rope.dimension_count", config["head_dim"]) != config["head_dim"]:
        config["partial_rotary_factor"] = get("rope.dimension_count") / config["head_dim"]  # refused later
    scaling = metadata(reader, f"{arch}.rope.scaling.type", "none")
    if scaling != "none" or any(t.name == "rope_freqs.weight" for t in reader.tensors):
        config["rope_scaling"] = {"rope_type": scaling if scaling != "none" else "rope_freqs"}  # refused later
    return config


def tensor(t, path: Path) -> torch.Tensor:
    """The float32 values of one GGUF tensor (a view of the file for F32)."""
    gguf = require("gguf", "reading GGUF files")
    kind = t.tensor_type.name
    if kind not in TYPES:
        raise ValueError(f"{path}: tensor {t.name} is {kind}; fusec reads {', '.join(TYPES)} GGUF tensors")
    shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions innermost first
    data = t.data if kind == "F32" else gguf.quants.dequantize(t.data, t.tensor_type)
    return torch.from_numpy(np.asarray(data).reshape(shape))


def load_model(path: Path):
    reader = open_reader(path)
    kinds = {t.tensor_type.name for t in reader.tensors}
    listed = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in listed:
        raise ValueError(f"{path}: no token_embd.weight tensor: not a language model GGUF fusec can read")
    vocab = int(listed["token_embd.weight"].shape[-1])  # GGUF lists dimensions innermost first
    hf = hf_config(reader, path, vocab, "output.weight" not in listed)
    try:  # before any tensor is converted: a file fusec cannot run fails at once
        config, tied = config_from_hf(hf)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    raw = {name: tensor(t, path) for name, t in listed.items()}
    names = dict(BLOCK, **{"ffn_up.weight": "mlp.gate_up_proj.weight"}) if hf["model_type"] == "phi3" else BLOCK
    tensors = {}
    for name, value in raw.items():
        block, _, rest = name.removeprefix("blk.").partition(".")
        if name.startswith("blk.") and block.isdigit() and rest in names:
            tensors[f"model.layers.{block}.{names[rest]}"] = value
        elif name in NAMES:
            tensors[NAMES[name]] = value
        else:
            raise ValueError(f"{path}: unexpected tensor {name} for a {hf['model_type']} model")
    if hf["model_type"] == "llama":
        for name in list(tensors):
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                heads = config.n_heads if "q_proj" in name else config.n_kv_heads
                tensors[name] = interleaved_to_half(tensors[name], heads)
    if hf["model_type"] == "phi3":
        tensors = llama_layout(hf, tensors)
    notes = [f"{kind} tensors dequantized to float32 (weights=\"int8\" keeps Q8_0 blocks as in the file)"
             for kind in sorted(kinds) if kind.startswith("Q")]
    return load_hf_weights(config, tied, tensors, copy=False), notes


def load_tokenizer(path: Path, tokenizer: Path | None = None):
    if tokenizer is not None:
        return hf_tokenizer(tokenizer.parent, tokenizer)
    reader = open_reader(path)
    model = metadata(reader, "tokenizer.ggml.model")
    if model is None:
        raise FileNotFoundError(f"{path} embeds no tokenizer (no tokenizer.ggml.model): pass --tokenizer")
    tokens = metadata(reader, "tokenizer.ggml.tokens")
    bos, eos = metadata(reader, "tokenizer.ggml.bos_token_id"), metadata(reader, "tokenizer.ggml.eos_token_id")
    add_bos = bool(metadata(reader, "tokenizer.ggml.add_bos_token", model == "llama"))
    if model == "llama":
        types = metadata(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
        scores = metadata(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
        control = [i for i, t in enumerate(types) if t == 3]  # CONTROL
        return PieceTokenizer(tokens, scores, bos_id=bos, eos_id=eos, space="▁", add_bos=add_bos, control=control,
                              add_prefix=bool(metadata(reader, "tokenizer.ggml.add_space_prefix", True)))
    if model == "gpt2":
        tokenizers = require("tokenizers", "the GGUF file's BPE tokenizer")
        merges = [tuple(m.split(" ", 1)) for m in metadata(reader, "tokenizer.ggml.merges") or []]
        bpe = tokenizers.models.BPE({t: i for i, t in enumerate(tokens)}, merges)
        tok = tokenizers.Tokenizer(bpe)
        tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tokenizers.decoders.ByteLevel()
        types = metadata(reader, "tokenizer.ggml.token_type") or []
        tok.add_special_tokens([tokens[i] for i, t in enumerate(types) if t == 3])
        return HFTokenizer(tok, bos, eos, add_bos=add_bos)
    raise ValueError(f"{path}: tokenizer model {model!r}; fusec reads GGUF's 'llama' and 'gpt2' tokenizers")


__all__ = ["load_model", "load_tokenizer"]
