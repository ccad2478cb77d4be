"""Independently recurrent neural network (Li, Li, Cook, Zhu and Gao 2018).

Each unit has one recurrent weight: ``h_t = act(W x_t + b + u * h_{t-1})``, so
units only interact across layers, and ``|u|`` bounds how fast a unit's memory
grows or decays.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Callable, List, Optional, Tuple

from torch import Tensor, nn

from ..cells import CellBase
from ..functional import Activation, linear_project, resolve_activation
from ..layers import _SHAPES_DOC, RecurrentBase
from ..registry import LayerEntry, register_layer
from ..spec import CellSpec, Params, State


def indrnn_step(xp: Tensor, state: State, p: Params, act: Callable[[Tensor], Tensor],
                recurrent_max_abs: Optional[float] = None) -> State:
    """``h' = act(W_ih x + b_ih + u * h + b_hh)`` with ``u = weight_hh`` ``(H,)``,
    clamped to ``[-recurrent_max_abs, recurrent_max_abs]`` when that is set."""
    (h,) = state
    u = p["weight_hh"]
    if recurrent_max_abs is not None:
        u = u.clamp(-recurrent_max_abs, recurrent_max_abs)
    pre = xp + u * h
    b = p.get("bias_hh")
    return (act(pre if b is None else pre + b),)


@functools.lru_cache(maxsize=None)
def indrnn_spec(nonlinearity: Activation = "relu", recurrent_max_abs: Optional[float] = None) -> CellSpec:
    act = resolve_activation(nonlinearity)
    name = nonlinearity if isinstance(nonlinearity, str) else getattr(nonlinearity, "__name__", "custom")
    fusable = f"indrnn_{nonlinearity}" if isinstance(nonlinearity, str) and nonlinearity in ("relu", "tanh") else None
    return CellSpec(f"indrnn_{name}", 1, ("h",), linear_project,
                    functools.partial(indrnn_step, act=act, recurrent_max_abs=recurrent_max_abs), fusable=fusable,
                    extra={"recurrent_max_abs": recurrent_max_abs})


def _check_max_abs(owner: str, value) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"{owner}: recurrent_max_abs must be None (no clamping) or a positive number "
                         f"(the bound on |u|), got {value!r}")
    return float(value)


def _shapes(hidden: int, input_size: int, bias: bool):
    return [("weight_ih", (hidden, input_size)), ("weight_hh", (hidden,)),
            ("bias_ih", (hidden,) if bias else None), ("bias_hh", (hidden,) if bias else None)]


def _reset(module: nn.Module, hidden: int, recurrent_max_abs: Optional[float]) -> None:
    """``u ~ U(0, min(1, recurrent_max_abs))``, everything else ~ U(-1/sqrt(H), 1/sqrt(H))."""
    bound = 1.0 / math.sqrt(hidden)
    u_max = 1.0 if recurrent_max_abs is None else min(1.0, recurrent_max_abs)
    for name, param in module.named_parameters():
        if name.startswith("weight_hh"):
            nn.init.uniform_(param, 0.0, u_max)
        else:
            nn.init.uniform_(param, -bound, bound)


class IndRNN(RecurrentBase):
    __doc__ = r"""Independently recurrent neural network (Li et al. 2018).

    .. math:: h_t = \mathrm{act}(W_{ih} x_t + b_{ih} + u \odot h_{t-1} + b_{hh})

    with a per-unit recurrent weight :math:`u` (``weight_hh``, shape ``(H,)``) and
    ``act = relu`` by default. With ``recurrent_max_abs = m`` the step uses
    :math:`\mathrm{clamp}(u, -m, m)` (the paper's constraint :math:`|u| \le m`, applied
    in the forward pass; the parameter itself is never modified, and an element of ``u``
    outside the bound gets no gradient, as with any clamp). The paper picks
    :math:`m = 2^{1/T}` to keep a relu unit's memory from exploding over ``T`` steps.

    Args:
        input_size: ``H_in``, the number of features of ``x``.
        hidden_size: ``H``, the number of features of ``h``.
        num_layers: how many layers to stack; layer ``k > 0`` reads layer ``k-1``'s output.
        nonlinearity: ``'relu'`` (default), ``'tanh'``, another name from
            :data:`rnnkit.functional.ACTIVATIONS`, or a callable.
        bias: if False, no ``b_ih`` and ``b_hh``.
        batch_first: if True, ``input`` and ``output`` are ``(N, L, ·)``; states are not affected.
        dropout: dropout probability on each layer's output except the last's, in training only.
        bidirectional: if True, each layer also runs the sequence backwards.
        recurrent_max_abs (keyword): None (default, no clamping) or the bound ``m`` on ``|u|``.
        backend: ``'auto'``, ``'reference'`` or ``'fused'`` (rnnkit's C++ kernel, for ``'relu'`` and
            ``'tanh'``); PyTorch has no fused op for IndRNN.
""" + _SHAPES_DOC.format(hx="hx", hx_shape=" ``(D * num_layers, N, H_out)``", hn="h_n", hn_first="h_n", cn="",
                         hout="hidden_size") + r"""
    Attributes:
        weight_ih_l[k]: ``(H, H_in)`` for ``k = 0``, else ``(H, D * H)``, ~ U(-1/sqrt(H), 1/sqrt(H)).
        weight_hh_l[k]: ``(H,)``, the per-unit ``u``, ~ U(0, min(1, recurrent_max_abs)).
        bias_ih_l[k], bias_hh_l[k]: ``(H,)``, ~ U(-1/sqrt(H), 1/sqrt(H)).

    Examples::

        >>> rnn = rnnkit.IndRNN(10, 20, num_layers=3, recurrent_max_abs=2 ** (1 / 100))
        >>> out, h = rnn(torch.randn(100, 4, 10))
        >>> out.shape, h.shape
        (torch.Size([100, 4, 20]), torch.Size([3, 4, 20]))
    """

    _is_standard = False

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: Activation = "relu",
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None, *, recurrent_max_abs: Optional[float] = None,
                 backend: str = "auto") -> None:
        resolve_activation(nonlinearity, owner="IndRNN")
        self.recurrent_max_abs = _check_max_abs("IndRNN", recurrent_max_abs)
        super().__init__(indrnn_spec(nonlinearity, self.recurrent_max_abs), input_size, hidden_size, num_layers,
                         bias, batch_first, dropout, bidirectional, 0, device, dtype, backend=backend)
        self.nonlinearity = nonlinearity  # after Module.__init__: an nn.Module activation becomes a submodule

    def _make_spec(self) -> CellSpec:
        # as __init__, which cannot set an nn.Module nonlinearity before Module.__init__ (cached: the same spec)
        return indrnn_spec(self.nonlinearity, self.recurrent_max_abs)

    def _layer_param_shapes(self, layer_input: int) -> List[Tuple[str, Tuple[int, ...]]]:
        return [(n, s) for n, s in _shapes(self.hidden_size, layer_input, self.bias) if s is not None]

    def reset_parameters(self) -> None:
        _reset(self, self.hidden_size, self.recurrent_max_abs)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.nonlinearity != "relu":
            s += f", nonlinearity={self.nonlinearity!r}"
        if self.recurrent_max_abs is not None:
            s += f", recurrent_max_abs={self.recurrent_max_abs}"
        return s


class IndRNNCell(CellBase):
    r"""One step of :class:`IndRNN` (the same step function):
    ``h' = act(W_ih x + b_ih + u * h + b_hh)``, ``u`` clamped to ``±recurrent_max_abs`` if set.

    Args:
        input_size, hidden_size, bias, device, dtype: as ``torch.nn.RNNCell``.
        nonlinearity: ``'relu'`` (default), another name, or a callable.
        recurrent_max_abs (keyword): None or the bound on ``|u|``.
        backend: ``'auto'`` or ``'reference'``.

    Inputs: ``input (N, H_in)`` or ``(H_in,)``; ``hx (N, H)`` or ``(H,)``, zeros if None.
    Output: ``h' (N, H)`` or ``(H,)``.

    Attributes: ``weight_ih (H, H_in)``, ``weight_hh (H,)``, ``bias_ih (H,)``, ``bias_hh (H,)``.

    Examples::

        >>> cell = rnnkit.IndRNNCell(10, 20)
        >>> cell(torch.randn(3, 10)).shape
        torch.Size([3, 20])
    """

    _is_standard = False

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: Activation = "relu",
                 device=None, dtype=None, *, recurrent_max_abs: Optional[float] = None,
                 backend: str = "auto") -> None:
        resolve_activation(nonlinearity, owner="IndRNNCell")
        self.recurrent_max_abs = _check_max_abs("IndRNNCell", recurrent_max_abs)
        super().__init__(indrnn_spec(nonlinearity, self.recurrent_max_abs), input_size, hidden_size, bias, device,
                         dtype, backend=backend)
        self.nonlinearity = nonlinearity  # after Module.__init__: an nn.Module activation becomes a submodule

    def _make_spec(self) -> CellSpec:
        return indrnn_spec(self.nonlinearity, self.recurrent_max_abs)  # as __init__ (see IndRNN._make_spec)

    def _param_shapes(self) -> List[Tuple[str, Optional[Tuple[int, ...]]]]:
        return _shapes(self.hidden_size, self.input_size, self.bias)

    def reset_parameters(self) -> None:
        _reset(self, self.hidden_size, self.recurrent_max_abs)


register_layer(LayerEntry("indrnn", IndRNN, IndRNNCell))
