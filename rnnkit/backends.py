"""The backend dispatch table.

A backend runs a whole recurrent layer stack for a module. Each entry answers
two questions with a reason (or ``None`` when the answer is yes):

* ``unavailable()``: can it run on this machine at all?
* ``unsupported(module, x)``: can it compute *exactly this* configuration?
  ``x`` is None when asked at construction time (configuration only).

``backend="auto"`` walks :data:`AUTO_ORDER` and picks the first backend that
can run; asking for a backend by name that cannot run raises a ValueError
with its reason. New backends join with :func:`register_backend`.
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, _VF
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import _autocast
from ._checks import forward_ad_active
from .runner import reference_scan, run_stack
from .spec import State


class Backend:
    name: str = ""
    description: str = ""

    def unavailable(self) -> Optional[str]:
        return None

    def unsupported(self, module, x: Optional[Tensor]) -> Optional[str]:
        return None

    def run(self, module, x: Tensor, state0: State, lengths: Optional[Tensor]) -> Tuple[Tensor, State]:
        raise NotImplementedError


class ReferenceBackend(Backend):
    name = "reference"
    description = "the generic runner looping over each cell's step function in plain PyTorch ops"

    def run(self, module, x, state0, lengths):
        return run_stack(module, x, state0, lengths, reference_scan)


def _onednn_lstm(module, x: Tensor) -> bool:
    """Whether torch's op runs ``module`` on ``x`` through oneDNN's LSTM (``mkldnn_rnn_layer``, which has no
    forward-mode AD): an LSTM on a float32 CPU input where ATen's ``use_mkldnn`` takes it
    (:func:`rnnkit._autocast.onednn_lstm`; its bfloat16 path depends on the CPU, and there torch.nn's
    behaviour is kept). RNN and GRU run ATen's cells."""
    return (module.cell_spec.extra.get("torch_mode") == "LSTM" and x.device.type == "cpu"
            and x.dtype == torch.float32 and _autocast.onednn_lstm(x))


_VF_LAYERS = {"RNN_TANH": _VF.rnn_tanh, "RNN_RELU": _VF.rnn_relu, "LSTM": _VF.lstm, "GRU": _VF.gru}


class TorchBackend(Backend):
    """PyTorch's own fused op (cuDNN on GPU, oneDNN or ATen on CPU), whole stack in one call."""

    name = "torch"
    description = "PyTorch's built-in fused RNN op (cuDNN / oneDNN / ATen)"

    def unsupported(self, module, x):
        mode = module.cell_spec.extra.get("torch_mode")
        if mode is None or not getattr(module, "_is_standard", False):
            return f"PyTorch has no fused op for the '{module.cell_spec.name}' cell"
        extra = module._regularizers_active() if hasattr(module, "_regularizers_active") else None
        if extra:
            return f"PyTorch's fused op has no {extra}"
        if x is not None and not x.dtype.is_floating_point:
            return f"PyTorch's fused op needs a floating-point input, got {x.dtype}"
        if x is not None and forward_ad_active() and _onednn_lstm(module, x):
            return ("forward-mode AD is active and PyTorch's op runs oneDNN here (an LSTM on a float32 CPU input), "
                    "which has no forward-mode (jvp) formula (torch.nn raises NotImplementedError)")
        return None

    def run(self, module, x, state0, lengths):
        fn = _VF_LAYERS[module.cell_spec.extra["torch_mode"]]
        hx = state0 if len(state0) > 1 else state0[0]
        args = (module._flat_weights, module.bias, module.num_layers, module.dropout,
                module.training, module.num_directions == 2)
        if lengths is None or x.shape[1] == 0:  # an empty batch has nothing to pack
            result = fn(x, hx, *args, False)
            return result[0], tuple(result[1:])
        # torch packs instead of taking lengths; it rejects empty sequences, so
        # run those for one step and give them back their initial state.
        order = getattr(module, "_packed_order", None)  # a PackedSequence input's own order (inter-layer dropout)
        if order is None:
            packed = pack_padded_sequence(x, lengths.clamp(min=1).cpu(), enforce_sorted=False)
            order, back = packed.sorted_indices, packed.unsorted_indices
        else:  # packed as the caller's: torch's op draws its dropout masks in the packed data's order
            back = torch.empty_like(order)
            back[order] = torch.arange(order.numel(), device=order.device)
            packed = pack_padded_sequence(x.index_select(1, order), lengths[order].clamp(min=1).cpu())
        hx_sorted = tuple(h.index_select(1, order) for h in state0)
        result = fn(packed.data, packed.batch_sizes, hx_sorted if len(state0) > 1 else hx_sorted[0], *args)
        out_packed = PackedSequence(result[0], packed.batch_sizes, order, back)
        out, _ = pad_packed_sequence(out_packed, total_length=x.shape[0])
        states = tuple(s.index_select(1, back) for s in result[1:])
        empty = (lengths == 0).view(1, -1, 1)
        # (s0 in the op's result dtype: under autocast an LSTM's h may come back bfloat16 from a float32 h_0)
        states = tuple(torch.where(empty, s0.to(s.dtype), s) for s0, s in zip(state0, states))
        return out, states


BACKENDS: Dict[str, Backend] = {}
AUTO_ORDER = ["fused", "torch", "reference"]


def register_backend(backend: Backend) -> Backend:
    BACKENDS[backend.name] = backend
    return backend


register_backend(ReferenceBackend())
register_backend(TorchBackend())

BACKEND_CHOICES = ("auto", "reference", "torch", "fused", "triton")


def check_backend_name(name, owner: str) -> str:
    if name not in BACKEND_CHOICES:
        raise ValueError(f"{owner}: backend must be one of {list(BACKEND_CHOICES)}, got {name!r}")
    return name


def why_not(name: str, module, x: Optional[Tensor] = None) -> Optional[str]:
    """Why backend ``name`` cannot run ``module`` (on ``x``), or None if it can."""
    backend = BACKENDS.get(name)
    if backend is None:
        return f"the '{name}' backend is not installed"
    return backend.unavailable() or backend.unsupported(module, x)


def select(module, x: Optional[Tensor] = None, lengths: Optional[Tensor] = None) -> Backend:
    """The backend that will run ``module`` on ``x`` (with ``lengths``, if given).

    While ``torch.onnx.export`` runs, every layer takes the ONNX export route
    (:mod:`rnnkit.onnx`): the same function, in ops both ONNX exporters translate."""
    if torch.onnx.is_in_onnx_export():
        from .onnx import EXPORT_BACKEND
        return EXPORT_BACKEND
    requested = module.backend
    if requested == "auto":
        key = _auto_key(module, x, lengths)
        if key is not None:
            cached = module.__dict__.get(AUTO_CHOICE)
            if cached is not None and cached[0] == key and cached[1] in BACKENDS:
                return BACKENDS[cached[1]]
        order, settled = _auto_plan(module, x, lengths)
        for name in order:
            if why_not(name, module, x) is None:
                if settled and key is not None:  # keyed after planning: a measurement made now counts
                    module.__dict__[AUTO_CHOICE] = (_auto_key(module, x, lengths), name)  # not __setattr__
                return BACKENDS[name]
        raise RuntimeError("no backend can run this module")  # reference runs everything
    reason = why_not(requested, module, x)
    if reason is not None:
        raise ValueError(
            f"{module._describe()}: backend={requested!r} cannot run this configuration: {reason}. "
            "Use backend='auto' to pick one that can."
        )
    return BACKENDS[requested]


def auto_order(module, x: Optional[Tensor], lengths: Optional[Tensor] = None):
    """Backends in the order ``auto`` tries them; the fused backend reorders
    this from its measured table where it has one."""
    return _auto_plan(module, x, lengths)[0]


def _auto_plan(module, x: Optional[Tensor], lengths: Optional[Tensor]):
    """``(auto_order(...), settled)``: settled when the order is final for this configuration."""
    order, settled = AUTO_ORDER, True
    preference = BACKENDS.get("fused")
    if preference is not None and hasattr(preference, "auto_plan"):
        order, settled = preference.auto_plan(module, x, AUTO_ORDER, lengths)
    elif preference is not None and hasattr(preference, "auto_order"):
        order, settled = preference.auto_order(module, x, AUTO_ORDER, lengths), False
    gpu = BACKENDS.get("triton")
    if gpu is not None and x is not None and x.device.type == "cuda":  # never on the CPU
        order, settled = gpu.auto_order(module, x, order, lengths), False
    return order, settled


AUTO_CHOICE = "_auto_choice"
"""Where :func:`select` keeps ``auto``'s last settled choice in a module's ``__dict__``: ``(key, name)``.
Choosing costs tens of microseconds (the measured class, every candidate's checks), as much as a short
call's whole work; a repeated call with the same :func:`_auto_key` takes the remembered name.
``RecurrentBase.__setattr__`` and ``_apply`` (``.to()``, ``.double()``) drop it."""


def _auto_key(module, x: Optional[Tensor], lengths: Optional[Tensor]) -> Optional[tuple]:
    """Everything ``auto``'s choice depends on besides the module's attributes, or None where the choice
    is never remembered (no input, a GPU input, tracing, torch.compile or export, forward-mode AD,
    CPU autocast: a layer reaches a backend with it on only to run in mixed precision, which the fused
    kernels decline)."""
    if (x is None or x.device.type != "cpu" or torch.compiler.is_compiling() or torch._C._get_tracing_state()
            or forward_ad_active() or torch.is_autocast_enabled("cpu")):
        return None
    fused = BACKENDS.get("fused")
    cal = getattr(fused, "_calibrator", None)
    params = module._parameters
    return (type(x), x.dtype, x.shape[1:], x.requires_grad, lengths is None, torch.is_grad_enabled(),
            torch.is_inference_mode_enabled(), any(p is not None and p.requires_grad for p in params.values()),
            torch.get_num_threads(), os.environ.get("RNNKIT_AUTO_MEASURE"), id(getattr(fused, "_table", None)),
            id(cal), getattr(cal, "epoch", 0))


def describe_backends() -> Dict[str, str]:
    """Each known backend: 'ready' or why it is not."""
    return {name: (BACKENDS[name].unavailable() or "ready") if name in BACKENDS else "not installed"
            for name in ("reference", "torch", "fused", "triton")}
