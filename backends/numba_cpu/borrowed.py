"""An array at another address with the shape, strides and type of a given one: how a loop driver reaches
iteration l's weight (`driver.py`).

A driver used to take one tuple per weight of the body (the arrays of every iteration), but Numba unboxes
a tuple of arrays into long straight-line code in the driver's Python entry point that LLVM then optimizes,
superlinearly in its length: measured on a 2-core machine, 9 tuples of 6 arrays cost 1.6 s of LLVM time,
of 22 arrays 17.5 s, more than all the kernels of a tinyllama_1b layer. So the driver takes iteration 0's
array of each weight (its type and shape) and one int64 array of the data addresses of every iteration's
weights, and `borrowed(like, address)` makes iteration l's array from them: same shape and strides, no
reference of its own (the caller keeps the arrays alive for the call, see `driver.Driver.args`).
"""
from __future__ import annotations

from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


@intrinsic
def borrowed(typingctx, like, address):
    """The array `like` (any Numba array) with its data at `address` (int64), unowned."""
    if not isinstance(like, types.Array) or not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        src = context.make_array(like)(context, builder, value=args[0])
        out = context.make_array(like)(context, builder)
        data = builder.inttoptr(args[1], src.data.type)
        context.populate_array(out, data=data, shape=src.shape, strides=src.strides, itemsize=src.itemsize,
                               meminfo=None)
        return out._getvalue()

    return like(like, address), codegen
