"""Call a compiled kernel by its address: how a loop driver calls the kernels of its body (`driver.py`).

A driver used to take each kernel as a first-class function argument. Numba types such an argument in
Python on every call (no fast path for it) and unboxes it through two more Python calls: 0.15-0.2 ms of
CPU per call of stories15M's decode driver (5 kernels, a step of ~1.5 ms). Now the driver takes one int64
array of the kernels' native entry points, and `call_at(address, signature, *args)` calls one with Numba's
own calling convention: no wrapper, no Python, errors propagated as from any call.

An address carries no type, so the call checks its arguments against the signature the kernel was compiled
for, `signature` (a string literal in the driver's source, `signature_text` of the kernel's argument types):
a driver whose arguments would not match fails to compile, with both written out, instead of calling a
kernel with arrays it does not expect.
"""
from __future__ import annotations

from numba import types
from numba.core import errors
from numba.extending import intrinsic


def signature_text(argtypes) -> str:
    """The text `call_at` compares a call's argument types with, stable across processes and runs: an array
    as `float32[2C]` (its dtype, dimensions and layout; `ro` read-only, `u` unaligned), others as Numba
    writes them."""
    return ", ".join(f"{t.dtype}[{t.ndim}{t.layout}]{'' if t.mutable else 'ro'}{'' if t.aligned else 'u'}"
                     if isinstance(t, types.Array) else str(t) for t in argtypes)


def entry_address(overload) -> int:
    """The native entry point (Numba's calling convention) of a compiled specialization."""
    return overload.library.get_pointer_to_function(overload.fndesc.llvm_func_name)


@intrinsic
def call_at(typingctx, address, signature, *args):
    """Call the function at `address` (int64: `entry_address` of a specialization returning None) with
    `*args`, which must have the types written in `signature` (a string literal)."""
    if not isinstance(address, types.Integer) or not isinstance(signature, types.StringLiteral):
        return None
    argtypes = tuple(args)
    given = signature_text(argtypes)
    if given != signature.literal_value:
        raise errors.TypingError(f"call_at: the kernel at this address takes ({signature.literal_value}); "
                                 f"the call passes ({given})")

    def codegen(context, builder, sig, llargs):
        packed = llargs[2]
        argvals = [builder.extract_value(packed, k) for k in range(len(argtypes))]
        fnty = context.call_conv.get_function_type(types.none, argtypes)
        callee = builder.inttoptr(llargs[0], fnty.as_pointer())
        status, _ = context.call_conv.call_function(builder, callee, types.none, argtypes, argvals)
        with builder.if_then(status.is_error, likely=False):
            context.call_conv.return_status_propagate(builder, status)
        return context.get_dummy_value()

    return types.none(address, signature, types.StarArgTuple(argtypes)), codegen
