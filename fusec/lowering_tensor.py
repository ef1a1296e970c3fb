"""ATen -> fusec IR lowerings for reductions, contractions, layout and gather, and the composite ops
(softmax, layer norm) that decompose into them. Registered into `fusec.lowering.LOWERINGS`."""
from __future__ import annotations

from fusec.errors import IRError, UnsupportedOpError
from fusec.lowering import TV, _scalar_for, lowers
from fusec.symbolic import Sym


# -- reductions ---------------------------------------------------------------------------------------
@lowers("aten.sum")
def _sum(cx, x, dims=None, keepdim=False, dtype=None):
    return cx.reduce("sum", cx.tensor(x, cx.out_dtype()), dims, keepdim)


@lowers("aten.mean")
def _mean(cx, x, dims=None, keepdim=False, dtype=None):
    x = cx.tensor(x, cx.out_dtype())
    return _divide_by(cx, cx.reduce("sum", x, dims, keepdim), _count(cx, x, dims))


@lowers("aten.var")
def _var(cx, x, dims=None, correction=None, keepdim=False, unbiased=None):
    """sum((x - mean)^2) / (N - correction); `unbiased` is the older form of correction 1 or 0."""
    if correction is None:
        correction = 1 if unbiased is None or unbiased else 0
    x = cx.tensor(x, cx.out_dtype())
    count = _count(cx, x, dims)
    centered = cx.add("sub", [x, _divide_by(cx, cx.reduce("sum", x, dims, True), count)])
    squares = cx.reduce("sum", cx.add("mul", [centered, centered]), dims, keepdim)
    return _divide_by(cx, squares, count - correction)


def _count(cx, x, dims):
    """How many elements a reduction over `dims` (None or empty: all) sums: an int or a Sym."""
    t = cx.type(x)
    dims = [dims] if isinstance(dims, int) else dims
    count = 1
    for a in ({d % t.rank for d in dims} if dims else range(t.rank)):
        count *= t.shape[a]
    return count


def _divide_by(cx, total, count):
    if isinstance(count, Sym):  # known at run time: divide by a one-element iota that starts at the count
        return cx.add("div", [total, cx.add("iota", [], shape=(1,), axis=0, start=count, step=1,
                                            dtype=cx.type(total).dtype)])
    return cx.add("mul", [total, cx.tensor(1.0 / count if count else float("nan"), cx.type(total).dtype)])


@lowers("aten.amax", "aten.max")
def _amax(cx, x, dims=None, keepdim=False):
    if isinstance(dims, int):  # max.dim returns (values, indices)
        raise UnsupportedOpError("max.dim", cx.origin, "use amax/argmax")
    return cx.reduce("amax", cx.tensor(x), dims, keepdim)


@lowers("aten.amin", "aten.min")
def _amin(cx, x, dims=None, keepdim=False):
    return cx.reduce("amin", cx.tensor(x), dims, keepdim)


@lowers("aten.any")
def _any(cx, x, dims=None, keepdim=False):
    dims = [dims] if isinstance(dims, int) else dims
    return cx.reduce("amax", cx.tensor(x, "bool"), dims, keepdim)


@lowers("aten.argmax")
def _argmax(cx, x, dim=None, keepdim=False):
    x = cx.tensor(x)
    if dim is None:
        x, dim = cx.reshape(x, [-1]), 0
    return cx.reduce("argmax", x, [dim], keepdim)


@lowers("aten._softmax", "aten._log_softmax")
def _softmax(cx, x, dim, half_to_float=False):
    dt = cx.out_dtype()
    x = cx.tensor(x, dt)
    shifted = cx.add("sub", [x, cx.reduce("amax", x, [dim], True)])
    e = cx.add("exp", [shifted])
    total = cx.reduce("sum", e, [dim], True)
    if cx.current == "aten._log_softmax":
        return cx.add("sub", [shifted, cx.add("log", [total])])
    return cx.add("div", [e, total])


@lowers("aten.native_layer_norm")
def _layer_norm(cx, x, normalized_shape, weight, bias, eps):
    dt = cx.out_dtype()
    x = cx.tensor(x, dt)
    rank = cx.type(x).rank
    dims = list(range(rank - len(normalized_shape), rank))
    inv_n = cx.tensor(1.0 / _prod(normalized_shape), dt)
    mean = cx.add("mul", [cx.reduce("sum", x, dims, True), inv_n])
    centered = cx.add("sub", [x, mean])
    var = cx.add("mul", [cx.reduce("sum", cx.add("mul", [centered, centered]), dims, True), inv_n])
    rstd = cx.add("rsqrt", [cx.add("add", [var, cx.tensor(float(eps), dt)])])
    out = cx.add("mul", [centered, rstd])
    if weight is not None:
        out = cx.add("mul", [out, cx.tensor(weight, dt)])
    if bias is not None:
        out = cx.add("add", [out, cx.tensor(bias, dt)])
    return out, mean, rstd


def _prod(xs) -> int:
    n = 1
    for x in xs:
        n *= x
    return n


# -- contraction --------------------------------------------------------------------------------------
@lowers("aten.mm", "aten.bmm")  # aten.matmul: fusec.lowering_direct
def _matmul(cx, a, b):
    dt = cx.out_dtype()
    return cx.add("matmul", [cx.tensor(a, dt), cx.tensor(b, dt)])


@lowers("aten.addmm")
def _addmm(cx, bias, a, b, beta=1, alpha=1):
    if beta != 1 or alpha != 1:
        raise UnsupportedOpError(f"addmm(beta={beta}, alpha={alpha})", cx.origin)
    dt = cx.out_dtype()
    return cx.add("add", [cx.add("matmul", [cx.tensor(a, dt), cx.tensor(b, dt)]), cx.tensor(bias, dt)])


# -- layout -------------------------------------------------------------------------------------------
@lowers("aten.view", "aten._unsafe_view", "aten.reshape")
def _view(cx, x, shape):
    return cx.reshape(cx.tensor(x), shape)


@lowers("aten.unsqueeze", "aten.squeeze")
def _squeeze(cx, x, *dims):
    return cx.reshape(cx.tensor(x), cx.out_shape())


@lowers("aten.permute")
def _permute(cx, x, perm):
    x = cx.tensor(x)
    rank = cx.type(x).rank
    perm = tuple(p % rank for p in perm)
    return x if perm == tuple(range(rank)) else cx.add("permute", [x], perm=perm)


@lowers("aten.t", "aten.transpose")
def _transpose(cx, x, d0=0, d1=1):
    x = cx.tensor(x)
    rank = cx.type(x).rank
    perm = list(range(rank))
    perm[d0 % rank], perm[d1 % rank] = perm[d1 % rank], perm[d0 % rank]
    return _permute(cx, x, perm)


@lowers("aten.expand")
def _expand(cx, x, shape, implicit=False):
    x = cx.tensor(x)
    t = cx.type(x)
    lead = len(shape) - t.rank
    x = cx.reshape(x, (1,) * lead + t.shape)
    full = tuple(cx.type(x).shape[i] if s == -1 else s for i, s in enumerate(shape))
    return x if full == cx.type(x).shape else cx.add("expand", [x], shape=full)


@lowers("aten.slice")
def _slice(cx, x, dim=0, start=None, end=None, step=1):
    x = cx.tensor(x)
    t = cx.type(x)
    axis = dim % t.rank
    size = t.shape[axis]
    if any(isinstance(v, Sym) for v in (start, end, size)):
        start, stop = _symbolic_bounds(start, end, size, cx.origin)
    else:
        start, stop, _ = slice(start, end, step).indices(size)
        stop = max(stop, start)
    if (start, stop, step) == (0, size, 1):
        return x
    return cx.add("slice", [x], axis=axis, start=start, stop=stop, step=step)


def _symbolic_bounds(start, end, size, origin: str) -> tuple:
    """A slice's [start, stop) when a bound or the size is symbolic: torch.export guarantees
    0 <= start <= end for every size in the bounds (else it raised); an end past the size (a huge int)
    stops at the size. A bound that may be negative or past the size for some sizes is not supported."""
    start = 0 if start is None else start
    end = size if end is None else end
    try:
        end = end if end <= size else size  # (IRError: past the size for some sizes only)
        if start < 0 or end < start:
            raise UnsupportedOpError("slice", origin, f"bounds [{start}:{end}] of a size-{size} axis")
    except IRError as e:
        raise UnsupportedOpError("slice", origin, f"bounds [{start}:{end}] of a size-{size} axis: {e}") from e
    return start, end


@lowers("aten.arange")
def _arange(cx, start, end=None, step=1, **kwargs):
    """Only reached with a symbolic bound (constant ones fold at trace time): an iota of that length."""
    if end is None:
        start, end = 0, start
    if step != 1 or not isinstance(start, int):
        raise UnsupportedOpError("arange", cx.origin, "with a symbolic bound only arange(start, end) with step 1")
    return cx.add("iota", [], shape=(end - start,), axis=0, start=start, step=1, dtype=cx.out_dtype())


@lowers("aten.full", "aten.zeros", "aten.ones")
def _full(cx, size, value=None, **kwargs):
    """Only reached with a symbolic size (constant ones fold at trace time): a splat constant."""
    value = {"aten.zeros": 0, "aten.ones": 1}.get(cx.current, value)
    dt = cx.out_dtype()
    return TV(cx.b.const(_scalar_for(value, dt), dt, cx.out_shape()))


@lowers("aten.select")
def _select(cx, x, dim, index):
    x = cx.tensor(x)
    t = cx.type(x)
    axis = dim % t.rank
    size = t.shape[axis]
    index = (index + size if index < 0 else index) if isinstance(size, Sym) else index % size  # x[:, -1]
    sliced = _slice(cx, x, axis, index, index + 1)
    return cx.reshape(sliced, t.shape[:axis] + t.shape[axis + 1:])


@lowers("aten.split", "aten.split_with_sizes")
def _split(cx, x, sizes, dim=0):
    x = cx.tensor(x)
    total = cx.type(x).shape[dim]
    if isinstance(sizes, int):
        sizes = [min(sizes, total - s) for s in range(0, total, sizes)]
    outs, start = [], 0
    for s in sizes:
        outs.append(_slice(cx, x, dim, start, start + s))
        start += s
    return tuple(outs)


@lowers("aten.cat")
def _cat(cx, xs, dim=0):
    dt = cx.out_dtype()
    parts = [cx.tensor(x, dt) for x in xs]
    parts = [p for p in parts if cx.type(p).numel > 0 or cx.type(p).rank != 1]
    rank = cx.type(parts[0]).rank
    parts = [p for p in parts if cx.type(p).shape[dim % rank] > 0]
    return parts[0] if len(parts) == 1 else cx.add("concat", parts, axis=dim % rank)


# -- gather -------------------------------------------------------------------------------------------
@lowers("aten.embedding")
def _embedding(cx, weight, indices, padding_idx=-1, scale_grad=False, sparse=False):
    return cx.add("take", [cx.tensor(weight), cx.tensor(indices)], axis=0)


@lowers("aten.index_select")
def _index_select(cx, x, dim, index):
    x = cx.tensor(x)
    return cx.add("take", [x, cx.tensor(index)], axis=dim % cx.type(x).rank)


@lowers("aten.index")
def _index(cx, x, indices):
    given = [i for i, idx in enumerate(indices) if idx is not None]
    if len(given) != 1:
        raise UnsupportedOpError("index with several index tensors", cx.origin,
                                 f"index tensors at positions {given}; one is supported")
    x, axis = cx.tensor(x), given[0]
    index = cx.tensor(indices[axis])
    dt = cx.type(index).dtype
    if dt != "bool":  # x[i] counts a negative i from the end (embedding and index_select do not)
        size = cx.type(x).shape[axis]
        wrapped = cx.add("add", [index, cx.tensor(size, dt)])
        index = cx.add("where", [cx.add("lt", [index, cx.tensor(0, dt)]), wrapped, index])
    return cx.add("take", [x, index], axis=axis)

