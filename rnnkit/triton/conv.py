"""ConvLSTM and ConvGRU on the ``triton`` backend: torch convolutions, Triton gate math.

Each step of a convolutional cell needs a convolution of ``h_{t-1}``, so the
time loop runs in Python: the input convolution of every step at once
(:func:`rnnkit.zoo.conv.conv_project`, ``L`` folded into the batch), then per
step the recurrent convolution (torch: cuDNN on a GPU) and ONE Triton kernel for
the gate math and the state update (forward), one for its hand-written backward.
Autograd chains the steps and differentiates the convolutions.

A step's tensors are ``(N, G * hidden, *S')`` (gates) and ``(N, hidden, *S')``
(state), contiguous, so a gate is the state's ``(N, hidden * P)`` columns
(``P = prod(S')``) at an offset of ``k * hidden * P`` in each sample: the same
flattened layout as the elementwise driver (:mod:`rnnkit.triton.elementwise`),
with ``H = hidden * P``. One program owns ``BLOCK`` of those columns.

``lengths`` are read inside the kernels (a sequence past its length keeps ``h``
and ``c``; its gates get no gradient and the state's gradient passes through).
Storage float16, bfloat16, float32 or float64, math in float32 (float64 for float64).

Ops (``torch.library.custom_op``, with fake implementations and autograd):

* ``rnnkit_triton::conv_lstm_step(xp_t, hc, h, c, w_ci, w_cf, w_co, lengths, t) -> (h', c')``
  with ``xp_t = W_ih * x_t + b_ih + b_hh``, ``hc = U * h`` (both ``(N, 4 hidden, *S')``,
  gates ``i, f, g, o``) and the peepholes ``(hidden, *S')`` or None;
* ``rnnkit_triton::conv_gru_step(xp_t, hc, h, lengths, t) -> h'`` with ``hc = U * h + b_hh``
  (gates ``r, z, n``; ``r`` multiplies the convolved ``n`` part, as torch.nn.GRU);
* their backwards ``conv_lstm_step_bwd`` and ``conv_gru_step_bwd``.

``t`` is the step's index: the kernels compare it with ``lengths``.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..runner import _per_row
from ..spec import CellSpec, Params, State
from ..zoo.conv import conv_gru_update, conv_lstm_update, conv_same
from ._common import bias_sum, twin_backward
from .elementwise import _accum_dtype, _lengths_arg, block_size, compute_dtype, sigmoid, tanh

# ----------------------------------------------------------------------------- gate math (jit functions)


@triton.jit
def conv_lstm_cell(xi, xf, xg, xo, c, w_ci, w_cf, w_co):
    """LSTM gate math on pre-activations ``i, f, g, o`` with peepholes (zero without):
    returns ``(h', c')``."""
    si = sigmoid(xi + w_ci * c)
    sf = sigmoid(xf + w_cf * c)
    tg = tanh(xg)
    c_new = sf * c + si * tg
    so = sigmoid(xo + w_co * c_new)
    return so * tanh(c_new), c_new


@triton.jit
def conv_lstm_cell_bwd(xi, xf, xg, xo, c, w_ci, w_cf, w_co, dh, dc):
    """Backward of :func:`conv_lstm_cell` for ``dh = dL/dh'``, ``dc = dL/dc'`` (direct):
    returns ``(di, df, dg, do, dc_prev, dw_ci, dw_cf, dw_co)`` (gate pre-activation
    gradients; the peepholes' for this element)."""
    si = sigmoid(xi + w_ci * c)
    sf = sigmoid(xf + w_cf * c)
    tg = tanh(xg)
    c_new = sf * c + si * tg
    so = sigmoid(xo + w_co * c_new)
    tc = tanh(c_new)
    do = dh * tc * so * (1.0 - so)
    dcn = dc + dh * so * (1.0 - tc * tc) + do * w_co
    di = dcn * tg * si * (1.0 - si)
    df = dcn * c * sf * (1.0 - sf)
    dg = dcn * si * (1.0 - tg * tg)
    dc_prev = dcn * sf + di * w_ci + df * w_cf
    return di, df, dg, do, dc_prev, di * c, df * c, do * c_new


@triton.jit
def conv_gru_cell(xr, xz, xn, hr, hz, hn, h):
    """GRU gate math (torch.nn.GRU's form): ``r, z`` from ``x + U h``, ``n = tanh(x_n + r (U_n h + b_hn))``."""
    r = sigmoid(xr + hr)
    z = sigmoid(xz + hz)
    n = tanh(xn + r * hn)
    return n + z * (h - n)


@triton.jit
def conv_gru_cell_bwd(xr, xz, xn, hr, hz, hn, h, dh):
    """Backward of :func:`conv_gru_cell`: ``(d_r, d_z, d_xn, d_hn, dh_prev)`` where ``d_r``, ``d_z`` are
    the pre-activation gradients (the same for ``x`` and ``U h``), ``d_xn`` the ``x_n`` one and ``d_hn``
    the convolved ``n`` part's, ``dh_prev`` the direct ``z * h`` path."""
    r = sigmoid(xr + hr)
    z = sigmoid(xz + hz)
    n = tanh(xn + r * hn)
    dz = dh * (h - n) * z * (1.0 - z)
    dn = dh * (1.0 - z) * (1.0 - n * n)
    dr = dn * hn * r * (1.0 - r)
    return dr, dz, dn, dn * r, dh * z


# ----------------------------------------------------------------------------- kernels (one step each)


@triton.jit(do_not_specialize=["t"])  # one compiled kernel for every step index
def _conv_lstm_fwd_kernel(xp_ptr, hc_ptr, h_ptr, c_ptr, wci_ptr, wcf_ptr, wco_ptr, len_ptr, h_out_ptr, c_out_ptr,
                          t, NHP, HP, PEEP: tl.constexpr, HAS_LEN: tl.constexpr, BLOCK: tl.constexpr,
                          COMPUTE: tl.constexpr):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = cols < NHP
    n = cols // HP
    r = cols % HP
    off = n * (4 * HP) + r
    xi = tl.load(xp_ptr + off, mask=m, other=0.0).to(COMPUTE) + tl.load(hc_ptr + off, mask=m, other=0.0).to(COMPUTE)
    xf = tl.load(xp_ptr + off + HP, mask=m, other=0.0).to(COMPUTE) + \
        tl.load(hc_ptr + off + HP, mask=m, other=0.0).to(COMPUTE)
    xg = tl.load(xp_ptr + off + 2 * HP, mask=m, other=0.0).to(COMPUTE) + \
        tl.load(hc_ptr + off + 2 * HP, mask=m, other=0.0).to(COMPUTE)
    xo = tl.load(xp_ptr + off + 3 * HP, mask=m, other=0.0).to(COMPUTE) + \
        tl.load(hc_ptr + off + 3 * HP, mask=m, other=0.0).to(COMPUTE)
    c = tl.load(c_ptr + cols, mask=m, other=0.0).to(COMPUTE)
    if PEEP:
        w_ci = tl.load(wci_ptr + r, mask=m, other=0.0).to(COMPUTE)
        w_cf = tl.load(wcf_ptr + r, mask=m, other=0.0).to(COMPUTE)
        w_co = tl.load(wco_ptr + r, mask=m, other=0.0).to(COMPUTE)
    else:
        w_ci = c * 0.0
        w_cf = w_ci
        w_co = w_ci
    h_new, c_new = conv_lstm_cell(xi, xf, xg, xo, c, w_ci, w_cf, w_co)
    if HAS_LEN:
        valid = t < tl.load(len_ptr + n, mask=m, other=0)
        h_new = tl.where(valid, h_new, tl.load(h_ptr + cols, mask=m, other=0.0).to(COMPUTE))
        c_new = tl.where(valid, c_new, c)
    tl.store(h_out_ptr + cols, h_new.to(h_out_ptr.dtype.element_ty), mask=m)
    tl.store(c_out_ptr + cols, c_new.to(c_out_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["t"])  # one compiled kernel for every step index
def _conv_lstm_bwd_kernel(dh_ptr, dc_ptr, xp_ptr, hc_ptr, c_ptr, wci_ptr, wcf_ptr, wco_ptr, len_ptr,
                          dgates_ptr, dh_prev_ptr, dc_prev_ptr, dwci_ptr, dwcf_ptr, dwco_ptr,
                          t, NHP, HP, PEEP: tl.constexpr, HAS_LEN: tl.constexpr, BLOCK: tl.constexpr,
                          COMPUTE: tl.constexpr):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = cols < NHP
    n = cols // HP
    r = cols % HP
    off = n * (4 * HP) + r
    xi = tl.load(xp_ptr + off, mask=m, other=0.0).to(COMPUTE) + tl.load(hc_ptr + off, mask=m, other=0.0).to(COMPUTE)
    xf = tl.load(xp_ptr + off + HP, mask=m, other=0.0).to(COMPUTE) + \
        tl.load(hc_ptr + off + HP, mask=m, other=0.0).to(COMPUTE)
    xg = tl.load(xp_ptr + off + 2 * HP, mask=m, other=0.0).to(COMPUTE) + \
        tl.load(hc_ptr + off + 2 * HP, mask=m, other=0.0).to(COMPUTE)
    xo = tl.load(xp_ptr + off + 3 * HP, mask=m, other=0.0).to(COMPUTE) + \
        tl.load(hc_ptr + off + 3 * HP, mask=m, other=0.0).to(COMPUTE)
    c = tl.load(c_ptr + cols, mask=m, other=0.0).to(COMPUTE)
    dh = tl.load(dh_ptr + cols, mask=m, other=0.0).to(COMPUTE)
    dc = tl.load(dc_ptr + cols, mask=m, other=0.0).to(COMPUTE)
    if PEEP:
        w_ci = tl.load(wci_ptr + r, mask=m, other=0.0).to(COMPUTE)
        w_cf = tl.load(wcf_ptr + r, mask=m, other=0.0).to(COMPUTE)
        w_co = tl.load(wco_ptr + r, mask=m, other=0.0).to(COMPUTE)
    else:
        w_ci = c * 0.0
        w_cf = w_ci
        w_co = w_ci
    di, df, dg, do, dc_prev, dw_ci, dw_cf, dw_co = conv_lstm_cell_bwd(xi, xf, xg, xo, c, w_ci, w_cf, w_co, dh, dc)
    dh_prev = dh * 0.0  # h' does not read h directly: only through the convolution (autograd's part)
    if HAS_LEN:  # a held step: the state's gradient passes through, the gates get none
        valid = t < tl.load(len_ptr + n, mask=m, other=0)
        di = tl.where(valid, di, 0.0)
        df = tl.where(valid, df, 0.0)
        dg = tl.where(valid, dg, 0.0)
        do = tl.where(valid, do, 0.0)
        dc_prev = tl.where(valid, dc_prev, dc)
        dh_prev = tl.where(valid, dh_prev, dh)
        dw_ci = tl.where(valid, dw_ci, 0.0)
        dw_cf = tl.where(valid, dw_cf, 0.0)
        dw_co = tl.where(valid, dw_co, 0.0)
    ty = dgates_ptr.dtype.element_ty
    tl.store(dgates_ptr + off, di.to(ty), mask=m)
    tl.store(dgates_ptr + off + HP, df.to(ty), mask=m)
    tl.store(dgates_ptr + off + 2 * HP, dg.to(ty), mask=m)
    tl.store(dgates_ptr + off + 3 * HP, do.to(ty), mask=m)
    tl.store(dh_prev_ptr + cols, dh_prev.to(dh_prev_ptr.dtype.element_ty), mask=m)
    tl.store(dc_prev_ptr + cols, dc_prev.to(dc_prev_ptr.dtype.element_ty), mask=m)
    if PEEP:  # per (n, element) partial sums; the host sums over n
        tl.store(dwci_ptr + cols, dw_ci, mask=m)
        tl.store(dwcf_ptr + cols, dw_cf, mask=m)
        tl.store(dwco_ptr + cols, dw_co, mask=m)


@triton.jit(do_not_specialize=["t"])  # one compiled kernel for every step index
def _conv_gru_fwd_kernel(xp_ptr, hc_ptr, h_ptr, len_ptr, h_out_ptr, t, NHP, HP, HAS_LEN: tl.constexpr,
                         BLOCK: tl.constexpr, COMPUTE: tl.constexpr):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = cols < NHP
    n = cols // HP
    r = cols % HP
    off = n * (3 * HP) + r
    xr = tl.load(xp_ptr + off, mask=m, other=0.0).to(COMPUTE)
    xz = tl.load(xp_ptr + off + HP, mask=m, other=0.0).to(COMPUTE)
    xn = tl.load(xp_ptr + off + 2 * HP, mask=m, other=0.0).to(COMPUTE)
    hr = tl.load(hc_ptr + off, mask=m, other=0.0).to(COMPUTE)
    hz = tl.load(hc_ptr + off + HP, mask=m, other=0.0).to(COMPUTE)
    hn = tl.load(hc_ptr + off + 2 * HP, mask=m, other=0.0).to(COMPUTE)
    h = tl.load(h_ptr + cols, mask=m, other=0.0).to(COMPUTE)
    h_new = conv_gru_cell(xr, xz, xn, hr, hz, hn, h)
    if HAS_LEN:
        h_new = tl.where(t < tl.load(len_ptr + n, mask=m, other=0), h_new, h)
    tl.store(h_out_ptr + cols, h_new.to(h_out_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["t"])  # one compiled kernel for every step index
def _conv_gru_bwd_kernel(dh_ptr, xp_ptr, hc_ptr, h_ptr, len_ptr, dxp_ptr, dhc_ptr, dh_prev_ptr, t, NHP, HP,
                         HAS_LEN: tl.constexpr, BLOCK: tl.constexpr, COMPUTE: tl.constexpr):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = cols < NHP
    n = cols // HP
    r = cols % HP
    off = n * (3 * HP) + r
    xr = tl.load(xp_ptr + off, mask=m, other=0.0).to(COMPUTE)
    xz = tl.load(xp_ptr + off + HP, mask=m, other=0.0).to(COMPUTE)
    xn = tl.load(xp_ptr + off + 2 * HP, mask=m, other=0.0).to(COMPUTE)
    hr = tl.load(hc_ptr + off, mask=m, other=0.0).to(COMPUTE)
    hz = tl.load(hc_ptr + off + HP, mask=m, other=0.0).to(COMPUTE)
    hn = tl.load(hc_ptr + off + 2 * HP, mask=m, other=0.0).to(COMPUTE)
    h = tl.load(h_ptr + cols, mask=m, other=0.0).to(COMPUTE)
    dh = tl.load(dh_ptr + cols, mask=m, other=0.0).to(COMPUTE)
    dr, dz, dxn, dhn, dh_prev = conv_gru_cell_bwd(xr, xz, xn, hr, hz, hn, h, dh)
    if HAS_LEN:
        valid = t < tl.load(len_ptr + n, mask=m, other=0)
        dr = tl.where(valid, dr, 0.0)
        dz = tl.where(valid, dz, 0.0)
        dxn = tl.where(valid, dxn, 0.0)
        dhn = tl.where(valid, dhn, 0.0)
        dh_prev = tl.where(valid, dh_prev, dh)
    ty = dxp_ptr.dtype.element_ty
    tl.store(dxp_ptr + off, dr.to(ty), mask=m)
    tl.store(dxp_ptr + off + HP, dz.to(ty), mask=m)
    tl.store(dxp_ptr + off + 2 * HP, dxn.to(ty), mask=m)
    ty = dhc_ptr.dtype.element_ty
    tl.store(dhc_ptr + off, dr.to(ty), mask=m)
    tl.store(dhc_ptr + off + HP, dz.to(ty), mask=m)
    tl.store(dhc_ptr + off + 2 * HP, dhn.to(ty), mask=m)
    tl.store(dh_prev_ptr + cols, dh_prev.to(dh_prev_ptr.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------- ops


def _check_step(op: str, xp_t: Tensor, hc: Tensor, h: Tensor, gates: int, lengths: Optional[Tensor],
                c: Optional[Tensor] = None) -> None:
    """Check the shapes the kernels index by (they cannot see bounds)."""
    if h.dim() < 3:
        raise ValueError(f"rnnkit_triton::{op}: h must be (N, hidden, *S') with 1 to 3 spatial dims, got shape "
                         f"{tuple(h.shape)}")
    if c is not None and c.shape != h.shape:
        raise ValueError(f"rnnkit_triton::{op}: c (or the gradient) must have h's shape {tuple(h.shape)}, got "
                         f"{tuple(c.shape)}")
    want = (h.shape[0], gates * h.shape[1], *h.shape[2:])
    for name, tensor in (("xp_t", xp_t), ("hc", hc)):
        if tuple(tensor.shape) != want:
            raise ValueError(f"rnnkit_triton::{op}: {name} must have shape {want} ((N, {gates} * hidden, *S') for "
                             f"h of shape {tuple(h.shape)}), got {tuple(tensor.shape)}")
    if lengths is not None and (lengths.dim() != 1 or lengths.shape[0] != h.shape[0]):
        raise ValueError(f"rnnkit_triton::{op}: lengths must have shape (N={h.shape[0]},), got {tuple(lengths.shape)}")


def _launch_args(h: Tensor):
    NHP = h.numel()
    HP = NHP // h.shape[0] if h.shape[0] else 0
    block = block_size(NHP)
    return (triton.cdiv(NHP, block),), NHP, HP, block


def _peepholes(w_ci: Optional[Tensor], w_cf: Optional[Tensor], w_co: Optional[Tensor],
               h: Tensor) -> Tuple[bool, List[Tensor]]:
    given = [w is not None for w in (w_ci, w_cf, w_co)]
    if any(given) and not all(given):
        raise ValueError("rnnkit_triton::conv_lstm_step: w_ci, w_cf and w_co must be given together or all None, "
                         f"got {['None' if not g else 'a tensor' for g in given]}")
    if not all(given):
        return False, [h, h, h]
    for name, w in (("w_ci", w_ci), ("w_cf", w_cf), ("w_co", w_co)):
        if tuple(w.shape) != tuple(h.shape[1:]):
            raise ValueError(f"rnnkit_triton::conv_lstm_step: {name} must have the state's per-sample shape "
                             f"{tuple(h.shape[1:])} (hidden, *S'), got {tuple(w.shape)}")
    return True, [w.contiguous() for w in (w_ci, w_cf, w_co)]


@torch.library.custom_op("rnnkit_triton::conv_lstm_step", mutates_args=())
def conv_lstm_step(xp_t: Tensor, hc: Tensor, h: Tensor, c: Tensor, w_ci: Optional[Tensor], w_cf: Optional[Tensor],
                   w_co: Optional[Tensor], lengths: Optional[Tensor], t: int) -> Tuple[Tensor, Tensor]:
    """One ConvLSTM step's gate math and state update: ``(h', c')``, each ``(N, hidden, *S')``."""
    _check_step("conv_lstm_step", xp_t, hc, h, 4, lengths, c)
    xp_t, hc, h, c = xp_t.contiguous(), hc.contiguous(), h.contiguous(), c.contiguous()
    peep, ws = _peepholes(w_ci, w_cf, w_co, h)
    h_new, c_new = torch.empty_like(h), torch.empty_like(c)
    grid, NHP, HP, block = _launch_args(h)
    if NHP:
        len_arg, has_len = _lengths_arg(lengths, h)
        _conv_lstm_fwd_kernel[grid](xp_t, hc, h, c, *ws, len_arg, h_new, c_new, t, NHP, HP, PEEP=peep,
                                    HAS_LEN=has_len, BLOCK=block, COMPUTE=compute_dtype(h.dtype))
    return h_new, c_new


@conv_lstm_step.register_fake
def _(xp_t, hc, h, c, w_ci, w_cf, w_co, lengths, t):
    _check_step("conv_lstm_step", xp_t, hc, h, 4, lengths, c)
    return torch.empty_like(h), torch.empty_like(c)


@torch.library.custom_op("rnnkit_triton::conv_lstm_step_bwd", mutates_args=())
def conv_lstm_step_bwd(grad_h: Tensor, grad_c: Tensor, xp_t: Tensor, hc: Tensor, c: Tensor, w_ci: Optional[Tensor],
                       w_cf: Optional[Tensor], w_co: Optional[Tensor], lengths: Optional[Tensor],
                       t: int) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward of :func:`conv_lstm_step`: ``(d_gates, dh, dc, dw_ci, dw_cf, dw_co)``. ``d_gates`` is the
    gradient of both ``xp_t`` and ``hc`` (they are summed); ``dh`` is the direct part (held steps only);
    the peepholes' gradients are empty tensors without peepholes."""
    _check_step("conv_lstm_step_bwd", xp_t, hc, c, 4, lengths, grad_c)
    xp_t, hc, c = xp_t.contiguous(), hc.contiguous(), c.contiguous()
    grad_h, grad_c = grad_h.contiguous(), grad_c.contiguous()
    peep, ws = _peepholes(w_ci, w_cf, w_co, c)
    dgates = torch.empty_like(xp_t)
    dh, dc = torch.empty_like(c), torch.empty_like(c)
    acc = _accum_dtype(c.dtype)
    parts = [c.new_empty(c.shape, dtype=acc) if peep else c.new_empty((0,), dtype=acc) for _ in range(3)]
    grid, NHP, HP, block = _launch_args(c)
    if NHP:
        len_arg, has_len = _lengths_arg(lengths, c)
        _conv_lstm_bwd_kernel[grid](grad_h, grad_c, xp_t, hc, c, *ws, len_arg, dgates, dh, dc, *parts, t, NHP, HP,
                                    PEEP=peep, HAS_LEN=has_len, BLOCK=block, COMPUTE=compute_dtype(c.dtype))
    if peep:
        dws = [part.sum(0).to(w.dtype) for part, w in zip(parts, (w_ci, w_cf, w_co))]
    else:
        dws = [c.new_empty((0,)) for _ in range(3)]
    return (dgates, dh, dc, *dws)


@conv_lstm_step_bwd.register_fake
def _(grad_h, grad_c, xp_t, hc, c, w_ci, w_cf, w_co, lengths, t):
    _check_step("conv_lstm_step_bwd", xp_t, hc, c, 4, lengths, grad_c)
    dws = [w.new_empty(w.shape) if w is not None else c.new_empty((0,)) for w in (w_ci, w_cf, w_co)]
    return (torch.empty_like(xp_t), torch.empty_like(c), torch.empty_like(c), *dws)


def _held(new: Tensor, old: Tensor, lengths: Optional[Tensor], t: int) -> Tensor:
    """``new`` where step ``t`` is inside the row's length, ``old`` (held) past it (as the reference scan)."""
    if lengths is None:
        return new
    return torch.where(_per_row(t < lengths.to(new.device), new), new, old)


def _conv_lstm_twin(xp_t, hc, h, c, w_ci, w_cf, w_co, lengths, t):
    """:func:`conv_lstm_step`'s reference twin (the cell's own gate math, plain PyTorch ops): ``(h', c')``."""
    p = {} if w_ci is None else {"weight_ci": w_ci, "weight_cf": w_cf, "weight_co": w_co}
    h_new, c_new = conv_lstm_update(xp_t + hc, c, p)
    return _held(h_new, h, lengths, t), _held(c_new, c, lengths, t)


def _conv_lstm_setup(ctx, inputs, output):
    xp_t, hc, h, c, w_ci, w_cf, w_co, lengths, t = inputs
    ctx.t = t
    ctx.save_for_backward(xp_t, hc, h, c, w_ci, w_cf, w_co, lengths)


def _conv_lstm_backward(ctx, grad_h, grad_c):
    xp_t, hc, h, c, w_ci, w_cf, w_co, lengths = ctx.saved_tensors
    if torch.is_grad_enabled():  # the backward must itself be differentiable (create_graph=True): the twin's
        inputs = (xp_t, hc, h, c, w_ci, w_cf, w_co, lengths, ctx.t)
        wanted = [i for i in range(7) if inputs[i] is not None and ctx.needs_input_grad[i]]
        return tuple(twin_backward(_conv_lstm_twin, inputs, wanted, (grad_h, grad_c)))
    grad_h = torch.zeros_like(c) if grad_h is None else grad_h
    grad_c = torch.zeros_like(c) if grad_c is None else grad_c
    dgates, dh, dc, dw_ci, dw_cf, dw_co = conv_lstm_step_bwd(grad_h, grad_c, xp_t, hc, c, w_ci, w_cf, w_co,
                                                             lengths, ctx.t)
    if w_ci is None:
        dw_ci = dw_cf = dw_co = None
    return dgates, dgates, dh, dc, dw_ci, dw_cf, dw_co, None, None


conv_lstm_step.register_autograd(_conv_lstm_backward, setup_context=_conv_lstm_setup)


@torch.library.custom_op("rnnkit_triton::conv_gru_step", mutates_args=())
def conv_gru_step(xp_t: Tensor, hc: Tensor, h: Tensor, lengths: Optional[Tensor], t: int) -> Tensor:
    """One ConvGRU step's gate math and state update: ``h' (N, hidden, *S')``."""
    _check_step("conv_gru_step", xp_t, hc, h, 3, lengths)
    xp_t, hc, h = xp_t.contiguous(), hc.contiguous(), h.contiguous()
    h_new = torch.empty_like(h)
    grid, NHP, HP, block = _launch_args(h)
    if NHP:
        len_arg, has_len = _lengths_arg(lengths, h)
        _conv_gru_fwd_kernel[grid](xp_t, hc, h, len_arg, h_new, t, NHP, HP, HAS_LEN=has_len, BLOCK=block,
                                   COMPUTE=compute_dtype(h.dtype))
    return h_new


@conv_gru_step.register_fake
def _(xp_t, hc, h, lengths, t):
    _check_step("conv_gru_step", xp_t, hc, h, 3, lengths)
    return torch.empty_like(h)


@torch.library.custom_op("rnnkit_triton::conv_gru_step_bwd", mutates_args=())
def conv_gru_step_bwd(grad_h: Tensor, xp_t: Tensor, hc: Tensor, h: Tensor, lengths: Optional[Tensor],
                      t: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Backward of :func:`conv_gru_step`: ``(dxp_t, dhc, dh)`` (``dh`` the direct ``z * h`` and held-step part)."""
    _check_step("conv_gru_step_bwd", xp_t, hc, h, 3, lengths, grad_h)
    xp_t, hc, h, grad_h = xp_t.contiguous(), hc.contiguous(), h.contiguous(), grad_h.contiguous()
    dxp, dhc, dh = torch.empty_like(xp_t), torch.empty_like(hc), torch.empty_like(h)
    grid, NHP, HP, block = _launch_args(h)
    if NHP:
        len_arg, has_len = _lengths_arg(lengths, h)
        _conv_gru_bwd_kernel[grid](grad_h, xp_t, hc, h, len_arg, dxp, dhc, dh, t, NHP, HP, HAS_LEN=has_len,
                                   BLOCK=block, COMPUTE=compute_dtype(h.dtype))
    return dxp, dhc, dh


@conv_gru_step_bwd.register_fake
def _(grad_h, xp_t, hc, h, lengths, t):
    _check_step("conv_gru_step_bwd", xp_t, hc, h, 3, lengths, grad_h)
    return torch.empty_like(xp_t), torch.empty_like(hc), torch.empty_like(h)


def _conv_gru_twin(xp_t, hc, h, lengths, t):
    """:func:`conv_gru_step`'s reference twin (the cell's own gate math, plain PyTorch ops): ``(h',)``."""
    return (_held(conv_gru_update(xp_t, hc, h), h, lengths, t),)


def _conv_gru_setup(ctx, inputs, output):
    xp_t, hc, h, lengths, t = inputs
    ctx.t = t
    ctx.save_for_backward(xp_t, hc, h, lengths)


def _conv_gru_backward(ctx, grad_h):
    xp_t, hc, h, lengths = ctx.saved_tensors
    if torch.is_grad_enabled():  # the backward must itself be differentiable (create_graph=True): the twin's
        inputs = (xp_t, hc, h, lengths, ctx.t)
        wanted = [i for i in range(3) if ctx.needs_input_grad[i]]
        return tuple(twin_backward(_conv_gru_twin, inputs, wanted, (grad_h,)))
    dxp, dhc, dh = conv_gru_step_bwd(grad_h, xp_t, hc, h, lengths, ctx.t)
    return dxp, dhc, dh, None, None


conv_gru_step.register_autograd(_conv_gru_backward, setup_context=_conv_gru_setup)


# ----------------------------------------------------------------------------- the scans


def _step_lengths(lengths: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    """Lengths as every step's kernel reads them (int32 on ``like``'s device), converted once per scan."""
    return None if lengths is None else lengths.to(device=like.device, dtype=torch.int32).contiguous()


def _stack(outputs: List[Tensor], xp: Tensor, h0: Tensor) -> Tensor:
    return torch.stack(outputs) if outputs else xp.new_empty((0, *h0.shape))


def scan_conv_lstm(spec: CellSpec, p: Params, x: Tensor, state: State,
                   lengths: Optional[Tensor]) -> Tuple[Tensor, State]:
    """ConvLSTM on one layer-direction: the spec's input convolution over every step (``b_hh`` joins
    ``b_ih``), then per step the recurrent convolution (torch) and :func:`conv_lstm_step` (Triton)."""
    if spec.fusable != "conv_lstm":
        raise ValueError(f"rnnkit.triton.scan_conv_lstm: expected the 'conv_lstm' cell, got the '{spec.name}' cell")
    xp = spec.project(x, {**p, "bias_ih": bias_sum(p)})  # (L, N, 4 hidden, *S')
    h, c = state
    peepholes = [p.get(name) for name in ("weight_ci", "weight_cf", "weight_co")]
    if peepholes[0] is not None:  # (hidden, 1, ...) per channel or (hidden, *S') per position -> (hidden, *S')
        peepholes = [w.expand(c.shape[1:]).contiguous() for w in peepholes]
    lens = _step_lengths(lengths, x)
    w_hh = p["weight_hh"]
    outputs = []
    for t, xp_t in enumerate(xp.unbind(0)):
        h, c = conv_lstm_step(xp_t, conv_same(h, w_hh, None), h, c, *peepholes, lens, t)
        outputs.append(h)
    return _stack(outputs, xp, state[0]), (h, c)


def scan_conv_gru(spec: CellSpec, p: Params, x: Tensor, state: State,
                  lengths: Optional[Tensor]) -> Tuple[Tensor, State]:
    """ConvGRU on one layer-direction: the spec's input convolution (``W_ih * x + b_ih``) over every step,
    then per step ``U * h + b_hh`` (torch) and :func:`conv_gru_step` (Triton)."""
    if spec.fusable != "conv_gru":
        raise ValueError(f"rnnkit.triton.scan_conv_gru: expected the 'conv_gru' cell, got the '{spec.name}' cell")
    xp = spec.project(x, p)
    (h,) = state
    lens = _step_lengths(lengths, x)
    w_hh, b_hh = p["weight_hh"], p.get("bias_hh")
    outputs = []
    for t, xp_t in enumerate(xp.unbind(0)):
        h = conv_gru_step(xp_t, conv_same(h, w_hh, b_hh), h, lens, t)
        outputs.append(h)
    return _stack(outputs, xp, state[0]), (h,)


SCANS = {"conv_lstm": scan_conv_lstm, "conv_gru": scan_conv_gru}
"""The convolutional scans by :attr:`CellSpec.fusable`."""

__all__ = ["scan_conv_lstm", "scan_conv_gru", "SCANS", "conv_lstm_step", "conv_lstm_step_bwd", "conv_gru_step",
           "conv_gru_step_bwd", "conv_lstm_cell", "conv_lstm_cell_bwd", "conv_gru_cell", "conv_gru_cell_bwd"]
