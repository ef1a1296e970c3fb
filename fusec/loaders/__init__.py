"""Checkpoints people have, loaded into fusec's CausalLM with their tokenizers.

    loaded = load("path/to/model")      # a Hugging Face directory, a llama2.c .bin or a .gguf file
    loaded.model, loaded.tokenizer, loaded.format, loaded.notes

Formats (fusec/loaders/<module>):
  hf       a directory with config.json and *.safetensors (one file or shards), tokenizer.json
  llama2c  llama2.c's model.bin (legacy or version-1 header, float32) with tokenizer.bin beside it
  gguf     a llama.cpp GGUF file (F32, F16, BF16, Q8_0 tensors) with the tokenizer it embeds
Float32 weights are memory-mapped (private, copy-on-write maps: the parameters are views of the file);
other dtypes are converted to float32 once. The libraries these need (safetensors, tokenizers, gguf) are
the `models` extra: `pip install 'fusec[models]'`; they are imported only when a format needs them.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, NamedTuple

FORMATS = ("hf", "llama2c", "gguf")
EXTRA = "models"


class Loaded(NamedTuple):
    model: Any          # fusec.models.causal_lm.CausalLM
    tokenizer: Any      # fusec.loaders.tokenize.Tokenizer, or None when the checkpoint has none
    format: str         # one of FORMATS
    notes: tuple        # what the user should know (a dequantized tensor type, ...)
    tokenizer_error: str = ""  # why there is no tokenizer


def require(package: str, what: str):
    """Import `package`, or ImportError naming the extra that installs it."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise ImportError(f"{what} needs the {package!r} package: pip install 'fusec[{EXTRA}]'") from None


def detect_format(path: str | Path) -> str:
    """The format of the checkpoint at `path`: from what it is (a directory) and its first bytes."""
    path = Path(path)
    if path.is_dir():
        return "hf"
    if not path.is_file():
        raise ValueError(f"no model at {str(path)!r}: expected a Hugging Face model directory, a llama2.c "
                         f".bin checkpoint or a .gguf file")
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"GGUF":
        return "gguf"
    if path.suffix == ".gguf":
        raise ValueError(f"{path}: not a GGUF file (it starts with {head!r}, not b'GGUF'): damaged or not GGUF")
    if path.suffix == ".safetensors":
        return "hf"
    return "llama2c"


def load(path: str | Path, tokenizer: str | Path | None = None) -> Loaded:
    """The model at `path` (see `detect_format`) and its tokenizer (`tokenizer` overrides where it is
    looked for). A missing tokenizer is not an error here: `Loaded.tokenizer` is None and
    `tokenizer_error` says why (generating from token ids still works)."""
    kind = detect_format(path)
    module = importlib.import_module(f"fusec.loaders.{kind}")
    model, notes = module.load_model(Path(path))
    try:
        tok = module.load_tokenizer(Path(path), Path(tokenizer) if tokenizer else None)
        error = ""
    except FileNotFoundError as e:
        tok, error = None, str(e)
    if tok is not None and tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"{path}: the tokenizer has {tok.vocab_size} tokens, more than the model's "
                         f"vocab_size={model.config.vocab_size}: they do not belong together")
    return Loaded(model, tok, kind, tuple(notes), error)


__all__ = ["FORMATS", "Loaded", "detect_format", "load", "require"]
