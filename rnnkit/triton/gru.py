"""GRU kernels, shared by the LayerNorm GRU (``LN``).

Gates ``r, z, n`` (torch.nn's order): ``b = h W_hh^T`` (``LN``: ``ln_w_hh * LN(h W_hh^T)``) plus
``b_hh`` (``LN``: the shift ``b_hh + ln_bias_hh``), ``r = σ(xp_r + b_r)``, ``z = σ(xp_z + b_z)``,
``n = tanh(xp_n + r b_n)``, ``h' = n + z (h - n)``. The drivers are those of rnnkit/triton/lstm.py:
``PERSIST`` holds ``W_hh`` in the program for the whole loop, else one step on a GEMM's product.
"""

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _common as C
from ._jit import mdot, row_norm, row_norm_bwd, sigmoid, tanh


@triton.jit
def _gru_fwd_kernel(xp, rec, w_hh, b_hh, lnw_hh, h_in, h_out, lens, out, gs, bns, nz_s, rstd_s,
                    t0, steps, N, H, eps,
                    PERSIST: tl.constexpr, LN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LEN: tl.constexpr,
                    BN: tl.constexpr, BH: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    rn = pid * BN + tl.arange(0, BN)
    rh = tl.arange(0, BH)
    mn = rn < N
    mc = rh < H
    mh = mn[:, None] & mc[None, :]
    G = 3 * H
    h = tl.load(h_in + rn[:, None] * H + rh[None, :], mask=mh, other=0.0).to(ACC)
    if HAS_LEN:
        ln = tl.load(lens + rn, mask=mn, other=0)
    if HAS_BIAS:
        br = tl.load(b_hh + rh, mask=mc, other=0.0).to(ACC)[None, :]
        bz = tl.load(b_hh + H + rh, mask=mc, other=0.0).to(ACC)[None, :]
        bn = tl.load(b_hh + 2 * H + rh, mask=mc, other=0.0).to(ACC)[None, :]
    if LN:
        lwr = tl.load(lnw_hh + rh, mask=mc, other=0.0).to(ACC)[None, :]
        lwz = tl.load(lnw_hh + H + rh, mask=mc, other=0.0).to(ACC)[None, :]
        lwn = tl.load(lnw_hh + 2 * H + rh, mask=mc, other=0.0).to(ACC)[None, :]
    if PERSIST:  # W_g^T (BH, BH): [k, j] = W_hh[g H + j, k]
        wmask = (rh[:, None] < H) & (rh[None, :] < H)
        woff = rh[None, :] * H + rh[:, None]
        wr = tl.load(w_hh + woff, mask=wmask, other=0.0)
        wz = tl.load(w_hh + H * H + woff, mask=wmask, other=0.0)
        wn = tl.load(w_hh + 2 * H * H + woff, mask=wmask, other=0.0)
    for s in range(steps):
        t = t0 + s
        goff = t * N * G + rn[:, None] * G + rh[None, :]
        hoff = t * N * H + rn[:, None] * H + rh[None, :]
        xr = tl.load(xp + goff, mask=mh, other=0.0).to(ACC)
        xz = tl.load(xp + goff + H, mask=mh, other=0.0).to(ACC)
        xn = tl.load(xp + goff + 2 * H, mask=mh, other=0.0).to(ACC)
        if PERSIST:
            zr = mdot(h, wr, ACC, UPCAST)
            zz = mdot(h, wz, ACC, UPCAST)
            zn = mdot(h, wn, ACC, UPCAST)
        else:
            roff = rn[:, None] * G + rh[None, :]
            zr = tl.load(rec + roff, mask=mh, other=0.0).to(ACC)
            zz = tl.load(rec + roff + H, mask=mh, other=0.0).to(ACC)
            zn = tl.load(rec + roff + 2 * H, mask=mh, other=0.0).to(ACC)
        if LN:
            zr, zz, zn, _u, rz = row_norm(zr, zz, zn, zn, mh, G, eps, 3)
            tl.store(nz_s + goff, zr, mask=mh)
            tl.store(nz_s + goff + H, zz, mask=mh)
            tl.store(nz_s + goff + 2 * H, zn, mask=mh)
            tl.store(rstd_s + t * N + rn, rz, mask=mn)
            zr = zr * lwr
            zz = zz * lwz
            zn = zn * lwn
        if HAS_BIAS:
            zr += br
            zz += bz
            zn += bn
        # ---- the gate math
        r = sigmoid(xr + zr)
        z = sigmoid(xz + zz)
        n = tanh(xn + r * zn)
        h2 = n + z * (h - n)
        tl.store(gs + goff, r, mask=mh)
        tl.store(gs + goff + H, z, mask=mh)
        tl.store(gs + goff + 2 * H, n, mask=mh)
        tl.store(bns + hoff, zn, mask=mh)
        if HAS_LEN:
            h = tl.where((t < ln)[:, None], h2, h)
        else:
            h = h2
        tl.store(out + hoff, h.to(out.dtype.element_ty), mask=mh)
    tl.store(h_out + rn[:, None] * H + rh[None, :], h, mask=mh)


@triton.jit
def _gru_bwd_kernel(dout, dh_in, dh_out, w_hh, lnw_hh, h0, out, gs, bns, nz_s, rstd_s, lens, dxp, dbs, drec,
                    t_hi, steps, N, H,
                    PERSIST: tl.constexpr, LN: tl.constexpr, HAS_LEN: tl.constexpr,
                    BN: tl.constexpr, BH: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    rn = pid * BN + tl.arange(0, BN)
    rh = tl.arange(0, BH)
    mn = rn < N
    mc = rh < H
    mh = mn[:, None] & mc[None, :]
    G = 3 * H
    dh = tl.load(dh_in + rn[:, None] * H + rh[None, :], mask=mh, other=0.0).to(ACC)
    if HAS_LEN:
        ln = tl.load(lens + rn, mask=mn, other=0)
    if LN:
        lwr = tl.load(lnw_hh + rh, mask=mc, other=0.0).to(ACC)[None, :]
        lwz = tl.load(lnw_hh + H + rh, mask=mc, other=0.0).to(ACC)[None, :]
        lwn = tl.load(lnw_hh + 2 * H + rh, mask=mc, other=0.0).to(ACC)[None, :]
    if PERSIST:  # W_g (BH, BH): [j, k] = W_hh[g H + j, k]
        wmask = (rh[:, None] < H) & (rh[None, :] < H)
        woff = rh[:, None] * H + rh[None, :]
        wr = tl.load(w_hh + woff, mask=wmask, other=0.0)
        wz = tl.load(w_hh + H * H + woff, mask=wmask, other=0.0)
        wn = tl.load(w_hh + 2 * H * H + woff, mask=wmask, other=0.0)
    for s in range(steps):
        t = t_hi - s
        goff = t * N * G + rn[:, None] * G + rh[None, :]
        hoff = t * N * H + rn[:, None] * H + rh[None, :]
        dh += tl.load(dout + hoff, mask=mh, other=0.0).to(ACC)
        r = tl.load(gs + goff, mask=mh, other=0.0)
        z = tl.load(gs + goff + H, mask=mh, other=0.0)
        n = tl.load(gs + goff + 2 * H, mask=mh, other=0.0)
        bn = tl.load(bns + hoff, mask=mh, other=0.0)
        if t > 0:
            hp = tl.load(out + hoff - N * H, mask=mh, other=0.0).to(ACC)
        else:
            hp = tl.load(h0 + rn[:, None] * H + rh[None, :], mask=mh, other=0.0).to(ACC)
        # ---- the gate math, backwards
        dan = dh * (1.0 - z) * (1.0 - n * n)
        daz = dh * (hp - n) * z * (1.0 - z)
        dar = dan * bn * r * (1.0 - r)
        dbn = dan * r
        direct = dh * z
        if HAS_LEN:
            valid = (t < ln)[:, None]
            dan = tl.where(valid, dan, 0.0)
            daz = tl.where(valid, daz, 0.0)
            dar = tl.where(valid, dar, 0.0)
            dbn = tl.where(valid, dbn, 0.0)
        tl.store(dxp + goff, dar, mask=mh)
        tl.store(dxp + goff + H, daz, mask=mh)
        tl.store(dxp + goff + 2 * H, dan, mask=mh)
        tl.store(dbs + goff, dar, mask=mh)
        tl.store(dbs + goff + H, daz, mask=mh)
        tl.store(dbs + goff + 2 * H, dbn, mask=mh)
        if LN:
            nr = tl.load(nz_s + goff, mask=mh, other=0.0)
            nzz = tl.load(nz_s + goff + H, mask=mh, other=0.0)
            nn = tl.load(nz_s + goff + 2 * H, mask=mh, other=0.0)
            rz = tl.load(rstd_s + t * N + rn, mask=mn, other=1.0)
            gr, gz, gn, _u = row_norm_bwd(dar * lwr, daz * lwz, dbn * lwn, dbn, nr, nzz, nn, nn, rz, mh, G, 3)
            tl.store(drec + goff, gr, mask=mh)
            tl.store(drec + goff + H, gz, mask=mh)
            tl.store(drec + goff + 2 * H, gn, mask=mh)
        else:
            gr = dar
            gz = daz
            gn = dbn
        if PERSIST:
            dhp = direct + mdot(gr, wr, ACC, UPCAST) + mdot(gz, wz, ACC, UPCAST) + mdot(gn, wn, ACC, UPCAST)
        else:  # the carry: the GEMM after this kernel adds drec W_hh
            dhp = direct
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


def gru_forward(xp: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], ln_w_hh: Optional[Tensor], h0: Tensor,
                lengths: Optional[Tensor], eps: float, driver: int) -> List[Tensor]:
    L, N, G = xp.shape
    H = G // 3
    ln = ln_w_hh is not None
    sd = C.state_dtype(xp.dtype)
    persist = driver == 0
    BN, BH, grid = _blocks(H, N, persist, xp.dtype)
    xp = xp.contiguous()
    out = xp.new_empty(L, N, H)
    gs = xp.new_empty(L, N, G, dtype=sd)
    bns = xp.new_empty(L, N, H, dtype=sd)
    nz = xp.new_empty(L, N, G, dtype=sd) if ln else xp.new_empty(0, dtype=sd)
    rstd = xp.new_empty(L, N, dtype=sd) if ln else xp.new_empty(0, dtype=sd)
    hbuf = h0.to(sd).contiguous().clone()
    lens = C.lengths_arg(lengths, xp)
    d = xp.new_empty(1)
    w_hh = w_hh.contiguous()
    flags = dict(LN=ln, HAS_BIAS=b_hh is not None, HAS_LEN=lengths is not None, BN=BN, BH=BH,
                 UPCAST=C.upcast_dots(xp.dtype), ACC=C.acc_dtype(xp.dtype))
    b = b_hh.contiguous() if b_hh is not None else d
    lw = ln_w_hh.contiguous() if ln else d
    if L > 0 and persist:
        _gru_fwd_kernel[(grid,)](xp, d, w_hh, b, lw, hbuf, hbuf, lens, out, gs, bns, nz, rstd, 0, L, N, H, eps,
                                 PERSIST=True, **flags)
    elif L > 0:
        rec = xp.new_empty(N, G, dtype=sd)
        w_rec = C.rec_weight(w_hh)

        def step_loop():
            for t in range(L):
                C.rec_mm(hbuf.to(w_hh.dtype), w_rec, rec)
                _gru_fwd_kernel[(grid,)](xp, rec, w_hh, b, lw, hbuf, hbuf, lens, out, gs, bns, nz, rstd, t, 1, N, H,
                                         eps, PERSIST=False, **flags)

        C.run_steps(step_loop, xp.device)
    return [out, hbuf.to(xp.dtype), gs, bns, nz, rstd]


def gru_backward(grad_out, grad_hn, xp, w_hh, b_hh, ln_w_hh, h0, lengths, driver, out, gs, bns, nz, rstd):
    """``[dxp, dw_hh, db_hh, dln_w_hh, dh0]`` (None where absent)."""
    L, N, G = xp.shape
    H = G // 3
    ln = ln_w_hh is not None
    sd = C.state_dtype(xp.dtype)
    persist = driver == 0
    BN, BH, grid = _blocks(H, N, persist, xp.dtype)
    grad_out = grad_out.contiguous()
    dh = grad_hn.to(sd).contiguous().clone()
    dxp = xp.new_empty(L, N, G, dtype=sd)
    dbs = xp.new_empty(L, N, G, dtype=sd)
    drec = xp.new_empty(L, N, G, dtype=sd) if ln else dbs
    lens = C.lengths_arg(lengths, xp)
    d = xp.new_empty(1)
    w_hh = w_hh.contiguous()
    lw = ln_w_hh.contiguous() if ln else d
    h0c = h0.contiguous()
    flags = dict(LN=ln, HAS_LEN=lengths is not None, BN=BN, BH=BH, UPCAST=C.upcast_dots(xp.dtype),
                 ACC=C.acc_dtype(xp.dtype))
    if persist:
        _gru_bwd_kernel[(grid,)](grad_out, dh, dh, w_hh, lw, h0c, out, gs, bns, nz, rstd, lens, dxp, dbs, drec,
                                 L - 1, L, N, H, PERSIST=True, **flags)
    else:
        w32 = w_hh.to(sd)

        def step_loop():
            for t in range(L - 1, -1, -1):
                _gru_bwd_kernel[(grid,)](grad_out, dh, dh, w_hh, lw, h0c, out, gs, bns, nz, rstd, lens, dxp, dbs,
                                         drec, t, 1, N, H, PERSIST=False, **flags)
                dh.addmm_(drec[t], w32)

        C.run_steps(step_loop, xp.device)
    hp = C.hprev(h0, out).reshape(L * N, H)
    dw_hh = (drec.reshape(L * N, G).t() @ hp).to(w_hh.dtype)
    db = dbs.sum((0, 1)).to(b_hh.dtype) if b_hh is not None else None
    dlw = (dbs * nz).sum((0, 1)).to(ln_w_hh.dtype) if ln else None
    return [dxp.to(xp.dtype), dw_hh, db, dlw, dh.to(h0.dtype)]


# ------------------------------------------------------------------ the ops


def _fake_fwd(xp, w_hh, b_hh, ln_w_hh, h0, lengths, eps, driver):
    L, N, G = xp.shape
    H = G // 3
    sd = C.state_dtype(xp.dtype)
    ln = ln_w_hh is not None
    return (xp.new_empty(L, N, H), xp.new_empty(N, H), xp.new_empty(L, N, G, dtype=sd), xp.new_empty(L, N, H, dtype=sd),
            xp.new_empty(L, N, G, dtype=sd) if ln else xp.new_empty(0, dtype=sd),
            xp.new_empty(L, N, dtype=sd) if ln else xp.new_empty(0, dtype=sd))


@C.custom_op("gru_fwd", _fake_fwd)
def gru_fwd(xp: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], ln_w_hh: Optional[Tensor], h0: Tensor,
            lengths: Optional[Tensor], eps: float, driver: int
            ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One GRU layer-direction on ``xp (L, N, 3H)``: ``(out, h_n, *saved)``; ``b_hh`` (LayerNorm:
    the shift) and ``ln_w_hh`` (LayerNorm GRU) optional."""
    return tuple(gru_forward(xp, w_hh, b_hh, ln_w_hh, h0, lengths, eps, driver))


def _fake_bwd(grad_out, grad_hn, xp, w_hh, b_hh, ln_w_hh, h0, lengths, driver, out, gs, bns, nz, rstd):
    return (xp.new_empty(xp.shape), w_hh.new_empty(w_hh.shape),
            b_hh.new_empty(b_hh.shape) if b_hh is not None else xp.new_empty(0),
            ln_w_hh.new_empty(ln_w_hh.shape) if ln_w_hh is not None else xp.new_empty(0), h0.new_empty(h0.shape))


@C.custom_op("gru_bwd", _fake_bwd)
def gru_bwd(grad_out: Tensor, grad_hn: Tensor, xp: Tensor, w_hh: Tensor, b_hh: Optional[Tensor],
            ln_w_hh: Optional[Tensor], h0: Tensor, lengths: Optional[Tensor], driver: int, out: Tensor, gs: Tensor,
            bns: Tensor, nz: Tensor, rstd: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backpropagation through time of :func:`gru_fwd`: gradients of ``xp, w_hh, b_hh, ln_w_hh, h0``
    (an empty tensor for an absent one)."""
    if xp.shape[0] == 0:
        grads = [torch.zeros_like(xp), torch.zeros_like(w_hh), None if b_hh is None else torch.zeros_like(b_hh),
                 None if ln_w_hh is None else torch.zeros_like(ln_w_hh), grad_hn.clone()]
    else:
        grads = gru_backward(grad_out, grad_hn, xp, w_hh, b_hh, ln_w_hh, h0, lengths, driver, out, gs, bns, nz, rstd)
    return tuple(g if g is not None else xp.new_empty(0) for g in grads)


def _twin(xp, w_hh, b_hh, ln_w_hh, h0, lengths, eps):
    """:func:`gru_fwd`'s visible outputs ``(out, h_n)`` in plain PyTorch ops (the fused backend's twins)."""
    from ..fused import twins
    if ln_w_hh is None:
        return twins.gru_fwd(xp, w_hh, b_hh, h0, lengths)
    shift = b_hh if b_hh is not None else ln_w_hh.new_zeros(ln_w_hh.shape)
    return twins.ln_gru_fwd(xp, w_hh, ln_w_hh, shift, h0, lengths, eps)


def _setup(ctx, inputs, output):
    ctx.driver, ctx.eps = inputs[7], inputs[6]
    ctx.present = [t is not None for t in inputs[:6]]
    ctx.save_for_backward(*inputs[:6], output[0], *output[2:])


def _backward(ctx, g_out, g_hn, *_saved_grads):
    saved = ctx.saved_tensors
    ins, (out, gs, bns, nz, rstd) = saved[:6], saved[6:]
    if torch.is_grad_enabled():  # the backward must itself be differentiable: the twin's
        wanted = [i for i in range(5) if ins[i] is not None and ctx.needs_input_grad[i]]
        return (*C.twin_backward(lambda *a: _twin(*a, ctx.eps), ins, wanted, (g_out, g_hn)), None, None)
    grads = gru_bwd(C.zeros_if_none(g_out, out), C.zeros_if_none(g_hn, ins[4]), *ins, ctx.driver, out, gs, bns, nz,
                    rstd)
    dxp, dw, db, dlw, dh0 = grads
    return (dxp, dw, db if ctx.present[2] else None, dlw if ctx.present[3] else None, dh0, None, None, None)


gru_fwd.register_autograd(_backward, setup_context=_setup)


def gru_sequence(xp: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], h0: Tensor, lengths: Optional[Tensor], *,
                 ln_w_hh: Optional[Tensor] = None, eps: float = 1e-5, driver: Optional[int] = None):
    if driver is None:
        driver = C.driver_for(w_hh.shape[1])
    out, h_n, *_ = gru_fwd(xp, w_hh, b_hh, ln_w_hh, h0, lengths, float(eps), driver)
    return out, h_n


def scan_gru(spec, p, x: Tensor, state, lengths: Optional[Tensor]):
    """The runner's scan for ``torch.nn.GRU``-compatible layers (``b_hh`` stays in the kernel: ``r``
    gates its ``n`` part)."""
    xp = C.project(x, p["weight_ih"], p.get("bias_ih"))
    out, h_n = gru_sequence(xp, p["weight_hh"], p.get("bias_hh"), state[0], lengths)
    return out, (h_n,)
