"""Built-in models fusec compiles and tests against, and the registry the CLI resolves model names with."""
from fusec.models.llama import LlamaBlock, LlamaConfig, RMSNorm, example_inputs
from fusec.models.registry import list_models, load_model

__all__ = ["LlamaBlock", "LlamaConfig", "RMSNorm", "example_inputs", "list_models", "load_model"]
