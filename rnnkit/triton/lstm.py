"""LSTM kernels (with ``proj_size``), shared by the peephole and LayerNorm LSTMs.

One forward and one backward ``@triton.jit`` kernel hold the gate math; compile-time flags
pick the cell (``PROJ``, ``PEEP``, ``LN``) and the driver:

* ``PERSIST`` (the persistent driver): one program per ``BN`` batch rows runs the whole time
  loop, ``W_hh`` (and ``W_hr``) loaded once and kept on chip, the recurrent products as
  ``tl.dot`` inside the loop;
* not ``PERSIST`` (the alternating driver): the kernel runs one step on the recurrent product
  ``rec = h W_hh^T`` that a GEMM (``torch.mm`` into a preallocated buffer) computed just before;
  the Python step loop is captured in a CUDA graph on CUDA.

``lengths`` is read inside the kernels: a row past its length keeps its state (its output is
the kept state, its gate gradients are zero). States and saved activations are float32
(float64 for float64 storage); ``xp``, ``out`` and the weights keep the storage dtype.

Gradients: the backward kernel produces the gate gradients ``dxp`` (and, for LayerNorm, the
gradient of the raw recurrent product); the weight gradients are then one GEMM each over all
steps (``dW_hh = drec^T h_prev``), as haste and cuDNN do.
"""

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _common as C
from ._jit import mdot, row_norm, row_norm_bwd, sigmoid, tanh


@triton.jit
def _lstm_fwd_kernel(xp, rec, w_hh, w_hr, w_ci, w_cf, w_co, lnw_hh, lnw_c, lnb_c,
                     h_in, c_in, h_out, c_out, lens, out, gs, cs, ms, nz_s, nc_s, rstd_s,
                     t0, steps, N, H, P, eps,
                     PERSIST: tl.constexpr, PROJ: tl.constexpr, PEEP: tl.constexpr, LN: tl.constexpr,
                     HAS_LEN: tl.constexpr, WRITE_H: tl.constexpr,
                     BN: tl.constexpr, BH: tl.constexpr, BP: tl.constexpr, UPCAST: tl.constexpr,
                     ACC: tl.constexpr):
    pid = tl.program_id(0)
    rn = pid * BN + tl.arange(0, BN)
    rh = tl.arange(0, BH)
    rp = tl.arange(0, BP)
    mn = rn < N
    mh = mn[:, None] & (rh < H)[None, :]
    mp = mn[:, None] & (rp < P)[None, :]
    G = 4 * H
    h = tl.load(h_in + rn[:, None] * P + rp[None, :], mask=mp, other=0.0).to(ACC)
    c = tl.load(c_in + rn[:, None] * H + rh[None, :], mask=mh, other=0.0).to(ACC)
    if HAS_LEN:
        ln = tl.load(lens + rn, mask=mn, other=0)
    if PEEP:
        wci = tl.load(w_ci + rh, mask=rh < H, other=0.0).to(ACC)[None, :]
        wcf = tl.load(w_cf + rh, mask=rh < H, other=0.0).to(ACC)[None, :]
        wco = tl.load(w_co + rh, mask=rh < H, other=0.0).to(ACC)[None, :]
    if LN:
        lwi = tl.load(lnw_hh + rh, mask=rh < H, other=0.0).to(ACC)[None, :]
        lwf = tl.load(lnw_hh + H + rh, mask=rh < H, other=0.0).to(ACC)[None, :]
        lwg = tl.load(lnw_hh + 2 * H + rh, mask=rh < H, other=0.0).to(ACC)[None, :]
        lwo = tl.load(lnw_hh + 3 * H + rh, mask=rh < H, other=0.0).to(ACC)[None, :]
        lwc = tl.load(lnw_c + rh, mask=rh < H, other=0.0).to(ACC)[None, :]
        lbc = tl.load(lnb_c + rh, mask=rh < H, other=0.0).to(ACC)[None, :]
    if PERSIST:
        # W_g^T (BP, BH): [k, j] = W_hh[g H + j, k]
        wmask = (rp[:, None] < P) & (rh[None, :] < H)
        woff = rh[None, :] * P + rp[:, None]
        wi = tl.load(w_hh + woff, mask=wmask, other=0.0)
        wf = tl.load(w_hh + H * P + woff, mask=wmask, other=0.0)
        wg = tl.load(w_hh + 2 * H * P + woff, mask=wmask, other=0.0)
        wo = tl.load(w_hh + 3 * H * P + woff, mask=wmask, other=0.0)
        if PROJ:  # W_hr^T (BH, BP): [j, p] = W_hr[p, j]
            wr = tl.load(w_hr + rp[None, :] * H + rh[:, None], mask=(rh[:, None] < H) & (rp[None, :] < P), other=0.0)
    for s in range(steps):
        t = t0 + s
        goff = t * N * G + rn[:, None] * G + rh[None, :]
        hoff = t * N * H + rn[:, None] * H + rh[None, :]
        ai = tl.load(xp + goff, mask=mh, other=0.0).to(ACC)
        af = tl.load(xp + goff + H, mask=mh, other=0.0).to(ACC)
        ag = tl.load(xp + goff + 2 * H, mask=mh, other=0.0).to(ACC)
        ao = tl.load(xp + goff + 3 * H, mask=mh, other=0.0).to(ACC)
        if PERSIST:
            zi = mdot(h, wi, ACC, UPCAST)
            zf = mdot(h, wf, ACC, UPCAST)
            zg = mdot(h, wg, ACC, UPCAST)
            zo = mdot(h, wo, ACC, UPCAST)
        else:
            roff = rn[:, None] * G + rh[None, :]
            zi = tl.load(rec + roff, mask=mh, other=0.0).to(ACC)
            zf = tl.load(rec + roff + H, mask=mh, other=0.0).to(ACC)
            zg = tl.load(rec + roff + 2 * H, mask=mh, other=0.0).to(ACC)
            zo = tl.load(rec + roff + 3 * H, mask=mh, other=0.0).to(ACC)
        if LN:
            zi, zf, zg, zo, rz = row_norm(zi, zf, zg, zo, mh, G, eps, 4)
            tl.store(nz_s + goff, zi, mask=mh)
            tl.store(nz_s + goff + H, zf, mask=mh)
            tl.store(nz_s + goff + 2 * H, zg, mask=mh)
            tl.store(nz_s + goff + 3 * H, zo, mask=mh)
            tl.store(rstd_s + (t * N + rn) * 2, rz, mask=mn)
            zi = zi * lwi
            zf = zf * lwf
            zg = zg * lwg
            zo = zo * lwo
        ai += zi
        af += zf
        ag += zg
        ao += zo
        # ---- the gate math
        if PEEP:
            ai += wci * c
            af += wcf * c
        i = sigmoid(ai)
        f = sigmoid(af)
        g = tanh(ag)
        c2 = f * c + i * g
        if PEEP:
            ao += wco * c2
        o = sigmoid(ao)
        if LN:
            ncn, _u, _v, _w, rc = row_norm(c2, c2, c2, c2, mh, H, eps, 1)
            tl.store(nc_s + hoff, ncn, mask=mh)
            tl.store(rstd_s + (t * N + rn) * 2 + 1, rc, mask=mn)
            m = o * tanh(ncn * lwc + lbc)
        else:
            m = o * tanh(c2)
        tl.store(gs + goff, i, mask=mh)
        tl.store(gs + goff + H, f, mask=mh)
        tl.store(gs + goff + 2 * H, g, mask=mh)
        tl.store(gs + goff + 3 * H, o, mask=mh)
        if PROJ:
            tl.store(ms + hoff, m, mask=mh)
            if PERSIST:
                h2 = mdot(m, wr, ACC, UPCAST)
            else:
                h2 = h  # the alternating driver projects with a GEMM after this kernel
        else:
            h2 = m
        if HAS_LEN:
            valid = (t < ln)[:, None]
            c = tl.where(valid, c2, c)
            h = tl.where(valid, h2, h)
        else:
            c = c2
            h = h2
        tl.store(cs + hoff, c, mask=mh)
        if WRITE_H:
            tl.store(out + t * N * P + rn[:, None] * P + rp[None, :], h.to(out.dtype.element_ty), mask=mp)
    if WRITE_H:
        tl.store(h_out + rn[:, None] * P + rp[None, :], h, mask=mp)
    tl.store(c_out + rn[:, None] * H + rh[None, :], c, mask=mh)


@triton.jit
def _lstm_bwd_kernel(dout, dh_in, dc_in, dm_in, dh_out, dc_out,
                     w_hh, w_hr, w_ci, w_cf, w_co, lnw_hh, lnw_c, lnb_c,
                     gs, cs, c0, nz_s, nc_s, rstd_s, lens,
                     dg, drec, dhs, dys,
                     t_hi, steps, N, H, P,
                     PERSIST: tl.constexpr, PROJ: tl.constexpr, PEEP: tl.constexpr, LN: tl.constexpr,
                     HAS_LEN: tl.constexpr, BN: tl.constexpr, BH: tl.constexpr, BP: tl.constexpr,
                     UPCAST: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    rn = pid * BN + tl.arange(0, BN)
    rh = tl.arange(0, BH)
    rp = tl.arange(0, BP)
    mn = rn < N
    mh = mn[:, None] & (rh < H)[None, :]
    mp = mn[:, None] & (rp < P)[None, :]
    G = 4 * H
    dh = tl.load(dh_in + rn[:, None] * P + rp[None, :], mask=mp, other=0.0).to(ACC)
    dc = tl.load(dc_in + rn[:, None] * H + rh[None, :], mask=mh, other=0.0).to(ACC)
    if HAS_LEN:
        ln = tl.load(lens + rn, mask=mn, other=0)
    if PEEP:
        wci = tl.load(w_ci + rh, mask=rh < H, other=0.0).to(ACC)[None, :]
        wcf = tl.load(w_cf + rh, mask=rh < H, other=0.0).to(ACC)[None, :]
        wco = tl.load(w_co + rh, mask=rh < H, other=0.0).to(ACC)[None, :]
    if LN:
        lwi = tl.load(lnw_hh + rh, mask=rh < H, other=0.0).to(ACC)[None, :]
        lwf = tl.load(lnw_hh + H + rh, mask=rh < H, other=0.0).to(ACC)[None, :]
        lwg = tl.load(lnw_hh + 2 * H + rh, mask=rh < H, other=0.0).to(ACC)[None, :]
        lwo = tl.load(lnw_hh + 3 * H + rh, mask=rh < H, other=0.0).to(ACC)[None, :]
        lwc = tl.load(lnw_c + rh, mask=rh < H, other=0.0).to(ACC)[None, :]
        lbc = tl.load(lnb_c + rh, mask=rh < H, other=0.0).to(ACC)[None, :]
    if PERSIST:
        # W_g (BH, BP): [j, k] = W_hh[g H + j, k]
        wmask = (rh[:, None] < H) & (rp[None, :] < P)
        woff = rh[:, None] * P + rp[None, :]
        wi = tl.load(w_hh + woff, mask=wmask, other=0.0)
        wf = tl.load(w_hh + H * P + woff, mask=wmask, other=0.0)
        wg = tl.load(w_hh + 2 * H * P + woff, mask=wmask, other=0.0)
        wo = tl.load(w_hh + 3 * H * P + woff, mask=wmask, other=0.0)
        if PROJ:  # W_hr (BP, BH)
            wr = tl.load(w_hr + rp[:, None] * H + rh[None, :], mask=(rp[:, None] < P) & (rh[None, :] < H), other=0.0)
    for s in range(steps):
        t = t_hi - s
        goff = t * N * G + rn[:, None] * G + rh[None, :]
        hoff = t * N * H + rn[:, None] * H + rh[None, :]
        poff = t * N * P + rn[:, None] * P + rp[None, :]
        if PROJ and not PERSIST:
            dm = tl.load(dm_in + rn[:, None] * H + rh[None, :], mask=mh, other=0.0).to(ACC)  # dh was summed
        else:
            dh += tl.load(dout + poff, mask=mp, other=0.0).to(ACC)
            if PROJ:
                dm = mdot(dh, wr, ACC, UPCAST)
            else:
                dm = dh
        i = tl.load(gs + goff, mask=mh, other=0.0)
        f = tl.load(gs + goff + H, mask=mh, other=0.0)
        g = tl.load(gs + goff + 2 * H, mask=mh, other=0.0)
        o = tl.load(gs + goff + 3 * H, mask=mh, other=0.0)
        c2 = tl.load(cs + hoff, mask=mh, other=0.0)
        if t > 0:
            cp = tl.load(cs + hoff - N * H, mask=mh, other=0.0).to(ACC)
        else:
            cp = tl.load(c0 + rn[:, None] * H + rh[None, :], mask=mh, other=0.0).to(ACC)
        # ---- the gate math, backwards
        if LN:
            ncn = tl.load(nc_s + hoff, mask=mh, other=0.0)
            rc = tl.load(rstd_s + (t * N + rn) * 2 + 1, mask=mn, other=1.0)
            ty = tanh(ncn * lwc + lbc)
            dy = dm * o * (1.0 - ty * ty)
            dct, _u, _v, _w = row_norm_bwd(dy * lwc, dy, dy, dy, ncn, ncn, ncn, ncn, rc, mh, H, 1)
            dct += dc
        else:
            ty = tanh(c2)
            dct = dc + dm * o * (1.0 - ty * ty)
        dao = dm * ty * o * (1.0 - o)
        if PEEP:
            dct += dao * wco
        dai = dct * g * i * (1.0 - i)
        daf = dct * cp * f * (1.0 - f)
        dag = dct * i * (1.0 - g * g)
        dcp = dct * f
        if PEEP:
            dcp += dai * wci + daf * wcf
        if HAS_LEN:
            valid = (t < ln)[:, None]
            dai = tl.where(valid, dai, 0.0)
            daf = tl.where(valid, daf, 0.0)
            dag = tl.where(valid, dag, 0.0)
            dao = tl.where(valid, dao, 0.0)
            dcp = tl.where(valid, dcp, dc)
        tl.store(dg + goff, dai, mask=mh)
        tl.store(dg + goff + H, daf, mask=mh)
        tl.store(dg + goff + 2 * H, dag, mask=mh)
        tl.store(dg + goff + 3 * H, dao, mask=mh)
        if LN:
            if HAS_LEN:
                dy = tl.where(valid, dy, 0.0)
            tl.store(dys + hoff, dy, mask=mh)
            ni = tl.load(nz_s + goff, mask=mh, other=0.0)
            nf = tl.load(nz_s + goff + H, mask=mh, other=0.0)
            ng = tl.load(nz_s + goff + 2 * H, mask=mh, other=0.0)
            no = tl.load(nz_s + goff + 3 * H, mask=mh, other=0.0)
            rz = tl.load(rstd_s + (t * N + rn) * 2, mask=mn, other=1.0)
            ri, rf, rg, ro = row_norm_bwd(dai * lwi, daf * lwf, dag * lwg, dao * lwo, ni, nf, ng, no, rz, mh, G, 4)
            tl.store(drec + goff, ri, mask=mh)
            tl.store(drec + goff + H, rf, mask=mh)
            tl.store(drec + goff + 2 * H, rg, mask=mh)
            tl.store(drec + goff + 3 * H, ro, mask=mh)
        else:
            ri = dai
            rf = daf
            rg = dag
            ro = dao
        if PROJ:
            if HAS_LEN:
                tl.store(dhs + poff, tl.where(valid, dh, 0.0), mask=mp)
            else:
                tl.store(dhs + poff, dh, mask=mp)
        if PERSIST:
            dhp = mdot(ri, wi, ACC, UPCAST) + mdot(rf, wf, ACC, UPCAST) + mdot(rg, wg, ACC, UPCAST) + \
                mdot(ro, wo, ACC, UPCAST)
            if HAS_LEN:
                dh = tl.where(valid, dhp, dh)
            else:
                dh = dhp
        else:  # the carry: the GEMM after this kernel adds drec W_hh
            if HAS_LEN:
                dh = tl.where(valid, 0.0, dh)
            else:
                dh = dh * 0.0
        dc = dcp
    tl.store(dh_out + rn[:, None] * P + rp[None, :], dh, mask=mp)
    tl.store(dc_out + rn[:, None] * H + rh[None, :], dc, mask=mh)


# ------------------------------------------------------------------ launchers


def _blocks(H: int, P: int, N: int, persist: bool, dtype: torch.dtype):
    BH, BP = C.block(H), C.block(P)
    if persist:
        BN = C.MIN_DOT
        C.check_dot_block(BN, BH, BP, dtype)  # h (BN, BP) @ W_g^T (BP, BH) and back
        C.check_dot_block(BN, BP, BH, dtype)
    else:
        BN = C.rows_per_program(BH)
    return BN, BH, BP, triton.cdiv(N, BN)


def _dummy(like: Tensor) -> Tensor:
    return like.new_empty(1)


def lstm_forward(xp: Tensor, w_hh: Tensor, w_hr: Optional[Tensor], w_ci: Optional[Tensor], w_cf: Optional[Tensor],
                 w_co: Optional[Tensor], ln_w_hh: Optional[Tensor], ln_w_c: Optional[Tensor],
                 ln_b_c: Optional[Tensor], h0: Tensor, c0: Tensor, lengths: Optional[Tensor], eps: float,
                 driver: int) -> List[Tensor]:
    L, N, G = xp.shape
    H, P = G // 4, h0.shape[1]
    proj, peep, ln = w_hr is not None, w_ci is not None, ln_w_hh is not None
    sd = C.state_dtype(xp.dtype)
    persist = driver == 0
    BN, BH, BP, grid = _blocks(H, P, N, persist, xp.dtype)
    xp = xp.contiguous()
    out = xp.new_empty(L, N, P)
    gs = xp.new_empty(L, N, G, dtype=sd)
    cs = xp.new_empty(L, N, H, dtype=sd)
    ms = xp.new_empty(L, N, H, dtype=sd) if proj else xp.new_empty(0, dtype=sd)
    nz = xp.new_empty(L, N, G, dtype=sd) if ln else xp.new_empty(0, dtype=sd)
    nc = xp.new_empty(L, N, H, dtype=sd) if ln else xp.new_empty(0, dtype=sd)
    rstd = xp.new_empty(L, N, 2, dtype=sd) if ln else xp.new_empty(0, dtype=sd)
    hbuf = h0.to(sd).contiguous().clone()
    cbuf = c0.to(sd).contiguous().clone()
    lens = C.lengths_arg(lengths, xp)
    d = _dummy(xp)
    w_hh = w_hh.contiguous()
    w_hr_ = w_hr.contiguous() if proj else d
    pe = [w.contiguous() for w in (w_ci, w_cf, w_co)] if peep else [d, d, d]
    lw = [w.contiguous() for w in (ln_w_hh, ln_w_c, ln_b_c)] if ln else [d, d, d]
    flags = dict(PROJ=proj, PEEP=peep, LN=ln, HAS_LEN=lengths is not None, BN=BN, BH=BH, BP=BP,
                 UPCAST=C.upcast_dots(xp.dtype), ACC=C.acc_dtype(xp.dtype))
    if L == 0:
        return [out, hbuf.to(xp.dtype), cbuf.to(xp.dtype), gs, cs, ms, nz, nc, rstd]
    if persist:
        _lstm_fwd_kernel[(grid,)](xp, d, w_hh, w_hr_, *pe, *lw, hbuf, cbuf, hbuf, cbuf, lens, out, gs, cs, ms, nz, nc,
                                  rstd, 0, L, N, H, P, eps, PERSIST=True, WRITE_H=True, **flags)
    else:
        rec = xp.new_empty(N, G, dtype=sd)
        w_rec = C.rec_weight(w_hh)
        valid = None
        if proj and lengths is not None:
            valid = (torch.arange(L, device=xp.device).unsqueeze(1) < lens.unsqueeze(0)).unsqueeze(2)  # (L, N, 1)

        def step_loop():
            for t in range(L):
                C.rec_mm(hbuf.to(w_hh.dtype), w_rec, rec)
                _lstm_fwd_kernel[(grid,)](xp, rec, w_hh, w_hr_, *pe, *lw, hbuf, cbuf, hbuf, cbuf, lens, out, gs, cs,
                                          ms, nz, nc, rstd, t, 1, N, H, P, eps, PERSIST=False, WRITE_H=not proj,
                                          **flags)
                if proj:
                    hp = torch.mm(ms[t].to(w_hr.dtype), w_hr.t()).to(sd)
                    hbuf.copy_(hp if valid is None else torch.where(valid[t], hp, hbuf))
                    out[t].copy_(hbuf)

        C.run_steps(step_loop, xp.device)
    return [out, hbuf.to(xp.dtype), cbuf.to(xp.dtype), gs, cs, ms, nz, nc, rstd]


def lstm_backward(grad_out: Tensor, grad_hn: Tensor, grad_cn: Tensor, xp: Tensor, w_hh: Tensor,
                  w_hr: Optional[Tensor], w_ci: Optional[Tensor], w_cf: Optional[Tensor], w_co: Optional[Tensor],
                  ln_w_hh: Optional[Tensor], ln_w_c: Optional[Tensor], ln_b_c: Optional[Tensor], h0: Tensor,
                  c0: Tensor, lengths: Optional[Tensor], driver: int, out: Tensor, gs: Tensor, cs: Tensor,
                  ms: Tensor, nz: Tensor, nc: Tensor, rstd: Tensor) -> List[Tensor]:
    """``[dxp, dw_hh, dw_hr, dw_ci, dw_cf, dw_co, dln_w_hh, dln_w_c, dln_b_c, dh0, dc0]`` (None where absent)."""
    L, N, G = xp.shape
    H, P = G // 4, h0.shape[1]
    proj, peep, ln = w_hr is not None, w_ci is not None, ln_w_hh is not None
    sd = C.state_dtype(xp.dtype)
    # With lengths the persistent backward kernel (plain and LayerNorm, float32) crashes Triton 3.9's compiler for
    # sm_90 (an LLVM SLP-vectorizer assertion aborts the process; found without a GPU by compiling every variant
    # the drivers launch, docs/gpu.md): the alternating step loop takes that backward, from the same saved tensors
    persist = driver == 0 and lengths is None
    BN, BH, BP, grid = _blocks(H, P, N, persist, xp.dtype)
    grad_out = grad_out.contiguous()
    dh = grad_hn.to(sd).contiguous().clone()
    dc = grad_cn.to(sd).contiguous().clone()
    dg = xp.new_empty(L, N, G, dtype=sd)
    drec = xp.new_empty(L, N, G, dtype=sd) if ln else dg
    dhs = xp.new_empty(L, N, P, dtype=sd) if proj else dg
    dys = xp.new_empty(L, N, H, dtype=sd) if ln else dg
    lens = C.lengths_arg(lengths, xp)
    d = _dummy(xp)
    w_hh = w_hh.contiguous()
    w_hr_ = w_hr.contiguous() if proj else d
    pe = [w.contiguous() for w in (w_ci, w_cf, w_co)] if peep else [d, d, d]
    lw = [w.contiguous() for w in (ln_w_hh, ln_w_c, ln_b_c)] if ln else [d, d, d]
    c0c = c0.contiguous()
    flags = dict(PROJ=proj, PEEP=peep, LN=ln, HAS_LEN=lengths is not None, BN=BN, BH=BH, BP=BP,
                 UPCAST=C.upcast_dots(xp.dtype), ACC=C.acc_dtype(xp.dtype))
    if L > 0 and persist:
        _lstm_bwd_kernel[(grid,)](grad_out, dh, dc, d, dh, dc, w_hh, w_hr_, *pe, *lw, gs, cs, c0c, nz, nc, rstd, lens,
                                  dg, drec, dhs, dys, L - 1, L, N, H, P, PERSIST=True, **flags)
    elif L > 0:
        w32 = w_hh.to(sd)
        whr32 = w_hr.to(sd) if proj else None
        dm = xp.new_empty(N, H, dtype=sd) if proj else d

        def step_loop():
            for t in range(L - 1, -1, -1):
                if proj:
                    dh.add_(grad_out[t])
                    torch.mm(dh, whr32, out=dm)
                _lstm_bwd_kernel[(grid,)](grad_out, dh, dc, dm, dh, dc, w_hh, w_hr_, *pe, *lw, gs, cs, c0c, nz, nc,
                                          rstd, lens, dg, drec, dhs, dys, t, 1, N, H, P, PERSIST=False, **flags)
                dh.addmm_(drec[t], w32)

        C.run_steps(step_loop, xp.device)
    hp = C.hprev(h0, out).reshape(L * N, P)
    dw_hh = (drec.reshape(L * N, G).t() @ hp).to(w_hh.dtype)
    dw_hr = (dhs.reshape(L * N, P).t() @ ms.reshape(L * N, H)).to(w_hr.dtype) if proj else None
    peeps = [None, None, None]
    if peep:
        cprev = torch.cat([c0.to(sd).unsqueeze(0), cs[:-1]], 0)
        peeps = [(dg[..., :H] * cprev).sum((0, 1)).to(w_ci.dtype), (dg[..., H:2 * H] * cprev).sum((0, 1)).to(w_cf.dtype),
                 (dg[..., 3 * H:] * cs).sum((0, 1)).to(w_co.dtype)]
    lns = [None, None, None]
    if ln:
        lns = [(dg * nz).sum((0, 1)).to(ln_w_hh.dtype), (dys * nc).sum((0, 1)).to(ln_w_c.dtype),
               dys.sum((0, 1)).to(ln_b_c.dtype)]
    return [dg.to(xp.dtype), dw_hh, dw_hr, *peeps, *lns, dh.to(h0.dtype), dc.to(c0.dtype)]


# ------------------------------------------------------------------ the ops (custom_op + fake + autograd)


def _fake_fwd(xp, w_hh, w_hr, w_ci, w_cf, w_co, ln_w_hh, ln_w_c, ln_b_c, h0, c0, lengths, eps, driver):
    L, N, G = xp.shape
    H, P = G // 4, h0.shape[1]
    sd = C.state_dtype(xp.dtype)
    ln = ln_w_hh is not None

    def saved(present, *shape):  # a fresh tensor each (an empty one for what is not saved): outputs never alias
        return xp.new_empty(*shape, dtype=sd) if present else xp.new_empty(0, dtype=sd)
    return (xp.new_empty(L, N, P), xp.new_empty(N, P), xp.new_empty(N, H), saved(True, L, N, G), saved(True, L, N, H),
            saved(w_hr is not None, L, N, H), saved(ln, L, N, G), saved(ln, L, N, H), saved(ln, L, N, 2))


@C.custom_op("lstm_fwd", _fake_fwd)
def lstm_fwd(xp: Tensor, w_hh: Tensor, w_hr: Optional[Tensor], w_ci: Optional[Tensor], w_cf: Optional[Tensor],
             w_co: Optional[Tensor], ln_w_hh: Optional[Tensor], ln_w_c: Optional[Tensor], ln_b_c: Optional[Tensor],
             h0: Tensor, c0: Tensor, lengths: Optional[Tensor], eps: float, driver: int
             ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One LSTM layer-direction on ``xp (L, N, 4H)``: ``(out, h_n, c_n, *saved)``; optional
    ``w_hr`` (projection), peepholes ``w_ci, w_cf, w_co`` and LayerNorm ``ln_w_hh, ln_w_c, ln_b_c``."""
    return tuple(lstm_forward(xp, w_hh, w_hr, w_ci, w_cf, w_co, ln_w_hh, ln_w_c, ln_b_c, h0, c0, lengths, eps,
                              driver))


_OPTIONAL = (2, 3, 4, 5, 6, 7, 8)  # positions of lstm_fwd's optional weights among its inputs


def _fake_bwd(grad_out, grad_hn, grad_cn, xp, w_hh, w_hr, w_ci, w_cf, w_co, ln_w_hh, ln_w_c, ln_b_c, h0, c0,
              lengths, driver, out, gs, cs, ms, nz, nc, rstd):
    like = [w_hh, w_hr, w_ci, w_cf, w_co, ln_w_hh, ln_w_c, ln_b_c]
    return (xp.new_empty(xp.shape), *[w.new_empty(w.shape) if w is not None else xp.new_empty(0) for w in like],
            h0.new_empty(h0.shape), c0.new_empty(c0.shape))


@C.custom_op("lstm_bwd", _fake_bwd)
def lstm_bwd(grad_out: Tensor, grad_hn: Tensor, grad_cn: Tensor, xp: Tensor, w_hh: Tensor, w_hr: Optional[Tensor],
             w_ci: Optional[Tensor], w_cf: Optional[Tensor], w_co: Optional[Tensor], ln_w_hh: Optional[Tensor],
             ln_w_c: Optional[Tensor], ln_b_c: Optional[Tensor], h0: Tensor, c0: Tensor, lengths: Optional[Tensor],
             driver: int, out: Tensor, gs: Tensor, cs: Tensor, ms: Tensor, nz: Tensor, nc: Tensor, rstd: Tensor
             ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backpropagation through time of :func:`lstm_fwd`: the gradients of ``xp``, every weight
    (an empty tensor for an absent one), ``h0`` and ``c0``."""
    if xp.shape[0] == 0:
        grads = [torch.zeros_like(xp), torch.zeros_like(w_hh)] + \
            [torch.zeros_like(w) if w is not None else None for w in (w_hr, w_ci, w_cf, w_co, ln_w_hh, ln_w_c, ln_b_c)] + \
            [grad_hn.clone(), grad_cn.clone()]
    else:
        grads = lstm_backward(grad_out, grad_hn, grad_cn, xp, w_hh, w_hr, w_ci, w_cf, w_co, ln_w_hh, ln_w_c, ln_b_c,
                              h0, c0, lengths, driver, out, gs, cs, ms, nz, nc, rstd)
    return tuple(g if g is not None else xp.new_empty(0) for g in grads)


def _twin(xp, w_hh, w_hr, w_ci, w_cf, w_co, ln_w_hh, ln_w_c, ln_b_c, h0, c0, lengths, eps):
    """:func:`lstm_fwd`'s visible outputs ``(out, h_n, c_n)`` in plain PyTorch ops (the fused backend's
    reference twins), for a differentiable backward. The layers use one flag at a time."""
    from ..fused import twins
    if w_ci is None and ln_w_hh is None:
        return twins.lstm_fwd(xp, w_hh, w_hr, h0, c0, lengths)
    if w_hr is None and ln_w_hh is None:
        return twins.peephole_fwd(xp, w_hh, w_ci, w_cf, w_co, h0, c0, lengths)
    if w_hr is None and w_ci is None:
        return twins.ln_lstm_fwd(xp, w_hh, ln_w_hh, ln_w_c, ln_b_c, h0, c0, lengths, eps)
    raise NotImplementedError("rnnkit_triton::lstm_fwd: second derivatives with more than one of proj_size, "
                              "peepholes and LayerNorm at once are not implemented")


def _setup(ctx, inputs, output):
    xp, w_hh, w_hr, w_ci, w_cf, w_co, ln_w_hh, ln_w_c, ln_b_c, h0, c0, lengths, eps, driver = inputs
    ctx.driver, ctx.eps = driver, eps
    ctx.present = [t is not None for t in inputs[:12]]
    ctx.save_for_backward(*inputs[:12], *output[:1], *output[3:])


def _backward(ctx, g_out, g_hn, g_cn, *_saved_grads):
    saved = ctx.saved_tensors
    ins, (out, gs, cs, ms, nz, nc, rstd) = saved[:12], saved[12:]
    if torch.is_grad_enabled():  # the backward must itself be differentiable: the twin's
        wanted = [i for i in range(11) if ins[i] is not None and ctx.needs_input_grad[i]]
        return (*C.twin_backward(lambda *a: _twin(*a, ctx.eps), ins, wanted, (g_out, g_hn, g_cn)), None, None)
    g_out = C.zeros_if_none(g_out, out)
    g_hn = C.zeros_if_none(g_hn, ins[9])
    g_cn = C.zeros_if_none(g_cn, ins[10])
    grads = lstm_bwd(g_out, g_hn, g_cn, *ins, ctx.driver, out, gs, cs, ms, nz, nc, rstd)
    result = list(grads) + [None, None, None]  # lengths, eps, driver
    for i in _OPTIONAL:
        if not ctx.present[i]:
            result[i] = None
    return tuple(result)


lstm_fwd.register_autograd(_backward, setup_context=_setup)


def lstm_sequence(xp: Tensor, w_hh: Tensor, h0: Tensor, c0: Tensor, lengths: Optional[Tensor], *,
                  w_hr: Optional[Tensor] = None, peepholes=(None, None, None), ln=(None, None, None),
                  eps: float = 1e-5, driver: Optional[int] = None):
    """``(out (L, N, H_out), h_n, c_n)`` of one LSTM-family layer-direction on ``xp`` (every term
    that does not depend on ``h`` already added); ``driver`` None chooses by size."""
    H, P = xp.shape[2] // 4, h0.shape[1]
    if driver is None:
        driver = C.driver_for(H, P)
    out, h_n, c_n, *_ = lstm_fwd(xp, w_hh, w_hr, *peepholes, *ln, h0, c0, lengths, float(eps), driver)
    return out, h_n, c_n


def scan_lstm(spec, p, x: Tensor, state, lengths: Optional[Tensor]):
    """The runner's scan for ``torch.nn.LSTM``-compatible layers (with or without ``proj_size``)."""
    xp = C.project(x, p["weight_ih"], C.bias_sum(p))
    out, h_n, c_n = lstm_sequence(xp, p["weight_hh"], state[0], state[1], lengths, w_hr=p.get("weight_hr"))
    return out, (h_n, c_n)
