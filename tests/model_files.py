"""Small model files for the loader tests, built here from one set of weights (no internet): a BPE
tokenizer trained on a few sentences, and writers of llama2.c checkpoints, tokenizer.bin and GGUF files
(with gguf's GGUFWriter) from a fusec CausalLM, in the layouts llama2.c's export and llama.cpp's
converter produce (q/k rows in interleaved-RoPE order for llama, Gemma's norms stored as 1 + w)."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch

TEXT = ["Once upon a time there was a little robot who loved to read books.",
        "The robot read every book in the library, and then it wrote its own.",
        "One day a small girl came to the library and asked the robot for a story.",
        "Numbers like 42 and 7 are fine too, and so is punctuation: yes!"] * 4
SPECIAL = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2: llama2.c's BOS is 1, EOS 2
BYTES = [f"<0x{b:02X}>" for b in range(256)]


def train_tokenizer(vocab_size: int = 400):
    """A SentencePiece-style BPE (Metaspace "▁", byte fallback) trained on TEXT with `tokenizers`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL + BYTES, show_progress=False)
    tok.train_from_iterator(TEXT, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    # the trainer takes the byte pieces only as special tokens; they are ordinary ones (decoded as bytes)
    data = json.loads(tok.to_str())
    for added in data["added_tokens"]:
        added["special"] = added["content"] in SPECIAL
    return Tokenizer.from_str(json.dumps(data))


def pieces_and_scores(tok) -> tuple[list[str], list[float], list[int]]:
    """(pieces by id, scores: each merged piece scores minus its merge's rank, token types for GGUF)."""
    vocab = tok.get_vocab()
    pieces = [None] * len(vocab)
    for piece, i in vocab.items():
        pieces[i] = piece
    merges = [a + b for a, b in (m if isinstance(m, (list, tuple)) else m.split(" ") for m in _merges(tok))]
    rank = {piece: r for r, piece in enumerate(merges)}
    scores = [-float(rank[p]) if p in rank else -1e9 for p in pieces]  # never the result of a merge
    types = [3 if p in SPECIAL[1:] else 2 if p == "<unk>" else 6 if p in BYTES else 1 for p in pieces]
    return pieces, scores, types


def _merges(tok) -> list:
    return json.loads(tok.to_str())["model"]["merges"]


def save_hf_directory(hf_model, tok, path: Path) -> Path:
    hf_model.save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    return path


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of fusec.loaders.llama2c.interleaved_to_half (what llama2.c and llama.cpp store)."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def write_llama2c(model, path: Path, version: int = 0) -> Path:
    """A llama2.c checkpoint of `model` (a CausalLM): legacy (version 0) or version-1 header."""
    c, shared = model.config, model.tie_embeddings
    layers = model.layers

    def stack(get):
        return [get(layer) for layer in layers]
    wq = stack(lambda l: half_to_interleaved(l.attention.wq.weight, c.n_heads))
    wk = stack(lambda l: half_to_interleaved(l.attention.wk.weight, c.n_kv_heads))
    groups = {"attn_norm": stack(lambda l: l.attention_norm.weight), "wq": wq, "wk": wk,
              "wv": stack(lambda l: l.attention.wv.weight), "wo": stack(lambda l: l.attention.wo.weight),
              "ffn_norm": stack(lambda l: l.ffn_norm.weight), "w1": stack(lambda l: l.feed_forward.w1.weight),
              "w2": stack(lambda l: l.feed_forward.w2.weight), "w3": stack(lambda l: l.feed_forward.w3.weight)}
    fields = [c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.max_seq_len]
    if version == 0:
        fields[5] = c.vocab_size if shared else -c.vocab_size
        header = struct.pack("<7i", *fields)
        order = [[model.tok_embeddings.weight], *(groups[k] for k in ("attn_norm", "wq", "wk", "wv", "wo",
                 "ffn_norm", "w1", "w2", "w3")), [model.norm.weight], [torch.zeros(2, c.max_seq_len, c.head_dim // 2)]]
    else:
        header = struct.pack("<Ii7iB", 0x616B3432, 1, *fields, int(shared))
        header += b"\0" * (256 - len(header))
        order = [groups["attn_norm"], groups["ffn_norm"], [model.norm.weight], [model.tok_embeddings.weight],
                 *(groups[k] for k in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"))]
    if not shared:
        order.append([model.output.weight])
    with open(path, "wb") as f:
        f.write(header)
        for group in order:
            for t in group:
                f.write(t.detach().float().numpy().astype("<f4").tobytes())
    return path


def write_gguf(model, path: Path, arch: str, tokenizer=None, qtype: str = "F32") -> Path:
    """A GGUF file of `model` (a CausalLM mapped from a transformers model of `arch`), matrices in
    `qtype` (F32, F16, BF16, Q8_0; norms and biases stay F32 as llama.cpp keeps them)."""
    import gguf
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.n_layers)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.dim)
    w.add_feed_forward_length(c.hidden_dim)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    if c.sliding_window:
        w.add_sliding_window(c.sliding_window)
    if tokenizer is not None:
        pieces, scores, types = pieces_and_scores(tokenizer)
        w.add_tokenizer_model("llama")
        w.add_token_list(pieces)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
    for name, t in gguf_tensors(model, arch).items():
        a = t.detach().float().numpy()
        if a.ndim == 1 or qtype == "F32":
            w.add_tensor(name, a)
        elif qtype == "F16":
            w.add_tensor(name, a.astype(np.float16))
        else:
            kind = getattr(gguf.GGMLQuantizationType, qtype)
            w.add_tensor(name, gguf.quants.quantize(a, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gguf_tensors(model, arch: str) -> dict:
    c = model.config
    out = {"token_embd.weight": model.tok_embeddings.weight, "output_norm.weight": model.norm.weight}
    if not model.tie_embeddings:
        out["output.weight"] = model.output.weight
    for i, l in enumerate(model.layers):
        a, f, b = l.attention, l.feed_forward, f"blk.{i}."
        wq, wk = a.wq.weight, a.wk.weight
        if arch == "llama":
            wq, wk = half_to_interleaved(wq, c.n_heads), half_to_interleaved(wk, c.n_kv_heads)
        out.update({b + "attn_norm.weight": l.attention_norm.weight, b + "ffn_norm.weight": l.ffn_norm.weight,
                    b + "attn_output.weight": a.wo.weight, b + "ffn_down.weight": f.w2.weight})
        if arch == "phi3":
            out[b + "attn_qkv.weight"] = torch.cat([wq, wk, a.wv.weight])
            out[b + "ffn_up.weight"] = torch.cat([f.w1.weight, f.w3.weight])
        else:
            out.update({b + "attn_q.weight": wq, b + "attn_k.weight": wk, b + "attn_v.weight": a.wv.weight,
                        b + "ffn_gate.weight": f.w1.weight, b + "ffn_up.weight": f.w3.weight})
        if c.qkv_bias:
            out.update({b + "attn_q.bias": a.wq.bias, b + "attn_k.bias": a.wk.bias, b + "attn_v.bias": a.wv.bias})
    return out
