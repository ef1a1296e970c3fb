"""fusec: a dataflow-graph compiler with kernel fusion for PyTorch.

    import fusec
    fast = fusec.compile(module, example_inputs)
    fast(*inputs)
    coe = fusec.CoE(router, experts={"math": "math.safetensors", ...}, hbm_bytes=600 << 20)
"""
import importlib.util as _importlib_util
import os as _os
import sys as _sys


def _load_top_level_folders() -> None:
    """The passes and the backends live in the repository's top-level folders `passes/` and `backends/`
    (the layout shows the architecture) and install as `fusec.passes` and `fusec.backends` (setup.py's
    package_dir), so they take no global import name. Run from a source tree (an editable install, or a
    checkout on PYTHONPATH), there is no fusec/passes: load the two from the folders beside this package."""
    root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    for name in ("passes", "backends"):
        folder = _os.path.join(root, name)
        if (f"fusec.{name}" in _sys.modules or _os.path.isdir(_os.path.join(__path__[0], name))
                or not _os.path.isfile(_os.path.join(folder, "__init__.py"))):
            continue
        spec = _importlib_util.spec_from_file_location(f"fusec.{name}", _os.path.join(folder, "__init__.py"),
                                                       submodule_search_locations=[folder])
        module = _importlib_util.module_from_spec(spec)
        _sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        globals()[name] = module


_load_top_level_folders()

from fusec import models  # noqa: E402 - after the folders above are importable
from fusec.api import CompiledModule, compile  # noqa: E402
from fusec.errors import FusecError, IRError, UnsupportedOpError  # noqa: E402
from fusec.generate import compile_generator  # noqa: E402

__version__ = "0.1.0"
__all__ = ["CoE", "CompiledModule", "FusecError", "IRError", "UnsupportedOpError", "compile", "compile_generator", "models",
           "__version__"]


def __getattr__(name: str):
    if name == "CoE":  # imported on first use: serving is not needed to compile
        from fusec.coe import CoE
        return CoE
    raise AttributeError(f"module 'fusec' has no attribute {name!r}")
