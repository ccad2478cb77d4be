"""Layer-normalized LSTM and GRU (Ba, Kiros and Hinton 2016, "Layer Normalization").

The input projection ``W_ih x`` and the recurrent projection ``W_hh h`` are
each normalized over their whole ``G = gates * H`` vector with their own gain
and shift, then the gate biases are added; the LSTM also normalizes the cell
state before the output ``tanh``. The input side runs over all time steps at
once in ``project``; only the recurrent side is in the step.
"""

from __future__ import annotations

import functools
import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cells import CellBase
from ..functional import recurrent_input, static_size
from ..layers import _ARGS_DOC, _REGULARIZERS_DOC, _SHAPES_DOC, RecurrentBase
from ..registry import LayerEntry, register_layer
from ..spec import CellSpec, Params, State

# ----------------------------------------------------------------------------- math


def _layer_norm(v: Tensor, p: Params, which: str, eps: float) -> Tensor:
    """``LN(v) = (v - mean) / sqrt(var + eps) * ln_weight_{which} + ln_bias_{which}`` over the last axis."""
    return F.layer_norm(v, (static_size(v, -1),), p[f"ln_weight_{which}"], p.get(f"ln_bias_{which}"), eps)


def _add_bias(v: Tensor, b: Optional[Tensor]) -> Tensor:
    return v if b is None else v + b


def layernorm_project(x: Tensor, p: Params, eps: float = 1e-5) -> Tensor:
    """``LN_ih(W_ih x) + b_ih`` over any leading axes: ``(..., H_in) -> (..., G)``."""
    return _add_bias(_layer_norm(F.linear(x, p["weight_ih"]), p, "ih", eps), p.get("bias_ih"))


def layernorm_recurrent(h: Tensor, p: Params, eps: float = 1e-5) -> Tensor:
    """``LN_hh(W_hh h) + b_hh`` (``h`` through the recurrent-dropout mask, if any)."""
    return _add_bias(_layer_norm(F.linear(recurrent_input(h, p), p["weight_hh"]), p, "hh", eps), p.get("bias_hh"))


def layernorm_lstm_step(xp: Tensor, state: State, p: Params, eps: float = 1e-5) -> State:
    """LN-LSTM, gates ``i, f, g, o``: ``c' = σ(f) c + σ(i) tanh(g)``, ``h' = σ(o) tanh(LN_c(c'))``."""
    h, c = state
    i, f, g, o = (xp + layernorm_recurrent(h, p, eps)).chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(_layer_norm(c, p, "c", eps))
    return h, c


def layernorm_gru_step(xp: Tensor, state: State, p: Params, eps: float = 1e-5) -> State:
    """LN-GRU, gates ``r, z, n``: ``n = tanh(a_n + r * b_n)``, ``h' = (1 - z) n + z h``
    where ``a = LN_ih(W_ih x) + b_ih`` and ``b = LN_hh(W_hh h) + b_hh``."""
    (h,) = state
    x_r, x_z, x_n = xp.chunk(3, dim=-1)
    h_r, h_z, h_n = layernorm_recurrent(h, p, eps).chunk(3, dim=-1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return (n + z * (h - n),)


@functools.lru_cache(maxsize=None)
def layernorm_lstm_spec(eps: float = 1e-5) -> CellSpec:
    return CellSpec("layernorm_lstm", 4, ("h", "c"), functools.partial(layernorm_project, eps=eps),
                    functools.partial(layernorm_lstm_step, eps=eps), fusable="layernorm_lstm",
                    extra={"recurrent_dropout": True})


@functools.lru_cache(maxsize=None)
def layernorm_gru_spec(eps: float = 1e-5) -> CellSpec:
    return CellSpec("layernorm_gru", 3, ("h",), functools.partial(layernorm_project, eps=eps),
                    functools.partial(layernorm_gru_step, eps=eps), fusable="layernorm_gru",
                    extra={"recurrent_dropout": True})


# ----------------------------------------------------------------------------- parameters


def _shapes(gates: int, hidden: int, input_size: int, bias: bool, cell_norm: bool):
    """One layer-direction's parameters: torch.nn's four, then the LN gains and shifts."""
    g = gates * hidden
    shapes = [("weight_ih", (g, input_size)), ("weight_hh", (g, hidden)),
              ("bias_ih", (g,) if bias else None), ("bias_hh", (g,) if bias else None)]
    for which, size in [("ih", g), ("hh", g)] + ([("c", hidden)] if cell_norm else []):
        shapes += [(f"ln_weight_{which}", (size,)), (f"ln_bias_{which}", (size,) if bias else None)]
    return shapes


def _reset(module: nn.Module, hidden: int) -> None:
    """Gains 1, LN shifts 0, every other parameter ~ U(-1/sqrt(H), 1/sqrt(H))."""
    bound = 1.0 / math.sqrt(hidden)
    for name, param in module.named_parameters():
        if name.startswith("ln_weight"):
            nn.init.ones_(param)
        elif name.startswith("ln_bias"):
            nn.init.zeros_(param)
        else:
            nn.init.uniform_(param, -bound, bound)


def _check_eps(owner: str, eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"{owner}: layer_norm_eps must be a positive number (added to the variance), got {eps!r}")
    return float(eps)


class _LayerNormCellBase(CellBase):
    _is_standard = False
    _cell_norm = False

    def _make_spec(self) -> CellSpec:
        return (layernorm_lstm_spec if self._cell_norm else layernorm_gru_spec)(self.layer_norm_eps)

    def _param_shapes(self) -> List[Tuple[str, Optional[Tuple[int, ...]]]]:
        return _shapes(self.cell_spec.gates, self.hidden_size, self.input_size, self.bias, self._cell_norm)

    def reset_parameters(self) -> None:
        _reset(self, self.hidden_size)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + (f", layer_norm_eps={self.layer_norm_eps}" if self.layer_norm_eps != 1e-5 else "")


class _LayerNormLayerBase(RecurrentBase):
    _is_standard = False
    _cell_norm = False

    def _make_spec(self) -> CellSpec:
        return (layernorm_lstm_spec if self._cell_norm else layernorm_gru_spec)(self.layer_norm_eps)

    def _layer_param_shapes(self, layer_input: int) -> List[Tuple[str, Tuple[int, ...]]]:
        return [(n, s) for n, s in _shapes(self.cell_spec.gates, self.hidden_size, layer_input, self.bias,
                                           self._cell_norm) if s is not None]

    def reset_parameters(self) -> None:
        _reset(self, self.hidden_size)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + (f", layer_norm_eps={self.layer_norm_eps}" if self.layer_norm_eps != 1e-5 else "")


# ----------------------------------------------------------------------------- layers

_LN_ARGS = r"""
        layer_norm_eps (keyword): the ``eps`` of every layer normalization (default 1e-5)."""


class LayerNormLSTM(_LayerNormLayerBase):
    __doc__ = r"""LSTM with layer normalization (Ba, Kiros and Hinton 2016).

    .. math::
        \begin{array}{ll}
        a_t = \mathrm{LN}_{ih}(W_{ih} x_t) + b_{ih} + \mathrm{LN}_{hh}(W_{hh} h_{t-1}) + b_{hh}
              \quad (4H, \text{ split as } a^i, a^f, a^g, a^o) \\
        i_t = \sigma(a^i_t), \; f_t = \sigma(a^f_t), \; g_t = \tanh(a^g_t), \; o_t = \sigma(a^o_t) \\
        c_t = f_t \odot c_{t-1} + i_t \odot g_t \\
        h_t = o_t \odot \tanh(\mathrm{LN}_c(c_t))
        \end{array}

    where :math:`\mathrm{LN}(v) = \gamma \odot (v - \mu(v)) / \sqrt{\sigma^2(v) + \epsilon} + \beta`
    normalizes over the whole vector (``4H`` for the projections, ``H`` for ``c``), each
    LN with its own gain :math:`\gamma` (init 1) and shift :math:`\beta` (init 0). The
    state carried to the next step is the unnormalized ``c_t``.

    Args:""" + _ARGS_DOC.replace("no ``b_ih`` and ``b_hh``", "no gate biases ``b_ih``, ``b_hh`` and no LN shifts "
                                 "``ln_bias_*`` (the LNs only scale)") + _LN_ARGS + \
        _REGULARIZERS_DOC.format(gru_note="", cell_note="\n        zoneout_cell (keyword): the same for the cell "
                                 "state ``c``; defaults to ``zoneout``.") + "\n" + \
        _SHAPES_DOC.format(hx="hx = (h_0, c_0)", hx_shape="s ``h_0 (D * num_layers, N, H_out)`` and "
                           "``c_0 (D * num_layers, N, H)``", hn="(h_n, c_n)", hn_first="h_n",
                           cn="\n        * **c_n**: ``(D * num_layers, N, H)``: the final cell states, same order.",
                           hout="hidden_size") + r"""
    Attributes:
        weight_ih_l[k]: ``(4H, H_in)`` for ``k = 0``, else ``(4H, D * H)``; gates ``i, f, g, o``.
        weight_hh_l[k]: ``(4H, H)``.
        bias_ih_l[k], bias_hh_l[k]: ``(4H,)``.
        ln_weight_ih_l[k], ln_bias_ih_l[k], ln_weight_hh_l[k], ln_bias_hh_l[k]: ``(4H,)``.
        ln_weight_c_l[k], ln_bias_c_l[k]: ``(H,)``.
        Weights and gate biases ~ U(-1/sqrt(H), 1/sqrt(H)); ``ln_weight_*`` = 1, ``ln_bias_*`` = 0.

    Examples::

        >>> lstm = rnnkit.LayerNormLSTM(10, 20, num_layers=2, bidirectional=True)
        >>> out, (h, c) = lstm(torch.randn(5, 3, 10))
        >>> out.shape, h.shape, c.shape
        (torch.Size([5, 3, 40]), torch.Size([4, 3, 20]), torch.Size([4, 3, 20]))
    """

    _cell_norm = True

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, device=None,
                 dtype=None, *, layer_norm_eps: float = 1e-5, backend: str = "auto", recurrent_dropout: float = 0.0,
                 zoneout: float = 0.0, zoneout_cell: Optional[float] = None, weight_drop: float = 0.0) -> None:
        self.layer_norm_eps = _check_eps("LayerNormLSTM", layer_norm_eps)
        super().__init__(self._make_spec(), input_size, hidden_size, num_layers, bias,
                         batch_first, dropout, bidirectional, 0, device, dtype, backend=backend,
                         recurrent_dropout=recurrent_dropout, zoneout=zoneout, zoneout_cell=zoneout_cell,
                         weight_drop=weight_drop)


class LayerNormGRU(_LayerNormLayerBase):
    __doc__ = r"""GRU with layer normalization (Ba, Kiros and Hinton 2016), extending ``torch.nn.GRU``.

    .. math::
        \begin{array}{ll}
        a_t = \mathrm{LN}_{ih}(W_{ih} x_t) + b_{ih}, \quad
        b_t = \mathrm{LN}_{hh}(W_{hh} h_{t-1}) + b_{hh} \quad (3H, \text{ split as } r, z, n) \\
        r_t = \sigma(a^r_t + b^r_t) \\
        z_t = \sigma(a^z_t + b^z_t) \\
        n_t = \tanh(a^n_t + r_t \odot b^n_t) \\
        h_t = (1 - z_t) \odot n_t + z_t \odot h_{t-1}
        \end{array}

    The reset gate multiplies the *normalized* recurrent candidate plus its bias,
    :math:`r_t \odot (\mathrm{LN}_{hh}(W_{hh} h_{t-1})^n + b^n_{hh})`, the natural extension of
    torch.nn.GRU's :math:`r_t \odot (W_{hn} h_{t-1} + b_{hn})`. Each LN normalizes the whole
    ``3H`` projection with its own gain (init 1) and shift (init 0).

    Args:""" + _ARGS_DOC.replace("no ``b_ih`` and ``b_hh``", "no gate biases ``b_ih``, ``b_hh`` and no LN shifts "
                                 "``ln_bias_*`` (the LNs only scale)") + _LN_ARGS + _REGULARIZERS_DOC.format(
        gru_note="\n            The update ``z * h_{t-1}`` reads the unmasked ``h_{t-1}``.", cell_note="") + "\n" + \
        _SHAPES_DOC.format(hx="hx", hx_shape=" ``(D * num_layers, N, H_out)``", hn="h_n", hn_first="h_n", cn="",
                           hout="hidden_size") + r"""
    Attributes:
        weight_ih_l[k]: ``(3H, H_in)`` for ``k = 0``, else ``(3H, D * H)``; gates ``r, z, n``.
        weight_hh_l[k]: ``(3H, H)``.
        bias_ih_l[k], bias_hh_l[k]: ``(3H,)``.
        ln_weight_ih_l[k], ln_bias_ih_l[k], ln_weight_hh_l[k], ln_bias_hh_l[k]: ``(3H,)``.
        Weights and gate biases ~ U(-1/sqrt(H), 1/sqrt(H)); ``ln_weight_*`` = 1, ``ln_bias_*`` = 0.

    Examples::

        >>> gru = rnnkit.LayerNormGRU(10, 20, batch_first=True)
        >>> out, h = gru(torch.randn(3, 5, 10))
        >>> out.shape, h.shape
        (torch.Size([3, 5, 20]), torch.Size([1, 3, 20]))
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, device=None,
                 dtype=None, *, layer_norm_eps: float = 1e-5, backend: str = "auto", recurrent_dropout: float = 0.0,
                 zoneout: float = 0.0, weight_drop: float = 0.0) -> None:
        self.layer_norm_eps = _check_eps("LayerNormGRU", layer_norm_eps)
        super().__init__(self._make_spec(), input_size, hidden_size, num_layers, bias,
                         batch_first, dropout, bidirectional, 0, device, dtype, backend=backend,
                         recurrent_dropout=recurrent_dropout, zoneout=zoneout, weight_drop=weight_drop)


# ----------------------------------------------------------------------------- cells


class LayerNormLSTMCell(_LayerNormCellBase):
    r"""One step of :class:`LayerNormLSTM` (the same step function).

    ``a = LN_ih(W_ih x) + b_ih + LN_hh(W_hh h) + b_hh``; ``c' = σ(a^f) c + σ(a^i) tanh(a^g)``;
    ``h' = σ(a^o) tanh(LN_c(c'))``.

    Args:
        input_size, hidden_size, bias, device, dtype: as ``torch.nn.LSTMCell``
            (``bias=False`` also drops the LN shifts).
        layer_norm_eps (keyword): the LNs' ``eps`` (default 1e-5).
        backend: ``'auto'`` or ``'reference'`` (PyTorch has no fused op for it).

    Inputs: ``input (N, H_in)`` or ``(H_in,)``; ``hx = (h, c)``, each ``(N, H)`` or ``(H,)``, zeros if None.
    Output: ``(h', c')``, each ``(N, H)`` or ``(H,)``.

    Attributes: ``weight_ih (4H, H_in)``, ``weight_hh (4H, H)``, ``bias_ih``, ``bias_hh``,
    ``ln_weight_ih``, ``ln_bias_ih``, ``ln_weight_hh``, ``ln_bias_hh`` ``(4H,)``, ``ln_weight_c``, ``ln_bias_c`` ``(H,)``.

    Examples::

        >>> cell = rnnkit.LayerNormLSTMCell(10, 20)
        >>> h, c = cell(torch.randn(3, 10))
        >>> h.shape
        torch.Size([3, 20])
    """

    _cell_norm = True

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None,
                 *, layer_norm_eps: float = 1e-5, backend: str = "auto") -> None:
        self.layer_norm_eps = _check_eps("LayerNormLSTMCell", layer_norm_eps)
        super().__init__(self._make_spec(), input_size, hidden_size, bias, device, dtype, backend=backend)


class LayerNormGRUCell(_LayerNormCellBase):
    r"""One step of :class:`LayerNormGRU` (the same step function).

    ``a = LN_ih(W_ih x) + b_ih``, ``b = LN_hh(W_hh h) + b_hh``; ``r = σ(a^r + b^r)``,
    ``z = σ(a^z + b^z)``, ``n = tanh(a^n + r b^n)``, ``h' = (1 - z) n + z h``.

    Args:
        input_size, hidden_size, bias, device, dtype: as ``torch.nn.GRUCell``
            (``bias=False`` also drops the LN shifts).
        layer_norm_eps (keyword): the LNs' ``eps`` (default 1e-5).
        backend: ``'auto'`` or ``'reference'``.

    Inputs: ``input (N, H_in)`` or ``(H_in,)``; ``hx (N, H)`` or ``(H,)``, zeros if None.
    Output: ``h' (N, H)`` or ``(H,)``.

    Attributes: ``weight_ih (3H, H_in)``, ``weight_hh (3H, H)``, ``bias_ih``, ``bias_hh``,
    ``ln_weight_ih``, ``ln_bias_ih``, ``ln_weight_hh``, ``ln_bias_hh``, all ``(3H,)``.

    Examples::

        >>> cell = rnnkit.LayerNormGRUCell(10, 20)
        >>> cell(torch.randn(3, 10)).shape
        torch.Size([3, 20])
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None,
                 *, layer_norm_eps: float = 1e-5, backend: str = "auto") -> None:
        self.layer_norm_eps = _check_eps("LayerNormGRUCell", layer_norm_eps)
        super().__init__(self._make_spec(), input_size, hidden_size, bias, device, dtype, backend=backend)


register_layer(LayerEntry("layernorm_lstm", LayerNormLSTM, LayerNormLSTMCell))
register_layer(LayerEntry("layernorm_gru", LayerNormGRU, LayerNormGRUCell))
