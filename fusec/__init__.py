"""fusec: a dataflow-graph compiler with kernel fusion for PyTorch.

    import fusec
    fast = fusec.compile(module, example_inputs)
    fast(*inputs)
    coe = fusec.CoE(router, experts={"math": "math.safetensors", ...}, hbm_bytes=600 << 20)
"""
from fusec import models
from fusec.api import CompiledModule, compile
from fusec.errors import FusecError, IRError, UnsupportedOpError
from fusec.generate import compile_generator

__version__ = "0.1.0"
__all__ = ["CoE", "CompiledModule", "FusecError", "IRError", "UnsupportedOpError", "compile", "compile_generator", "models",
           "__version__"]


def __getattr__(name: str):
    if name == "CoE":  # imported on first use: serving is not needed to compile
        from fusec.coe import CoE
        return CoE
    raise AttributeError(f"module 'fusec' has no attribute {name!r}")
