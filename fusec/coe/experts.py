"""Experts and the DDR tier: where each expert's weights live until it is needed.

An expert is a Llama causal LM of some architecture (config and tied embeddings). Its weights come from
a safetensors file (`FileExpert`: one file per expert, in the Hugging Face layout `save_safetensors`
writes, the config in the file's metadata) or from a model in memory (`ModuleExpert`). Registering a file
reads only its header, which is checked against the architecture; the tensors are read when the weight
store loads the expert, with one read of the data section into one buffer (the read releases the GIL,
so a background load overlaps generation), and viewed as tensors without another copy.

`conform` turns an expert's tensors into what a compiled program reads: its parameter names, and the
dtypes it was compiled for (bf16 matrices with weights="bf16"; small weights float32).
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import astuple, dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from fusec.errors import FusecError
from fusec.models.causal_lm import CONFIG_KEY, CausalLM, config_from_hf, config_to_hf, from_hf, hf_names
from fusec.models.llama import LlamaConfig

DTYPES = {"BF16": torch.bfloat16, "F32": torch.float32, "F16": torch.float16, "F64": torch.float64}
HEADER_LIMIT = 100 << 20  # a header past 100 MB is not a safetensors file


class ExpertError(FusecError, RuntimeError):
    """An expert that cannot serve: its file is missing or damaged, or does not fit its architecture.
    The message names the expert; the other experts keep serving."""

    def __init__(self, expert: str, problem: str):
        self.expert, self.problem = expert, problem
        super().__init__(f"expert {expert!r}: {problem}")

    def __reduce__(self):  # picklable (Ray sends it from an actor to the driver)
        return type(self), (self.expert, self.problem)


@dataclass(frozen=True, eq=False)
class Architecture:
    """What experts must share to share one compiled program (equal configs and tying)."""

    config: LlamaConfig
    tied: bool

    def _key(self) -> tuple:
        return astuple(self.config), self.tied

    def __eq__(self, other) -> bool:
        return isinstance(other, Architecture) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __str__(self) -> str:
        c = self.config
        return (f"llama dim={c.dim} layers={c.n_layers} heads={c.n_heads}/{c.n_kv_heads} hidden={c.hidden_dim} "
                f"vocab={c.vocab_size}{' tied' if self.tied else ''}")


@cache
def expected_shapes(arch: Architecture) -> dict[str, tuple[int, ...]]:
    """{Hugging Face tensor name: shape} of a model of `arch` (computed on the meta device: no memory)."""
    with torch.device("meta"):
        model = CausalLM(arch.config, arch.tied)
    params = dict(model.named_parameters(remove_duplicate=False))
    return {theirs: tuple(params[ours].shape) for ours, theirs in hf_names(arch.config, arch.tied).items()}


class FileExpert:
    """An expert in a safetensors file. The header is read and checked now; the data when `load` runs."""

    def __init__(self, name: str, path: str | os.PathLike):
        self.name, self.path = name, Path(path)
        header, self.data_start = read_header(name, self.path)
        meta = header.pop("__metadata__", None) or {}
        if CONFIG_KEY not in meta:
            raise ExpertError(name, f"{self.path} records no model config in its metadata (write expert files "
                                    f"with fusec.models.causal_lm.save_safetensors)")
        try:
            self.architecture = Architecture(*config_from_hf(json.loads(meta[CONFIG_KEY])))
        except (ValueError, KeyError, TypeError) as e:
            raise ExpertError(name, f"{self.path} has an unusable config: {e}") from None
        self.entries = header
        self.data_bytes = check_entries(name, self.path, header, self.architecture)
        if self.data_start + self.data_bytes > self.path.stat().st_size:
            raise ExpertError(name, f"{self.path} is truncated: {self.path.stat().st_size} bytes, the header "
                                    f"describes {self.data_start + self.data_bytes}")

    def new_buffer(self) -> np.ndarray:
        """A writable buffer the size of the data section, for `load`."""
        return np.frombuffer(mmap.mmap(-1, max(self.data_bytes, 1)), np.uint8)[:self.data_bytes]

    def load(self, buffer: np.ndarray | None = None) -> dict[str, Tensor]:
        """The tensors by Hugging Face name, views of one buffer the data section is read into: `buffer`
        (an evicted expert's, of the same size: memory already mapped in is four times quicker to fill
        than new pages) or a new anonymous mapping, returned to the system when the last view goes
        (malloc would keep buffers under its mmap threshold, 32 MiB, in its heap after eviction)."""
        if buffer is None or buffer.nbytes != self.data_bytes:
            buffer = self.new_buffer()
        try:
            with open(self.path, "rb") as f:
                f.seek(self.data_start)
                got = f.readinto(memoryview(buffer))
        except OSError as e:
            raise ExpertError(self.name, f"cannot read {self.path}: {e}") from None
        if got != self.data_bytes:
            raise ExpertError(self.name, f"{self.path} is truncated: read {got} of {self.data_bytes} data bytes")
        whole = torch.from_numpy(buffer)
        return {key: whole[start:end].view(DTYPES[e["dtype"]]).view(e["shape"])
                for key, e in self.entries.items() for start, end in [e["data_offsets"]]}

    def __repr__(self) -> str:
        return f"FileExpert({self.name!r}, {str(self.path)!r}, {self.architecture})"


class ModuleExpert:
    """An expert held in memory: a fusec CausalLM or a transformers LlamaForCausalLM."""

    def __init__(self, name: str, model: nn.Module):
        self.name = name
        try:
            self.model = model if isinstance(model, CausalLM) else from_hf(model)
        except TypeError as e:
            raise ExpertError(name, f"is not a Llama model: {e}") from None
        self.architecture = Architecture(self.model.config, self.model.tie_embeddings)
        self.path = None

    def load(self) -> dict[str, Tensor]:
        """The model's own tensors (nothing is read)."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        return {theirs: params[ours].detach() for ours, theirs in
                hf_names(self.architecture.config, self.architecture.tied).items()}

    def __repr__(self) -> str:
        return f"ModuleExpert({self.name!r}, {self.architecture})"


def as_expert(name: str, source) -> FileExpert | ModuleExpert:
    """An expert from a file path or a model (ExpertError for an unusable file, TypeError for anything else)."""
    if isinstance(source, (FileExpert, ModuleExpert)):
        return source
    if isinstance(source, (str, os.PathLike)):
        return FileExpert(name, source)
    if isinstance(source, nn.Module):
        return ModuleExpert(name, source)
    raise TypeError(f"expert {name!r}: expected a safetensors path or a Llama model, given {type(source).__name__}")


def read_header(name: str, path: Path) -> tuple[dict, int]:
    """(the JSON header, the offset of the data section) of a safetensors file."""
    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ExpertError(name, f"{path} is not a safetensors file (only {len(prefix)} bytes)")
            (size,) = struct.unpack("<Q", prefix)
            if size > HEADER_LIMIT:
                raise ExpertError(name, f"{path} is not a safetensors file (header size {size})")
            text = f.read(size)
    except FileNotFoundError:
        raise ExpertError(name, f"file {path} does not exist") from None
    except OSError as e:
        raise ExpertError(name, f"cannot read {path}: {e}") from None
    try:
        header = json.loads(text)
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as e:
        raise ExpertError(name, f"{path} has a damaged safetensors header ({e})") from None
    return header, 8 + size


def check_entries(name: str, path: Path, header: dict, arch: Architecture) -> int:
    """The data section's size, after checking every tensor's name, dtype, shape and extent."""
    want = expected_shapes(arch)
    missing, unexpected = sorted(set(want) - set(header)), sorted(set(header) - set(want))
    if missing or unexpected:
        raise ExpertError(name, f"{path} does not hold a model of {arch}: missing {missing[:3]}, "
                                f"unexpected {unexpected[:3]}")
    end = 0
    for key, entry in header.items():
        dtype, shape, (start, stop) = entry.get("dtype"), tuple(entry.get("shape", ())), entry.get("data_offsets")
        if dtype not in DTYPES:
            raise ExpertError(name, f"{path}: {key} has dtype {dtype}, expected one of {', '.join(DTYPES)}")
        if shape != want[key]:
            raise ExpertError(name, f"{path}: {key} has shape {list(shape)}, expected {list(want[key])}")
        nbytes = int(np.prod(shape)) * DTYPES[dtype].itemsize
        if stop - start != nbytes or start < 0:
            raise ExpertError(name, f"{path}: {key} spans bytes {start}..{stop}, expected {nbytes} bytes")
        end = max(end, stop)
    return end


def save_expert(model: CausalLM, path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write `model` as an expert file: its tensors in `dtype` (bf16 by default), its config in the metadata."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    params = dict(model.named_parameters(remove_duplicate=False))
    tensors = {theirs: params[ours].detach().to(dtype).contiguous()
               for ours, theirs in hf_names(model.config, model.tie_embeddings).items()}
    save_file(tensors, str(path), metadata={CONFIG_KEY: json.dumps(config_to_hf(model.config, model.tie_embeddings)),
                                            "format": "pt"})
    return path


def conform(expert: str, tensors: dict[str, Tensor], types: dict, names: dict[str, str]) -> dict[str, Tensor]:
    """{program parameter name: tensor} in the program's dtypes, from an expert's tensors by HF name.
    `types` is the program's {parameter name: TensorType}; `names` maps each to its HF name. A tensor
    already in the right dtype is used as it is (no copy)."""
    out = {}
    for name, want in types.items():
        t = tensors[names[name]]
        dtype = torch.bfloat16 if want.dtype == "bf16" else torch.float32
        out[name] = t if t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous()
    return out


def program_names(arch: Architecture, types: dict) -> dict[str, str]:
    """{program parameter name (the model's own name): HF name}; a tied head maps to the embedding."""
    theirs = hf_names(arch.config, arch.tied)
    if arch.tied:
        theirs = {**theirs, "output.weight": theirs["tok_embeddings.weight"]}
    unknown = sorted(set(types) - set(theirs))
    if unknown:
        raise FusecError(f"internal: the compiled program reads weights the model does not have: {unknown[:3]}")
    return {name: theirs[name] for name in types}


def nbytes(tensors: dict[str, Tensor]) -> int:
    """Bytes of distinct storage (a tied matrix counts once)."""
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors.values()}
    return sum(seen.values())
