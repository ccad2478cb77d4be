"""Autocast: rnnkit's layers and cells follow torch's policy for its own RNN ops.

Under ``torch.autocast`` a layer runs in one compute dtype, chosen as PyTorch 2.13
chooses for its recurrent ops (measured on torch.nn's layers, see
``tests/test_autocast.py``):

* on CUDA, cuDNN's RNN op and the ``*_cell`` ops are on autocast's lower-precision
  list: every layer and cell runs in the autocast dtype;
* on the CPU, ``torch.nn.RNN`` (its op is composite, so its matrix products are cast)
  and ``torch.nn.LSTM`` (oneDNN's ``mkldnn_rnn_layer`` is on the CPU list) run in the
  autocast dtype, while ``torch.nn.GRU``, a packed LSTM, ``LSTMCell`` and ``GRUCell``
  stay in float32 (their kernels are not on the list); ``RNNCell`` runs in the
  autocast dtype. rnnkit's own layers and cells (the zoo) stay in float32 on the CPU,
  where their fused kernels run float32 (so every backend can run them).

The layer then runs with autocast turned off, on its parameters, input and state cast
to that dtype (the casts are differentiable, so the float32 parameters get float32
gradients), on whichever backend runs that dtype. Float64 modules and inputs are not
cast (autocast leaves float64 alone).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

LOWER = "lower"
FLOAT32 = "float32"


def enabled() -> bool:
    """Cheap check run on every forward: is any autocast region active?"""
    return torch._C._is_any_autocast_enabled()


def compute_dtype(module, input) -> Optional[torch.dtype]:
    """The dtype ``module`` computes in under the active autocast for ``input``, or None
    when autocast does not apply (not enabled for its device, float64, not floating)."""
    packed = isinstance(input, PackedSequence)
    x = input.data if packed else input
    if not isinstance(x, Tensor) or not x.is_floating_point():
        return None
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return None
    ref = next(iter(module.parameters()), None)
    if x.dtype == torch.float64 or (ref is not None and ref.dtype == torch.float64):
        return None
    policy = LOWER if device_type != "cpu" else module._autocast_cpu_policy(packed)
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
