"""fusec: a dataflow-graph compiler with kernel fusion for PyTorch.

    import fusec
    fast = fusec.compile(module, example_inputs)
    fast(*inputs)
"""
from fusec import models
from fusec.api import CompiledModule, compile
from fusec.errors import FusecError, IRError, UnsupportedOpError
from fusec.generate import compile_generator

__version__ = "0.1.0"
__all__ = ["CompiledModule", "FusecError", "IRError", "UnsupportedOpError", "compile", "compile_generator", "models",
           "__version__"]
