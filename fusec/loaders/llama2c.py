"""llama2.c checkpoints (`model.bin`) and tokenizers (`tokenizer.bin`), as its export.py writes them.

Checkpoint headers (little-endian):
  legacy (version 0)  7 int32: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len; a
                      negative vocab_size means a separate classifier at the end. Then float32 weights:
                      embedding, per-layer groups (attention norms, wq, wk, wv, wo, ffn norms, w1, w2, w3),
                      final norm, the RoPE tables (unused: they derive from the config), classifier.
  version 1           uint32 magic "ak42", int32 version 1, the same 7 int32, uint8 shared_classifier,
                      zero padding to 256 bytes. Then float32: norms, embedding, wq.., w3, classifier.
(Version 2 is llama2.c's int8 export: not read; re-export with version 1.)
The weights are views of one copy-on-write memory map of the file; wq and wk are permuted from
llama2.c's interleaved RoPE pairs to the rotate-half layout the CausalLM (and transformers) use.

tokenizer.bin: int32 max_token_length, then per token float32 score, int32 length, the piece's bytes.
BOS is 1 and EOS 2, and pieces hold plain spaces (llama2.c's tokenizer export); see PieceTokenizer.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

from fusec.loaders.tokenize import PieceTokenizer
from fusec.models.causal_lm import load_hf_weights
from fusec.models.llama import LlamaConfig

MAGIC = 0x616B3432  # "ak42"
V1_HEADER_BYTES = 256
FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")


def read_header(path: Path) -> tuple[dict, int, bool]:
    """(the 7 fields, the offset of the weights, shared classifier) of a llama2.c checkpoint."""
    with open(path, "rb") as f:
        head = f.read(V1_HEADER_BYTES)
    if len(head) < 28:
        raise ValueError(f"{path}: {len(head)} bytes is too short for a llama2.c checkpoint header")
    magic, version = struct.unpack_from("<Ii", head)
    if magic == MAGIC:
        if version != 1:
            raise ValueError(f"{path}: llama2.c checkpoint version {version}; fusec reads the legacy and "
                             f"version-1 (float32) exports")
        if len(head) < V1_HEADER_BYTES:
            raise ValueError(f"{path}: truncated inside its 256-byte version-1 header")
        fields = dict(zip(FIELDS, struct.unpack_from("<7i", head, 8)))
        return fields, V1_HEADER_BYTES, bool(head[36])
    fields = dict(zip(FIELDS, struct.unpack_from("<7i", head)))
    shared = fields["vocab_size"] > 0
    fields["vocab_size"] = abs(fields["vocab_size"])
    return fields, 28, shared


def _check(path: Path, fields: dict) -> None:
    bad = {k: v for k, v in fields.items() if not 0 < v < 1 << 24}
    if bad or fields["dim"] % fields["n_heads"] or fields["n_heads"] % fields["n_kv_heads"]:
        raise ValueError(f"{path}: not a llama2.c checkpoint (legacy or version 1): its header reads "
                         f"{fields}")


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q or k projection reordered from RoPE on interleaved pairs (llama2.c, Meta, llama.cpp's
    "llama") to RoPE on halves (transformers): per head, rows 0,2,4.. then 1,3,5..."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def load_model(path: Path):
    fields, offset, shared = read_header(path)
    _check(path, fields)
    dim, hidden, layers = fields["dim"], fields["hidden_dim"], fields["n_layers"]
    heads, kv_heads, vocab, seq = fields["n_heads"], fields["n_kv_heads"], fields["vocab_size"], fields["seq_len"]
    head_dim, kv_dim = dim // heads, dim // heads * kv_heads
    shapes = {"embed": (vocab, dim), "attn_norm": (layers, dim), "wq": (layers, dim, dim),
              "wk": (layers, kv_dim, dim), "wv": (layers, kv_dim, dim), "wo": (layers, dim, dim),
              "ffn_norm": (layers, dim), "w1": (layers, hidden, dim), "w2": (layers, dim, hidden),
              "w3": (layers, hidden, dim), "norm": (dim,), "rope": (2, seq, head_dim // 2), "output": (vocab, dim)}
    if offset == V1_HEADER_BYTES:
        order = ["attn_norm", "ffn_norm", "norm", "embed", "wq", "wk", "wv", "wo", "w1", "w2", "w3"]
    else:
        order = ["embed", "attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3", "norm", "rope"]
    order += [] if shared else ["output"]
    need = offset + 4 * sum(int(np.prod(shapes[name])) for name in order)
    size = path.stat().st_size
    if size < need:
        raise ValueError(f"{path}: truncated llama2.c checkpoint: {size:,} bytes, its header ({fields}) "
                         f"needs {need:,}")
    data = np.memmap(path, dtype="<f4", mode="c", offset=offset, shape=((size - offset) // 4,))
    arrays, at = {}, 0
    for name in order:
        count = int(np.prod(shapes[name]))
        arrays[name] = torch.from_numpy(data[at:at + count].reshape(shapes[name]))
        at += count
    layer = "model.layers.{}."
    tensors = {"model.embed_tokens.weight": arrays["embed"], "model.norm.weight": arrays["norm"]}
    for i in range(layers):
        p = layer.format(i)
        tensors.update({
            p + "input_layernorm.weight": arrays["attn_norm"][i],
            p + "self_attn.q_proj.weight": interleaved_to_half(arrays["wq"][i], heads),
            p + "self_attn.k_proj.weight": interleaved_to_half(arrays["wk"][i], kv_heads),
            p + "self_attn.v_proj.weight": arrays["wv"][i], p + "self_attn.o_proj.weight": arrays["wo"][i],
            p + "post_attention_layernorm.weight": arrays["ffn_norm"][i], p + "mlp.gate_proj.weight": arrays["w1"][i],
            p + "mlp.down_proj.weight": arrays["w2"][i], p + "mlp.up_proj.weight": arrays["w3"][i]})
    if not shared:
        tensors["lm_head.weight"] = arrays["output"]
    config = LlamaConfig(dim=dim, n_heads=heads, n_kv_heads=kv_heads, hidden_dim=hidden, norm_eps=1e-5,
                         max_seq_len=seq, vocab_size=vocab, n_layers=layers)
    notes = [] if size == need else [f"{size - need:,} bytes after the weights were ignored"]
    return load_hf_weights(config, shared, tensors, copy=False), notes


def read_tokenizer(file: Path, vocab_size: int | None = None) -> PieceTokenizer:
    """llama2.c's tokenizer.bin. Its header does not say how many tokens it holds: all that follow (the
    model's vocab_size of them, when given, as run.c reads)."""
    raw = file.read_bytes()
    if len(raw) < 4:
        raise ValueError(f"{file}: too short for a llama2.c tokenizer.bin")
    pieces, scores, at = [], [], 4
    while at < len(raw) and (vocab_size is None or len(pieces) < vocab_size):
        if at + 8 > len(raw):
            raise ValueError(f"{file}: truncated in the record of token {len(pieces)}")
        score, length = struct.unpack_from("<fi", raw, at)
        if not 0 <= length <= len(raw) - at - 8:
            raise ValueError(f"{file}: token {len(pieces)} claims {length} bytes: damaged or not a tokenizer.bin")
        pieces.append(raw[at + 8:at + 8 + length].decode("utf-8", errors="replace"))
        scores.append(score)
        at += 8 + length
    if vocab_size is not None and len(pieces) < vocab_size:
        raise ValueError(f"{file}: {len(pieces)} tokens, the model has {vocab_size}: truncated or another model's")
    return PieceTokenizer(pieces, scores, bos_id=1, eos_id=2, space=" ", add_prefix=True)


def load_tokenizer(path: Path, tokenizer: Path | None = None) -> PieceTokenizer:
    file = tokenizer or path.parent / "tokenizer.bin"
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer.bin beside {path} (or pass --tokenizer): llama2.c checkpoints "
                                f"need the tokenizer.bin they were trained with")
    fields, _, _ = read_header(path)
    return read_tokenizer(file, abs(fields["vocab_size"]))


def write_tokenizer(path: str | Path, pieces: list[str], scores: list[float]) -> Path:
    """Write a tokenizer.bin (the inverse of `read_tokenizer`; what llama2.c's tokenizer export writes)."""
    encoded = [p.encode("utf-8") for p in pieces]
    out = [struct.pack("<i", max(map(len, encoded), default=0))]
    out += [struct.pack("<fi", s, len(b)) + b for s, b in zip(scores, encoded)]
    Path(path).write_bytes(b"".join(out))
    return Path(path)


__all__ = ["interleaved_to_half", "load_model", "load_tokenizer", "read_header", "read_tokenizer",
           "write_tokenizer"]
