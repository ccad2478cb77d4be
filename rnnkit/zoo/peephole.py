"""LSTM with peephole connections (Gers, Schraudolph and Schmidhuber 2002).

The input and forget gates look at the previous cell state ``c_{t-1}``, the
output gate at the new one ``c_t``, through per-unit (diagonal) weights.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..cells import CellBase
from ..functional import linear_project, recurrent_project
from ..layers import _ARGS_DOC, _REGULARIZERS_DOC, _SHAPES_DOC, RecurrentBase
from ..registry import LayerEntry, register_layer
from ..spec import CellSpec, Params, State


def peephole_lstm_step(xp: Tensor, state: State, p: Params) -> State:
    """Peephole LSTM, gates ``i, f, g, o``; ``w_ci, w_cf, w_co`` are ``(H,)``.

    ``i = σ(a^i + w_ci c)``, ``f = σ(a^f + w_cf c)``, ``c' = f c + i tanh(a^g)``,
    ``o = σ(a^o + w_co c')``, ``h' = o tanh(c')`` with ``a = W_ih x + b_ih + W_hh h + b_hh``.
    """
    h, c = state
    a_i, a_f, a_g, a_o = (xp + recurrent_project(h, p)).chunk(4, dim=-1)
    i = torch.sigmoid(a_i + p["weight_ci"] * c)
    f = torch.sigmoid(a_f + p["weight_cf"] * c)
    c = f * c + i * torch.tanh(a_g)
    o = torch.sigmoid(a_o + p["weight_co"] * c)
    return o * torch.tanh(c), c


PEEPHOLE_LSTM_SPEC = CellSpec("peephole_lstm", 4, ("h", "c"), linear_project, peephole_lstm_step,
                              fusable="peephole_lstm", extra={"recurrent_dropout": True})

_PEEPHOLES = ("weight_ci", "weight_cf", "weight_co")


def _shapes(hidden: int, input_size: int, bias: bool):
    g = 4 * hidden
    shapes = [("weight_ih", (g, input_size)), ("weight_hh", (g, hidden)),
              ("bias_ih", (g,) if bias else None), ("bias_hh", (g,) if bias else None)]
    return shapes + [(name, (hidden,)) for name in _PEEPHOLES]


def _reset(module: nn.Module, hidden: int) -> None:
    """Every parameter, peepholes included, ~ U(-1/sqrt(H), 1/sqrt(H)) as torch.nn.LSTM."""
    bound = 1.0 / math.sqrt(hidden)
    for param in module.parameters():
        nn.init.uniform_(param, -bound, bound)


class PeepholeLSTM(RecurrentBase):
    __doc__ = r"""LSTM with peephole connections (Gers, Schraudolph and Schmidhuber 2002).

    .. math::
        \begin{array}{ll}
        i_t = \sigma(W_{ii} x_t + b_{ii} + W_{hi} h_{t-1} + b_{hi} + w_{ci} \odot c_{t-1}) \\
        f_t = \sigma(W_{if} x_t + b_{if} + W_{hf} h_{t-1} + b_{hf} + w_{cf} \odot c_{t-1}) \\
        g_t = \tanh(W_{ig} x_t + b_{ig} + W_{hg} h_{t-1} + b_{hg}) \\
        c_t = f_t \odot c_{t-1} + i_t \odot g_t \\
        o_t = \sigma(W_{io} x_t + b_{io} + W_{ho} h_{t-1} + b_{ho} + w_{co} \odot c_t) \\
        h_t = o_t \odot \tanh(c_t)
        \end{array}

    The peephole weights :math:`w_{ci}, w_{cf}, w_{co}` are per-unit (diagonal)
    parameters that learn. With them at zero this is exactly ``torch.nn.LSTM``, whose
    parameters it shares by name and shape, so an ``nn.LSTM`` checkpoint loads with
    ``load_state_dict(sd, strict=False)`` (the peepholes are then the only missing keys).

    Args:""" + _ARGS_DOC + _REGULARIZERS_DOC.format(
        gru_note="", cell_note="\n        zoneout_cell (keyword): the same for the cell state ``c``; defaults to "
        "``zoneout``.") + "\n" + \
        _SHAPES_DOC.format(hx="hx = (h_0, c_0)", hx_shape="s ``h_0 (D * num_layers, N, H_out)`` and "
                           "``c_0 (D * num_layers, N, H)``", hn="(h_n, c_n)", hn_first="h_n",
                           cn="\n        * **c_n**: ``(D * num_layers, N, H)``: the final cell states, same order.",
                           hout="hidden_size") + r"""
    Attributes:
        weight_ih_l[k]: ``(4H, H_in)`` for ``k = 0``, else ``(4H, D * H)``; gates ``i, f, g, o``.
        weight_hh_l[k]: ``(4H, H)``.
        bias_ih_l[k], bias_hh_l[k]: ``(4H,)``.
        weight_ci_l[k], weight_cf_l[k], weight_co_l[k]: ``(H,)``, the peepholes.
        All ~ U(-1/sqrt(H), 1/sqrt(H)).

    Examples::

        >>> lstm = rnnkit.PeepholeLSTM(10, 20, num_layers=2)
        >>> out, (h, c) = lstm(torch.randn(5, 3, 10))
        >>> out.shape, lstm.weight_ci_l0.shape
        (torch.Size([5, 3, 20]), torch.Size([20]))
    """

    _is_standard = False

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, device=None,
                 dtype=None, *, backend: str = "auto", recurrent_dropout: float = 0.0, zoneout: float = 0.0,
                 zoneout_cell: Optional[float] = None, weight_drop: float = 0.0) -> None:
        super().__init__(self._make_spec(), input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, 0, device, dtype, backend=backend, recurrent_dropout=recurrent_dropout,
                         zoneout=zoneout, zoneout_cell=zoneout_cell, weight_drop=weight_drop)

    def _make_spec(self) -> CellSpec:
        return PEEPHOLE_LSTM_SPEC

    def _layer_param_shapes(self, layer_input: int) -> List[Tuple[str, Tuple[int, ...]]]:
        return [(n, s) for n, s in _shapes(self.hidden_size, layer_input, self.bias) if s is not None]

    def reset_parameters(self) -> None:
        _reset(self, self.hidden_size)


class PeepholeLSTMCell(CellBase):
    r"""One step of :class:`PeepholeLSTM` (the same step function).

    ``i = σ(a^i + w_ci c)``, ``f = σ(a^f + w_cf c)``, ``c' = f c + i tanh(a^g)``,
    ``o = σ(a^o + w_co c')``, ``h' = o tanh(c')``, with ``a = W_ih x + b_ih + W_hh h + b_hh``.

    Args:
        input_size, hidden_size, bias, device, dtype: as ``torch.nn.LSTMCell``.
        backend: ``'auto'`` or ``'reference'`` (PyTorch has no fused op for it).

    Inputs: ``input (N, H_in)`` or ``(H_in,)``; ``hx = (h, c)``, each ``(N, H)`` or ``(H,)``, zeros if None.
    Output: ``(h', c')``.

    Attributes: ``weight_ih (4H, H_in)``, ``weight_hh (4H, H)``, ``bias_ih (4H,)``, ``bias_hh (4H,)``,
    ``weight_ci``, ``weight_cf``, ``weight_co`` ``(H,)``.

    Examples::

        >>> cell = rnnkit.PeepholeLSTMCell(10, 20)
        >>> h, c = cell(torch.randn(3, 10))
        >>> c.shape
        torch.Size([3, 20])
    """

    _is_standard = False

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None,
                 *, backend: str = "auto") -> None:
        super().__init__(self._make_spec(), input_size, hidden_size, bias, device, dtype, backend=backend)

    def _make_spec(self) -> CellSpec:
        return PEEPHOLE_LSTM_SPEC

    def _param_shapes(self) -> List[Tuple[str, Optional[Tuple[int, ...]]]]:
        return _shapes(self.hidden_size, self.input_size, self.bias)

    def reset_parameters(self) -> None:
        _reset(self, self.hidden_size)


register_layer(LayerEntry("peephole_lstm", PeepholeLSTM, PeepholeLSTMCell))
