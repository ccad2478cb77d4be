"""minGRU and minLSTM (Feng et al. 2024, "Were RNNs All We Needed?").

Their gates read ``x_t`` only, so every step is the linear recurrence
``h_t = a_t * h_{t-1} + b_t`` with ``0 < a_t < 1`` and ``b_t > 0``, and a whole
sequence can run as a parallel scan. The step functions below are the
definition (the cells and ``parallel=False`` loop them); :func:`log_space_scan`
computes the same recurrence for all ``t`` at once, in log space as in the
paper (Heinsen's ``cumsum`` + ``logcumsumexp``).

Initial state rule: ``h_0`` is the state itself, any real value (zeros by
default); it is *not* passed through ``g``. The scan splits
``h_t = (prod_{s<=t} a_s) * h_0 + sum_{s<=t} (prod_{s<r<=t} a_r) b_s``: the
second term is a sum of positive terms, done in log space; the first is
``exp(cumsum(log a)) * h_0``, computed with ``h_0``'s sign, so ``h_0`` may be
zero or negative and streaming (passing ``h_n`` back in) is exact.

Precision: ``cumsum(log a)`` reaches thousands after 10,000 steps, and adding
two numbers of that size in float32 loses ~1e-4 of ``log h``. The scan
therefore accumulates in float64 for float16, bfloat16 and float32 inputs
(except on MPS, which has no float64) and casts the outputs back.

Shape legend: ``L`` sequence length, ``N`` batch, ``H_in`` input_size, ``H``
hidden_size, ``D`` 2 if bidirectional else 1.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..cells import CellBase
from ..functional import linear_project
from ..layers import RecurrentBase
from ..registry import LayerEntry, register_layer
from ..spec import CellSpec, Params, State


def g(x: Tensor) -> Tensor:
    """The paper's positive activation: ``x + 0.5`` for ``x >= 0``, ``sigmoid(x)`` below."""
    return torch.where(x >= 0, x + 0.5, torch.sigmoid(x))


def log_g(x: Tensor) -> Tensor:
    """``log(g(x))``, stable for all ``x`` (both branches are finite everywhere)."""
    return torch.where(x >= 0, torch.log(F.relu(x) + 0.5), -F.softplus(-x))


# ----------------------------------------------------------------------------- the definition: one step


def min_gru_step(xp: Tensor, state: State, p: Params) -> State:
    """minGRU, ``xp = [k_z, k_h]`` (``2H``): ``z = sigmoid(k_z)``,
    ``h' = (1 - z) * h + z * g(k_h)``."""
    (h,) = state
    k_z, k_h = xp.chunk(2, dim=-1)
    z = torch.sigmoid(k_z)
    return ((1 - z) * h + z * g(k_h),)


def min_lstm_step(xp: Tensor, state: State, p: Params) -> State:
    """minLSTM, ``xp = [k_f, k_i, k_h]`` (``3H``): ``f = sigmoid(k_f)``,
    ``i = sigmoid(k_i)``, ``h' = f / (f + i) * h + i / (f + i) * g(k_h)``.

    The normalized gates in log space, ``f / (f + i) = sigmoid(log f - log i)`` with
    ``log f = logsigmoid(k_f)``: the same value, finite where ``f`` and ``i`` both underflow
    (``k_f, k_i`` below about -90 in float32), where ``f / (f + i)`` is 0 / 0 = NaN (as the
    parallel scan, which works in log space, never is)."""
    (h,) = state
    k_f, k_i, k_h = xp.chunk(3, dim=-1)
    d = F.logsigmoid(k_f) - F.logsigmoid(k_i)
    return (torch.sigmoid(d) * h + torch.sigmoid(-d) * g(k_h),)


# ----------------------------------------------------------------------------- the parallel scan


def _scan_dtype(t: Tensor) -> torch.dtype:
    if t.dtype in (torch.float16, torch.bfloat16, torch.float32) and t.device.type != "mps":
        return torch.float64
    return t.dtype


def _safe_log(t: Tensor) -> Tensor:
    """``log t`` where ``t > 0``, the dtype's lowest finite value elsewhere; its derivative is finite
    everywhere (``log`` only ever sees positive numbers), so a ``where`` around it never makes 0 * inf."""
    positive = t > 0
    return torch.where(positive, torch.log(torch.where(positive, t, torch.ones_like(t))),
                       torch.full_like(t, torch.finfo(t.dtype).min))


class _LogCumSumExp(torch.autograd.Function):
    """``torch.logcumsumexp(x, 0)`` with a backward written in differentiable ops that stays finite
    where the incoming gradient is 0. torch's own backward takes ``log`` of the gradient's positive
    and negative parts inside a ``where``, so its second derivative is NaN wherever a gradient is 0
    (an output the loss does not read: steps past a length, a loss on the last step only)."""

    generate_vmap_rule = True  # torch.func's vmap and jacrev (forward and backward are plain torch ops)

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return torch.logcumsumexp(x, dim=0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], output)
        ctx.save_for_forward(inputs[0], output)

    @staticmethod
    def jvp(ctx, tangent: Tensor) -> Tensor:
        # forward-mode AD (torch.autograd.forward_ad, torch.func.jvp, hessian = jacfwd(jacrev)):
        # dy_t = sum_{j <= t} tangent_j exp(x_j - y_t), over the tangent's positive and negative parts in log space
        x, y = ctx.saved_tensors

        def head(v):  # logsumexp over j <= t
            return torch.logcumsumexp(v, dim=0)
        return torch.exp(head(x + _safe_log(tangent)) - y) - torch.exp(head(x + _safe_log(-tangent)) - y)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        # dx_j = sum_{t >= j} grad_t exp(x_j - y_t), over grad's positive and negative parts in log space
        x, y = ctx.saved_tensors

        def tail(v):  # logsumexp over t >= j
            return _LogCumSumExp.apply(v.flip(0)).flip(0)
        return torch.exp(x + tail(_safe_log(grad) - y)) - torch.exp(x + tail(_safe_log(-grad) - y))


def _logcumsumexp(x: Tensor) -> Tensor:
    if (torch.is_grad_enabled() and x.requires_grad and not torch.compiler.is_compiling()
            and not torch._C._get_tracing_state()):
        return _LogCumSumExp.apply(x)
    return torch.logcumsumexp(x, dim=0)


def log_space_scan(log_a: Tensor, log_b: Tensor, h0: Tensor) -> Tensor:
    """All ``h_t`` of ``h_t = a_t * h_{t-1} + b_t`` (``a_t, b_t > 0``, any real
    ``h0``) for ``t = 1..L`` at once: ``log_a, log_b (L, N, H)``, ``h0 (N, H)``
    -> ``(L, N, H)``, in ``log_a``'s dtype.

    ``A_t = cumsum(log a)``; ``h_t = exp(A_t + logcumsumexp(log b - A)_t) + exp(A_t) * h0``.
    """
    wide = _scan_dtype(log_a)
    log_a, log_b = log_a.to(wide), log_b.to(wide)
    a_star = torch.cumsum(log_a, dim=0)
    h = torch.exp(a_star + _logcumsumexp(log_b - a_star)) + torch.exp(a_star) * h0.to(wide)
    return h.to(h0.dtype)


def _finish(out: Tensor, h0: Tensor, lengths: Optional[Tensor]) -> Tuple[Tensor, State]:
    """The runner's contract: outputs and the state after each sequence's last valid step.
    (Outputs past a length are not held; the runner masks them.)"""
    if lengths is None:
        return out, (out[-1],)
    last = (lengths - 1).clamp(min=0)
    final = out[last, torch.arange(out.shape[1], device=out.device)]
    final = torch.where((lengths == 0).view(-1, *([1] * (h0.dim() - 1))), h0, final)
    return out, (final,)


def min_gru_sequence(xp: Tensor, state: State, p: Params, lengths: Optional[Tensor]) -> Tuple[Tensor, State]:
    """minGRU over a whole ``(L, N, 2H)`` projected sequence: ``log a = log(1 - z) = -softplus(k_z)``,
    ``log b = log z + log g(k_h) = -softplus(-k_z) + log_g(k_h)``."""
    (h0,) = state
    k_z, k_h = xp.chunk(2, dim=-1)
    out = log_space_scan(-F.softplus(k_z), -F.softplus(-k_z) + log_g(k_h), h0)
    return _finish(out, h0, lengths)


def min_lstm_sequence(xp: Tensor, state: State, p: Params, lengths: Optional[Tensor]) -> Tuple[Tensor, State]:
    """minLSTM over a whole ``(L, N, 3H)`` projected sequence. With
    ``d = log(i / f) = softplus(-k_f) - softplus(-k_i)``:
    ``log f' = -softplus(d)``, ``log i' = -softplus(-d)``, ``log b = log i' + log g(k_h)``."""
    (h0,) = state
    k_f, k_i, k_h = xp.chunk(3, dim=-1)
    d = F.softplus(-k_f) - F.softplus(-k_i)
    out = log_space_scan(-F.softplus(d), -F.softplus(-d) + log_g(k_h), h0)
    return _finish(out, h0, lengths)


MIN_GRU_SPEC = CellSpec("min_gru", 2, ("h",), linear_project, min_gru_step, sequence=min_gru_sequence)
MIN_LSTM_SPEC = CellSpec("min_lstm", 3, ("h",), linear_project, min_lstm_step, sequence=min_lstm_sequence)
_STEP_ONLY = {spec.name: dataclasses.replace(spec, sequence=None) for spec in (MIN_GRU_SPEC, MIN_LSTM_SPEC)}


# ----------------------------------------------------------------------------- layers


class _MinBase(RecurrentBase):
    _is_standard = False
    _spec: CellSpec  # the cell's spec, with its parallel scan

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, device=None,
                 dtype=None, *, parallel: bool = True, backend: str = "auto") -> None:
        if not isinstance(parallel, bool):
            raise TypeError(f"{type(self).__name__}: parallel must be a bool, got {parallel!r} of type "
                            f"{type(parallel).__name__}")
        self.parallel = parallel
        super().__init__(self._make_spec(), input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, 0, device, dtype, backend=backend)

    def _make_spec(self) -> CellSpec:
        return self._spec if self.parallel else _STEP_ONLY[self._spec.name]

    def _layer_param_shapes(self, layer_input: int) -> List[Tuple[str, Tuple[int, ...]]]:
        gates = self.cell_spec.gates * self.hidden_size
        shapes = [("weight_ih", (gates, layer_input))]
        if self.bias:
            shapes.append(("bias_ih", (gates,)))
        return shapes

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.parallel else ", parallel=False")


_MIN_ARGS = r"""
        input_size: ``H_in``, the number of features of ``x``.
        hidden_size: ``H``, the number of features of ``h``.
        num_layers: how many layers to stack; layer ``k > 0`` reads layer ``k-1``'s output.
        bias: if False, no ``b_ih``.
        batch_first: if True, ``input`` and ``output`` are ``(N, L, H)``; states are not affected.
        dropout: dropout probability on each layer's output except the last's, in training only.
        bidirectional: if True, each layer also runs the sequence backwards.
        parallel (keyword): True (default) runs each layer-direction as one log-space
            parallel scan; False loops the step (the definition; same results to rounding).
        backend: ``"auto"`` or ``"reference"`` (the generic runner; PyTorch has no fused op).

    Inputs: input, h_0 (, lengths)
        * **input**: ``(L, N, H_in)``, ``(N, L, H_in)`` with ``batch_first=True``,
          ``(L, H_in)`` unbatched, or a PackedSequence.
        * **h_0**: ``(D * num_layers, N, H)``, any real values (zeros if not given);
          it is the state itself (not passed through ``g``), so ``h_n`` can be fed back.
        * **lengths** (keyword): ``(N,)`` each sequence's length in a padded batch.

    Outputs: output, h_n
        * **output**: ``(L, N, D * H)`` (``(N, L, D * H)`` with ``batch_first``).
        * **h_n**: ``(D * num_layers, N, H)``, the state after each sequence's last step,
          layer-major, direction-minor.

    Shape legend: ``N`` batch, ``L`` sequence length, ``D`` 2 if bidirectional else 1,
    ``H_in`` input_size, ``H`` hidden_size.
"""


class MinGRU(_MinBase):
    __doc__ = r"""minGRU (Feng et al. 2024): a GRU whose gate reads only ``x_t``, trained as a parallel scan.

    .. math::
        \begin{array}{ll}
        z_t = \sigma(W_z x_t + b_z) \\
        \tilde h_t = g(W_h x_t + b_h), \quad g(v) = v + 0.5 \text{ if } v \ge 0 \text{ else } \sigma(v) \\
        h_t = (1 - z_t) \odot h_{t-1} + z_t \odot \tilde h_t
        \end{array}

    ``weight_ih`` stacks ``W_z, W_h``. The sequence runs as the paper's log-space
    scan, ``log h_t = A_t + logcumsumexp(log z + log g - A)_t`` with
    ``A_t = sum_{s<=t} log(1 - z_s)``, plus ``exp(A_t) h_0`` for the initial state
    (see :mod:`rnnkit.zoo.minimal` for the rule on ``h_0`` and the precision).

    Args:""" + _MIN_ARGS + r"""
    Attributes:
        weight_ih_l[k]: ``(2*H, H_in)`` for ``k = 0``, else ``(2*H, D * H)``.
        bias_ih_l[k]: ``(2*H,)``.
        All ~ U(-1/sqrt(H), 1/sqrt(H)).

    Examples::

        >>> rnn = rnnkit.MinGRU(10, 20, num_layers=2)
        >>> out, h_n = rnn(torch.randn(1000, 3, 10))
        >>> out.shape, h_n.shape
        (torch.Size([1000, 3, 20]), torch.Size([2, 3, 20]))
    """

    _spec = MIN_GRU_SPEC

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, device=None,
                 dtype=None, *, parallel: bool = True, backend: str = "auto") -> None:
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, device,
                         dtype, parallel=parallel, backend=backend)


class MinLSTM(_MinBase):
    __doc__ = r"""minLSTM (Feng et al. 2024): an LSTM whose gates read only ``x_t``, with
    normalized gates and no separate cell state, trained as a parallel scan.

    .. math::
        \begin{array}{ll}
        f_t = \sigma(W_f x_t + b_f), \quad i_t = \sigma(W_i x_t + b_i) \\
        f'_t = f_t / (f_t + i_t), \quad i'_t = i_t / (f_t + i_t) \\
        \tilde h_t = g(W_h x_t + b_h), \quad g(v) = v + 0.5 \text{ if } v \ge 0 \text{ else } \sigma(v) \\
        h_t = f'_t \odot h_{t-1} + i'_t \odot \tilde h_t
        \end{array}

    ``weight_ih`` stacks ``W_f, W_i, W_h``. The state is ``h`` alone (``h_n``, no
    ``c_n``). The sequence runs as a log-space scan with ``log f' = -softplus(d)``,
    ``log i' = -softplus(-d)``, ``d = softplus(-k_f) - softplus(-k_i)``.

    Args:""" + _MIN_ARGS + r"""
    Attributes:
        weight_ih_l[k]: ``(3*H, H_in)`` for ``k = 0``, else ``(3*H, D * H)``.
        bias_ih_l[k]: ``(3*H,)``.
        All ~ U(-1/sqrt(H), 1/sqrt(H)).

    Examples::

        >>> rnn = rnnkit.MinLSTM(10, 20, bidirectional=True, batch_first=True)
        >>> out, h_n = rnn(torch.randn(3, 1000, 10))
        >>> out.shape, h_n.shape
        (torch.Size([3, 1000, 40]), torch.Size([2, 3, 20]))
    """

    _spec = MIN_LSTM_SPEC

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, device=None,
                 dtype=None, *, parallel: bool = True, backend: str = "auto") -> None:
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, device,
                         dtype, parallel=parallel, backend=backend)


# ----------------------------------------------------------------------------- cells


class _MinCellBase(CellBase):
    _is_standard = False
    _spec: CellSpec

    def _make_spec(self) -> CellSpec:
        return self._spec

    def _param_shapes(self):
        gates = self.cell_spec.gates * self.hidden_size
        return [("weight_ih", (gates, self.input_size)), ("bias_ih", (gates,) if self.bias else None)]


class MinGRUCell(_MinCellBase):
    r"""One step of :class:`MinGRU` (sequential inference):
    ``z = σ(W_z x + b_z)``, ``h' = (1 - z) h + z g(W_h x + b_h)``.

    Args:
        input_size, hidden_size, bias, device, dtype: as :class:`MinGRU`.
        backend: ``'auto'`` or ``'reference'``.

    Inputs: ``input (N, H_in)`` or ``(H_in,)``; ``hx (N, H)`` or ``(H,)``, zeros if None.
    Output: ``h' (N, H)`` or ``(H,)``.

    Attributes: ``weight_ih (2H, H_in)``, ``bias_ih (2H,)``.

    Examples::

        >>> cell = rnnkit.MinGRUCell(10, 20)
        >>> h = None
        >>> for x_t in torch.randn(6, 3, 10):
        ...     h = cell(x_t, h)
    """

    _spec = MIN_GRU_SPEC

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None,
                 *, backend: str = "auto") -> None:
        super().__init__(self._make_spec(), input_size, hidden_size, bias, device, dtype, backend=backend)


class MinLSTMCell(_MinCellBase):
    r"""One step of :class:`MinLSTM` (sequential inference):
    ``f = σ(W_f x + b_f)``, ``i = σ(W_i x + b_i)``, ``h' = f/(f+i) h + i/(f+i) g(W_h x + b_h)``.

    Args:
        input_size, hidden_size, bias, device, dtype: as :class:`MinLSTM`.
        backend: ``'auto'`` or ``'reference'``.

    Inputs: ``input (N, H_in)`` or ``(H_in,)``; ``hx (N, H)`` or ``(H,)``, zeros if None.
    Output: ``h' (N, H)`` or ``(H,)``.

    Attributes: ``weight_ih (3H, H_in)``, ``bias_ih (3H,)``.

    Examples::

        >>> cell = rnnkit.MinLSTMCell(10, 20)
        >>> h = cell(torch.randn(3, 10))
    """

    _spec = MIN_LSTM_SPEC

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None,
                 *, backend: str = "auto") -> None:
        super().__init__(self._make_spec(), input_size, hidden_size, bias, device, dtype, backend=backend)


register_layer(LayerEntry("mingru", MinGRU, MinGRUCell))
register_layer(LayerEntry("minlstm", MinLSTM, MinLSTMCell))

__all__ = ["MinGRU", "MinLSTM", "MinGRUCell", "MinLSTMCell", "g", "log_g", "log_space_scan", "min_gru_step",
           "min_lstm_step", "min_gru_sequence", "min_lstm_sequence", "MIN_GRU_SPEC", "MIN_LSTM_SPEC"]
