"""The fused single-step path of :class:`rnnkit.RNNCell`, :class:`rnnkit.LSTMCell`
and :class:`rnnkit.GRUCell`.

Inference (no gradient needed) runs one C++ op per step: both matrix products
and the gate math, no Python in between. With a gradient it runs the sequence
op for ``L = 1``, whose backward is the hand-written BPTT.

The plain inference step does not even go through the op: ``CellBase.forward``
first offers it to :data:`direct_step` (the extension's CPython entry, which
skips the dispatcher), and takes the full path below when that answers
NotImplemented (a check failed, a gradient is needed, torch.compile is tracing...).
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from .._checks import forward_ad_active, kernel_mode_reason
from . import _build, _ops
from .backend import KERNELS, _bias_sum, _project, tensor_unsupported


_FLOATS = (torch.float32, torch.float64)
_CELL_OPS: dict = {}

# the direct entry: direct_step(kind, input, hx, params, input_size, hidden_size) -> new state or
# NotImplemented; None until the extension is loaded as a module (see csrc/cell.cpp's last section)
direct_step = None
DIRECT_KIND = {"lstm": 0, "gru": 1, "rnn_tanh": 2, "rnn_relu": 3}
# the direct layer entry: layer_run(kind, input, hx, params, input_size, hidden_size, batch_first) ->
# (output, h_n) / (output, (h_n, c_n)) or NotImplemented: a plain inference call of a one-layer, one-direction
# RNN/LSTM/GRU, any length, through the inference-only kernel (csrc/cell.cpp's layer_infer); None until loaded
layer_run = None


def get_layer_run():
    """The direct layer entry once the extension is loaded as a module, else None (cheap: asked per call)."""
    global layer_run
    if layer_run is None and _build._state["loaded"] and _build._state["module"] is not None:
        layer_run = getattr(_build._state["module"], "layer_run", None)
    return layer_run


def get_direct_step():
    """The direct entry once the extension is loaded as a module, else None (cheap: asked per call)."""
    global direct_step
    if direct_step is None and _build._state["loaded"] and _build._state["module"] is not None:
        direct_step = getattr(_build._state["module"], "cell_step", None)
    return direct_step


def _cell_ops() -> dict:
    """The cell ops as resolved overloads (skips the per-call overload lookup)."""
    if not _CELL_OPS:
        ops = torch.ops.rnnkit_fused
        _CELL_OPS.update(lstm=ops.lstm_cell.default, gru=ops.gru_cell.default, rnn=ops.rnn_cell.default)
    return _CELL_OPS


_compiling = torch.compiler.is_compiling
_tracing = torch._C._get_tracing_state


def direct_entry_off() -> bool:
    """Whether the C++ direct entries (a layer's inference entry, a cell's step) must stay out: a tracer,
    torch.compile or export should record the ops (they bypass the dispatcher), and forward-mode AD needs a
    formula the kernels lack."""
    return _compiling() or bool(_tracing()) or forward_ad_active()


def cell_unsupported(cell, x: Optional[Tensor] = None) -> Optional[str]:
    """Why the fused step cannot run ``cell`` (on ``x``), or None if it can.
    Asked on every step, so the common case is a few attribute reads."""
    if not _build._state["loaded"] or os.environ.get(_build.DISABLE_ENV):
        reason = _build.load()
        if reason is not None:
            return reason
    global direct_step
    if direct_step is None and _build._state["module"] is not None:
        direct_step = getattr(_build._state["module"], "cell_step", None)
    reason = kernel_mode_reason(x, "fused kernels")  # asked with an input: constructing a cell in a dual_level is fine
    if reason is not None:
        return reason
    if x is not None and x.layout != torch.strided:  # a sparse input: torch's cell op takes it (a sparse product)
        return f"the fused kernels take dense (strided) tensors, got an input of layout {x.layout}"
    ref = cell.weight_ih
    if (cell.cell_spec.fusable in KERNELS and cell._is_standard and ref.dtype in _FLOATS
            and ref.device.type == "cpu" and (x is None or (x.dtype in _FLOATS and x.device.type == "cpu"))):
        return None
    spec = cell.cell_spec
    if spec.fusable not in KERNELS or not getattr(cell, "_is_standard", False):
        return f"no fused kernel for the '{spec.name}' cell"
    return tensor_unsupported(cell.weight_ih, x, bfloat16=True)  # bfloat16: the sequence op on one step


def _needs_grad(tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def cell_step(cell, x: Tensor, state: Tuple[Tensor, ...]) -> Tuple[Tensor, ...]:
    """One step of ``cell`` on ``x (N, H_in)`` from ``state`` (each ``(N, H)``)."""
    spec = cell.cell_spec
    p = cell._params()
    w_ih, w_hh, b_ih, b_hh = p["weight_ih"], p["weight_hh"], p.get("bias_ih"), p.get("bias_hh")
    if (x.dtype != torch.bfloat16 and not _needs_grad([x, *state, w_ih, w_hh, b_ih, b_hh])
            and not torch._C._get_tracing_state()):  # traced: one graph whatever the grad mode
        ops = _cell_ops()
        if spec.fusable == "lstm":
            return tuple(ops["lstm"](x, state[0], state[1], w_ih, w_hh, b_ih, b_hh))
        if spec.fusable == "gru":
            return (ops["gru"](x, state[0], w_ih, w_hh, b_ih, b_hh),)
        return (ops["rnn"](x, state[0], w_ih, w_hh, b_ih, b_hh, _ops.ACT[spec.fusable]),)
    # differentiable (or bfloat16, which the step ops do not run): the sequence op on one step
    x1 = x.unsqueeze(0)
    if spec.fusable == "lstm":
        out, h, c = _ops.lstm_sequence(_project(x1, w_ih, _bias_sum(p)), w_hh, None, state[0].contiguous(),
                                       state[1].contiguous(), None)
        return h, c
    if spec.fusable == "gru":
        out, h = _ops.gru_sequence(_project(x1, w_ih, b_ih), w_hh, b_hh, state[0].contiguous(), None)
        return (h,)
    out, h = _ops.rnn_sequence(_project(x1, w_ih, _bias_sum(p)), w_hh, state[0].contiguous(), None,
                               _ops.ACT[spec.fusable])
    return (h,)
