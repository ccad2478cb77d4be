"""The fused ops joined to PyTorch: their schemas (defined on import), fake (meta)
implementations for ``torch.compile``/``torch.export``, and autograd formulas that call
the hand-written backward ops (and the reference twins for a differentiable backward).

The ops live under ``torch.ops.rnnkit_fused``; the C++ library (``csrc/``, one file per family),
built and loaded on first use, adds their CPU kernels:

* ``rnn_fwd / lstm_fwd / gru_fwd / peephole_fwd / ln_lstm_fwd / indrnn_fwd``: a whole sequence, one layer, one direction,
  on the input projection ``xp (L, N, G)`` computed beforehand in one GEMM.
  Besides ``out (L, N, H_out)`` and the final state they return what the
  backward needs (gate activations, cell states), which the wrappers below drop.
* ``rnn_bwd / lstm_bwd / gru_bwd / peephole_bwd / ln_lstm_bwd / indrnn_bwd``: backpropagation through time.
* ``ln_gru_fwd / ln_gru_bwd``: the LayerNorm GRU, the same way.
* ``lstm_infer``, ``gru_infer``: the LSTM's / GRU's ``out`` and final state from the unprojected input, for a
  call that needs no gradient (no autograd): nothing saved, the input projected in chunks of steps inside the op.
* ``rnn_cell / lstm_cell / gru_cell``: one inference step (no autograd).
* ``conv_lstm_fwd/bwd``, ``conv_gru_fwd/bwd``: ConvLSTM / ConvGRU on their input convolution
  ``xp (L, N, G, *S)``; the recurrent convolution runs inside the op's time loop (ATen from C++).
* ``lstm_reg_fwd / lstm_reg_bwd``, ``gru_reg_fwd / gru_reg_bwd``: the LSTM and GRU with zoneout and recurrent dropout (the runner's masks as
  arguments, see :func:`lstm_reg_sequence`); ``peephole_reg_*``, ``ln_lstm_reg_*``, ``ln_gru_reg_*``: the peephole
  and LayerNorm cells the same way (their plain ops are the same time loop without regularizers, csrc/regularize.h).
* ``project_fwd / project_bwd``: the input projection ``x W^T + b`` and its backward, ATen's
  products run on the calling thread when small (threading by work; see :func:`project`).

:func:`register` runs once, when rnnkit is imported.
"""

from __future__ import annotations

import functools

from typing import Optional, Tuple

import torch
from torch import Tensor

_registered = False
ACT = {"rnn_tanh": 0, "rnn_relu": 1, "indrnn_tanh": 0, "indrnn_relu": 1}


def _ops():
    return torch.ops.rnnkit_fused


# ------------------------------------------------------------------ fake implementations

def _saved(t: Tensor) -> torch.dtype:
    """The dtype of the float tensors a forward saves for its backward (gate
    activations, cell states): float32 for bfloat16 sequences (the kernels keep
    them in float32 across steps), else the sequence's own dtype."""
    return torch.float32 if t.dtype == torch.bfloat16 else t.dtype


def _fake_rnn_fwd(xp, w_hh, h0, lengths, act):
    L, N, H = xp.shape[0], xp.shape[1], w_hh.shape[1]
    return xp.new_empty(L, N, H), xp.new_empty(N, H)


def _fake_rnn_bwd(grad_out, grad_hn, w_hh, h0, lengths, out, act):
    return out.new_empty(out.shape), w_hh.new_empty(w_hh.shape), h0.new_empty(h0.shape)


def _fake_lstm_fwd(xp, w_hh, w_hr, h0, c0, lengths):
    L, N, G = xp.shape
    H, P = G // 4, w_hh.shape[1]
    ms = xp.new_empty(L, N, H) if w_hr is not None else xp.new_empty(0)
    return (xp.new_empty(L, N, P), xp.new_empty(N, P), xp.new_empty(N, H), xp.new_empty(L, N, G, dtype=_saved(xp)),
            xp.new_empty(L, N, H, dtype=_saved(xp)), ms)


def _fake_lstm_infer(x, w_ih, b, w_hh, w_hr, h0, c0, lengths):
    L, N = x.shape[0], x.shape[1]
    H, P = w_hh.shape[0] // 4, w_hh.shape[1]
    return x.new_empty(L, N, P), x.new_empty(N, P), x.new_empty(N, H)


def _fake_lstm_bwd(grad_out, grad_hn, grad_cn, w_hh, w_hr, h0, c0, lengths, out, gates, cs, ms):
    g_hr = w_hr.new_empty(w_hr.shape) if w_hr is not None else out.new_empty(0)
    return out.new_empty(gates.shape), w_hh.new_empty(w_hh.shape), g_hr, h0.new_empty(h0.shape), \
        c0.new_empty(c0.shape)


def _fake_lstm_reg_fwd(xp, w_hh, w_hr, h0, c0, lengths, rd_mask, zo_h, zo_c, zo_h_rate, zo_c_rate):
    L, N, G = xp.shape
    H, P = G // 4, w_hh.shape[1]
    ms = xp.new_empty(L, N, H) if w_hr is not None else xp.new_empty(0)
    cn = xp.new_empty(L, N, H) if (zo_c is not None or zo_c_rate > 0) else xp.new_empty(0)
    return (xp.new_empty(L, N, P), xp.new_empty(N, P), xp.new_empty(N, H), xp.new_empty(L, N, G),
            xp.new_empty(L, N, H), cn, ms)


def _fake_lstm_reg_bwd(grad_out, grad_hn, grad_cn, w_hh, w_hr, h0, c0, lengths, out, gates, cs, cn, ms, rd_mask, zo_h,
                       zo_c, zo_h_rate, zo_c_rate):
    g_hr = w_hr.new_empty(w_hr.shape) if w_hr is not None else out.new_empty(0)
    return out.new_empty(gates.shape), w_hh.new_empty(w_hh.shape), g_hr, h0.new_empty(h0.shape), \
        c0.new_empty(c0.shape)


def _fake_gru_infer(x, w_ih, b_ih, w_hh, b_hh, h0, lengths):
    L, N, H = x.shape[0], x.shape[1], w_hh.shape[1]
    return x.new_empty(L, N, H), x.new_empty(N, H)


def _fake_gru_fwd(xp, w_hh, b_hh, h0, lengths):
    L, N, G = xp.shape
    H = w_hh.shape[1]
    return xp.new_empty(L, N, H), xp.new_empty(N, H), xp.new_empty(L, N, G, dtype=_saved(xp)), \
        xp.new_empty(L, N, H, dtype=_saved(xp))


def _fake_gru_reg_fwd(xp, w_hh, b_hh, h0, lengths, rd_mask, zo_h, zo_h_rate):
    return _fake_gru_fwd(xp, w_hh, b_hh, h0, lengths)


def _fake_gru_reg_bwd(grad_out, grad_hn, w_hh, h0, lengths, out, rzn, hn, rd_mask, zo_h, zo_h_rate):
    return _fake_gru_bwd(grad_out, grad_hn, w_hh, h0, lengths, out, rzn, hn)


def _fake_gru_bwd(grad_out, grad_hn, w_hh, h0, lengths, out, rzn, hn):
    return out.new_empty(rzn.shape), w_hh.new_empty(w_hh.shape), w_hh.new_empty(w_hh.shape[0]), \
        h0.new_empty(h0.shape)


def _fake_peephole_fwd(xp, w_hh, w_ci, w_cf, w_co, h0, c0, lengths):
    L, N, G = xp.shape
    H = G // 4
    return xp.new_empty(L, N, H), xp.new_empty(N, H), xp.new_empty(N, H), xp.new_empty(L, N, G), \
        xp.new_empty(L, N, H)


def _fake_peephole_bwd(grad_out, grad_hn, grad_cn, w_hh, w_ci, w_cf, w_co, h0, c0, lengths, out, gates, cs):
    return gates.new_empty(gates.shape), w_hh.new_empty(w_hh.shape), w_ci.new_empty(w_ci.shape), \
        w_cf.new_empty(w_cf.shape), w_co.new_empty(w_co.shape), h0.new_empty(h0.shape), c0.new_empty(c0.shape)


def _fake_peephole_reg_fwd(xp, w_hh, w_ci, w_cf, w_co, h0, c0, lengths, rd_mask, zo_h, zo_c, zo_h_rate, zo_c_rate):
    L, N, G = xp.shape
    cn = xp.new_empty(L, N, G // 4) if (zo_c is not None or zo_c_rate > 0) else xp.new_empty(0)
    return (*_fake_peephole_fwd(xp, w_hh, w_ci, w_cf, w_co, h0, c0, lengths), cn)


def _fake_peephole_reg_bwd(grad_out, grad_hn, grad_cn, w_hh, w_ci, w_cf, w_co, h0, c0, lengths, out, gates, cs, cn,
                           rd_mask, zo_h, zo_c, zo_h_rate, zo_c_rate):
    return _fake_peephole_bwd(grad_out, grad_hn, grad_cn, w_hh, w_ci, w_cf, w_co, h0, c0, lengths, out, gates, cs)


def _fake_ln_lstm_reg_fwd(xp, w_hh, ln_w_hh, ln_w_c, ln_b_c, h0, c0, lengths, eps, rd_mask, zo_h, zo_c, zo_h_rate,
                          zo_c_rate):
    return _fake_ln_lstm_fwd(xp, w_hh, ln_w_hh, ln_w_c, ln_b_c, h0, c0, lengths, eps)


def _fake_ln_lstm_reg_bwd(grad_out, grad_hn, grad_cn, w_hh, ln_w_hh, ln_w_c, ln_b_c, h0, c0, lengths, out, gates, cs,
                          nz, nc, rstd, rd_mask, zo_h, zo_c, zo_h_rate, zo_c_rate):
    return _fake_ln_lstm_bwd(grad_out, grad_hn, grad_cn, w_hh, ln_w_hh, ln_w_c, ln_b_c, h0, c0, lengths, out, gates,
                             cs, nz, nc, rstd)


def _fake_ln_gru_reg_fwd(xp, w_hh, ln_w_hh, shift, h0, lengths, eps, rd_mask, zo_h, zo_h_rate):
    return _fake_ln_gru_fwd(xp, w_hh, ln_w_hh, shift, h0, lengths, eps)


def _fake_ln_gru_reg_bwd(grad_out, grad_hn, w_hh, ln_w_hh, shift, h0, lengths, out, gates, nz, rstd, rd_mask, zo_h,
                         zo_h_rate):
    return _fake_ln_gru_bwd(grad_out, grad_hn, w_hh, ln_w_hh, shift, h0, lengths, out, gates, nz, rstd)


def _fake_ln_lstm_fwd(xp, w_hh, ln_w_hh, ln_w_c, ln_b_c, h0, c0, lengths, eps):
    L, N, G = xp.shape
    H = G // 4
    return xp.new_empty(L, N, H), xp.new_empty(N, H), xp.new_empty(N, H), xp.new_empty(L, N, G), \
        xp.new_empty(L, N, H), xp.new_empty(L, N, G), xp.new_empty(L, N, H), xp.new_empty(L, N, 2)


def _fake_ln_lstm_bwd(grad_out, grad_hn, grad_cn, w_hh, ln_w_hh, ln_w_c, ln_b_c, h0, c0, lengths, out, gates, cs,
                      nz, nc, rstd):
    return gates.new_empty(gates.shape), w_hh.new_empty(w_hh.shape), ln_w_hh.new_empty(ln_w_hh.shape), \
        ln_w_c.new_empty(ln_w_c.shape), ln_b_c.new_empty(ln_b_c.shape), h0.new_empty(h0.shape), c0.new_empty(c0.shape)


def _fake_project_fwd(x, w, b):
    return x.new_empty(x.shape[0], w.shape[0])


def _fake_project_bwd(grad, x, w, mask):
    empty = x.new_empty(0)
    return (x.new_empty(x.shape) if mask[0] else empty, w.new_empty(w.shape) if mask[1] else empty,
            w.new_empty(w.shape[0]) if mask[2] else empty)


def _fake_indrnn_fwd(xp, u, h0, lengths, act):
    L, N, H = xp.shape
    return xp.new_empty(L, N, H), xp.new_empty(N, H)


def _fake_indrnn_bwd(grad_out, grad_hn, u, h0, lengths, out, act):
    return out.new_empty(out.shape), u.new_empty(u.shape), h0.new_empty(h0.shape)


def _fake_ln_gru_fwd(xp, w_hh, ln_w_hh, shift, h0, lengths, eps):
    L, N, G = xp.shape
    H = w_hh.shape[1]
    return xp.new_empty(L, N, H), xp.new_empty(N, H), xp.new_empty(L, N, G), xp.new_empty(L, N, G), \
        xp.new_empty(L, N)


def _fake_ln_gru_bwd(grad_out, grad_hn, w_hh, ln_w_hh, shift, h0, lengths, out, gates, nz, rstd):
    return gates.new_empty(gates.shape), w_hh.new_empty(w_hh.shape), ln_w_hh.new_empty(ln_w_hh.shape), \
        shift.new_empty(shift.shape), h0.new_empty(h0.shape)


def _fake_lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh):
    return c.new_empty(c.shape), c.new_empty(c.shape)


def _fake_gru_cell(x, h, w_ih, w_hh, b_ih, b_hh):
    return h.new_empty(h.shape)


def _fake_rnn_cell(x, h, w_ih, w_hh, b_ih, b_hh, act):
    return h.new_empty(h.shape)


# ConvLSTM / ConvGRU: xp (L, N, G, *S), states (N, hidden, *S), w_hh (G, hidden, *kernel)

def _fake_conv_lstm_fwd(xp, w_hh, w_ci, w_cf, w_co, h0, c0, lengths):
    L, N, hid, spatial = xp.shape[0], xp.shape[1], w_hh.shape[1], xp.shape[3:]
    return xp.new_empty(L, N, hid, *spatial), xp.new_empty(N, hid, *spatial), xp.new_empty(N, hid, *spatial), \
        xp.new_empty(xp.shape), xp.new_empty(L, N, hid, *spatial)


def _fake_conv_lstm_bwd(grad_out, grad_hn, grad_cn, w_hh, w_ci, w_cf, w_co, h0, c0, lengths, out, gates, cs):
    peep = [w.new_empty(w.shape) if w is not None else out.new_empty(0) for w in (w_ci, w_cf, w_co)]
    return gates.new_empty(gates.shape), w_hh.new_empty(w_hh.shape), *peep, h0.new_empty(h0.shape), \
        c0.new_empty(c0.shape)


def _fake_conv_gru_fwd(xp, w_hh, b_hh, h0, lengths):
    L, N, hid, spatial = xp.shape[0], xp.shape[1], w_hh.shape[1], xp.shape[3:]
    return xp.new_empty(L, N, hid, *spatial), xp.new_empty(N, hid, *spatial), xp.new_empty(xp.shape), \
        xp.new_empty(L, N, hid, *spatial)


def _fake_conv_gru_bwd(grad_out, grad_hn, w_hh, h0, lengths, out, rzn, hn):
    return rzn.new_empty(rzn.shape), w_hh.new_empty(w_hh.shape), w_hh.new_empty(w_hh.shape[0]), \
        h0.new_empty(h0.shape)


# ------------------------------------------------------------------ autograd
#
# Each *_fwd op is differentiated through one autograd.Function (forward / setup_context /
# backward, so torch.func's grad, vjp, jacrev and vmap can run it). setup_context saves every
# input and output; the backward calls the op's hand-written C++ backward, except when the
# backward must itself be differentiable (create_graph=True: second derivatives, torch.func):
# then it differentiates the op's reference twin (rnnkit/fused/twins.py) on the saved inputs,
# so higher derivatives are exact instead of silently zero.


def _zeros_if_none(g: Optional[Tensor], like: Tensor) -> Tensor:
    return torch.zeros_like(like) if g is None else g


def _bwd_rnn(inputs, outputs, grads):
    xp, w_hh, h0, lengths, act = inputs
    out = outputs[0]
    dxp, dw, dh0 = _ops().rnn_bwd(_zeros_if_none(grads[0], out), _zeros_if_none(grads[1], h0), w_hh, h0, lengths,
                                  out, act)
    return dxp, dw, dh0, None, None


def _bwd_lstm(inputs, outputs, grads):
    xp, w_hh, w_hr, h0, c0, lengths = inputs
    out, _, _, gates, cs, ms = outputs
    dxp, dw_hh, dw_hr, dh0, dc0 = _ops().lstm_bwd(
        _zeros_if_none(grads[0], out), _zeros_if_none(grads[1], h0), _zeros_if_none(grads[2], c0), w_hh, w_hr, h0, c0,
        lengths, out, gates, cs, ms)
    return dxp, dw_hh, (dw_hr if w_hr is not None else None), dh0, dc0, None


def _bwd_lstm_reg(inputs, outputs, grads):
    xp, w_hh, w_hr, h0, c0, lengths, rd_mask, zo_h, zo_c, zo_h_rate, zo_c_rate = inputs
    out, _, _, gates, cs, cn, ms = outputs
    dxp, dw_hh, dw_hr, dh0, dc0 = _ops().lstm_reg_bwd(
        _zeros_if_none(grads[0], out), _zeros_if_none(grads[1], h0), _zeros_if_none(grads[2], c0), w_hh, w_hr, h0, c0,
        lengths, out, gates, cs, cn, ms, rd_mask, zo_h, zo_c, zo_h_rate, zo_c_rate)
    return dxp, dw_hh, (dw_hr if w_hr is not None else None), dh0, dc0, None, None, None, None, None, None


def _bwd_gru(inputs, outputs, grads):
    xp, w_hh, b_hh, h0, lengths = inputs
    out, _, rzn, hn = outputs
    dxp, dw_hh, db_hh, dh0 = _ops().gru_bwd(_zeros_if_none(grads[0], out), _zeros_if_none(grads[1], h0), w_hh, h0,
                                            lengths, out, rzn, hn)
    return dxp, dw_hh, (db_hh if b_hh is not None else None), dh0, None


def _bwd_gru_reg(inputs, outputs, grads):
    xp, w_hh, b_hh, h0, lengths, rd_mask, zo_h, zo_h_rate = inputs
    out, _, rzn, hn = outputs
    dxp, dw_hh, db_hh, dh0 = _ops().gru_reg_bwd(_zeros_if_none(grads[0], out), _zeros_if_none(grads[1], h0), w_hh,
                                                h0, lengths, out, rzn, hn, rd_mask, zo_h, zo_h_rate)
    return dxp, dw_hh, (db_hh if b_hh is not None else None), dh0, None, None, None, None


def _bwd_peephole(inputs, outputs, grads):
    xp, w_hh, w_ci, w_cf, w_co, h0, c0, lengths = inputs
    out, _, _, gates, cs = outputs
    grads = _ops().peephole_bwd(_zeros_if_none(grads[0], out), _zeros_if_none(grads[1], h0),
                                _zeros_if_none(grads[2], c0), w_hh, w_ci, w_cf, w_co, h0, c0, lengths, out, gates, cs)
    return (*grads, None)


def _bwd_ln_lstm(inputs, outputs, grads):
    xp, w_hh, ln_w_hh, ln_w_c, ln_b_c, h0, c0, lengths, eps = inputs
    out, _, _, gates, cs, nz, nc, rstd = outputs
    grads = _ops().ln_lstm_bwd(_zeros_if_none(grads[0], out), _zeros_if_none(grads[1], h0),
                               _zeros_if_none(grads[2], c0), w_hh, ln_w_hh, ln_w_c, ln_b_c, h0, c0, lengths, out,
                               gates, cs, nz, nc, rstd)
    return (*grads, None, None)


def _bwd_peephole_reg(inputs, outputs, grads):
    xp, w_hh, w_ci, w_cf, w_co, h0, c0, lengths, rd_mask, zo_h, zo_c, zo_h_rate, zo_c_rate = inputs
    out, _, _, gates, cs, cn = outputs
    grads = _ops().peephole_reg_bwd(_zeros_if_none(grads[0], out), _zeros_if_none(grads[1], h0),
                                    _zeros_if_none(grads[2], c0), w_hh, w_ci, w_cf, w_co, h0, c0, lengths, out, gates,
                                    cs, cn, rd_mask, zo_h, zo_c, zo_h_rate, zo_c_rate)
    return (*grads, None, None, None, None, None, None)


def _bwd_ln_lstm_reg(inputs, outputs, grads):
    xp, w_hh, ln_w_hh, ln_w_c, ln_b_c, h0, c0, lengths, eps, rd_mask, zo_h, zo_c, zo_h_rate, zo_c_rate = inputs
    out, _, _, gates, cs, nz, nc, rstd = outputs
    grads = _ops().ln_lstm_reg_bwd(_zeros_if_none(grads[0], out), _zeros_if_none(grads[1], h0),
                                   _zeros_if_none(grads[2], c0), w_hh, ln_w_hh, ln_w_c, ln_b_c, h0, c0, lengths, out,
                                   gates, cs, nz, nc, rstd, rd_mask, zo_h, zo_c, zo_h_rate, zo_c_rate)
    return (*grads, None, None, None, None, None, None, None)


def _bwd_ln_gru_reg(inputs, outputs, grads):
    xp, w_hh, ln_w_hh, shift, h0, lengths, eps, rd_mask, zo_h, zo_h_rate = inputs
    out, _, gates, nz, rstd = outputs
    grads = _ops().ln_gru_reg_bwd(_zeros_if_none(grads[0], out), _zeros_if_none(grads[1], h0), w_hh, ln_w_hh, shift,
                                  h0, lengths, out, gates, nz, rstd, rd_mask, zo_h, zo_h_rate)
    return (*grads, None, None, None, None, None)


def _bwd_indrnn(inputs, outputs, grads):
    xp, u, h0, lengths, act = inputs
    out = outputs[0]
    dxp, du, dh0 = _ops().indrnn_bwd(_zeros_if_none(grads[0], out), _zeros_if_none(grads[1], h0), u, h0, lengths,
                                     out, act)
    return dxp, du, dh0, None, None


def _bwd_conv_lstm(inputs, outputs, grads):
    xp, w_hh, w_ci, w_cf, w_co, h0, c0, lengths = inputs
    out, _, _, gates, cs = outputs
    dxp, dw_hh, dw_ci, dw_cf, dw_co, dh0, dc0 = _ops().conv_lstm_bwd(
        _zeros_if_none(grads[0], out), _zeros_if_none(grads[1], h0), _zeros_if_none(grads[2], c0), w_hh, w_ci, w_cf,
        w_co, h0, c0, lengths, out, gates, cs)
    peep = (dw_ci, dw_cf, dw_co) if w_ci is not None else (None, None, None)
    return dxp, dw_hh, *peep, dh0, dc0, None


def _bwd_conv_gru(inputs, outputs, grads):
    xp, w_hh, b_hh, h0, lengths = inputs
    out, _, rzn, hn = outputs
    dxp, dw_hh, db_hh, dh0 = _ops().conv_gru_bwd(_zeros_if_none(grads[0], out), _zeros_if_none(grads[1], h0), w_hh,
                                                 h0, lengths, out, rzn, hn)
    return dxp, dw_hh, (db_hh if b_hh is not None else None), dh0, None


def _bwd_ln_gru(inputs, outputs, grads):
    xp, w_hh, ln_w_hh, shift, h0, lengths, eps = inputs
    out, _, gates, nz, rstd = outputs
    grads = _ops().ln_gru_bwd(_zeros_if_none(grads[0], out), _zeros_if_none(grads[1], h0), w_hh, ln_w_hh, shift, h0,
                              lengths, out, gates, nz, rstd)
    return (*grads, None, None)


def _bwd_project(inputs, outputs, grads):
    x, w, b = inputs
    mask = [x.requires_grad, w.requires_grad, b is not None and b.requires_grad]
    if grads[0] is None or not any(mask):
        return None, None, None
    dx, dw, db = _ops().project_bwd(grads[0], x, w, mask)
    return tuple(g if m else None for g, m in zip((dx, dw, db), mask))


BACKWARDS = {
    "rnn_fwd": _bwd_rnn, "lstm_fwd": _bwd_lstm, "gru_fwd": _bwd_gru, "peephole_fwd": _bwd_peephole,
    "ln_lstm_fwd": _bwd_ln_lstm, "indrnn_fwd": _bwd_indrnn, "conv_lstm_fwd": _bwd_conv_lstm,
    "conv_gru_fwd": _bwd_conv_gru, "ln_gru_fwd": _bwd_ln_gru, "project_fwd": _bwd_project,
    "lstm_reg_fwd": _bwd_lstm_reg, "gru_reg_fwd": _bwd_gru_reg, "peephole_reg_fwd": _bwd_peephole_reg,
    "ln_lstm_reg_fwd": _bwd_ln_lstm_reg, "ln_gru_reg_fwd": _bwd_ln_gru_reg,
}
"""Each ``*_fwd`` op's first-order backward: ``(inputs, outputs, grads of the outputs) -> grads of the inputs``."""


UNREAD_OUTPUTS = {
    "rnn_fwd": (1,), "indrnn_fwd": (1,), "gru_fwd": (1,), "gru_reg_fwd": (1,), "conv_gru_fwd": (1,),
    "ln_gru_fwd": (1,), "lstm_fwd": (1, 2), "lstm_reg_fwd": (1, 2), "peephole_fwd": (1, 2), "ln_lstm_fwd": (1, 2),
    "conv_lstm_fwd": (1, 2), "project_fwd": (0,), "peephole_reg_fwd": (1, 2), "ln_lstm_reg_fwd": (1, 2),
    "ln_gru_reg_fwd": (1,),
}
"""Each ``*_fwd`` op's outputs that its backward does not read (the final states; ``project_fwd``'s only
output): saved as None, so that a caller may change them in place before the backward, as torch.nn's
final states (a fused cell returns them as its new state). The sequence output ``out`` (index 0) is read
(the backward needs every step's ``h``): the backends hand the caller a copy (``own_output``)."""


def _setup(ctx, inputs, output, name: str = "") -> None:
    output = output if isinstance(output, tuple) else (output,)  # project_fwd returns one tensor
    unread = UNREAD_OUTPUTS.get(name, ())
    output = tuple(None if i in unread else t for i, t in enumerate(output))
    tensors = [t if isinstance(t, Tensor) else None for t in (*inputs, *output)]
    ctx.save_for_backward(*tensors)
    ctx.plain = [None if isinstance(t, Tensor) else t for t in inputs]  # act, eps: not tensors
    ctx.num_inputs = len(inputs)
    ctx.set_materialize_grads(False)  # the saved extra outputs get no gradient: no zero tensors for them


def _backward(name: str, ctx, grads):
    saved = ctx.saved_tensors
    inputs = tuple(t if p is None else p for t, p in zip(saved[:ctx.num_inputs], ctx.plain))
    outputs = saved[ctx.num_inputs:]
    if torch.is_grad_enabled():
        return _twin_backward(name, ctx, inputs, grads)
    return BACKWARDS[name](inputs, outputs, grads)


def _twin_backward(name: str, ctx, inputs, grads):
    """A differentiable backward (``create_graph=True``, and inside ``torch.func`` transforms):
    the vector-Jacobian product of the op's reference twin on the saved inputs, taken with
    ``torch.func.vjp`` so that both autograd and torch.func can differentiate it again."""
    from .twins import TWINS
    wanted = [i for i, t in enumerate(inputs) if isinstance(t, Tensor) and ctx.needs_input_grad[i]]
    result = [None] * len(inputs)
    if not wanted:
        return tuple(result)

    def visible(*diff):
        args = list(inputs)
        for i, t in zip(wanted, diff):
            args[i] = t
        return TWINS[name](*args)

    with torch.enable_grad():
        outs, pullback = torch.func.vjp(visible, *[inputs[i] for i in wanted])
        found = pullback(tuple(torch.zeros_like(o) if g is None else g for o, g in zip(outs, grads)))
    for i, g in zip(wanted, found):
        result[i] = g
    return tuple(result)


def _function(name: str):
    """The autograd.Function of op ``name``."""

    def forward(*args):
        return getattr(_ops(), name)(*args)

    def setup_context(ctx, inputs, output):
        _setup(ctx, inputs, output, name)

    def backward(ctx, *grads):
        return _backward(name, ctx, grads)

    return type(f"Fused_{name}", (torch.autograd.Function,), {
        "forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward), "generate_vmap_rule": True})


FUNCTIONS = {name: _function(name) for name in BACKWARDS}


def _eager_function(name: str):
    """The same op and backward as :func:`_function`'s, as an autograd.Function whose ``forward``
    takes ``ctx`` (no ``setup_context``) and calls the op's CPU kernel below the autograd key.
    ``Function.apply`` of a ``setup_context`` Function binds its arguments through
    ``inspect.signature`` on every call, and the op's registered autograd is Python too: together
    about 50 us per op, the whole cost of a small layer. torch.func transforms need
    ``setup_context``, so :func:`apply` takes this one only in plain eager mode."""

    def forward(ctx, *args):
        with torch._C._AutoDispatchBelowAutograd():
            output = getattr(_ops(), name)(*args)
        _setup(ctx, args, output, name)
        return output

    def backward(ctx, *grads):
        return _backward(name, ctx, grads)

    return type(f"FusedEager_{name}", (torch.autograd.Function,), {
        "forward": staticmethod(forward), "backward": staticmethod(backward)})


EAGER_FUNCTIONS = {name: _eager_function(name) for name in BACKWARDS}

_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


def plain_eager(tensors) -> bool:
    """Plain tensors (no subclass) in plain eager mode: no tracer, torch.compile or export is active.
    The backend adds autocast to it (``backend._plain_eager``: a fused op standing in for ATen's parts),
    :func:`apply` torch.func transforms (an op called below its autograd kernel)."""
    return (all(type(t) in _PLAIN_TENSORS for t in tensors) and not torch._C._get_tracing_state()
            and not torch.compiler.is_compiling() and not torch.compiler.is_exporting())


def _below_autograd(args) -> bool:
    """Whether the op may be called below its (Python) autograd kernel: :func:`plain_eager` with no
    torch.func transform active."""
    return (plain_eager([a for a in args if isinstance(a, Tensor)])
            and torch._C._functorch.peek_interpreter_stack() is None)


def apply(name: str, *args):
    """Run op ``name`` (a ``*_fwd``), through its autograd.Function when a gradient is needed
    (``torch.jit.trace`` records the op itself, whose registered autograd has the same formulas).
    In plain eager mode both routes skip the op's Python autograd kernel (:func:`_eager_function`)."""
    eager = _below_autograd(args)
    if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
        if eager:
            return EAGER_FUNCTIONS[name].apply(*args)
        if not torch._C._get_tracing_state():
            return FUNCTIONS[name].apply(*args)
    elif eager:
        with torch._C._AutoDispatchBelowAutograd():
            return getattr(_ops(), name)(*args)
    return getattr(_ops(), name)(*args)


def _registered_backward(name: str):
    def backward(ctx, *grads):
        return _backward(name, ctx, grads)
    return backward


# ------------------------------------------------------------------ schemas (on import) and the lazy kernel load

SCHEMAS = {
    "rnn_fwd": "rnn_fwd(Tensor xp, Tensor w_hh, Tensor h0, Tensor? lengths, int act) -> (Tensor, Tensor)",
    "rnn_bwd": "rnn_bwd(Tensor grad_out, Tensor grad_hn, Tensor w_hh, Tensor h0, Tensor? lengths, Tensor out, "
               "int act) -> (Tensor, Tensor, Tensor)",
    "lstm_fwd": "lstm_fwd(Tensor xp, Tensor w_hh, Tensor? w_hr, Tensor h0, Tensor c0, Tensor? lengths) "
                "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    "lstm_infer": "lstm_infer(Tensor x, Tensor w_ih, Tensor? b, Tensor w_hh, Tensor? w_hr, Tensor h0, Tensor c0, "
                  "Tensor? lengths) -> (Tensor, Tensor, Tensor)",
    "lstm_bwd": "lstm_bwd(Tensor grad_out, Tensor grad_hn, Tensor grad_cn, Tensor w_hh, Tensor? w_hr, Tensor h0, "
                "Tensor c0, Tensor? lengths, Tensor out, Tensor gates, Tensor cs, Tensor ms) "
                "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    "gru_infer": "gru_infer(Tensor x, Tensor w_ih, Tensor? b_ih, Tensor w_hh, Tensor? b_hh, Tensor h0, "
                 "Tensor? lengths) -> (Tensor, Tensor)",
    "gru_fwd": "gru_fwd(Tensor xp, Tensor w_hh, Tensor? b_hh, Tensor h0, Tensor? lengths) "
               "-> (Tensor, Tensor, Tensor, Tensor)",
    "gru_bwd": "gru_bwd(Tensor grad_out, Tensor grad_hn, Tensor w_hh, Tensor h0, Tensor? lengths, Tensor out, "
               "Tensor rzn, Tensor hn) -> (Tensor, Tensor, Tensor, Tensor)",
    "lstm_cell": "lstm_cell(Tensor x, Tensor h, Tensor c, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh) "
                 "-> (Tensor, Tensor)",
    "gru_cell": "gru_cell(Tensor x, Tensor h, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh) -> Tensor",
    "rnn_cell": "rnn_cell(Tensor x, Tensor h, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, int act) "
                "-> Tensor",
    "peephole_fwd": "peephole_fwd(Tensor xp, Tensor w_hh, Tensor w_ci, Tensor w_cf, Tensor w_co, Tensor h0, "
                    "Tensor c0, Tensor? lengths) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    "peephole_bwd": "peephole_bwd(Tensor grad_out, Tensor grad_hn, Tensor grad_cn, Tensor w_hh, Tensor w_ci, "
                    "Tensor w_cf, Tensor w_co, Tensor h0, Tensor c0, Tensor? lengths, Tensor out, Tensor gates, "
                    "Tensor cs) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    "indrnn_fwd": "indrnn_fwd(Tensor xp, Tensor u, Tensor h0, Tensor? lengths, int act) -> (Tensor, Tensor)",
    "indrnn_bwd": "indrnn_bwd(Tensor grad_out, Tensor grad_hn, Tensor u, Tensor h0, Tensor? lengths, Tensor out, "
                  "int act) -> (Tensor, Tensor, Tensor)",
    "ln_lstm_fwd": "ln_lstm_fwd(Tensor xp, Tensor w_hh, Tensor ln_w_hh, Tensor ln_w_c, Tensor ln_b_c, Tensor h0, "
                   "Tensor c0, Tensor? lengths, float eps) "
                   "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    "ln_lstm_bwd": "ln_lstm_bwd(Tensor grad_out, Tensor grad_hn, Tensor grad_cn, Tensor w_hh, Tensor ln_w_hh, "
                   "Tensor ln_w_c, Tensor ln_b_c, Tensor h0, Tensor c0, Tensor? lengths, Tensor out, Tensor gates, "
                   "Tensor cs, Tensor nz, Tensor nc, Tensor rstd) "
                   "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    "conv_lstm_fwd": "conv_lstm_fwd(Tensor xp, Tensor w_hh, Tensor? w_ci, Tensor? w_cf, Tensor? w_co, Tensor h0, "
                     "Tensor c0, Tensor? lengths) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    "conv_lstm_bwd": "conv_lstm_bwd(Tensor grad_out, Tensor grad_hn, Tensor grad_cn, Tensor w_hh, Tensor? w_ci, "
                     "Tensor? w_cf, Tensor? w_co, Tensor h0, Tensor c0, Tensor? lengths, Tensor out, Tensor gates, "
                     "Tensor cs) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    "conv_gru_fwd": "conv_gru_fwd(Tensor xp, Tensor w_hh, Tensor? b_hh, Tensor h0, Tensor? lengths) "
                    "-> (Tensor, Tensor, Tensor, Tensor)",
    "conv_gru_bwd": "conv_gru_bwd(Tensor grad_out, Tensor grad_hn, Tensor w_hh, Tensor h0, Tensor? lengths, "
                    "Tensor out, Tensor rzn, Tensor hn) -> (Tensor, Tensor, Tensor, Tensor)",
    "ln_gru_fwd": "ln_gru_fwd(Tensor xp, Tensor w_hh, Tensor ln_w_hh, Tensor shift, Tensor h0, Tensor? lengths, "
                  "float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    "ln_gru_bwd": "ln_gru_bwd(Tensor grad_out, Tensor grad_hn, Tensor w_hh, Tensor ln_w_hh, Tensor shift, "
                  "Tensor h0, Tensor? lengths, Tensor out, Tensor gates, Tensor nz, Tensor rstd) "
                  "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    "project_fwd": "project_fwd(Tensor x, Tensor w, Tensor? b) -> Tensor",
    "lstm_reg_fwd": "lstm_reg_fwd(Tensor xp, Tensor w_hh, Tensor? w_hr, Tensor h0, Tensor c0, Tensor? lengths, "
                    "Tensor? rd_mask, Tensor? zo_h, Tensor? zo_c, float zo_h_rate, float zo_c_rate) "
                    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    "gru_reg_fwd": "gru_reg_fwd(Tensor xp, Tensor w_hh, Tensor? b_hh, Tensor h0, Tensor? lengths, Tensor? rd_mask, "
                   "Tensor? zo_h, float zo_h_rate) -> (Tensor, Tensor, Tensor, Tensor)",
    "gru_reg_bwd": "gru_reg_bwd(Tensor grad_out, Tensor grad_hn, Tensor w_hh, Tensor h0, Tensor? lengths, Tensor out, "
                   "Tensor rzn, Tensor hn, Tensor? rd_mask, Tensor? zo_h, float zo_h_rate) "
                   "-> (Tensor, Tensor, Tensor, Tensor)",
    "lstm_reg_bwd": "lstm_reg_bwd(Tensor grad_out, Tensor grad_hn, Tensor grad_cn, Tensor w_hh, Tensor? w_hr, "
                    "Tensor h0, Tensor c0, Tensor? lengths, Tensor out, Tensor gates, Tensor cs, Tensor cn, Tensor ms, "
                    "Tensor? rd_mask, Tensor? zo_h, Tensor? zo_c, float zo_h_rate, float zo_c_rate) "
                    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    "project_bwd": "project_bwd(Tensor grad, Tensor x, Tensor w, bool[3] mask) -> (Tensor, Tensor, Tensor)",
    "peephole_reg_fwd": "peephole_reg_fwd(Tensor xp, Tensor w_hh, Tensor w_ci, Tensor w_cf, Tensor w_co, Tensor h0, "
                        "Tensor c0, Tensor? lengths, Tensor? rd_mask, Tensor? zo_h, Tensor? zo_c, float zo_h_rate, "
                        "float zo_c_rate) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    "peephole_reg_bwd": "peephole_reg_bwd(Tensor grad_out, Tensor grad_hn, Tensor grad_cn, Tensor w_hh, Tensor w_ci, "
                        "Tensor w_cf, Tensor w_co, Tensor h0, Tensor c0, Tensor? lengths, Tensor out, Tensor gates, "
                        "Tensor cs, Tensor cn, Tensor? rd_mask, Tensor? zo_h, Tensor? zo_c, float zo_h_rate, "
                        "float zo_c_rate) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    "ln_lstm_reg_fwd": "ln_lstm_reg_fwd(Tensor xp, Tensor w_hh, Tensor ln_w_hh, Tensor ln_w_c, Tensor ln_b_c, "
                       "Tensor h0, Tensor c0, Tensor? lengths, float eps, Tensor? rd_mask, Tensor? zo_h, Tensor? zo_c, "
                       "float zo_h_rate, float zo_c_rate) "
                       "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    "ln_lstm_reg_bwd": "ln_lstm_reg_bwd(Tensor grad_out, Tensor grad_hn, Tensor grad_cn, Tensor w_hh, "
                       "Tensor ln_w_hh, Tensor ln_w_c, Tensor ln_b_c, Tensor h0, Tensor c0, Tensor? lengths, "
                       "Tensor out, Tensor gates, Tensor cs, Tensor nz, Tensor nc, Tensor rstd, Tensor? rd_mask, "
                       "Tensor? zo_h, Tensor? zo_c, float zo_h_rate, float zo_c_rate) "
                       "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    "ln_gru_reg_fwd": "ln_gru_reg_fwd(Tensor xp, Tensor w_hh, Tensor ln_w_hh, Tensor shift, Tensor h0, "
                      "Tensor? lengths, float eps, Tensor? rd_mask, Tensor? zo_h, float zo_h_rate) "
                      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    "ln_gru_reg_bwd": "ln_gru_reg_bwd(Tensor grad_out, Tensor grad_hn, Tensor w_hh, Tensor ln_w_hh, Tensor shift, "
                      "Tensor h0, Tensor? lengths, Tensor out, Tensor gates, Tensor nz, Tensor rstd, "
                      "Tensor? rd_mask, Tensor? zo_h, float zo_h_rate) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
}
"""Every tensor op's schema. They are defined when rnnkit is imported (so a ``torch.export`` or
``torch.jit`` artifact that calls them loads in a fresh process after ``import rnnkit``); the C++
library only adds CPU kernels, built and loaded on first use (``_build.load``)."""

_LIB = None


def _lazy_kernel(name: str):
    """The op's fallback kernel until the C++ library is loaded: load it, then run the op again
    (its CPU kernel now takes precedence). Only CPU tensors have a kernel."""

    def run(*args):
        from . import _build
        for a in args:
            if isinstance(a, Tensor) and a.device.type != "cpu":
                raise RuntimeError(f"rnnkit_fused::{name}: the fused kernels run on the CPU, got a tensor on "
                                   f"{a.device}")
        reason = _build.load()
        if reason is not None:
            raise RuntimeError(f"rnnkit_fused::{name}: rnnkit's fused CPU kernels are not available: {reason}")
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"rnnkit_fused::{name}", "CPU"):
            raise RuntimeError(f"rnnkit_fused::{name}: the loaded fused library has no CPU kernel for this op")
        return getattr(_ops(), name).default(*args)

    return run


def define() -> None:
    """Define every op's schema with its lazy kernel (once per process)."""
    global _LIB
    if _LIB is not None or hasattr(torch.ops.rnnkit_fused, "lstm_fwd"):
        return  # done, or done by another copy of rnnkit in this process
    lib = torch.library.Library("rnnkit_fused", "DEF")
    for name, schema in SCHEMAS.items():
        lib.define(schema)
        lib.impl(name, _lazy_kernel(name), "CompositeExplicitAutograd")
    _LIB = lib


def register() -> None:
    """Define the ops and attach their fake and autograd implementations (once, on import)."""
    global _registered
    if _registered:
        return
    define()
    for name, fn in [("rnn_fwd", _fake_rnn_fwd), ("rnn_bwd", _fake_rnn_bwd), ("lstm_fwd", _fake_lstm_fwd),
                     ("lstm_bwd", _fake_lstm_bwd), ("lstm_infer", _fake_lstm_infer), ("gru_fwd", _fake_gru_fwd),
                     ("gru_infer", _fake_gru_infer), ("gru_bwd", _fake_gru_bwd),
                     ("peephole_fwd", _fake_peephole_fwd), ("peephole_bwd", _fake_peephole_bwd),
                     ("ln_lstm_fwd", _fake_ln_lstm_fwd), ("ln_lstm_bwd", _fake_ln_lstm_bwd),
                     ("indrnn_fwd", _fake_indrnn_fwd), ("indrnn_bwd", _fake_indrnn_bwd),
                     ("lstm_cell", _fake_lstm_cell), ("gru_cell", _fake_gru_cell), ("rnn_cell", _fake_rnn_cell),
                     ("conv_lstm_fwd", _fake_conv_lstm_fwd), ("conv_lstm_bwd", _fake_conv_lstm_bwd),
                     ("conv_gru_fwd", _fake_conv_gru_fwd), ("conv_gru_bwd", _fake_conv_gru_bwd),
                     ("ln_gru_fwd", _fake_ln_gru_fwd), ("ln_gru_bwd", _fake_ln_gru_bwd),
                     ("project_fwd", _fake_project_fwd), ("project_bwd", _fake_project_bwd),
                     ("lstm_reg_fwd", _fake_lstm_reg_fwd), ("lstm_reg_bwd", _fake_lstm_reg_bwd),
                     ("gru_reg_fwd", _fake_gru_reg_fwd), ("gru_reg_bwd", _fake_gru_reg_bwd),
                     ("peephole_reg_fwd", _fake_peephole_reg_fwd), ("peephole_reg_bwd", _fake_peephole_reg_bwd),
                     ("ln_lstm_reg_fwd", _fake_ln_lstm_reg_fwd), ("ln_lstm_reg_bwd", _fake_ln_lstm_reg_bwd),
                     ("ln_gru_reg_fwd", _fake_ln_gru_reg_fwd), ("ln_gru_reg_bwd", _fake_ln_gru_reg_bwd)]:
        torch.library.register_fake(f"rnnkit_fused::{name}", fn, lib=_LIB)
    for name in BACKWARDS:  # calling the op itself with a gradient (the layers go through FUNCTIONS)
        torch.library.register_autograd(f"rnnkit_fused::{name}", _registered_backward(name),
                                        setup_context=functools.partial(_setup, name=name),
                                        lib=_LIB)
    _registered = True


# ------------------------------------------------------------------ the functions the backend calls

def rnn_sequence(xp: Tensor, w_hh: Tensor, h0: Tensor, lengths: Optional[Tensor], act: int) -> Tuple[Tensor, Tensor]:
    """``(out (L, N, H), h_n (N, H))`` of an Elman RNN on the projected input
    ``xp = x W_ih^T + b_ih + b_hh``; ``act`` 0 is tanh, 1 is relu."""
    return apply("rnn_fwd", xp, w_hh, h0, lengths, act)


def lstm_sequence(xp: Tensor, w_hh: Tensor, w_hr: Optional[Tensor], h0: Tensor, c0: Tensor,
                  lengths: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """``(out (L, N, H_out), h_n (N, H_out), c_n (N, H))`` of an LSTM on
    ``xp = x W_ih^T + b_ih + b_hh``, gates ``i, f, g, o``."""
    out, h_n, c_n, _, _, _ = apply("lstm_fwd", xp, w_hh, w_hr, h0, c0, lengths)
    return out, h_n, c_n


def lstm_infer(x: Tensor, w_ih: Tensor, b: Optional[Tensor], w_hh: Tensor, w_hr: Optional[Tensor], h0: Tensor,
               c0: Tensor, lengths: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`lstm_sequence` of ``xp = x W_ih^T + b`` for a call that needs no gradient (the op has no
    autograd): nothing saved for a backward, the input projected in chunks of steps inside the op."""
    return _ops().lstm_infer(x, w_ih, b, w_hh, w_hr, h0, c0, lengths)


def lstm_reg_sequence(xp: Tensor, w_hh: Tensor, w_hr: Optional[Tensor], h0: Tensor, c0: Tensor,
                      lengths: Optional[Tensor], rd_mask: Optional[Tensor], zo_h: Optional[Tensor],
                      zo_c: Optional[Tensor], zo_h_rate: float, zo_c_rate: float) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`lstm_sequence` with the runner's regularizers inside the time loop: ``rd_mask``
    ``(N, H_out)`` (recurrent dropout, already ``1/keep``-scaled) multiplies ``h_{t-1}`` in the
    recurrent product; zoneout mixes ``s_t = k s_{t-1} + (1 - k) s~_t`` after each step with the
    per-step keep masks ``zo_h (L, N, H_out)`` / ``zo_c (L, N, H)`` (training), or with the
    constant ``zo_h_rate`` / ``zo_c_rate`` where a mask is None (eval: the expectation; 0: off).
    A row past its length holds its state, as without regularizers."""
    out, h_n, c_n, *_ = apply("lstm_reg_fwd", xp, w_hh, w_hr, h0, c0, lengths, rd_mask, zo_h, zo_c, zo_h_rate,
                              zo_c_rate)
    return out, h_n, c_n


def gru_sequence(xp: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], h0: Tensor,
                 lengths: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """``(out (L, N, H), h_n (N, H))`` of a GRU on ``xp = x W_ih^T + b_ih``
    (``b_hh`` stays inside: its ``n`` part is gated by ``r``)."""
    out, h_n, _, _ = apply("gru_fwd", xp, w_hh, b_hh, h0, lengths)
    return out, h_n


def gru_infer(x: Tensor, w_ih: Tensor, b_ih: Optional[Tensor], w_hh: Tensor, b_hh: Optional[Tensor], h0: Tensor,
              lengths: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """:func:`gru_sequence` of ``xp = x W_ih^T + b_ih`` for a call that needs no gradient (the op has no
    autograd): nothing saved for a backward, the input projected in chunks of steps inside the op."""
    return _ops().gru_infer(x, w_ih, b_ih, w_hh, b_hh, h0, lengths)


def gru_reg_sequence(xp: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], h0: Tensor, lengths: Optional[Tensor],
                     rd_mask: Optional[Tensor], zo_h: Optional[Tensor], zo_h_rate: float) -> Tuple[Tensor, Tensor]:
    """:func:`gru_sequence` with the runner's regularizers inside the time loop: ``rd_mask (N, H)``
    multiplies ``h_{t-1}`` in the recurrent product only (the update ``z h_{t-1}`` reads the unmasked
    ``h``), zoneout mixes ``h_t = k h_{t-1} + (1 - k) h~_t`` with ``zo_h (L, N, H)`` (training) or the
    constant ``zo_h_rate`` where the mask is None (eval; 0: off)."""
    out, h_n, _, _ = apply("gru_reg_fwd", xp, w_hh, b_hh, h0, lengths, rd_mask, zo_h, zo_h_rate)
    return out, h_n


def peephole_sequence(xp: Tensor, w_hh: Tensor, w_ci: Tensor, w_cf: Tensor, w_co: Tensor, h0: Tensor, c0: Tensor,
                      lengths: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """``(out (L, N, H), h_n (N, H), c_n (N, H))`` of a peephole LSTM on
    ``xp = x W_ih^T + b_ih + b_hh``, gates ``i, f, g, o``; ``i, f`` see ``c_{t-1}``
    through ``w_ci, w_cf``, ``o`` sees ``c_t`` through ``w_co`` (each ``(H,)``)."""
    out, h_n, c_n, _, _ = apply("peephole_fwd", xp, w_hh, w_ci, w_cf, w_co, h0, c0, lengths)
    return out, h_n, c_n


def peephole_reg_sequence(xp: Tensor, w_hh: Tensor, w_ci: Tensor, w_cf: Tensor, w_co: Tensor, h0: Tensor, c0: Tensor,
                          lengths: Optional[Tensor], rd_mask: Optional[Tensor], zo_h: Optional[Tensor],
                          zo_c: Optional[Tensor], zo_h_rate: float, zo_c_rate: float) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`peephole_sequence` with the runner's regularizers inside the time loop (as
    :func:`lstm_reg_sequence`; the output gate's peephole sees the pre-zoneout ``c~_t``)."""
    out, h_n, c_n, *_ = apply("peephole_reg_fwd", xp, w_hh, w_ci, w_cf, w_co, h0, c0, lengths, rd_mask, zo_h, zo_c,
                              zo_h_rate, zo_c_rate)
    return out, h_n, c_n


def ln_lstm_reg_sequence(xp: Tensor, w_hh: Tensor, ln_w_hh: Tensor, ln_w_c: Tensor, ln_b_c: Tensor, h0: Tensor,
                         c0: Tensor, lengths: Optional[Tensor], eps: float, rd_mask: Optional[Tensor],
                         zo_h: Optional[Tensor], zo_c: Optional[Tensor], zo_h_rate: float,
                         zo_c_rate: float) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`ln_lstm_sequence` with the runner's regularizers inside the time loop (as :func:`lstm_reg_sequence`)."""
    out, h_n, c_n, *_ = apply("ln_lstm_reg_fwd", xp, w_hh, ln_w_hh, ln_w_c, ln_b_c, h0, c0, lengths, eps, rd_mask,
                              zo_h, zo_c, zo_h_rate, zo_c_rate)
    return out, h_n, c_n


def ln_gru_reg_sequence(xp: Tensor, w_hh: Tensor, ln_w_hh: Tensor, shift: Tensor, h0: Tensor,
                        lengths: Optional[Tensor], eps: float, rd_mask: Optional[Tensor], zo_h: Optional[Tensor],
                        zo_h_rate: float) -> Tuple[Tensor, Tensor]:
    """:func:`ln_gru_sequence` with the runner's regularizers inside the time loop (as :func:`gru_reg_sequence`:
    ``rd_mask`` in the recurrent product only)."""
    out, h_n, *_ = apply("ln_gru_reg_fwd", xp, w_hh, ln_w_hh, shift, h0, lengths, eps, rd_mask, zo_h, zo_h_rate)
    return out, h_n


def ln_lstm_sequence(xp: Tensor, w_hh: Tensor, ln_w_hh: Tensor, ln_w_c: Tensor, ln_b_c: Tensor, h0: Tensor,
                     c0: Tensor, lengths: Optional[Tensor], eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """``(out (L, N, H), h_n (N, H), c_n (N, H))`` of a LayerNorm LSTM on
    ``xp = LN_ih(x W_ih^T) + b_ih + b_hh + ln_bias_hh`` (every additive term that does
    not depend on ``h``): gates ``a = xp + ln_w_hh * LN(h W_hh^T)``, ``i, f, g, o``;
    ``h_t = o tanh(ln_w_c * LN(c_t) + ln_b_c)`` (each LN without gain, ``eps`` inside the root)."""
    out, h_n, c_n, *_ = apply("ln_lstm_fwd", xp, w_hh, ln_w_hh, ln_w_c, ln_b_c, h0, c0, lengths, eps)
    return out, h_n, c_n


def indrnn_sequence(xp: Tensor, u: Tensor, h0: Tensor, lengths: Optional[Tensor], act: int) -> Tuple[Tensor, Tensor]:
    """``(out (L, N, H), h_n (N, H))`` of an IndRNN, ``h_t = act(xp_t + u * h_{t-1})``
    with ``xp = x W_ih^T + b_ih + b_hh`` and the per-unit ``u (H,)`` (already
    clamped by the caller where the layer bounds it); ``act`` 0 is tanh, 1 is relu."""
    return apply("indrnn_fwd", xp, u, h0, lengths, act)


def conv_lstm_sequence(xp: Tensor, w_hh: Tensor, w_ci: Optional[Tensor], w_cf: Optional[Tensor],
                       w_co: Optional[Tensor], h0: Tensor, c0: Tensor,
                       lengths: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """``(out (L, N, hidden, *S), h_n (N, hidden, *S), c_n (N, hidden, *S))`` of a
    ConvLSTM on its input convolution ``xp = W_ih * x + b_ih + b_hh`` ``(L, N, 4 hidden, *S)``,
    gates ``i, f, g, o``: per step ``a = xp_t + U * h_{t-1}`` with ``U = w_hh
    (4 hidden, hidden, *kernel)`` ('same' padding as :func:`rnnkit.zoo.conv.conv_same`).
    Peepholes ``w_ci, w_cf, w_co`` are all None or all ``(hidden, *S)`` (the caller expands
    broadcast ones): ``i, f`` see ``c_{t-1}``, ``o`` sees ``c_t``, element-wise."""
    out, h_n, c_n, _, _ = apply("conv_lstm_fwd", xp, w_hh, w_ci, w_cf, w_co, h0, c0, lengths)
    return out, h_n, c_n


def conv_gru_sequence(xp: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], h0: Tensor,
                      lengths: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """``(out (L, N, hidden, *S), h_n (N, hidden, *S))`` of a ConvGRU on its input
    convolution ``xp = W_ih * x + b_ih`` ``(L, N, 3 hidden, *S)``, gates ``r, z, n``;
    ``b_hh`` goes with the recurrent convolution ``U * h_{t-1} + b_hh`` (its ``n``
    part is gated by ``r``)."""
    out, h_n, _, _ = apply("conv_gru_fwd", xp, w_hh, b_hh, h0, lengths)
    return out, h_n


def ln_gru_sequence(xp: Tensor, w_hh: Tensor, ln_w_hh: Tensor, shift: Tensor, h0: Tensor,
                    lengths: Optional[Tensor], eps: float) -> Tuple[Tensor, Tensor]:
    """``(out (L, N, H), h_n (N, H))`` of a LayerNorm GRU on ``xp = LN_ih(x W_ih^T) + b_ih``:
    ``b = ln_w_hh * LN(h W_hh^T) + shift`` (``shift = ln_bias_hh + b_hh``, zeros without bias; it stays
    inside because ``r`` gates its ``n`` part), gates ``r, z, n``: ``r = σ(xp_r + b_r)``,
    ``z = σ(xp_z + b_z)``, ``n = tanh(xp_n + r b_n)``, ``h_t = (1 - z) n + z h_{t-1}``
    (the LN without gain, ``eps`` inside the root)."""
    out, h_n, *_ = apply("ln_gru_fwd", xp, w_hh, ln_w_hh, shift, h0, lengths, eps)
    return out, h_n


SERIAL_PROJECT_MACS = 1 << 22
"""kSerialOnceMacs (csrc/common.h): below this many multiply-adds (rows x outputs x inputs) one
product runs on the calling thread, so the projection goes through :func:`project`."""


def project(x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    """``x (M, K) @ w.T (K, G) + b (G,)``: what ``torch.addmm`` computes, forward and backward, with
    each product on the calling thread (csrc/project.cpp: it is small, see SERIAL_PROJECT_MACS)."""
    return apply("project_fwd", x, w, b)


def oversubscribed() -> bool:
    """Whether a fused op call starting now runs on one thread because the machine is
    oversubscribed (more runnable threads than cores; csrc/common.h, "under load", and
    ``RNNKIT_FUSED_UNDER_LOAD``). Cheap: the machine is sampled at most every 0.5 s."""
    return bool(_ops().oversubscribed())


def load_policy(mode: str = "", fake_others: float = -1.0, fake_cpus: int = 0) -> dict:
    """The under-load policy's state, and its hook for tests and the benchmark. ``mode``: ``""``
    leaves it, ``"env"`` reads ``RNNKIT_FUSED_UNDER_LOAD`` again, ``"auto"`` / ``"serial"`` /
    ``"parallel"`` set it; ``fake_others >= 0`` replaces the sampled runnable threads of other
    processes and ``fake_cpus > 0`` the machine's cores (else both are sampled). A call that sets the
    mode or the cores forgets past samples; one that sets only ``fake_others`` keeps them and makes the
    next op call sample (a sequence of samples, for tests); ``load_policy()`` only reads. Returns the state as a dict: ``others``
    is the least of the last 3 samples' runnable threads of other processes (what decides), ``last`` the
    last sample's."""
    v = _ops().load_policy(mode, float(fake_others), int(fake_cpus))
    return {"mode": {-1: "unread", 0: "auto", 1: "serial", 2: "parallel"}[int(v[0])], "serial": bool(v[1]),
            "others": v[2], "online": int(v[3]), "usable": int(v[4]), "samples": int(v[5]), "waited": bool(v[6]),
            "last": v[7]}


def recurrent_kernel(mode: str = "") -> str:
    """The kernel of the fused ops' per-step recurrent product (csrc/common.h, ``Recurrent``) for
    every op call from now on: ``"rule"`` (the default: the panel GEMM or MKL by size), ``"blas"``
    (MKL's packed GEMM, the few-rows kernel below 4 rows) or ``"panel"`` (the panel GEMM always);
    ``""`` leaves it. Returns the setting before the call. For benchmarks and tests."""
    return _ops().recurrent_kernel(mode)


def recurrent_mm(a: Tensor, w: Tensor, c: Tensor, trans: bool, beta: float = 0.0, kernel: int = -1,
                 steps: int = 1) -> None:
    """``steps`` recurrent products ``c = beta c + a op(w)`` in place, as a fused step loop runs them
    (``w`` laid out once): ``op(w) = w^T`` with ``w (cols, k)`` when ``trans``, else ``w (k, cols)``;
    ``a (rows, k)``, ``c (rows, cols)`` (unit column stride, any row stride); ``kernel`` -1 (the
    :func:`recurrent_kernel` setting), 0 (the rule), 1 (BLAS) or 2 (panel). For benchmarks and tests."""
    _ops().recurrent_mm(a, w, c, bool(trans), float(beta), int(kernel), int(steps))
