"""Elman RNN kernels (tanh or relu): ``h' = act(xp + h W_hh^T)``, ``xp = x W_ih^T + b_ih + b_hh``.
The drivers are those of rnnkit/triton/lstm.py (``PERSIST``: ``W_hh`` in the program for the
whole loop; else one step on a GEMM's product). The backward reads the saved outputs:
``tanh' = 1 - h^2``, ``relu' = [h > 0]``."""

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _common as C
from ._jit import mdot, tanh

ACT = {"rnn_tanh": 0, "rnn_relu": 1}


@triton.jit
def _act(a, RELU: tl.constexpr):
    if RELU:
        return tl.maximum(a, 0.0)
    else:
        return tanh(a)


@triton.jit
def _act_grad(y, RELU: tl.constexpr):
    """``act'(a)`` from ``y = act(a)``."""
    if RELU:
        return tl.where(y > 0.0, 1.0, 0.0)
    else:
        return 1.0 - y * y


@triton.jit
def _rnn_fwd_kernel(xp, rec, w_hh, h_in, h_out, lens, out, hs, t0, steps, N, H,
                    PERSIST: tl.constexpr, RELU: tl.constexpr, HAS_LEN: tl.constexpr,
                    BN: tl.constexpr, BH: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    rn = pid * BN + tl.arange(0, BN)
    rh = tl.arange(0, BH)
    mn = rn < N
    mh = mn[:, None] & (rh < H)[None, :]
    h = tl.load(h_in + rn[:, None] * H + rh[None, :], mask=mh, other=0.0).to(ACC)
    if HAS_LEN:
        ln = tl.load(lens + rn, mask=mn, other=0)
    if PERSIST:  # W^T (BH, BH): [k, j] = W_hh[j, k]
        w = tl.load(w_hh + rh[None, :] * H + rh[:, None], mask=(rh[:, None] < H) & (rh[None, :] < H), other=0.0)
    for s in range(steps):
        t = t0 + s
        hoff = t * N * H + rn[:, None] * H + rh[None, :]
        a = tl.load(xp + hoff, mask=mh, other=0.0).to(ACC)
        if PERSIST:
            a += mdot(h, w, ACC, UPCAST)
        else:
            a += tl.load(rec + rn[:, None] * H + rh[None, :], mask=mh, other=0.0).to(ACC)
        h2 = _act(a, RELU)
        tl.store(hs + hoff, h2, mask=mh)
        if HAS_LEN:
            h = tl.where((t < ln)[:, None], h2, h)
        else:
            h = h2
        tl.store(out + hoff, h.to(out.dtype.element_ty), mask=mh)
    tl.store(h_out + rn[:, None] * H + rh[None, :], h, mask=mh)


@triton.jit
def _rnn_bwd_kernel(dout, dh_in, dh_out, w_hh, hs, lens, da_s, t_hi, steps, N, H,
                    PERSIST: tl.constexpr, RELU: tl.constexpr, HAS_LEN: tl.constexpr,
                    BN: tl.constexpr, BH: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    rn = pid * BN + tl.arange(0, BN)
    rh = tl.arange(0, BH)
    mn = rn < N
    mh = mn[:, None] & (rh < H)[None, :]
    dh = tl.load(dh_in + rn[:, None] * H + rh[None, :], mask=mh, other=0.0).to(ACC)
    if HAS_LEN:
        ln = tl.load(lens + rn, mask=mn, other=0)
    if PERSIST:  # W (BH, BH)
        w = tl.load(w_hh + rh[:, None] * H + rh[None, :], mask=(rh[:, None] < H) & (rh[None, :] < H), other=0.0)
    for s in range(steps):
        t = t_hi - s
        hoff = t * N * H + rn[:, None] * H + rh[None, :]
        dh += tl.load(dout + hoff, mask=mh, other=0.0).to(ACC)
        y = tl.load(hs + hoff, mask=mh, other=0.0)
        da = dh * _act_grad(y, RELU)
        if HAS_LEN:
            valid = (t < ln)[:, None]
            da = tl.where(valid, da, 0.0)
        tl.store(da_s + hoff, da, mask=mh)
        if PERSIST:
            dhp = mdot(da, w, ACC, UPCAST)
        else:
            dhp = dh * 0.0
        if HAS_LEN:
            dh = tl.where(valid, dhp, dh)
        else:
            dh = dhp
    tl.store(dh_out + rn[:, None] * H + rh[None, :], dh, mask=mh)


def _blocks(H: int, N: int, persist: bool, dtype: torch.dtype):
    BH = C.block(H)
    if persist:
        BN = C.MIN_DOT
        C.check_dot_block(BN, BH, BH, dtype)
    else:
        BN = C.rows_per_program(BH)
    return BN, BH, triton.cdiv(N, BN)


def rnn_forward(xp: Tensor, w_hh: Tensor, h0: Tensor, lengths: Optional[Tensor], act: int, driver: int) -> List[Tensor]:
    L, N, H = xp.shape
    sd = C.state_dtype(xp.dtype)
    persist = driver == 0
    BN, BH, grid = _blocks(H, N, persist, xp.dtype)
    xp = xp.contiguous()
    out = xp.new_empty(L, N, H)
    hs = xp.new_empty(L, N, H, dtype=sd)
    hbuf = h0.to(sd).contiguous().clone()
    lens = C.lengths_arg(lengths, xp)
    w_hh = w_hh.contiguous()
    flags = dict(RELU=act == 1, HAS_LEN=lengths is not None, BN=BN, BH=BH, UPCAST=C.upcast_dots(xp.dtype),
                 ACC=C.acc_dtype(xp.dtype))
    if L > 0 and persist:
        _rnn_fwd_kernel[(grid,)](xp, xp, w_hh, hbuf, hbuf, lens, out, hs, 0, L, N, H, PERSIST=True, **flags)
    elif L > 0:
        rec = xp.new_empty(N, H, dtype=sd)
        w_rec = C.rec_weight(w_hh)

        def step_loop():
            for t in range(L):
                C.rec_mm(hbuf.to(w_hh.dtype), w_rec, rec)
                _rnn_fwd_kernel[(grid,)](xp, rec, w_hh, hbuf, hbuf, lens, out, hs, t, 1, N, H, PERSIST=False, **flags)

        C.run_steps(step_loop, xp.device)
    return [out, hbuf.to(xp.dtype), hs]


def rnn_backward(grad_out, grad_hn, xp, w_hh, h0, lengths, act, driver, out, hs):
    L, N, H = xp.shape
    sd = C.state_dtype(xp.dtype)
    persist = driver == 0
    BN, BH, grid = _blocks(H, N, persist, xp.dtype)
    grad_out = grad_out.contiguous()
    dh = grad_hn.to(sd).contiguous().clone()
    da = xp.new_empty(L, N, H, dtype=sd)
    lens = C.lengths_arg(lengths, xp)
    w_hh = w_hh.contiguous()
    flags = dict(RELU=act == 1, HAS_LEN=lengths is not None, BN=BN, BH=BH, UPCAST=C.upcast_dots(xp.dtype),
                 ACC=C.acc_dtype(xp.dtype))
    if persist:
        _rnn_bwd_kernel[(grid,)](grad_out, dh, dh, w_hh, hs, lens, da, L - 1, L, N, H, PERSIST=True, **flags)
    else:
        w32 = w_hh.to(sd)

        def step_loop():
            for t in range(L - 1, -1, -1):
                _rnn_bwd_kernel[(grid,)](grad_out, dh, dh, w_hh, hs, lens, da, t, 1, N, H, PERSIST=False, **flags)
                dh.addmm_(da[t], w32)

        C.run_steps(step_loop, xp.device)
    dw = (da.reshape(L * N, H).t() @ C.hprev(h0, out).reshape(L * N, H)).to(w_hh.dtype)
    return [da.to(xp.dtype), dw, dh.to(h0.dtype)]


def _fake_fwd(xp, w_hh, h0, lengths, act, driver):
    L, N, H = xp.shape
    return xp.new_empty(L, N, H), xp.new_empty(N, H), xp.new_empty(L, N, H, dtype=C.state_dtype(xp.dtype))


@C.custom_op("rnn_fwd", _fake_fwd)
def rnn_fwd(xp: Tensor, w_hh: Tensor, h0: Tensor, lengths: Optional[Tensor], act: int, driver: int
            ) -> Tuple[Tensor, Tensor, Tensor]:
    """One Elman RNN layer-direction on ``xp (L, N, H)``: ``(out, h_n, saved)``; ``act`` 0 tanh, 1 relu."""
    return tuple(rnn_forward(xp, w_hh, h0, lengths, act, driver))


def _fake_bwd(grad_out, grad_hn, xp, w_hh, h0, lengths, act, driver, out, hs):
    return xp.new_empty(xp.shape), w_hh.new_empty(w_hh.shape), h0.new_empty(h0.shape)


@C.custom_op("rnn_bwd", _fake_bwd)
def rnn_bwd(grad_out: Tensor, grad_hn: Tensor, xp: Tensor, w_hh: Tensor, h0: Tensor, lengths: Optional[Tensor],
            act: int, driver: int, out: Tensor, hs: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Backpropagation through time of :func:`rnn_fwd`: gradients of ``xp, w_hh, h0``."""
    if xp.shape[0] == 0:
        return torch.zeros_like(xp), torch.zeros_like(w_hh), grad_hn.clone()
    return tuple(rnn_backward(grad_out, grad_hn, xp, w_hh, h0, lengths, act, driver, out, hs))


def _setup(ctx, inputs, output):
    ctx.act, ctx.driver = inputs[4], inputs[5]
    ctx.save_for_backward(*inputs[:4], output[0], output[2])


def _backward(ctx, g_out, g_hn, _g_hs):
    xp, w_hh, h0, lengths, out, hs = ctx.saved_tensors
    if torch.is_grad_enabled():  # the backward must itself be differentiable: the fused backend's twin
        from ..fused import twins
        wanted = [i for i in range(3) if ctx.needs_input_grad[i]]
        return (*C.twin_backward(lambda *a: twins.rnn_fwd(*a, ctx.act), (xp, w_hh, h0, lengths), wanted,
                                 (g_out, g_hn)), None, None)
    dxp, dw, dh0 = rnn_bwd(C.zeros_if_none(g_out, out), C.zeros_if_none(g_hn, h0), xp, w_hh, h0, lengths, ctx.act,
                           ctx.driver, out, hs)
    return dxp, dw, dh0, None, None, None


rnn_fwd.register_autograd(_backward, setup_context=_setup)


def scan_rnn(spec, p, x: Tensor, state, lengths: Optional[Tensor]):
    xp = C.project(x, p["weight_ih"], C.bias_sum(p))
    H = p["weight_hh"].shape[1]
    out, h_n, _ = rnn_fwd(xp, p["weight_hh"], state[0], lengths, ACT[spec.fusable], C.driver_for(H))
    return out, (h_n,)
