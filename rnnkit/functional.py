"""The math of the standard cells, written once, as pure step functions.

Each cell is an input projection (run over all time steps at once by the
runner) and a step on the projected input. The gate order is torch.nn's:
LSTM ``i, f, g, o``; GRU ``r, z, n``. ``p`` holds one layer-direction's
parameters by their unsuffixed names (``weight_ih``, ``weight_hh``, ``bias_ih``,
``bias_hh``, ``weight_hr``); a missing bias is ``None``.
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import RNNInputError
from .spec import CellSpec, Params, State

Activation = Union[str, Callable[[Tensor], Tensor]]


def identity(x: Tensor) -> Tensor:
    """The ``"identity"`` activation (a named function, so a spec using it pickles)."""
    return x


ACTIVATIONS: Dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": torch.tanh,
    "relu": torch.relu,
    "sigmoid": torch.sigmoid,
    "gelu": F.gelu,
    "silu": F.silu,
    "elu": F.elu,
    "leaky_relu": F.leaky_relu,
    "softsign": F.softsign,
    "hardtanh": F.hardtanh,
    "identity": identity,
}


def resolve_activation(nonlinearity: Activation, owner: str = "rnnkit") -> Callable[[Tensor], Tensor]:
    """Turn a name from :data:`ACTIVATIONS` or a callable into a function."""
    if callable(nonlinearity):
        return nonlinearity
    if isinstance(nonlinearity, str) and nonlinearity in ACTIVATIONS:
        return ACTIVATIONS[nonlinearity]
    # torch.nn's words first (its RNNCell's differ: it raises them, a RuntimeError, when it runs);
    # rnnkit takes more than torch.nn's 'tanh' and 'relu', and refuses an unknown one when built
    words = (f"Unknown nonlinearity: {nonlinearity}." if owner.endswith("Cell")
             else f"Unknown nonlinearity '{nonlinearity}'.")
    raise RNNInputError(
        f"{words} {owner}: nonlinearity must be one of {sorted(ACTIVATIONS)} or a callable, got {nonlinearity!r}"
    )


def static_size(t: Tensor, dim: int) -> int:
    """``t.shape[dim]`` as a plain int, also under ``torch.jit.trace`` (which otherwise records a size
    read as a traced value): for sizes that never vary (feature axes, kernel sizes) where an op needs a
    constant in a traced or ONNX graph (``F.layer_norm``'s shape, a convolution's padding)."""
    if not torch.jit.is_tracing():
        return t.shape[dim]
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        return int(t.shape[dim])
    finally:
        torch._C._set_tracing_state(state)


def linear_project(x: Tensor, p: Params) -> Tensor:
    """``W_ih x + b_ih`` over any leading axes: ``(..., H_in) -> (..., G)``."""
    return F.linear(x, p["weight_ih"], p.get("bias_ih"))


RECURRENT_MASK = "recurrent_dropout_mask"
"""The key under which the runner puts a recurrent-dropout mask into ``p``
(see :func:`rnnkit.runner.apply_regularizers`). Cells whose spec sets
``extra["recurrent_dropout"] = True`` read ``h`` through :func:`recurrent_input`."""


def recurrent_input(h: Tensor, p: Params) -> Tensor:
    """``h`` as the recurrent projection reads it: times the sequence's
    recurrent-dropout mask ``(N, H_out)`` when the runner put one in ``p``."""
    mask = p.get(RECURRENT_MASK)
    return h if mask is None else h * mask


def recurrent_project(h: Tensor, p: Params) -> Tensor:
    """``W_hh h + b_hh``: ``(N, H_out) -> (N, G)`` (``h`` through :func:`recurrent_input`)."""
    return F.linear(recurrent_input(h, p), p["weight_hh"], p.get("bias_hh"))


def rnn_step(xp: Tensor, state: State, p: Params, act: Callable[[Tensor], Tensor] = torch.tanh) -> State:
    """Elman RNN: ``h' = act(W_ih x + b_ih + W_hh h + b_hh)``."""
    (h,) = state
    return (act(xp + recurrent_project(h, p)),)


def lstm_step(xp: Tensor, state: State, p: Params) -> State:
    """LSTM, gates ``i, f, g, o``; with ``weight_hr`` the output is projected.

    ``c' = sigmoid(f) * c + sigmoid(i) * tanh(g)``,
    ``h' = W_hr (sigmoid(o) * tanh(c'))`` (no ``W_hr`` without ``proj_size``).
    """
    h, c = state
    i, f, g, o = (xp + recurrent_project(h, p)).chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    w_hr = p.get("weight_hr")
    if w_hr is not None:
        h = F.linear(h, w_hr)
    return h, c


def gru_step(xp: Tensor, state: State, p: Params) -> State:
    """GRU, gates ``r, z, n``: ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``,
    ``h' = (1 - z) * n + z * h`` (with recurrent dropout only ``W_h h`` reads the
    masked ``h``; the update ``z * h`` uses the unmasked one)."""
    (h,) = state
    x_r, x_z, x_n = xp.chunk(3, dim=-1)
    h_r, h_z, h_n = recurrent_project(h, p).chunk(3, dim=-1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return (n + z * (h - n),)


@functools.lru_cache(maxsize=None)
def rnn_spec(nonlinearity: Activation = "tanh") -> CellSpec:
    """The Elman RNN's spec for a named activation or a callable."""
    act = resolve_activation(nonlinearity)
    name = nonlinearity if isinstance(nonlinearity, str) else getattr(nonlinearity, "__name__", "custom")
    fusable = f"rnn_{nonlinearity}" if nonlinearity in ("tanh", "relu") else None
    return CellSpec(
        name=f"rnn_{name}",
        gates=1,
        state_names=("h",),
        project=linear_project,
        step=functools.partial(rnn_step, act=act),
        fusable=fusable,
        extra={"torch_mode": {"tanh": "RNN_TANH", "relu": "RNN_RELU"}.get(nonlinearity)
               if isinstance(nonlinearity, str) else None},
    )


LSTM_SPEC = CellSpec("lstm", 4, ("h", "c"), linear_project, lstm_step, fusable="lstm",
                     extra={"torch_mode": "LSTM", "recurrent_dropout": True})
GRU_SPEC = CellSpec("gru", 3, ("h",), linear_project, gru_step, fusable="gru",
                    extra={"torch_mode": "GRU", "recurrent_dropout": True})
