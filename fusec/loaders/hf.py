"""Hugging Face checkpoints: a model directory (config.json, model.safetensors or shards listed in
model.safetensors.index.json, tokenizer.json) or one .safetensors file fusec wrote (`save_safetensors`
keeps the config in its metadata). Any architecture of fusec.models.architectures.
"""
from __future__ import annotations

import json
from pathlib import Path

from fusec.loaders import require
from fusec.loaders.tokenize import HFTokenizer


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: damaged JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards its index lists, else every *.safetensors."""
    if not path.is_dir():
        return [path] if path.is_file() else []
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: no weight_map of tensor names to shard files")
        files = [path / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise ValueError(f"{index} lists shards that are not in {path}: {', '.join(absent)}")
        return files
    return sorted(path.glob("*.safetensors"))


def read_tensors(files: list[Path]) -> tuple[dict, str | None]:
    """({name: tensor} of every file, the config fusec stored in a file's metadata or None). ValueError
    naming a damaged or truncated file."""
    from fusec.models.causal_lm import CONFIG_KEY
    safetensors = require("safetensors", "reading safetensors checkpoints")
    tensors, stored = {}, None
    for file in files:
        try:
            with safetensors.safe_open(str(file), framework="pt") as f:
                stored = stored or (f.metadata() or {}).get(CONFIG_KEY)
                tensors.update({name: f.get_tensor(name) for name in f.keys()})
        except (safetensors.SafetensorError, OSError, RuntimeError) as e:
            size = file.stat().st_size if file.exists() else 0
            raise ValueError(f"{file}: damaged or truncated safetensors file ({size:,} bytes): {e}") from None
    return tensors, stored


def load_safetensors(path: str | Path, config=None):
    """A CausalLM with the weights of a Hugging Face checkpoint: one `.safetensors` file or a model
    directory (sharded or not). The config is `config` (a LlamaConfig, tied if there is no
    `lm_head.weight`, or a HF config dict), else the one `save_safetensors` stored in the file, else
    `config.json` beside the weights."""
    from fusec.models.architectures import config_from_hf, llama_layout
    from fusec.models.causal_lm import load_hf_weights
    from fusec.models.llama import LlamaConfig
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
