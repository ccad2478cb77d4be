"""The fused ops joined to PyTorch: fake (meta) implementations for
``torch.compile`` and autograd formulas that call the hand-written backward ops.

The C++ library (``csrc/fused.cpp``) defines the schemas and CPU kernels under
``torch.ops.rnnkit_fused``:

* ``rnn_fwd / lstm_fwd / gru_fwd / peephole_fwd / ln_lstm_fwd / indrnn_fwd``: a whole sequence, one layer, one direction,
  on the input projection ``xp (L, N, G)`` computed beforehand in one GEMM.
  Besides ``out (L, N, H_out)`` and the final state they return what the
  backward needs (gate activations, cell states), which the wrappers below drop.
* ``rnn_bwd / lstm_bwd / gru_bwd / peephole_bwd / ln_lstm_bwd / indrnn_bwd``: backpropagation through time.
* ``ln_gru_fwd / ln_gru_bwd``: the LayerNorm GRU, the same way.
* ``rnn_cell / lstm_cell / gru_cell``: one inference step (no autograd).
* ``conv_lstm_fwd/bwd``, ``conv_gru_fwd/bwd``: ConvLSTM / ConvGRU on their input convolution
  ``xp (L, N, G, *S)``; the recurrent convolution runs inside the op's time loop (ATen from C++).

:func:`register` runs once after the library is loaded.
"""

from __future__ import annotations

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


def _fake_lstm_bwd(grad_out, grad_hn, grad_cn, w_hh, w_hr, h0, c0, lengths, out, gates, cs, ms):
    g_hr = w_hr.new_empty(w_hr.shape) if w_hr is not None else out.new_empty(0)
    return out.new_empty(gates.shape), w_hh.new_empty(w_hh.shape), g_hr, h0.new_empty(h0.shape), \
        c0.new_empty(c0.shape)


def _fake_gru_fwd(xp, w_hh, b_hh, h0, lengths):
    L, N, G = xp.shape
    H = w_hh.shape[1]
    return xp.new_empty(L, N, H), xp.new_empty(N, H), xp.new_empty(L, N, G, dtype=_saved(xp)), \
        xp.new_empty(L, N, H, dtype=_saved(xp))


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


def _fake_ln_lstm_fwd(xp, w_hh, ln_w_hh, ln_w_c, ln_b_c, h0, c0, lengths, eps):
    L, N, G = xp.shape
    H = G // 4
    return xp.new_empty(L, N, H), xp.new_empty(N, H), xp.new_empty(N, H), xp.new_empty(L, N, G), \
        xp.new_empty(L, N, H), xp.new_empty(L, N, G), xp.new_empty(L, N, H), xp.new_empty(L, N, 2)


def _fake_ln_lstm_bwd(grad_out, grad_hn, grad_cn, w_hh, ln_w_hh, ln_w_c, ln_b_c, h0, c0, lengths, out, gates, cs,
                      nz, nc, rstd):
    return gates.new_empty(gates.shape), w_hh.new_empty(w_hh.shape), ln_w_hh.new_empty(ln_w_hh.shape), \
        ln_w_c.new_empty(ln_w_c.shape), ln_b_c.new_empty(ln_b_c.shape), h0.new_empty(h0.shape), c0.new_empty(c0.shape)


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

def _zeros_if_none(g: Optional[Tensor], like: Tensor) -> Tensor:
    return torch.zeros_like(like) if g is None else g


def _setup_rnn(ctx, inputs, output):
    xp, w_hh, h0, lengths, act = inputs
    out, _ = output
    ctx.act = act
    ctx.save_for_backward(w_hh, h0, lengths, out)


def _backward_rnn(ctx, grad_out, grad_hn):
    w_hh, h0, lengths, out = ctx.saved_tensors
    grad_out = _zeros_if_none(grad_out, out)
    grad_hn = _zeros_if_none(grad_hn, h0)
    dxp, dw, dh0 = _ops().rnn_bwd(grad_out, grad_hn, w_hh, h0, lengths, out, ctx.act)
    return dxp, dw, dh0, None, None


def _setup_lstm(ctx, inputs, output):
    xp, w_hh, w_hr, h0, c0, lengths = inputs
    out, _, _, gates, cs, ms = output
    ctx.save_for_backward(w_hh, w_hr, h0, c0, lengths, out, gates, cs, ms)
    ctx.set_materialize_grads(False)  # its saved outputs get no gradient: no zero tensors for them


def _backward_lstm(ctx, grad_out, grad_hn, grad_cn, *_unused):
    w_hh, w_hr, h0, c0, lengths, out, gates, cs, ms = ctx.saved_tensors
    grad_out = _zeros_if_none(grad_out, out)
    grad_hn = _zeros_if_none(grad_hn, h0)
    grad_cn = _zeros_if_none(grad_cn, c0)
    dxp, dw_hh, dw_hr, dh0, dc0 = _ops().lstm_bwd(grad_out, grad_hn, grad_cn, w_hh, w_hr, h0, c0, lengths, out,
                                                  gates, cs, ms)
    return dxp, dw_hh, (dw_hr if w_hr is not None else None), dh0, dc0, None


def _setup_peephole(ctx, inputs, output):
    xp, w_hh, w_ci, w_cf, w_co, h0, c0, lengths = inputs
    out, _, _, gates, cs = output
    ctx.save_for_backward(w_hh, w_ci, w_cf, w_co, h0, c0, lengths, out, gates, cs)
    ctx.set_materialize_grads(False)  # its saved outputs get no gradient: no zero tensors for them


def _backward_peephole(ctx, grad_out, grad_hn, grad_cn, *_unused):
    w_hh, w_ci, w_cf, w_co, h0, c0, lengths, out, gates, cs = ctx.saved_tensors
    grad_out = _zeros_if_none(grad_out, out)
    grad_hn = _zeros_if_none(grad_hn, h0)
    grad_cn = _zeros_if_none(grad_cn, c0)
    dxp, dw_hh, dw_ci, dw_cf, dw_co, dh0, dc0 = _ops().peephole_bwd(grad_out, grad_hn, grad_cn, w_hh, w_ci, w_cf,
                                                                    w_co, h0, c0, lengths, out, gates, cs)
    return dxp, dw_hh, dw_ci, dw_cf, dw_co, dh0, dc0, None


def _setup_ln_lstm(ctx, inputs, output):
    xp, w_hh, ln_w_hh, ln_w_c, ln_b_c, h0, c0, lengths, eps = inputs
    out, _, _, gates, cs, nz, nc, rstd = output
    ctx.save_for_backward(w_hh, ln_w_hh, ln_w_c, ln_b_c, h0, c0, lengths, out, gates, cs, nz, nc, rstd)
    ctx.set_materialize_grads(False)  # the saved outputs get no gradient: no L x N x 4H zero tensors for them


def _backward_ln_lstm(ctx, grad_out, grad_hn, grad_cn, *_unused):
    w_hh, ln_w_hh, ln_w_c, ln_b_c, h0, c0, lengths, out, gates, cs, nz, nc, rstd = ctx.saved_tensors
    grad_out = _zeros_if_none(grad_out, out)
    grad_hn = _zeros_if_none(grad_hn, h0)
    grad_cn = _zeros_if_none(grad_cn, c0)
    grads = _ops().ln_lstm_bwd(grad_out, grad_hn, grad_cn, w_hh, ln_w_hh, ln_w_c, ln_b_c, h0, c0, lengths, out,
                               gates, cs, nz, nc, rstd)
    return (*grads, None, None)


def _setup_indrnn(ctx, inputs, output):
    xp, u, h0, lengths, act = inputs
    out, _ = output
    ctx.act = act
    ctx.save_for_backward(u, h0, lengths, out)


def _backward_indrnn(ctx, grad_out, grad_hn):
    u, h0, lengths, out = ctx.saved_tensors
    grad_out = _zeros_if_none(grad_out, out)
    grad_hn = _zeros_if_none(grad_hn, h0)
    dxp, du, dh0 = _ops().indrnn_bwd(grad_out, grad_hn, u, h0, lengths, out, ctx.act)
    return dxp, du, dh0, None, None


def _setup_gru(ctx, inputs, output):
    xp, w_hh, b_hh, h0, lengths = inputs
    out, _, rzn, hn = output
    ctx.has_bias = b_hh is not None
    ctx.save_for_backward(w_hh, h0, lengths, out, rzn, hn)
    ctx.set_materialize_grads(False)  # its saved outputs get no gradient: no zero tensors for them


def _backward_gru(ctx, grad_out, grad_hn, *_unused):
    w_hh, h0, lengths, out, rzn, hn = ctx.saved_tensors
    grad_out = _zeros_if_none(grad_out, out)
    grad_hn = _zeros_if_none(grad_hn, h0)
    dxp, dw_hh, db_hh, dh0 = _ops().gru_bwd(grad_out, grad_hn, w_hh, h0, lengths, out, rzn, hn)
    return dxp, dw_hh, (db_hh if ctx.has_bias else None), dh0, None


def _setup_conv_lstm(ctx, inputs, output):
    xp, w_hh, w_ci, w_cf, w_co, h0, c0, lengths = inputs
    out, _, _, gates, cs = output
    ctx.save_for_backward(w_hh, w_ci, w_cf, w_co, h0, c0, lengths, out, gates, cs)
    ctx.set_materialize_grads(False)  # its saved outputs get no gradient: no zero tensors for them


def _backward_conv_lstm(ctx, grad_out, grad_hn, grad_cn, *_unused):
    w_hh, w_ci, w_cf, w_co, h0, c0, lengths, out, gates, cs = ctx.saved_tensors
    grad_out = _zeros_if_none(grad_out, out)
    grad_hn = _zeros_if_none(grad_hn, h0)
    grad_cn = _zeros_if_none(grad_cn, c0)
    dxp, dw_hh, dw_ci, dw_cf, dw_co, dh0, dc0 = _ops().conv_lstm_bwd(grad_out, grad_hn, grad_cn, w_hh, w_ci, w_cf,
                                                                     w_co, h0, c0, lengths, out, gates, cs)
    peep = (dw_ci, dw_cf, dw_co) if w_ci is not None else (None, None, None)
    return dxp, dw_hh, *peep, dh0, dc0, None


def _setup_conv_gru(ctx, inputs, output):
    xp, w_hh, b_hh, h0, lengths = inputs
    out, _, rzn, hn = output
    ctx.has_bias = b_hh is not None
    ctx.save_for_backward(w_hh, h0, lengths, out, rzn, hn)
    ctx.set_materialize_grads(False)  # its saved outputs get no gradient: no zero tensors for them


def _backward_conv_gru(ctx, grad_out, grad_hn, *_unused):
    w_hh, h0, lengths, out, rzn, hn = ctx.saved_tensors
    grad_out = _zeros_if_none(grad_out, out)
    grad_hn = _zeros_if_none(grad_hn, h0)
    dxp, dw_hh, db_hh, dh0 = _ops().conv_gru_bwd(grad_out, grad_hn, w_hh, h0, lengths, out, rzn, hn)
    return dxp, dw_hh, (db_hh if ctx.has_bias else None), dh0, None


def _setup_ln_gru(ctx, inputs, output):
    xp, w_hh, ln_w_hh, shift, h0, lengths, eps = inputs
    out, _, gates, nz, rstd = output
    ctx.save_for_backward(w_hh, ln_w_hh, shift, h0, lengths, out, gates, nz, rstd)
    ctx.set_materialize_grads(False)  # its saved outputs get no gradient: no zero tensors for them


def _backward_ln_gru(ctx, grad_out, grad_hn, *_unused):
    w_hh, ln_w_hh, shift, h0, lengths, out, gates, nz, rstd = ctx.saved_tensors
    grad_out = _zeros_if_none(grad_out, out)
    grad_hn = _zeros_if_none(grad_hn, h0)
    grads = _ops().ln_gru_bwd(grad_out, grad_hn, w_hh, ln_w_hh, shift, h0, lengths, out, gates, nz, rstd)
    return (*grads, None, None)


def register() -> None:
    """Attach fake and autograd implementations to the loaded C++ ops (once)."""
    global _registered
    if _registered:
        return
    lib = torch.library
    for name, fn in [("rnn_fwd", _fake_rnn_fwd), ("rnn_bwd", _fake_rnn_bwd), ("lstm_fwd", _fake_lstm_fwd),
                     ("lstm_bwd", _fake_lstm_bwd), ("gru_fwd", _fake_gru_fwd), ("gru_bwd", _fake_gru_bwd),
                     ("peephole_fwd", _fake_peephole_fwd), ("peephole_bwd", _fake_peephole_bwd),
                     ("ln_lstm_fwd", _fake_ln_lstm_fwd), ("ln_lstm_bwd", _fake_ln_lstm_bwd),
                     ("indrnn_fwd", _fake_indrnn_fwd), ("indrnn_bwd", _fake_indrnn_bwd),
                     ("lstm_cell", _fake_lstm_cell), ("gru_cell", _fake_gru_cell), ("rnn_cell", _fake_rnn_cell)]:
        lib.register_fake(f"rnnkit_fused::{name}", fn)
    lib.register_autograd("rnnkit_fused::rnn_fwd", _backward_rnn, setup_context=_setup_rnn)
    lib.register_autograd("rnnkit_fused::lstm_fwd", _backward_lstm, setup_context=_setup_lstm)
    lib.register_autograd("rnnkit_fused::gru_fwd", _backward_gru, setup_context=_setup_gru)
    lib.register_autograd("rnnkit_fused::peephole_fwd", _backward_peephole, setup_context=_setup_peephole)
    lib.register_autograd("rnnkit_fused::ln_lstm_fwd", _backward_ln_lstm, setup_context=_setup_ln_lstm)
    lib.register_autograd("rnnkit_fused::indrnn_fwd", _backward_indrnn, setup_context=_setup_indrnn)
    for name, fn in [("conv_lstm_fwd", _fake_conv_lstm_fwd), ("conv_lstm_bwd", _fake_conv_lstm_bwd),
                     ("conv_gru_fwd", _fake_conv_gru_fwd), ("conv_gru_bwd", _fake_conv_gru_bwd)]:
        lib.register_fake(f"rnnkit_fused::{name}", fn)
    lib.register_autograd("rnnkit_fused::conv_lstm_fwd", _backward_conv_lstm, setup_context=_setup_conv_lstm)
    lib.register_autograd("rnnkit_fused::conv_gru_fwd", _backward_conv_gru, setup_context=_setup_conv_gru)
    lib.register_fake("rnnkit_fused::ln_gru_fwd", _fake_ln_gru_fwd)
    lib.register_fake("rnnkit_fused::ln_gru_bwd", _fake_ln_gru_bwd)
    lib.register_autograd("rnnkit_fused::ln_gru_fwd", _backward_ln_gru, setup_context=_setup_ln_gru)
    _registered = True


# ------------------------------------------------------------------ the functions the backend calls

def rnn_sequence(xp: Tensor, w_hh: Tensor, h0: Tensor, lengths: Optional[Tensor], act: int) -> Tuple[Tensor, Tensor]:
    """``(out (L, N, H), h_n (N, H))`` of an Elman RNN on the projected input
    ``xp = x W_ih^T + b_ih + b_hh``; ``act`` 0 is tanh, 1 is relu."""
    return _ops().rnn_fwd(xp, w_hh, h0, lengths, act)


def lstm_sequence(xp: Tensor, w_hh: Tensor, w_hr: Optional[Tensor], h0: Tensor, c0: Tensor,
                  lengths: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """``(out (L, N, H_out), h_n (N, H_out), c_n (N, H))`` of an LSTM on
    ``xp = x W_ih^T + b_ih + b_hh``, gates ``i, f, g, o``."""
    out, h_n, c_n, _, _, _ = _ops().lstm_fwd(xp, w_hh, w_hr, h0, c0, lengths)
    return out, h_n, c_n


def gru_sequence(xp: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], h0: Tensor,
                 lengths: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """``(out (L, N, H), h_n (N, H))`` of a GRU on ``xp = x W_ih^T + b_ih``
    (``b_hh`` stays inside: its ``n`` part is gated by ``r``)."""
    out, h_n, _, _ = _ops().gru_fwd(xp, w_hh, b_hh, h0, lengths)
    return out, h_n


def peephole_sequence(xp: Tensor, w_hh: Tensor, w_ci: Tensor, w_cf: Tensor, w_co: Tensor, h0: Tensor, c0: Tensor,
                      lengths: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """``(out (L, N, H), h_n (N, H), c_n (N, H))`` of a peephole LSTM on
    ``xp = x W_ih^T + b_ih + b_hh``, gates ``i, f, g, o``; ``i, f`` see ``c_{t-1}``
    through ``w_ci, w_cf``, ``o`` sees ``c_t`` through ``w_co`` (each ``(H,)``)."""
    out, h_n, c_n, _, _ = _ops().peephole_fwd(xp, w_hh, w_ci, w_cf, w_co, h0, c0, lengths)
    return out, h_n, c_n


def ln_lstm_sequence(xp: Tensor, w_hh: Tensor, ln_w_hh: Tensor, ln_w_c: Tensor, ln_b_c: Tensor, h0: Tensor,
                     c0: Tensor, lengths: Optional[Tensor], eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """``(out (L, N, H), h_n (N, H), c_n (N, H))`` of a LayerNorm LSTM on
    ``xp = LN_ih(x W_ih^T) + b_ih + b_hh + ln_bias_hh`` (every additive term that does
    not depend on ``h``): gates ``a = xp + ln_w_hh * LN(h W_hh^T)``, ``i, f, g, o``;
    ``h_t = o tanh(ln_w_c * LN(c_t) + ln_b_c)`` (each LN without gain, ``eps`` inside the root)."""
    out, h_n, c_n, *_ = _ops().ln_lstm_fwd(xp, w_hh, ln_w_hh, ln_w_c, ln_b_c, h0, c0, lengths, eps)
    return out, h_n, c_n


def indrnn_sequence(xp: Tensor, u: Tensor, h0: Tensor, lengths: Optional[Tensor], act: int) -> Tuple[Tensor, Tensor]:
    """``(out (L, N, H), h_n (N, H))`` of an IndRNN, ``h_t = act(xp_t + u * h_{t-1})``
    with ``xp = x W_ih^T + b_ih + b_hh`` and the per-unit ``u (H,)`` (already
    clamped by the caller where the layer bounds it); ``act`` 0 is tanh, 1 is relu."""
    return _ops().indrnn_fwd(xp, u, h0, lengths, act)


def conv_lstm_sequence(xp: Tensor, w_hh: Tensor, w_ci: Optional[Tensor], w_cf: Optional[Tensor],
                       w_co: Optional[Tensor], h0: Tensor, c0: Tensor,
                       lengths: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """``(out (L, N, hidden, *S), h_n (N, hidden, *S), c_n (N, hidden, *S))`` of a
    ConvLSTM on its input convolution ``xp = W_ih * x + b_ih + b_hh`` ``(L, N, 4 hidden, *S)``,
    gates ``i, f, g, o``: per step ``a = xp_t + U * h_{t-1}`` with ``U = w_hh
    (4 hidden, hidden, *kernel)`` ('same' padding as :func:`rnnkit.zoo.conv.conv_same`).
    Peepholes ``w_ci, w_cf, w_co`` are all None or all ``(hidden, *S)`` (the caller expands
    broadcast ones): ``i, f`` see ``c_{t-1}``, ``o`` sees ``c_t``, element-wise."""
    out, h_n, c_n, _, _ = _ops().conv_lstm_fwd(xp, w_hh, w_ci, w_cf, w_co, h0, c0, lengths)
    return out, h_n, c_n


def conv_gru_sequence(xp: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], h0: Tensor,
                      lengths: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """``(out (L, N, hidden, *S), h_n (N, hidden, *S))`` of a ConvGRU on its input
    convolution ``xp = W_ih * x + b_ih`` ``(L, N, 3 hidden, *S)``, gates ``r, z, n``;
    ``b_hh`` goes with the recurrent convolution ``U * h_{t-1} + b_hh`` (its ``n``
    part is gated by ``r``)."""
    out, h_n, _, _ = _ops().conv_gru_fwd(xp, w_hh, b_hh, h0, lengths)
    return out, h_n


def ln_gru_sequence(xp: Tensor, w_hh: Tensor, ln_w_hh: Tensor, shift: Tensor, h0: Tensor,
                    lengths: Optional[Tensor], eps: float) -> Tuple[Tensor, Tensor]:
    """``(out (L, N, H), h_n (N, H))`` of a LayerNorm GRU on ``xp = LN_ih(x W_ih^T) + b_ih``:
    ``b = ln_w_hh * LN(h W_hh^T) + shift`` (``shift = ln_bias_hh + b_hh``, zeros without bias; it stays
    inside because ``r`` gates its ``n`` part), gates ``r, z, n``: ``r = σ(xp_r + b_r)``,
    ``z = σ(xp_z + b_z)``, ``n = tanh(xp_n + r b_n)``, ``h_t = (1 - z) n + z h_{t-1}``
    (the LN without gain, ``eps`` inside the root)."""
    out, h_n, *_ = _ops().ln_gru_fwd(xp, w_hh, ln_w_hh, shift, h0, lengths, eps)
    return out, h_n
