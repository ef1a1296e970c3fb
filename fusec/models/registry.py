"""Models the CLI can name: built-in ones (`llama-block`, `llama-block:<preset>`) or `path/to/file.py:factory`.

Every spec resolves to `(module, example_inputs)` with the module in eval mode, ready to trace.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

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
