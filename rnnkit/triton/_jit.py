"""``@triton.jit`` helpers every kernel shares (imported by the kernel modules, on first use)."""

import triton
import triton.language as tl


@triton.jit
def rsum(x, axis: tl.constexpr):
    """``tl.sum`` as ``tl.reduce`` with triton's own sum combine function. ``tl.sum`` is itself a
    ``@triton.jit`` function, defined when triton is imported, so it cannot run in the interpreter when
    triton was imported before ``TRITON_INTERPRET`` was set (pytest, torch, another library); the
    interpreter recognizes ``_sum_combine`` and reduces with numpy (a combine function of our own would
    run element by element in Python), and compiled kernels get exactly ``tl.sum``."""
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def tanh(x):
    # 2 sigmoid(2x) - 1: exact at both tails (exp overflows to inf, 1/inf = 0), no libdevice needed
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def mdot(a, b, ACC: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` with ``ACC`` accumulation; ``a`` is cast to ``b``'s (storage) dtype first, as
    cuDNN does. ``UPCAST`` (the interpreter with 16-bit weights): float32 operands instead."""
    if UPCAST:
        return tl.dot(a.to(b.dtype).to(tl.float32), b.to(tl.float32), input_precision="ieee", out_dtype=tl.float32)
    elif b.dtype == tl.float32 or b.dtype == tl.float64:
        return tl.dot(a.to(b.dtype), b, input_precision="ieee", out_dtype=ACC)
    else:
        return tl.dot(a.to(b.dtype), b, out_dtype=tl.float32)


@triton.jit
def row_norm(v0, v1, v2, v3, mask, count, eps, NUM: tl.constexpr):
    """LayerNorm without gain over the concatenation of ``NUM`` (1, 3 or 4) ``(BN, BH)`` tiles
    (padding excluded by ``mask``): returns the normalized tiles and ``rstd (BN,)``."""
    s = rsum(tl.where(mask, v0, 0.0), axis=1)
    if NUM >= 3:
        s += rsum(tl.where(mask, v1, 0.0), axis=1) + rsum(tl.where(mask, v2, 0.0), axis=1)
    if NUM == 4:
        s += rsum(tl.where(mask, v3, 0.0), axis=1)
    mean = (s / count)[:, None]
    d0 = tl.where(mask, v0 - mean, 0.0)
    d1 = tl.where(mask, v1 - mean, 0.0)
    d2 = tl.where(mask, v2 - mean, 0.0)
    d3 = tl.where(mask, v3 - mean, 0.0)
    q = rsum(d0 * d0, axis=1)
    if NUM >= 3:
        q += rsum(d1 * d1, axis=1) + rsum(d2 * d2, axis=1)
    if NUM == 4:
        q += rsum(d3 * d3, axis=1)
    rstd = 1.0 / tl.sqrt(q / count + eps)
    r = rstd[:, None]
    return d0 * r, d1 * r, d2 * r, d3 * r, rstd


@triton.jit
def row_norm_bwd(g0, g1, g2, g3, n0, n1, n2, n3, rstd, mask, count, NUM: tl.constexpr):
    """The backward of :func:`row_norm`: ``dv = rstd (g - mean(g) - n mean(g n))`` per tile."""
    s = rsum(tl.where(mask, g0, 0.0), axis=1)
    p = rsum(tl.where(mask, g0 * n0, 0.0), axis=1)
    if NUM >= 3:
        s += rsum(tl.where(mask, g1, 0.0), axis=1) + rsum(tl.where(mask, g2, 0.0), axis=1)
        p += rsum(tl.where(mask, g1 * n1, 0.0), axis=1) + rsum(tl.where(mask, g2 * n2, 0.0), axis=1)
    if NUM == 4:
        s += rsum(tl.where(mask, g3, 0.0), axis=1)
        p += rsum(tl.where(mask, g3 * n3, 0.0), axis=1)
    ms = (s / count)[:, None]
    mp = (p / count)[:, None]
    r = rstd[:, None]
    return r * (g0 - ms - n0 * mp), r * (g1 - ms - n1 * mp), r * (g2 - ms - n2 * mp), r * (g3 - ms - n3 * mp)
