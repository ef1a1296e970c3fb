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


@intrinsic
def view(typingctx, array, offset, shape):
    """Elements [offset, offset + prod(shape)) of the C-contiguous `array` as a C-contiguous array of `shape`
    (a tuple of integers), sharing its data: what a driver's reshapes and contiguous slices are. NumPy's
    `reshape` compiles a general routine (strides, -1, copies) into the driver, about a sixth of its compile;
    a range outside the array raises ValueError."""
    if (not isinstance(array, types.Array) or array.layout != "C" or not isinstance(offset, types.Integer)
            or not isinstance(shape, types.UniTuple) or not isinstance(shape.dtype, types.Integer)):
        return None
    out_type = types.Array(array.dtype, shape.count, "C")

    def codegen(context, builder, sig, args):
        src = context.make_array(array)(context, builder, value=args[0])
        dims = [context.cast(builder, d, shape.dtype, types.intp)
                for d in cgutils.unpack_tuple(builder, args[2], shape.count)]
        start = context.cast(builder, args[1], offset, types.intp)
        count = context.get_constant(types.intp, 1)
        for d in dims:
            count = builder.mul(count, d)
        with builder.if_then(builder.icmp_signed(">", builder.add(start, count), src.nitems), likely=False):
            context.call_conv.return_user_exc(builder, ValueError, ("view: a range outside the array",))
        strides, step = [], src.itemsize
        for d in reversed(dims):
            strides.insert(0, step)
            step = builder.mul(step, d)
        out = context.make_array(out_type)(context, builder)
        data = builder.gep(src.data, [start])
        context.populate_array(out, data=data, shape=dims, strides=strides, itemsize=src.itemsize, meminfo=None)
        return out._getvalue()

    return out_type(array, offset, shape), codegen
