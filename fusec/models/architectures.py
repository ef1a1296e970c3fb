"""Llama-family decoders of Hugging Face `transformers` mapped onto fusec's CausalLM by config switches.

    config, tied = config_from_hf(json.load(open("config.json")))   # any architecture in ARCHITECTURES
    tensors = llama_layout(hf_config, tensors)                       # their weights in the HF Llama names

What differs from Llama, and how it maps (LlamaConfig's switches, or the weights rewritten once at load):
  llama    the reference
  mistral  sliding-window attention            -> sliding_window
  qwen2    biases on q, k and v                -> qkv_bias (q/k/v `.bias` tensors)
  gemma    (1 + w) RMSNorm, sqrt(dim)-scaled embeddings, GELU(tanh) gate, head_dim of its own, tied head
           -> norm weights stored as 1 + w; embed_scale; activation="gelu_tanh" (or "gelu"); head_size
  phi3     fused qkv_proj and gate_up_proj     -> split into q/k/v and gate/up at load; sliding_window
Anything else a config asks for (RoPE scaling, partial rotary, Qwen2's per-layer windows, biases
elsewhere) is a ValueError naming the fields, never a silently different model.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch
from torch import Tensor

from fusec.models.llama import LlamaConfig

ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma", "phi3")
# HF hidden_act -> LlamaConfig.activation (Gemma's is GELU; transformers runs the exact one for "gelu")
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def model_type(hf: Mapping) -> str:
    """The config's model_type (or the one its `architectures` entry implies); ValueError if fusec does not
    implement it, listing the ones it does."""
    if not isinstance(hf, Mapping):
        raise ValueError(f"a model config is a JSON object of fields, given {type(hf).__name__}")
    kind = hf.get("model_type")
    if kind is None:  # a config written by hand may name only the class
        names = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                 "GemmaForCausalLM": "gemma", "Phi3ForCausalLM": "phi3"}
        kind = next((names[a] for a in hf.get("architectures") or () if a in names), None)
    if kind not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {kind or hf.get('architectures')!r}: fusec generates with "
                         f"{', '.join(ARCHITECTURES)} (Llama-family decoders)")
    return kind


def config_from_hf(hf: Mapping) -> tuple[LlamaConfig, bool]:
    """(LlamaConfig, tie_embeddings) of a Hugging Face config (`config.json` as a dict) of any architecture
    in ARCHITECTURES; ValueError naming the features the built-in CausalLM does not implement."""
    kind = model_type(hf)
    heads = hf["num_attention_heads"]
    act = hf.get("hidden_act") or hf.get("hidden_activation") or "silu"
    plain = {"rope_scaling": None, "mlp_bias": False, "partial_rotary_factor": 1.0,
             "attention_bias": False, "use_sliding_window": False}
    if kind == "qwen2":
        plain.pop("attention_bias")  # Qwen2 always has q/k/v biases; the flag is not read
    unsupported = {key: hf[key] for key, value in plain.items()
                   if hf.get(key) is not None and hf[key] != value and hf[key] != {"rope_type": "default"}}
    if act not in ACTIVATIONS or (kind == "gemma") != (act != "silu"):
        unsupported["hidden_act"] = act
    if unsupported:
        raise ValueError(f"this {kind} config uses features the built-in CausalLM does not implement: "
                         f"{unsupported}")
    dim = hf["hidden_size"]
    head_dim = hf.get("head_dim") or dim // heads
    window = hf.get("sliding_window") if kind in ("mistral", "phi3") else None
    config = LlamaConfig(dim=dim, n_heads=heads, n_kv_heads=hf.get("num_key_value_heads") or heads,
                         hidden_dim=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
                         rope_theta=hf.get("rope_theta", 10000.0),
                         max_seq_len=hf.get("max_position_embeddings", 2048),
                         vocab_size=hf["vocab_size"], n_layers=hf["num_hidden_layers"],
                         head_size=head_dim if head_dim * heads != dim else None, qkv_bias=kind == "qwen2",
                         sliding_window=window, activation=ACTIVATIONS[act],
                         # transformers multiplies by sqrt(dim) rounded to the activations' dtype (float32)
                         embed_scale=float(np.float32(math.sqrt(dim))) if kind == "gemma" else 1.0)
    return config, bool(hf.get("tie_word_embeddings", kind == "gemma"))


def llama_layout(hf: Mapping, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The weights of a checkpoint of `hf`'s architecture under the HF Llama names `load_hf_weights` takes:
    Phi-3's fused projections split, Gemma's norm weights w stored as 1 + w (what its RMSNorm multiplies
    by, computed in float32 as transformers does). Other tensors pass through untouched (no copy)."""
    kind = model_type(hf)
    if kind == "gemma":
        return {name: (1.0 + t.float()) if name.endswith("norm.weight") else t for name, t in tensors.items()}
    if kind != "phi3":
        return dict(tensors)
    heads, dim = hf["num_attention_heads"], hf["hidden_size"]
    head_dim = hf.get("head_dim") or dim // heads
    q_rows, kv_rows = heads * head_dim, (hf.get("num_key_value_heads") or heads) * head_dim
    out = {}
    for name, t in tensors.items():
        prefix = name.rpartition(".")[0].rpartition(".")[0]  # model.layers.N.self_attn / model.layers.N.mlp
        if name.endswith("self_attn.qkv_proj.weight"):
            _expect_rows(name, t, q_rows + 2 * kv_rows)
            q, k, v = torch.split(t, [q_rows, kv_rows, kv_rows])
            out.update({f"{prefix}.q_proj.weight": q, f"{prefix}.k_proj.weight": k, f"{prefix}.v_proj.weight": v})
        elif name.endswith("mlp.gate_up_proj.weight"):
            _expect_rows(name, t, 2 * hf["intermediate_size"])
            gate, up = torch.chunk(t, 2)  # transformers' Phi3MLP: gate first, then up
            out.update({f"{prefix}.gate_proj.weight": gate, f"{prefix}.up_proj.weight": up})
        else:
            out[name] = t
    return out


def _expect_rows(name: str, t: Tensor, rows: int) -> None:
    if t.dim() != 2 or t.shape[0] != rows:
        raise ValueError(f"weight {name} has shape {list(t.shape)}, expected {rows} rows for this config")


__all__ = ["ARCHITECTURES", "config_from_hf", "llama_layout", "model_type"]
