"""The files of a Hugging Face checkpoint: JSON, safetensors weights (one file or the shards an index
lists) and the config fusec keeps in a safetensors file's metadata. Plain file reading, below both the
loader (`fusec.loaders.hf`) and the model that reads and writes these files (`fusec.models.causal_lm`).
"""
from __future__ import annotations

import json
from pathlib import Path

from fusec.loaders import require

CONFIG_KEY = "config"  # safetensors metadata entry fusec writes: the HF config as JSON


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
