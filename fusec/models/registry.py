"""Models the CLI can name: built-in ones (`llama-block`, `llama-block:<preset>`) or `path/to/file.py:factory`.

Every spec resolves to `(module, example_inputs)` with the module in eval mode, ready to trace.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from fusec.models.llama import PRESETS, LlamaBlock, LlamaConfig, example_inputs, init_weights

LLAMA_BLOCK = "llama-block"
TINY_SEQ_LEN = 16
LARGE_SEQ_LEN = 32  # long enough to exercise the causal mask, short enough that a 1B-shaped block runs fast


def list_models() -> list[str]:
    """The built-in model names `load_model` accepts (file specs come on top of these)."""
    return [LLAMA_BLOCK] + [f"{LLAMA_BLOCK}:{name}" for name in PRESETS]


def load_model(spec: str, seq_len: int | None = None) -> tuple[nn.Module, tuple]:
    """Resolve `spec` to `(module, example_inputs)`, the module in eval mode.

    `spec` is a built-in name from `list_models()` (weights seeded with 0; `seq_len` overrides the default
    example length) or `path/to/file.py:factory`, where `factory()` returns `(module, example_inputs)`.
    Raises ValueError with a one-line message for an unknown name, a missing file or a missing factory.
    """
    file_path, sep, factory_name = spec.rpartition(":")
    if sep and file_path.endswith(".py"):
        if seq_len is not None:
            raise ValueError(f"seq_len applies only to built-in models, not to the file spec {spec!r}")
        return _load_from_file(Path(file_path), factory_name)
    return _load_builtin(spec, seq_len)


def decode_inputs(config: LlamaConfig, past_len: int, batch: int = 1,
                  seed: int = 0) -> tuple[tuple[torch.Tensor], dict[str, torch.Tensor]]:
    """Inputs for one decode step of a `LlamaBlock`: `((x,), {"past_k": k, "past_v": v})`.

    x [batch, 1, dim] is the new token; k and v [batch, n_kv_heads, past_len, head_dim] stand in for the
    KV cache of `past_len` earlier tokens. All seeded standard-normal float32. Call `block(*args, **kwargs)`.
    """
    if past_len < 0 or past_len + 1 > config.max_seq_len:
        raise ValueError(f"decode_inputs: past_len must be in 0..{config.max_seq_len - 1}, given {past_len}")
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, config.dim, generator=generator, dtype=torch.float32)
    cache_shape = (batch, config.n_kv_heads, past_len, config.head_dim)
    past_k = torch.randn(cache_shape, generator=generator, dtype=torch.float32)
    past_v = torch.randn(cache_shape, generator=generator, dtype=torch.float32)
    return (x,), {"past_k": past_k, "past_v": past_v}


def _load_builtin(spec: str, seq_len: int | None) -> tuple[nn.Module, tuple]:
    if spec not in list_models():
        raise ValueError(f"unknown model {spec!r}; known models: {', '.join(list_models())} "
                         f"(or path/to/file.py:factory)")
    preset = spec.partition(":")[2] or "tiny"
    config = LlamaConfig.preset(preset)
    if seq_len is None:
        seq_len = TINY_SEQ_LEN if preset == "tiny" else LARGE_SEQ_LEN
    module = init_weights(LlamaBlock(config), seed=0).eval()
    return module, example_inputs(config, seq_len=seq_len, seed=0)


def _load_from_file(path: Path, factory_name: str) -> tuple[nn.Module, tuple]:
    if not path.is_file():
        raise ValueError(f"model file {str(path)!r} does not exist")
    if not factory_name.isidentifier():
        raise ValueError(f"model spec {str(path)}:{factory_name} needs a factory function name after the ':'")
    # Not added to sys.modules: each load runs the file afresh, so edits between loads take effect.
    module_spec = importlib.util.spec_from_file_location(f"fusec_user_model_{path.stem}", path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"cannot import model file {str(path)!r}")
    user_module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(user_module)
    factory = getattr(user_module, factory_name, None)
    if not callable(factory):
        raise ValueError(f"model file {str(path)!r} has no function {factory_name!r}")
    result = factory()
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module)):
        raise ValueError(f"{path.name}:{factory_name}() must return (module, example_inputs), "
                         f"given {type(result).__name__}")
    module, inputs = result
    return module.eval(), tuple(inputs)
