"""Autocast: rnnkit's layers and cells follow torch's policy for its own RNN ops.

Under ``torch.autocast`` a layer runs the way torch.nn's twin runs under PyTorch 2.13
(measured on torch.nn's layers, dtypes and values, see ``tests/test_autocast.py``):

* on CUDA, cuDNN's RNN op and the ``*_cell`` ops are on autocast's lower-precision
  list: every layer and cell runs in the autocast dtype (:data:`LOWER`);
* on the CPU, ``torch.nn.RNN`` and ``RNNCell`` (composite ops whose every result comes
  out of a cast matrix product) and ``torch.nn.LSTM`` on oneDNN (``mkldnn_rnn_layer``
  is on the CPU list) also run in the autocast dtype (:data:`LOWER`);
* on the CPU, ``torch.nn.GRU``, ``GRUCell``, ``LSTMCell`` and an ``LSTM`` off oneDNN
  (with ``proj_size``, a PackedSequence, or oneDNN switched off) run ATen's composite
  cells *with autocast on*: the matrix products in the autocast dtype, the rest by
  type promotion, so the states mix precisions (an LSTM's ``c`` stays float32, a
  GRU's ``h`` is float32 for a float32 input and ``h_0``, bfloat16 for a bfloat16
  ``h_0``). rnnkit does the same (:data:`MIXED`): the layer runs with autocast left
  on, on torch's op (the same op torch.nn calls) or the reference backend (the same
  ops in the same order); the fused and triton kernels compute in one dtype, so they
  decline (pinned, they raise a ``ValueError`` that says so). ``lengths=`` reads as a
  packed batch here, as it runs on torch's op;
* rnnkit's own layers and cells (the zoo) stay in float32 on the CPU, where their
  fused kernels run float32 (:data:`FLOAT32`).

:data:`LOWER` and :data:`FLOAT32` run the layer with autocast turned off, on its
parameters, input and state cast to that dtype (the casts are differentiable, so the
float32 parameters get float32 gradients), on whichever backend runs that dtype.
Float64 modules and inputs are not cast (autocast leaves float64 alone).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

LOWER = "lower"
FLOAT32 = "float32"
MIXED = "mixed"
"""A policy and :func:`compute_dtype`'s answer: run with autocast left on, as torch.nn's composite ops do."""

MIXED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""The dtypes a :data:`MIXED` run takes in any mix (input, states, parameters): autocast casts them all."""


def onednn_lstm(x: Tensor) -> bool:
    """Whether torch.nn's unpacked LSTM without projection runs ``x`` on oneDNN (ATen's ``use_mkldnn``: oneDNN
    built and enabled, a non-empty input, float32, or bfloat16 where this CPU has oneDNN's bfloat16, or
    float16 without a gradient where it has its float16); else ATen's composite cells run it."""
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled) or x.numel() == 0:
        return False
    if x.dtype == torch.float32:
        return True
    if x.dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if x.dtype == torch.float16:
        return not torch.is_grad_enabled() and bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return False


def mixed_active(x: Tensor) -> bool:
    """Whether CPU autocast is on and ``x`` is a CPU tensor other than float64 (autocast leaves float64 alone):
    a fused kernel then declines, as it computes in one dtype (a :data:`MIXED` run, CPU only, is the only way
    a layer reaches a backend with autocast on and such an input)."""
    return x.device.type == "cpu" and x.dtype != torch.float64 and torch.is_autocast_enabled("cpu")


MIXED_REASON = ("autocast is on and torch.nn computes this layer in mixed precision there (matrix products in the "
                "autocast dtype, the states by type promotion); the {} compute in one dtype. Use backend='auto', "
                "'torch' or 'reference', or run outside autocast")


def enabled() -> bool:
    """Cheap check run on every forward: is any autocast region active?"""
    return torch._C._is_any_autocast_enabled()


def compute_dtype(module, input, lengths=None):
    """The dtype ``module`` computes in under the active autocast for ``input``, :data:`MIXED`
    (run with autocast on), or None when autocast does not apply (not enabled for its device,
    float64, not floating). ``lengths`` given reads as a packed input."""
    packed = isinstance(input, PackedSequence) or lengths is not None
    x = input.data if packed else input
    if not isinstance(x, Tensor) or not x.is_floating_point():
        return None
    device_type = x.device.type
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
    except RuntimeError:  # a device autocast does not know (meta)
        return None
    ref = next(iter(module.parameters()), None)
    if x.dtype == torch.float64 or (ref is not None and ref.dtype == torch.float64):
        return None
    policy = LOWER if device_type != "cpu" else module._autocast_cpu_policy(packed, x)
    if policy == MIXED:
        return MIXED
    return torch.get_autocast_dtype(device_type) if policy == LOWER else torch.float32


def _cast(value, dtype: torch.dtype):
    if isinstance(value, Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, PackedSequence):
        return value._replace(data=value.data.to(dtype))
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def call(module, dtype: torch.dtype, input, *args, **kwargs):
    """Run ``module(input, *args, **kwargs)`` in ``dtype`` with autocast off: its floating
    parameters, the input and the state are cast (differentiably) to ``dtype``."""
    device_type = (input.data if isinstance(input, PackedSequence) else input).device.type
    with torch.autocast(device_type, enabled=False):
        params = {name: _cast(p, dtype) for name, p in module.named_parameters()}
        args = tuple(_cast(a, dtype) for a in args)
        return torch.func.functional_call(module, params, (_cast(input, dtype), *args), kwargs)
