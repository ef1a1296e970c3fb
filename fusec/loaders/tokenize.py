"""Tokenizers: text to token ids and back, for the formats of fusec/loaders.

Two kinds, one interface (`encode(text) -> ids` with the model's BOS when it has one, `decode(ids) -> text`
without special tokens, `vocab_size`, `bos_id`, `eos_id`):
  HFTokenizer     a `tokenizers.Tokenizer` (tokenizer.json, or one built from a GGUF file's BPE vocab)
  PieceTokenizer  SentencePiece-style pieces with scores, encoded as llama2.c's run.c and llama.cpp's SPM
                  tokenizer do: the text as characters (unknown ones as <0xXX> byte pieces), then the
                  adjacent pair whose concatenation is the best-scoring piece merged, again and again.
                  llama2.c's tokenizer.bin and GGUF's "llama" tokenizers are this kind.
`TextStream` turns the ids of a generation into text as they come (whole characters only).
"""
from __future__ import annotations

import re
from typing import Sequence

BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class HFTokenizer:
    """A `tokenizers.Tokenizer`; its post-processor adds BOS as the model was trained (tokenizer.json)."""

    def __init__(self, tokenizer, bos_id: int | None = None, eos_id: int | None = None, add_bos: bool = False):
        self.tokenizer, self.bos_id, self.eos_id, self.add_bos = tokenizer, bos_id, eos_id, add_bos
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text).ids
        if self.add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


class PieceTokenizer:
    """SentencePiece-style pieces and scores (see the module doc). `space` is the character pieces use
    for a space ("▁" in SentencePiece and GGUF, " " in llama2.c's tokenizer.bin); `add_prefix` puts one
    before the text, as SentencePiece's add_dummy_prefix. `control` ids are left out of decoded text."""

    def __init__(self, pieces: Sequence[str], scores: Sequence[float], bos_id: int | None = 1,
                 eos_id: int | None = 2, space: str = "▁", add_prefix: bool = True, add_bos: bool = True,
                 control: Sequence[int] = ()):
        self.pieces, self.scores = list(pieces), [float(s) for s in scores]
        self.bos_id, self.eos_id, self.space, self.add_prefix, self.add_bos = bos_id, eos_id, space, add_prefix, add_bos
        self.vocab_size = len(self.pieces)
        self.ids = {}
        for i, piece in enumerate(self.pieces):
            self.ids.setdefault(piece, i)  # the first of duplicate pieces, as run.c's sorted lookup finds
        self.byte_ids = {int(m.group(1), 16): i for i, p in enumerate(self.pieces) if (m := BYTE_PIECE.fullmatch(p))}
        self.control = {i for i in (*control, bos_id, eos_id) if i is not None}

    def encode(self, text: str) -> list[int]:
        ids = [self.bos_id] if self.add_bos and self.bos_id is not None else []
        if not text:
            return ids
        text = (" " + text if self.add_prefix else text).replace(" ", self.space)
        tokens = []
        for char in text:
            if char in self.ids:
                tokens.append(self.ids[char])
                continue
            for byte in char.encode("utf-8"):
                if byte not in self.byte_ids:
                    raise ValueError(f"the tokenizer has no piece for {char!r} and no byte piece <0x{byte:02X}>")
                tokens.append(self.byte_ids[byte])
        while len(tokens) > 1:  # merge the best-scoring pair (the leftmost of equals), as run.c does
            best, at = None, -1
            for i in range(len(tokens) - 1):
                merged = self.ids.get(self.pieces[tokens[i]] + self.pieces[tokens[i + 1]])
                if merged is not None and (best is None or self.scores[merged] > self.scores[best]):
                    best, at = merged, i
            if best is None:
                break
            tokens[at:at + 2] = [best]
        return ids + tokens

    def decode(self, ids: Sequence[int]) -> str:
        out = bytearray()
        for i in ids:
            if i in self.control or not 0 <= i < self.vocab_size:
                continue
            piece = self.pieces[i]
            match = BYTE_PIECE.fullmatch(piece)
            out += bytes([int(match.group(1), 16)]) if match else piece.replace(self.space, " ").encode("utf-8")
        text = out.decode("utf-8", errors="replace")
        return text[1:] if self.add_prefix and text.startswith(" ") else text


class TextStream:
    """The text of a growing list of generated ids, a piece at a time: `push(ids) -> new text`.

    Decodes the prompt and everything generated so far together (so that a tokenizer's rules about
    leading spaces see the whole text) and holds back a trailing partial UTF-8 character."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int]):
        self.tokenizer, self.ids = tokenizer, list(prompt_ids)
        self.shown = len(tokenizer.decode(self.ids))

    def push(self, ids: Sequence[int]) -> str:
        self.ids.extend(int(i) for i in ids)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # the rest of a multi-byte character comes with a later token
            return ""
        new, self.shown = text[self.shown:], len(text)
        return new


__all__ = ["HFTokenizer", "PieceTokenizer", "TextStream"]
