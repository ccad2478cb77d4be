"""The ELEMENTWISE driver of the ``triton`` backend: IndRNN (relu, tanh), MinGRU, MinLSTM.

These cells read ``h_{t-1}`` only element by element (IndRNN: ``u * h``; the Min
cells: ``a_t * h + b_t`` with gates from ``x_t`` alone), so every column of the
``(N, H)`` state is an independent recurrence. One program owns a block of
``BLOCK`` flattened ``(batch, hidden)`` columns and loops over time inside the
kernel, keeping its part of the state in registers: no matrix product, no
synchronisation between programs, one launch per layer-direction (forward) and
one for its hand-written backward (backpropagation through time, reading the
saved outputs for ``h_{t-1}`` and recomputing the gates from ``xp``).

``lengths`` are read inside the kernels: past its length a sequence keeps its
state (its output there repeats it; the runner masks it), and in the backward
the gradient passes through such steps unchanged. Storage may be float16,
bfloat16, float32 or float64; the gate math and the state run in float32
(float64 for float64 storage, so ``gradcheck`` can check the backward).

The step math of each cell is written once, as ``@triton.jit`` functions
(:func:`elementwise_step`, :func:`elementwise_step_bwd`), shared by the drivers.
The Min cells' kernels run the recurrence step by step instead of the reference's
log-space parallel scan: the same function (rounding aside), with ``h_0`` any real
value, and the gates ``f' = sigmoid(log i - log f)`` form of the reference
(:func:`rnnkit.zoo.minimal.min_lstm_sequence`), stable when both gates underflow.

Ops (``torch.library.custom_op``, with fake implementations and autograd):

* ``rnnkit_triton::elementwise_fwd(xp, u, h0, lengths, cell) -> (out, h_n)``
* ``rnnkit_triton::elementwise_bwd(grad_out, grad_hn, xp, u, h0, lengths, out, cell) -> (dxp, du, dh0)``

Shapes: ``xp (L, N, G*H)`` (``G`` = 1 IndRNN, 2 MinGRU, 3 MinLSTM), ``u (H,)`` (IndRNN
only, else None), ``h0 (N, H)``, ``lengths (N,)`` integer or None, ``out (L, N, H)``.

The scans (``scan_indrnn``, ``scan_mingru``, ``scan_minlstm``) have the fused
backend's signature ``scan(spec, p, x, state, lengths) -> (out, state)`` for one
layer-direction (:func:`rnnkit.runner.run_stack`). They run the cell's plain math:
a spec the runner wrapped for recurrent dropout or zoneout is the backend's to decline.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..spec import CellSpec, Params, State
from ._common import bias_sum, project, twin_backward

BLOCK: Optional[int] = None
"""Columns of the flattened ``(N, H)`` state per program (a power of 2), or None: 128 on a GPU (many
programs, one column per thread of 4 warps), and under the interpreter one program for up to 2048
columns (it runs programs one after another, at a cost per program and step, not per column)."""


def interpreting() -> bool:
    """True when triton runs kernels in its interpreter (``TRITON_INTERPRET=1`` when they were defined)."""
    return not isinstance(_elementwise_fwd_kernel, triton.runtime.JITFunction)


def block_size(columns: int) -> int:
    """The ``BLOCK`` for ``columns`` flattened state columns (see :data:`BLOCK`)."""
    if BLOCK is not None:
        return BLOCK
    if interpreting():
        return max(16, min(triton.next_power_of_2(max(columns, 1)), 2048))
    return 128


CELL_INDRNN_TANH, CELL_INDRNN_RELU, CELL_MINGRU, CELL_MINLSTM = 0, 1, 2, 3
GATES = {CELL_INDRNN_TANH: 1, CELL_INDRNN_RELU: 1, CELL_MINGRU: 2, CELL_MINLSTM: 3}
CELL_NAMES = {CELL_INDRNN_TANH: "IndRNN (tanh)", CELL_INDRNN_RELU: "IndRNN (relu)", CELL_MINGRU: "MinGRU",
              CELL_MINLSTM: "MinLSTM"}


# ----------------------------------------------------------------------------- shared math (jit functions)


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def tanh(x):
    """``tanh`` from one ``exp`` of a non-positive number (no overflow at any ``x``)."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def softplus(x):
    """``log(1 + exp(x))``, stable for all ``x``."""
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def min_g(x):
    """The Min cells' positive activation: ``x + 0.5`` for ``x >= 0``, ``sigmoid(x)`` below."""
    return tl.where(x >= 0, x + 0.5, sigmoid(x))


@triton.jit
def min_g_grad(x):
    s = sigmoid(x)
    return tl.where(x >= 0, 1.0, s * (1.0 - s))


@triton.jit
def elementwise_step(k0, k1, k2, u, h, CELL: tl.constexpr):
    """One step on projected gates ``k0, k1, k2`` (unused ones are ignored) and
    ``h_{t-1}``; returns ``h_t``. ``u`` is IndRNN's recurrent weight."""
    if CELL == 0:  # IndRNN tanh
        h_new = tanh(k0 + u * h)
    elif CELL == 1:  # IndRNN relu
        h_new = tl.maximum(k0 + u * h, 0.0)
    elif CELL == 2:  # MinGRU: z = sigmoid(k_z), h' = (1 - z) h + z g(k_h)
        h_new = sigmoid(-k0) * h + sigmoid(k0) * min_g(k1)
    else:  # MinLSTM: f' = sigmoid(-d), i' = sigmoid(d), d = log i - log f; h' = f' h + i' g(k_h)
        d = softplus(-k0) - softplus(-k1)
        h_new = sigmoid(-d) * h + sigmoid(d) * min_g(k2)
    return h_new


@triton.jit
def elementwise_step_bwd(k0, k1, k2, u, h, dh, CELL: tl.constexpr):
    """The backward of :func:`elementwise_step` for ``dh = dL/dh_t``:
    returns ``(dk0, dk1, dk2, du, dh_prev)`` (``du`` is this column's part of ``dL/du``)."""
    zero = dh * 0.0
    if CELL == 0:
        h_new = tanh(k0 + u * h)
        dpre = dh * (1.0 - h_new * h_new)
        dk0, dk1, dk2, du, dh_prev = dpre, zero, zero, dpre * h, dpre * u
    elif CELL == 1:
        h_new = tl.maximum(k0 + u * h, 0.0)
        dpre = tl.where(h_new > 0, dh, 0.0)
        dk0, dk1, dk2, du, dh_prev = dpre, zero, zero, dpre * h, dpre * u
    elif CELL == 2:
        z = sigmoid(k0)
        a = sigmoid(-k0)
        dk0 = dh * (min_g(k1) - h) * z * a
        dk1 = dh * z * min_g_grad(k1)
        dk2, du, dh_prev = zero, zero, dh * a
    else:
        d = softplus(-k0) - softplus(-k1)
        fp = sigmoid(-d)
        ip = sigmoid(d)
        gh = min_g(k2)
        dd = dh * (gh - h) * fp * ip  # d(f' h + i' g)/dd with df'/dd = -f'i', di'/dd = f'i'
        dk0 = -dd * sigmoid(-k0)  # dd/dk_f = -(1 - f)
        dk1 = dd * sigmoid(-k1)  # dd/dk_i = 1 - i
        dk2 = dh * ip * min_g_grad(k2)
        du, dh_prev = zero, dh * fp
    return dk0, dk1, dk2, du, dh_prev


# ----------------------------------------------------------------------------- the driver kernels


@triton.jit
def _elementwise_fwd_kernel(xp_ptr, u_ptr, h0_ptr, len_ptr, out_ptr, hn_ptr, L, NH, H,
                            CELL: tl.constexpr, G: tl.constexpr, HAS_LEN: tl.constexpr, BLOCK: tl.constexpr,
                            COMPUTE: tl.constexpr):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = cols < NH
    n = cols // H
    j = cols % H
    h = tl.load(h0_ptr + cols, mask=m, other=0.0).to(COMPUTE)
    if CELL < 2:
        u = tl.load(u_ptr + j, mask=m, other=0.0).to(COMPUTE)
    else:
        u = h * 0.0
    if HAS_LEN:
        length = tl.load(len_ptr + n, mask=m, other=0)
    x_ptrs = xp_ptr + n * (G * H) + j  # gate k of column (n, j) at x_ptrs + k * H; one step is G * NH further
    o_ptrs = out_ptr + cols
    for t in range(L):
        k0 = tl.load(x_ptrs, mask=m, other=0.0).to(COMPUTE)
        k1 = k0
        k2 = k0
        if G > 1:
            k1 = tl.load(x_ptrs + H, mask=m, other=0.0).to(COMPUTE)
        if G > 2:
            k2 = tl.load(x_ptrs + 2 * H, mask=m, other=0.0).to(COMPUTE)
        h_new = elementwise_step(k0, k1, k2, u, h, CELL)
        if HAS_LEN:
            h_new = tl.where(t < length, h_new, h)
        h = h_new
        tl.store(o_ptrs, h.to(out_ptr.dtype.element_ty), mask=m)
        x_ptrs += G * NH
        o_ptrs += NH
    tl.store(hn_ptr + cols, h.to(hn_ptr.dtype.element_ty), mask=m)


@triton.jit
def _elementwise_bwd_kernel(gout_ptr, ghn_ptr, xp_ptr, u_ptr, h0_ptr, len_ptr, out_ptr, dxp_ptr, du_ptr, dh0_ptr,
                            L, NH, H, last_x, last_o,
                            CELL: tl.constexpr, G: tl.constexpr, HAS_LEN: tl.constexpr, BLOCK: tl.constexpr,
                            COMPUTE: tl.constexpr):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = cols < NH
    n = cols // H
    j = cols % H
    carry = tl.load(ghn_ptr + cols, mask=m, other=0.0).to(COMPUTE)  # dL/dh_t from later steps and h_n
    h0 = tl.load(h0_ptr + cols, mask=m, other=0.0).to(COMPUTE)
    if CELL < 2:
        u = tl.load(u_ptr + j, mask=m, other=0.0).to(COMPUTE)
    else:
        u = h0 * 0.0
    if HAS_LEN:
        length = tl.load(len_ptr + n, mask=m, other=0)
    du_acc = h0 * 0.0
    x_off = n * (G * H) + j + last_x  # step L - 1 (last_x = (L - 1) * G * NH, from the host: may pass 2**31)
    x_ptrs = xp_ptr + x_off
    dx_ptrs = dxp_ptr + x_off
    o_ptrs = out_ptr + cols + last_o
    g_ptrs = gout_ptr + cols + last_o
    for i in range(L):
        t = L - 1 - i
        dh = carry + tl.load(g_ptrs, mask=m, other=0.0).to(COMPUTE)
        has_prev = (j * 0 + t) > 0  # a block, so the mask and the select below are blocks on GPU and interpreter
        h_prev = tl.load(o_ptrs - NH, mask=m & has_prev, other=0.0).to(COMPUTE)
        h_prev = tl.where(has_prev, h_prev, h0)
        k0 = tl.load(x_ptrs, mask=m, other=0.0).to(COMPUTE)
        k1 = k0
        k2 = k0
        if G > 1:
            k1 = tl.load(x_ptrs + H, mask=m, other=0.0).to(COMPUTE)
        if G > 2:
            k2 = tl.load(x_ptrs + 2 * H, mask=m, other=0.0).to(COMPUTE)
        dk0, dk1, dk2, du, dh_prev = elementwise_step_bwd(k0, k1, k2, u, h_prev, dh, CELL)
        if HAS_LEN:  # a held step passes the gradient through and gives its gates none
            valid = t < length
            dk0 = tl.where(valid, dk0, 0.0)
            dk1 = tl.where(valid, dk1, 0.0)
            dk2 = tl.where(valid, dk2, 0.0)
            du = tl.where(valid, du, 0.0)
            dh_prev = tl.where(valid, dh_prev, dh)
        tl.store(dx_ptrs, dk0.to(dxp_ptr.dtype.element_ty), mask=m)
        if G > 1:
            tl.store(dx_ptrs + H, dk1.to(dxp_ptr.dtype.element_ty), mask=m)
        if G > 2:
            tl.store(dx_ptrs + 2 * H, dk2.to(dxp_ptr.dtype.element_ty), mask=m)
        du_acc += du
        carry = dh_prev
        x_ptrs -= G * NH
        dx_ptrs -= G * NH
        o_ptrs -= NH
        g_ptrs -= NH
    tl.store(dh0_ptr + cols, carry.to(dh0_ptr.dtype.element_ty), mask=m)
    if CELL < 2:
        tl.store(du_ptr + cols, du_acc, mask=m)  # float32/64 partial sums per (n, j); the host sums over n


# ----------------------------------------------------------------------------- host side


def compute_dtype(dtype: torch.dtype):
    """The kernels' math dtype for a storage dtype: float64 for float64, else float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def _accum_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _lengths_arg(lengths: Optional[Tensor], like: Tensor) -> Tuple[Tensor, bool]:
    """``(tensor to pass, HAS_LEN)``: int32 lengths on ``like``'s device, or ``like`` as an unused pointer."""
    if lengths is None:
        return like, False
    return lengths.to(device=like.device, dtype=torch.int32).contiguous(), True


def _check_cell(cell: int) -> int:
    if cell not in GATES:
        raise ValueError(f"rnnkit_triton::elementwise: cell must be one of {sorted(GATES)} "
                         f"({', '.join(f'{k}: {v}' for k, v in CELL_NAMES.items())}), got {cell!r}")
    return GATES[cell]


def _check_args(op: str, xp: Tensor, u: Optional[Tensor], h0: Tensor, lengths: Optional[Tensor], cell: int) -> int:
    """The gate count of ``cell``, after checking the shapes the kernels index by (they cannot see bounds)."""
    G = _check_cell(cell)
    if h0.dim() != 2:
        raise ValueError(f"rnnkit_triton::{op}: h0 must be 2-D (N, H), got shape {tuple(h0.shape)}")
    N, H = h0.shape
    if xp.dim() != 3 or xp.shape[1] != N or xp.shape[2] != G * H:
        raise ValueError(f"rnnkit_triton::{op}: xp must have shape (L, N={N}, {G}*H={G * H}) for "
                         f"{CELL_NAMES[cell]} with h0 of shape {tuple(h0.shape)}, got {tuple(xp.shape)}")
    if cell < 2:
        if u is None:
            raise ValueError(f"rnnkit_triton::{op}: IndRNN needs its recurrent weight u (H,), got None")
        if tuple(u.shape) != (H,):
            raise ValueError(f"rnnkit_triton::{op}: u must have shape (H={H},), got {tuple(u.shape)}")
    if lengths is not None and (lengths.dim() != 1 or lengths.shape[0] != N):
        raise ValueError(f"rnnkit_triton::{op}: lengths must have shape (N={N},), got {tuple(lengths.shape)}")
    devices = {t.device for t in (xp, u, h0) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"rnnkit_triton::{op}: xp, u and h0 must be on one device, got {sorted(map(str, devices))}")
    return G




@torch.library.custom_op("rnnkit_triton::elementwise_fwd", mutates_args=())
def elementwise_fwd(xp: Tensor, u: Optional[Tensor], h0: Tensor, lengths: Optional[Tensor],
                    cell: int) -> Tuple[Tensor, Tensor]:
    """A whole sequence of an elementwise cell: ``xp (L, N, G*H)`` -> ``out (L, N, H)``, ``h_n (N, H)``."""
    G = _check_args("elementwise_fwd", xp, u, h0, lengths, cell)
    L, N = xp.shape[0], xp.shape[1]
    H = h0.shape[-1]
    xp = xp.contiguous()
    h0 = h0.contiguous()
    out = xp.new_empty((L, N, H))
    h_n = h0.new_empty((N, H))
    if N * H == 0:
        return out, h_n
    u_arg = u.contiguous() if u is not None else h0
    len_arg, has_len = _lengths_arg(lengths, h0)
    block = block_size(N * H)
    _elementwise_fwd_kernel[(triton.cdiv(N * H, block),)](
        xp, u_arg, h0, len_arg, out, h_n, L, N * H, H,
        CELL=cell, G=G, HAS_LEN=has_len, BLOCK=block, COMPUTE=compute_dtype(xp.dtype))
    return out, h_n


@elementwise_fwd.register_fake
def _(xp, u, h0, lengths, cell):
    _check_args("elementwise_fwd", xp, u, h0, lengths, cell)
    L, N, H = xp.shape[0], xp.shape[1], h0.shape[-1]
    return xp.new_empty((L, N, H)), h0.new_empty((N, H))


@torch.library.custom_op("rnnkit_triton::elementwise_bwd", mutates_args=())
def elementwise_bwd(grad_out: Tensor, grad_hn: Tensor, xp: Tensor, u: Optional[Tensor], h0: Tensor,
                    lengths: Optional[Tensor], out: Tensor, cell: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Backpropagation through time of :func:`elementwise_fwd`: ``(dxp, du, dh0)``;
    ``du`` is ``(H,)`` for IndRNN, an empty tensor for the Min cells (they have no ``u``)."""
    G = _check_args("elementwise_bwd", xp, u, h0, lengths, cell)
    L, N = xp.shape[0], xp.shape[1]
    H = h0.shape[-1]
    xp, h0, out = xp.contiguous(), h0.contiguous(), out.contiguous()
    grad_out, grad_hn = grad_out.contiguous(), grad_hn.contiguous()
    dxp = torch.empty_like(xp)
    dh0 = torch.empty_like(h0)
    du_part = h0.new_zeros((N, H), dtype=_accum_dtype(xp.dtype)) if cell < 2 else h0.new_zeros((0,))
    if N * H > 0:
        u_arg = u.contiguous() if u is not None else h0
        len_arg, has_len = _lengths_arg(lengths, h0)
        NH = N * H
        block = block_size(NH)
        _elementwise_bwd_kernel[(triton.cdiv(NH, block),)](
            grad_out, grad_hn, xp, u_arg, h0, len_arg, out, dxp, du_part, dh0,
            L, NH, H, max(L - 1, 0) * G * NH, max(L - 1, 0) * NH,
            CELL=cell, G=G, HAS_LEN=has_len, BLOCK=block, COMPUTE=compute_dtype(xp.dtype))
    if cell < 2:
        du = du_part.sum(0).to(u.dtype if u is not None else xp.dtype)
    else:
        du = xp.new_empty((0,))
    return dxp, du, dh0


@elementwise_bwd.register_fake
def _(grad_out, grad_hn, xp, u, h0, lengths, out, cell):
    _check_args("elementwise_bwd", xp, u, h0, lengths, cell)
    H = h0.shape[-1]
    du = (u.new_empty((H,)) if u is not None else xp.new_empty((H,))) if cell < 2 else xp.new_empty((0,))
    return torch.empty_like(xp), du, torch.empty_like(h0)


def _elementwise_setup(ctx, inputs, output):
    xp, u, h0, lengths, cell = inputs
    ctx.cell = cell
    ctx.save_for_backward(xp, u, h0, lengths, output[0])


def _elementwise_twin(xp, u, h0, lengths, cell):
    """The op's reference twin (plain PyTorch ops, the cells' own step functions): ``(out, h_n)``."""
    from ..fused import twins
    if cell < 2:  # CELL_INDRNN_TANH, CELL_INDRNN_RELU: the fused twin's act 0 (tanh), 1 (relu)
        return tuple(twins.indrnn_fwd(xp, u, h0, lengths, cell))
    return tuple((twins.min_gru_fwd if cell == CELL_MINGRU else twins.min_lstm_fwd)(xp, h0, lengths))


def _elementwise_backward(ctx, grad_out, grad_hn):
    xp, u, h0, lengths, out = ctx.saved_tensors
    if torch.is_grad_enabled():  # the backward must itself be differentiable: the twin's
        inputs = (xp, u, h0, lengths, ctx.cell)
        wanted = [i for i in range(3) if inputs[i] is not None and ctx.needs_input_grad[i]]
        return tuple(twin_backward(_elementwise_twin, inputs, wanted, (grad_out, grad_hn)))
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    if grad_hn is None:
        grad_hn = torch.zeros_like(h0)
    dxp, du, dh0 = elementwise_bwd(grad_out, grad_hn, xp, u, h0, lengths, out, ctx.cell)
    return dxp, (du if u is not None else None), dh0, None, None


elementwise_fwd.register_autograd(_elementwise_backward, setup_context=_elementwise_setup)


# ----------------------------------------------------------------------------- the scans


INDRNN_CELLS = {"indrnn_tanh": CELL_INDRNN_TANH, "indrnn_relu": CELL_INDRNN_RELU}


def scan_indrnn(spec: CellSpec, p: Params, x: Tensor, state: State, lengths: Optional[Tensor]) -> Tuple[Tensor, State]:
    """IndRNN (relu or tanh) on one layer-direction: ``b_hh`` joins the input projection,
    ``u`` is clamped to ``±recurrent_max_abs`` by torch (autograd covers the clamp)."""
    cell = INDRNN_CELLS.get(spec.fusable)
    if cell is None:
        raise ValueError(f"rnnkit.triton.scan_indrnn: the triton kernel runs IndRNN with nonlinearity 'relu' or "
                         f"'tanh', got the '{spec.name}' cell")
    xp = project(x, p["weight_ih"], bias_sum(p))
    u = p["weight_hh"]
    bound = spec.extra.get("recurrent_max_abs")
    if bound is not None:
        u = u.clamp(-bound, bound)
    out, h_n = elementwise_fwd(xp, u, state[0], lengths, cell)
    return out, (h_n,)


def _scan_min(spec: CellSpec, p: Params, x: Tensor, state: State, lengths: Optional[Tensor], cell: int,
              name: str) -> Tuple[Tensor, State]:
    if spec.name != name:
        raise ValueError(f"rnnkit.triton.scan_{name.replace('_', '')}: expected the '{name}' cell, "
                         f"got the '{spec.name}' cell")
    xp = spec.project(x, p)  # W_ih x + b_ih, all steps in one product
    out, h_n = elementwise_fwd(xp, None, state[0], lengths, cell)
    return out, (h_n,)


def scan_mingru(spec: CellSpec, p: Params, x: Tensor, state: State, lengths: Optional[Tensor]) -> Tuple[Tensor, State]:
    """MinGRU on one layer-direction: the recurrence ``h' = (1 - z) h + z g(k_h)`` step by step in the kernel."""
    return _scan_min(spec, p, x, state, lengths, CELL_MINGRU, "min_gru")


def scan_minlstm(spec: CellSpec, p: Params, x: Tensor, state: State, lengths: Optional[Tensor]) -> Tuple[Tensor, State]:
    """MinLSTM on one layer-direction: ``h' = f' h + i' g(k_h)`` step by step in the kernel."""
    return _scan_min(spec, p, x, state, lengths, CELL_MINLSTM, "min_lstm")


SCANS = {"indrnn_tanh": scan_indrnn, "indrnn_relu": scan_indrnn, "min_gru": scan_mingru, "min_lstm": scan_minlstm}
"""The elementwise scans by family: :attr:`CellSpec.fusable` for IndRNN, :attr:`CellSpec.name` for the
Min cells (which have no fused family). See :func:`family`."""


def family(spec: CellSpec) -> Optional[str]:
    """The key of :data:`SCANS` that runs ``spec``, or None if this driver has no kernel for it."""
    if spec.fusable in SCANS:
        return spec.fusable
    if spec.name in ("min_gru", "min_lstm"):
        return spec.name
    return None


__all__ = ["scan_indrnn", "scan_mingru", "scan_minlstm", "SCANS", "family", "elementwise_fwd", "elementwise_bwd",
           "elementwise_step", "elementwise_step_bwd", "sigmoid", "tanh", "softplus", "BLOCK"]
