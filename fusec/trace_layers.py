"""Tracing fusec's own generation programs through two of their layers (`fusec.expand_layers`).

torch.export's time grows with the number of decoder layers (tinyllama_1b's 22: ~3 s for the decode
step, ~7 s for the symbolic prefill, most of a cold start). `DecodeStep` and `Prefill` over a `CausalLM`
repeat one layer module built from one config, so `trace_program` traces them over a view of the model
holding its first two layers (the same parameter tensors; the example caches cut to two rows) and
expands the IR to every layer: the IR a trace of the whole model gives (the two-layer IR is kept in
`Traced.two_layers`: the build runs the passes on it, `fusec.expand_loop`). Any other module, a model of
one or two layers, or a view whose two layers do not match (`ExpandError`) is traced as it is.
FUSEC_EXPAND=0 traces every program whole (for comparing).
"""
from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any

import torch
from torch import nn

from fusec.debug import debug
from fusec.tracing import Traced, trace

EXPAND = os.environ.get("FUSEC_EXPAND", "1") != "0"


def trace_program(module: nn.Module, args: tuple, kwargs: dict | None = None, strict: bool = False,
                  dynamic: Any = None) -> Traced:
    """`fusec.tracing.trace(module, ...)`, through two layers when `module` is a DecodeStep or Prefill
    of a CausalLM of three layers or more (see the module docstring; the Traced's torch.fx graph is then
    the two-layer view's)."""
    from fusec.expand_layers import ExpandError, expand_layers
    if not isinstance(args, tuple):
        args = (args,)
    view = two_layer_view(module, args, kwargs, dynamic) if EXPAND else None
    if view is None:
        return trace(module, args, kwargs, strict=strict, dynamic=dynamic)
    view_module, view_args = view
    traced = trace(view_module, view_args, kwargs, strict=strict, dynamic=dynamic)
    tensors = dict(module.named_parameters(remove_duplicate=False))
    n_layers = module.model.config.n_layers
    try:
        two_layers = (traced.graph, n_layers, tensors)
        traced.graph, traced.two_layers = expand_layers(traced.graph, n_layers, tensors), two_layers
    except ExpandError as e:
        debug(1, f"[fusec] {type(module).__name__}: its two layers do not expand ({e}); tracing all of them")
        return trace(module, args, kwargs, strict=strict, dynamic=dynamic)
    return traced


def two_layer_view(module: nn.Module, args: tuple, kwargs: dict | None, dynamic: Any):
    """(the program over a view of its model holding layers 0 and 1, the example inputs for it), or None
    where expansion does not apply."""
    from fusec.models.causal_lm import CausalLM, DecodeStep, Prefill
    if type(module) not in (DecodeStep, Prefill) or type(module.model) is not CausalLM:
        return None  # a subclass may do anything with its layers
    model = module.model
    n_layers = len(model.layers)
    if n_layers < 3 or n_layers != model.config.n_layers or kwargs:
        return None
    if isinstance(module, DecodeStep):
        if dynamic is not None or len(args) != 4 or not all(isinstance(c, torch.Tensor) and c.dim() == 5
                                                             and c.shape[0] == n_layers for c in args[2:]):
            return None  # (the whole trace says what is wrong)
        args = args[:2] + tuple(c[:2] for c in args[2:])
    view = copy.copy(model)  # the same submodules and tensors, but two layers
    view._modules = {**model._modules, "layers": nn.ModuleList(model.layers[:2])}
    view.config = dataclasses.replace(model.config, n_layers=2)
    program = copy.copy(module)
    program._modules = {**module._modules, "model": view}
    return program, args

