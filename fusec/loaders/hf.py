"""Hugging Face checkpoints: a model directory (config.json, model.safetensors or shards listed in
model.safetensors.index.json, tokenizer.json) or one .safetensors file fusec wrote (`save_safetensors`
keeps the config in its metadata). Any architecture of fusec.models.architectures.
"""
from __future__ import annotations

import json
from pathlib import Path

from fusec.loaders import require
from fusec.loaders.hf_files import read_json
from fusec.loaders.tokenize import HFTokenizer
# the model side builds the CausalLM (the files it reads are `hf_files`, below both)
from fusec.models.causal_lm import load_safetensors


def load_model(path: Path):
    return load_safetensors(path), []


def load_tokenizer(path: Path, tokenizer: Path | None = None) -> HFTokenizer:
    """tokenizer.json of the directory (or `tokenizer`), with BOS/EOS ids from config.json or
    tokenizer_config.json. FileNotFoundError if there is none."""
    directory = path if path.is_dir() else path.parent
    file = tokenizer or directory / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {directory} (or pass --tokenizer): a Hugging Face "
                                f"model directory keeps its tokenizer there")
    tokenizers = require("tokenizers", "reading tokenizer.json")
    try:
        tok = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a plain Exception for a malformed file
        raise ValueError(f"{file}: not a tokenizer.json the tokenizers library can read ({e})") from None
    ids = {}
    for name in ("config.json", "generation_config.json"):
        if (directory / name).is_file():
            ids.update({k: v for k, v in read_json(directory / name).items() if k in ("bos_token_id", "eos_token_id")})
    special = read_json(directory / "tokenizer_config.json") if (directory / "tokenizer_config.json").is_file() else {}
    eos = ids.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos
    return HFTokenizer(tok, ids.get("bos_token_id"), eos, add_bos=bool(special.get("add_bos_token", False)))


__all__ = ["load_model", "load_safetensors", "load_tokenizer"]
