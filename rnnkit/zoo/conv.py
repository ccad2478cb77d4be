"""Convolutional recurrent cells: ConvLSTM (Shi et al. 2015) and ConvGRU (Ballas et al. 2016)
over 1, 2 or 3 spatial dimensions, on rnnkit's one sequence runner.

The matrix products of LSTM and GRU become convolutions. The input convolution
(``W * x``, which may stride and dilate) runs over all time steps at once in
:func:`conv_project`, with ``L`` folded into the batch; the recurrent
convolution (``U * h``, stride 1, 'same' padding, so ``h`` keeps its spatial
size) and the gate math run per step in :func:`conv_lstm_step` and
:func:`conv_gru_step`. Layers, directions, ``lengths``, ``batch_first`` and
streaming come from :mod:`rnnkit.runner`, unchanged: a ``(L, N, C, *S)``
tensor flows through it like an ``(L, N, H_in)`` one.

Shape legend: ``L`` sequence length, ``N`` batch, ``D`` 2 if bidirectional else
1, ``C`` input channels (``input_size``), ``hidden`` hidden channels
(``hidden_size``), ``S`` the input's spatial size (``W``; ``H, W``;
``D_s, H, W``), ``S'`` the state's spatial size: ``S' = ceil(S / stride)``
(``S' = S`` without stride).
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .. import _autocast
from .._checks import check_bool, check_dtype_device, shape_str, split_states
from ..errors import RNNShapeError, RNNTypeError
from ..cells import CellBase
from ..layers import RecurrentBase, _exporter_defaults
from ..registry import LayerEntry, register_layer
from ..spec import CellSpec, Params, State

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_SPATIAL_SYMBOLS = {1: ("W",), 2: ("H", "W"), 3: ("D_s", "H", "W")}


class ConvGeometry(NamedTuple):
    """How the input convolution of one layer strides and dilates (per spatial dim)."""

    stride: Tuple[int, ...]
    dilation: Tuple[int, ...]


# ----------------------------------------------------------------------------- the math, once


def same_padding(kernel_size: Sequence[int], dilation: Sequence[int]) -> List[Tuple[int, int]]:
    """Per spatial dim, the (before, after) zero padding that keeps the size at
    stride 1: ``dilation * (k - 1)`` in all, the extra one after for an odd total
    (an even kernel)."""
    pads = []
    for k, d in zip(kernel_size, dilation):
        total = d * (k - 1)
        pads.append((total // 2, total - total // 2))
    return pads


def conv_same(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int] = None,
              dilation: Sequence[int] = None) -> Tensor:
    """``conv(x, weight) + bias`` with 'same' padding, then ``stride``:
    ``(B, C_in, *S) -> (B, C_out, *ceil(S / stride))``, for odd and even kernels."""
    nd = weight.dim() - 2
    stride = tuple(stride) if stride is not None else (1,) * nd
    dilation = tuple(dilation) if dilation is not None else (1,) * nd
    pads = same_padding(weight.shape[2:], dilation)
    if all(a == b for a, b in pads):
        return _CONV[nd](x, weight, bias, stride, [a for a, _ in pads], dilation)
    flat: List[int] = []
    for before, after in reversed(pads):  # F.pad lists the last dim first
        flat += [before, after]
    return _CONV[nd](F.pad(x, flat), weight, bias, stride, 0, dilation)


def conv_project(x: Tensor, p: Params) -> Tensor:
    """The input convolution ``W_ih * x + b_ih`` over any leading axes:
    ``(..., C, *S) -> (..., G * hidden, *S')``. The runner passes a whole
    ``(L, N, C, *S)`` sequence, so all steps run as one convolution of batch ``L * N``."""
    w = p["weight_ih"]
    nd = w.dim() - 2
    geometry = p.get("conv")
    lead = x.shape[: x.dim() - nd - 1]
    y = conv_same(x.reshape(-1, *x.shape[x.dim() - nd - 1:]), w, p.get("bias_ih"),
                  geometry.stride if geometry else None, geometry.dilation if geometry else None)
    return y.reshape(*lead, *y.shape[1:])


def conv_lstm_step(xp: Tensor, state: State, p: Params) -> State:
    """One ConvLSTM step, gates ``i, f, g, o`` stacked on the channel axis:
    ``xp (N, 4 hidden, *S')``, ``h, c (N, hidden, *S')``. With peepholes
    (``weight_ci``, ``weight_cf``, ``weight_co`` in ``p``) ``i`` and ``f`` see
    ``c_{t-1}`` and ``o`` sees ``c_t``, element-wise."""
    h, c = state
    return conv_lstm_update(xp + conv_same(h, p["weight_hh"], p.get("bias_hh")), c, p)


def conv_lstm_update(gates: Tensor, c: Tensor, p: Params) -> State:
    """The ConvLSTM step after its convolutions (:func:`conv_lstm_step`'s gate math and state
    update, also the Triton step op's twin): ``gates = xp + U * h_{t-1} + b_hh`` ``(N, 4 hidden,
    *S')`` and ``c_{t-1}`` give ``(h_t, c_t)``; the peepholes, if any, from ``p``."""
    i, f, g, o = gates.chunk(4, dim=1)
    w_ci = p.get("weight_ci")
    if w_ci is not None:
        i = i + w_ci * c
        f = f + p["weight_cf"] * c
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    if w_ci is not None:
        o = o + p["weight_co"] * c
    h = torch.sigmoid(o) * torch.tanh(c)
    return h, c


def conv_gru_step(xp: Tensor, state: State, p: Params) -> State:
    """One ConvGRU step, gates ``r, z, n`` as torch.nn.GRU (``r`` multiplies the
    convolved state): ``n = tanh(x_n + r * (U_n * h + b_hn))``, ``h' = (1 - z) n + z h``."""
    (h,) = state
    return (conv_gru_update(xp, conv_same(h, p["weight_hh"], p.get("bias_hh")), h),)


def conv_gru_update(xp: Tensor, hc: Tensor, h: Tensor) -> Tensor:
    """The ConvGRU step after its convolutions (:func:`conv_gru_step`'s gate math and state update,
    also the Triton step op's twin): ``xp (N, 3 hidden, *S')``, ``hc = U * h + b_hh`` of the same
    shape and ``h`` give ``h'``."""
    x_r, x_z, x_n = xp.chunk(3, dim=1)
    h_r, h_z, h_n = hc.chunk(3, dim=1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return n + z * (h - n)


CONV_LSTM_SPEC = CellSpec("conv_lstm", 4, ("h", "c"), conv_project, conv_lstm_step, fusable="conv_lstm")
CONV_GRU_SPEC = CellSpec("conv_gru", 3, ("h",), conv_project, conv_gru_step, fusable="conv_gru")


# ----------------------------------------------------------------------------- arguments


def _tuple_arg(name: str, value, nd: int, owner: str) -> Tuple[int, ...]:
    """An int or a length-``nd`` tuple of positive ints, as a tuple."""
    if isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be a positive int or a tuple of {nd} positive ints, got {value!r}")
    if isinstance(value, numbers.Integral):
        value = (value,) * nd
    if not isinstance(value, (tuple, list, torch.Size)) or len(value) != nd or \
            any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in value):
        raise ValueError(f"{owner}: {name} must be a positive int or a tuple of {nd} positive ints "
                         f"(one per spatial dim), got {value!r}")
    if any(v <= 0 for v in value):
        raise ValueError(f"{owner}: {name} must be positive, got {tuple(value)!r}")
    return tuple(int(v) for v in value)


def _state_spatial(spatial: Sequence[int], stride: Sequence[int]) -> Tuple[int, ...]:
    """``S' = ceil(S / stride)``: the spatial size after the first input convolution."""
    return tuple((s - 1) // st + 1 for s, st in zip(spatial, stride))


# ----------------------------------------------------------------------------- checkpoint conversion

# ConvLSTM_pytorch's ConvLSTMCell stacks its gates i, f, o, g; ours are i, f, g, o.
_IFOG_TO_IFGO = (0, 1, 3, 2)


def _split_concat_conv(weight: Tensor, bias: Optional[Tensor], hidden: int, input_size: int, what: str,
                       owner: str) -> Dict[str, Tensor]:
    """Split one ``conv`` over ``cat([x, h])`` (gates i, f, o, g) into rnnkit's
    ``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh`` (gates i, f, g, o)."""
    want = (4 * hidden, input_size + hidden)
    if weight.dim() < 3 or tuple(weight.shape[:2]) != want:
        raise ValueError(
            f"{owner}: {what} has shape {shape_str(weight.shape)}; a ConvLSTM_pytorch conv over cat([x, h]) "
            f"for input_size={input_size}, hidden_size={hidden} has shape (4*hidden={want[0]}, "
            f"input+hidden={want[1]}, *kernel_size)")

    def reorder(t: Tensor) -> Tensor:
        blocks = t.chunk(4, dim=0)
        return torch.cat([blocks[k] for k in _IFOG_TO_IFGO], dim=0)

    w = reorder(weight)
    out = {"weight_ih": w[:, :input_size].contiguous(), "weight_hh": w[:, input_size:].contiguous()}
    if bias is not None:
        out["bias_ih"] = reorder(bias).contiguous()
        out["bias_hh"] = torch.zeros_like(bias)
    return out


# ----------------------------------------------------------------------------- layers


class _ConvRecurrentBase(RecurrentBase):
    """A ConvLSTM/ConvGRU stack: :class:`rnnkit.RecurrentBase` with convolutional
    parameters and an ``(L, N, C, *S)`` layout. Subclasses set ``_nd`` and the spec."""

    _is_standard = False
    _nd = 2

    def __init__(self, cell_spec: CellSpec, input_size: int, hidden_size: int, kernel_size, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 stride=1, dilation=1, peephole: bool = False, device=None, dtype=None, *,
                 peephole_shape=None, backend: str = "auto") -> None:
        owner = type(self).__name__
        nd = self._nd
        self.kernel_size = _tuple_arg("kernel_size", kernel_size, nd, owner)
        self.stride = _tuple_arg("stride", stride, nd, owner)
        self.dilation = _tuple_arg("dilation", dilation, nd, owner)
        self.peephole = check_bool("peephole", peephole, owner=owner)
        if peephole_shape is not None:
            if not self.peephole:
                raise ValueError(f"{owner}: peephole_shape={peephole_shape!r} was given but peephole=False; "
                                 "pass peephole=True to use per-position peepholes")
            peephole_shape = _tuple_arg("peephole_shape", peephole_shape, nd, owner)
        self.peephole_shape = peephole_shape
        super().__init__(cell_spec, input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, 0, device, dtype, backend=backend)

    # -------------------------------------------------------------- parameters

    def _peephole_param_shape(self) -> Tuple[int, ...]:
        return (self.hidden_size, *(self.peephole_shape or (1,) * self._nd))

    def _layer_param_shapes(self, layer_input: int) -> List[Tuple[str, Tuple[int, ...]]]:
        gates = self.cell_spec.gates * self.hidden_size
        shapes = [("weight_ih", (gates, layer_input, *self.kernel_size)),
                  ("weight_hh", (gates, self.hidden_size, *self.kernel_size))]
        if self.bias:
            shapes += [("bias_ih", (gates,)), ("bias_hh", (gates,))]
        if self.peephole:
            shapes += [(name, self._peephole_param_shape()) for name in ("weight_ci", "weight_cf", "weight_co")]
        return shapes

    def reset_parameters(self) -> None:
        """Each layer-direction's parameters ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with
        ``fan_in = (layer input channels + hidden) * prod(kernel_size)``: PyTorch's
        default for the one convolution over ``cat([x, h])`` that computes the same gates."""
        for names in self._all_weights:
            fan_in = (getattr(self, names[0]).shape[1] + self.hidden_size) * math.prod(self.kernel_size)
            bound = 1.0 / math.sqrt(fan_in)
            for name in names:
                nn.init.uniform_(getattr(self, name), -bound, bound)

    def _layer_params(self, k: int) -> Dict[str, Optional[Tensor]]:
        p = super()._layer_params(k)
        first = k < self.num_directions  # only layer 0 strides, so every layer's state has the same S'
        p["conv"] = ConvGeometry(self.stride if first else (1,) * self._nd, self.dilation)
        return p

    # -------------------------------------------------------------- layout hooks

    def _describe(self) -> str:
        args = f"input_size={self.input_size}, hidden_size={self.hidden_size}, kernel_size={self.kernel_size}"
        if self.num_layers != 1:
            args += f", num_layers={self.num_layers}"
        if self.bidirectional:
            args += ", bidirectional=True"
        if any(s != 1 for s in self.stride):
            args += f", stride={self.stride}"
        return f"{type(self).__name__}({args})"

    def _feature_symbols(self) -> Sequence[str]:
        return ("C",) + _SPATIAL_SYMBOLS[self._nd]

    def _check_features(self, feature_shape: Tuple[int, ...]) -> Optional[str]:
        channels, spatial = feature_shape[0], feature_shape[1:]
        if channels != self.input_size:
            return (f"its channel axis (C={channels}, the first after the sequence and batch axes) must equal "
                    f"input_size={self.input_size}")
        if any(s == 0 for s in spatial):
            return f"its spatial size {shape_str(spatial)} has an empty axis"
        if self.peephole_shape is not None:
            out = _state_spatial(spatial, self.stride)
            if out != self.peephole_shape:
                return (f"the state's spatial size would be {shape_str(out)} but the per-position peepholes "
                        f"were built for peephole_shape={self.peephole_shape}")
        return None

    def _state_shapes(self, batch: int, feature_shape: Tuple[int, ...]) -> List[Tuple[int, ...]]:
        spatial = _state_spatial(feature_shape[1:], self.stride)
        shape = (self.num_directions * self.num_layers, batch, self.hidden_size, *spatial)
        return [shape for _ in self.cell_spec.state_names]

    def _state_symbols(self, label: str) -> Sequence[str]:
        return ("hidden",) + _SPATIAL_SYMBOLS[self._nd]

    # -------------------------------------------------------------- forward

    def forward(self, input, hx=None, *_exporter_args, lengths=None, padding_value: float = 0.0):
        """See the class docstring."""
        if _exporter_args:
            lengths, padding_value = _exporter_defaults(self, _exporter_args, lengths, padding_value)
        if isinstance(input, PackedSequence):
            raise TypeError(f"{self._describe()}: a PackedSequence input is not supported for convolutional "
                            "layers; pass the padded tensor (L, N, C, *S) and lengths=(N,) instead")
        return super().forward(input, hx, lengths=lengths, padding_value=padding_value)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}, kernel_size={self.kernel_size}"
        s += super().extra_repr()[len(f"{self.input_size}, {self.hidden_size}"):]
        if any(v != 1 for v in self.stride):
            s += f", stride={self.stride}"
        if any(v != 1 for v in self.dilation):
            s += f", dilation={self.dilation}"
        if self.peephole:
            s += ", peephole=True" + (f", peephole_shape={self.peephole_shape}" if self.peephole_shape else "")
        return s


_CONV_ARGS_DOC = r"""
        input_size: ``C``, the input's channels.
        hidden_size: ``hidden``, the channels of ``h`` (and ``c``).
        kernel_size: int or tuple, the kernel of both convolutions (odd or even).
        num_layers: how many layers to stack; layer ``k > 0`` reads layer ``k-1``'s output.
        bias: if False, no ``b_ih`` and ``b_hh``.
        batch_first: if True, ``input`` and ``output`` are ``(N, L, ...)``; states are not affected.
        dropout: dropout probability on each layer's output except the last's, in training only.
        bidirectional: if True, each layer also runs the sequence backwards.
        stride: int or tuple, stride of layer 0's input convolution (later layers use 1,
            so every state has the same size ``S' = ceil(S / stride)``).
        dilation: int or tuple, dilation of every layer's input convolution.
        backend: ``"auto"``, ``"fused"`` (rnnkit's C++ gate math and state update around
            ATen convolutions) or ``"reference"`` (the generic runner); PyTorch has no fused
            convolutional RNN op. ``module.last_backend`` names the one that ran."""

_CONV_SHAPES_DOC = r"""
    Inputs: input, hx (, lengths)
        * **input**: ``(L, N, C, {S})``, or ``(N, L, C, {S})`` with ``batch_first=True``,
          or ``(L, C, {S})`` unbatched. A PackedSequence is refused: pass the
          padded tensor and ``lengths``.
        * **{hx}**: initial state{hx_shape}; zeros if not given.
        * **lengths** (keyword): ``(N,)`` each sequence's length in a padded batch;
          past its length a sequence keeps its state and its output is ``padding_value``.

    Outputs: output, {hn}
        * **output**: ``(L, N, D * hidden, {S2})`` (``(N, L, ...)`` with ``batch_first``,
          no ``N`` unbatched): the last layer's ``h_t``, directions concatenated on the channel axis.
        * **h_n**: ``(D * num_layers, N, hidden, {S2})``, layer-major, direction-minor.{cn}

    Shape legend: ``N`` batch, ``L`` sequence length, ``D`` 2 if bidirectional else 1,
    ``C`` input_size, ``hidden`` hidden_size, ``{S}`` the input's spatial size,
    ``{S2}`` the state's: ``ceil(S / stride)`` per dim ('same' padding everywhere).
"""


class _ConvLSTMBase(_ConvRecurrentBase):
    def __init__(self, input_size: int, hidden_size: int, kernel_size, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, stride=1,
                 dilation=1, peephole: bool = False, device=None, dtype=None, *, peephole_shape=None,
                 backend: str = "auto") -> None:
        super().__init__(self._make_spec(), input_size, hidden_size, kernel_size, num_layers, bias, batch_first,
                         dropout, bidirectional, stride, dilation, peephole, device, dtype,
                         peephole_shape=peephole_shape, backend=backend)

    def _make_spec(self) -> CellSpec:
        return CONV_LSTM_SPEC

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _convert_convlstm_pytorch_layers(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class _ConvGRUBase(_ConvRecurrentBase):
    def __init__(self, input_size: int, hidden_size: int, kernel_size, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, stride=1,
                 dilation=1, device=None, dtype=None, *, backend: str = "auto") -> None:
        super().__init__(self._make_spec(), input_size, hidden_size, kernel_size, num_layers, bias, batch_first,
                         dropout, bidirectional, stride, dilation, False, device, dtype, backend=backend)

    def _make_spec(self) -> CellSpec:
        return CONV_GRU_SPEC


def _convert_convlstm_pytorch_layers(module, state_dict, prefix: str) -> None:
    """Rewrite ConvLSTM_pytorch's ``cell_list.{k}.conv.weight/bias`` keys (a
    one-way stack) into ours, in place, so ``load_state_dict`` takes them."""
    pattern = re.compile(re.escape(prefix) + r"cell_list\.(\d+)\.conv\.weight$")
    for key in [k for k in state_dict if pattern.match(k)]:
        layer = int(pattern.match(key).group(1))
        if module.bidirectional or layer >= module.num_layers:
            raise ValueError(f"{module._describe()}: the checkpoint has {key!r}, a ConvLSTM_pytorch layer this "
                             f"module has no one-way counterpart for (num_layers={module.num_layers}, "
                             f"bidirectional={module.bidirectional})")
        bias_key = key[: -len("weight")] + "bias"
        layer_input = module.input_size if layer == 0 else module.hidden_size
        parts = _split_concat_conv(state_dict.pop(key), state_dict.pop(bias_key, None), module.hidden_size,
                                   layer_input, key, module._describe())
        for name, value in parts.items():
            state_dict[f"{prefix}{name}_l{layer}"] = value


_LSTM_EQUATIONS = r"""
    .. math::
        \begin{array}{ll}
        i_t = \sigma(W_{i} * x_t + b_{ii} + U_{i} * h_{t-1} + b_{hi} \;[+\, w_{ci} \odot c_{t-1}]) \\
        f_t = \sigma(W_{f} * x_t + b_{if} + U_{f} * h_{t-1} + b_{hf} \;[+\, w_{cf} \odot c_{t-1}]) \\
        g_t = \tanh(W_{g} * x_t + b_{ig} + U_{g} * h_{t-1} + b_{hg}) \\
        c_t = f_t \odot c_{t-1} + i_t \odot g_t \\
        o_t = \sigma(W_{o} * x_t + b_{io} + U_{o} * h_{t-1} + b_{ho} \;[+\, w_{co} \odot c_t]) \\
        h_t = o_t \odot \tanh(c_t)
        \end{array}

    ``*`` is a convolution ('same' padding; ``W`` may stride and dilate, ``U`` does
    not), ``\odot`` the element-wise product; the bracketed peephole terms are
    there with ``peephole=True`` (Shi et al. 2015). Gates are stacked ``i, f, g, o``
    on the output channels of ``weight_ih`` and ``weight_hh``, as in torch.nn.LSTM.

    Peepholes are per channel by default (``(hidden, 1, ...)``, broadcast over
    space, so any input size works); ``peephole_shape=S'`` gives the paper's
    per-position Hadamard weights ``(hidden, *S')``, and then only inputs whose
    state size is ``S'`` are accepted.
"""

_GRU_EQUATIONS = r"""
    .. math::
        \begin{array}{ll}
        r_t = \sigma(W_{r} * x_t + b_{ir} + U_{r} * h_{t-1} + b_{hr}) \\
        z_t = \sigma(W_{z} * x_t + b_{iz} + U_{z} * h_{t-1} + b_{hz}) \\
        n_t = \tanh(W_{n} * x_t + b_{in} + r_t \odot (U_{n} * h_{t-1} + b_{hn})) \\
        h_t = (1 - z_t) \odot n_t + z_t \odot h_{t-1}
        \end{array}

    ``*`` is a convolution ('same' padding; ``W`` may stride and dilate, ``U`` does
    not). This is torch.nn.GRU's form (Ballas et al. 2016's ConvGRU with ``r``
    applied after the recurrent convolution, as in cuDNN), gates stacked ``r, z, n``.
"""


def _layer_doc(kind: str, nd: int, note: str = "") -> str:
    s = ", ".join(_SPATIAL_SYMBOLS[nd])
    s2 = ", ".join(v + "'" for v in _SPATIAL_SYMBOLS[nd])
    lstm = kind == "LSTM"
    example_in = {1: "(6, 2, 3, 16)", 2: "(6, 2, 3, 16, 16)", 3: "(6, 2, 3, 4, 8, 8)"}[nd]
    example_sp = {1: "16", 2: "16, 16", 3: "4, 8, 8"}[nd]
    head = (f"Conv{kind} over {nd} spatial dim{'s' if nd > 1 else ''}: every product of "
            f"{'LSTM' if lstm else 'GRU'} is a {nd}-D convolution, and ``h`` "
            f"keeps the input's spatial size.\n")
    args = _CONV_ARGS_DOC
    if lstm:
        args += (r"""
        peephole: if True, ``i`` and ``f`` see ``c_{t-1}`` and ``o`` sees ``c_t`` through learned
            weights ``weight_ci``, ``weight_cf``, ``weight_co`` (per channel).
        peephole_shape (keyword): the state's spatial size ``S'``, for per-position peepholes.""")
    shapes = _CONV_SHAPES_DOC.format(
        S=s, S2=s2, hx="hx = (h_0, c_0)" if lstm else "hx",
        hx_shape=(f"s ``h_0`` and ``c_0``, each ``(D * num_layers, N, hidden, {s2})``" if lstm
                  else f" ``h_0 (D * num_layers, N, hidden, {s2})``"),
        hn="(h_n, c_n)" if lstm else "h_n",
        cn=(f"\n        * **c_n**: ``(D * num_layers, N, hidden, {s2})``: the final cell states." if lstm else ""))
    g = 4 if lstm else 3
    attrs = (f"""
    Attributes:
        weight_ih_l[k]: ``({g}*hidden, C, *kernel_size)`` for ``k = 0``, else ``({g}*hidden, D*hidden, *kernel_size)``.
        weight_hh_l[k]: ``({g}*hidden, hidden, *kernel_size)``.
        bias_ih_l[k], bias_hh_l[k]: ``({g}*hidden,)``.""" +
             ("""
        weight_ci_l[k], weight_cf_l[k], weight_co_l[k]: ``(hidden, 1, ...)`` (or ``(hidden, *peephole_shape)``),
            only with ``peephole=True``.""" if lstm else "") + """
        Each layer-direction ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), ``fan_in = (in_channels + hidden) * prod(kernel)``.
""")
    states = "out, (h_n, c_n)" if lstm else "out, h_n"
    ex = f"""
    Examples::

        >>> rnn = rnnkit.Conv{kind}{nd}d(3, 8, kernel_size=3, num_layers=2)
        >>> {states} = rnn(torch.randn{example_in})
        >>> out.shape, h_n.shape
        (torch.Size([6, 2, 8, {example_sp}]), torch.Size([2, 2, 8, {example_sp}]))
    """
    return head + (_LSTM_EQUATIONS if lstm else _GRU_EQUATIONS) + note + "\n    Args:" + args + "\n" + shapes + attrs + ex


class ConvLSTM1d(_ConvLSTMBase):
    __doc__ = _layer_doc("LSTM", 1)
    _nd = 1


class ConvLSTM2d(_ConvLSTMBase):
    __doc__ = _layer_doc("LSTM", 2, r"""
    Checkpoints of ConvLSTM_pytorch's one-way ``ConvLSTM`` (keys
    ``cell_list.{k}.conv.weight/bias``, equal hidden sizes and kernels, odd kernels)
    load with ``load_state_dict`` as they are; see :meth:`ConvLSTM2dCell.from_convlstm_pytorch`.
""")
    _nd = 2


class ConvLSTM3d(_ConvLSTMBase):
    __doc__ = _layer_doc("LSTM", 3)
    _nd = 3


class ConvGRU1d(_ConvGRUBase):
    __doc__ = _layer_doc("GRU", 1)
    _nd = 1


class ConvGRU2d(_ConvGRUBase):
    __doc__ = _layer_doc("GRU", 2)
    _nd = 2


class ConvGRU3d(_ConvGRUBase):
    __doc__ = _layer_doc("GRU", 3)
    _nd = 3


ConvLSTM = ConvLSTM2d
ConvGRU = ConvGRU2d


# ----------------------------------------------------------------------------- cells


class _ConvCellBase(CellBase):
    """One step of a convolutional cell: input ``(N, C, *S)`` or ``(C, *S)``
    unbatched, state ``(N, hidden, *S')``; the step is the layer's."""

    _is_standard = False
    _nd = 2

    def __init__(self, cell_spec: CellSpec, input_size: int, hidden_size: int, kernel_size, bias: bool = True,
                 stride=1, dilation=1, peephole: bool = False, device=None, dtype=None, *, peephole_shape=None,
                 backend: str = "auto") -> None:
        owner = type(self).__name__
        nd = self._nd
        self.kernel_size = _tuple_arg("kernel_size", kernel_size, nd, owner)
        self.stride = _tuple_arg("stride", stride, nd, owner)
        self.dilation = _tuple_arg("dilation", dilation, nd, owner)
        self.peephole = check_bool("peephole", peephole, owner=owner)
        if peephole_shape is not None:
            if not self.peephole:
                raise ValueError(f"{owner}: peephole_shape={peephole_shape!r} was given but peephole=False; "
                                 "pass peephole=True to use per-position peepholes")
            peephole_shape = _tuple_arg("peephole_shape", peephole_shape, nd, owner)
        self.peephole_shape = peephole_shape
        super().__init__(cell_spec, input_size, hidden_size, bias, device, dtype, backend=backend)

    def _param_shapes(self):
        gates = self.cell_spec.gates * self.hidden_size
        shapes = [("weight_ih", (gates, self.input_size, *self.kernel_size)),
                  ("weight_hh", (gates, self.hidden_size, *self.kernel_size)),
                  ("bias_ih", (gates,) if self.bias else None), ("bias_hh", (gates,) if self.bias else None)]
        if self.peephole:
            shape = (self.hidden_size, *(self.peephole_shape or (1,) * self._nd))
            shapes += [(name, shape) for name in ("weight_ci", "weight_cf", "weight_co")]
        return shapes

    def reset_parameters(self) -> None:
        """Every parameter ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), ``fan_in = (C + hidden) * prod(kernel_size)``."""
        bound = 1.0 / math.sqrt((self.input_size + self.hidden_size) * math.prod(self.kernel_size))
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def _params(self) -> Dict[str, Optional[Tensor]]:
        p = super()._params()
        p["conv"] = ConvGeometry(self.stride, self.dilation)
        return p

    def _describe(self) -> str:
        return (f"{type(self).__name__}(input_size={self.input_size}, hidden_size={self.hidden_size}, "
                f"kernel_size={self.kernel_size})")

    def forward(self, input: Tensor, hx=None):
        if _autocast.enabled():
            cast = _autocast.compute_dtype(self, input)
            if cast is not None:
                return _autocast.call(self, cast, input, hx)
        owner = self._describe()
        nd = self._nd
        syms = ("C",) + _SPATIAL_SYMBOLS[nd]
        if not isinstance(input, Tensor):
            raise RNNTypeError(f"{owner}: input must be a Tensor, got {type(input).__name__}")
        if input.dim() not in (nd + 1, nd + 2):
            raise RNNShapeError(f"{owner}: input must be {nd + 2}-D (N, {', '.join(syms)}) or {nd + 1}-D "
                                f"({', '.join(syms)}) unbatched, got {input.dim()}-D input of shape "
                                f"{shape_str(input.shape)}")
        batched = input.dim() == nd + 2
        x = input if batched else input.unsqueeze(0)
        read = ", ".join(f"{s}={n}" for s, n in zip((("N",) if batched else ()) + syms, input.shape))
        spatial = tuple(x.shape[2:])
        if x.shape[1] != self.input_size:
            raise RNNShapeError(f"{owner}: input of shape {shape_str(input.shape)} was read as ({read}); its channel "
                                f"axis C must equal input_size={self.input_size}")
        if any(s == 0 for s in spatial):
            raise RNNShapeError(f"{owner}: input of shape {shape_str(input.shape)} was read as ({read}); "
                                f"its spatial size {shape_str(spatial)} has an empty axis")
        out_spatial = _state_spatial(spatial, self.stride)
        if self.peephole_shape is not None and out_spatial != self.peephole_shape:
            raise RNNShapeError(f"{owner}: input of shape {shape_str(input.shape)} was read as ({read}); the state's "
                                f"spatial size would be {shape_str(out_spatial)} but the per-position peepholes were "
                                f"built for peephole_shape={self.peephole_shape}")
        ref = self.weight_ih
        check_dtype_device(self, "input", input, ref)
        names = self.cell_spec.state_names
        shape = (x.shape[0], self.hidden_size, *out_spatial)
        if hx is None:
            state = tuple(x.new_zeros(shape) for _ in names)
        else:
            state = self._check_conv_hx(hx, shape, batched, read, input, ref)
        self.last_backend = "reference"
        p = self._params()
        new = self.cell_spec.step(self.cell_spec.project(x, p), state, p)
        if not batched:
            new = tuple(s.squeeze(0) for s in new)
        return new if len(new) > 1 else new[0]

    def _check_conv_hx(self, hx, shape, batched: bool, read: str, input: Tensor, ref: Tensor):
        want = shape if batched else shape[1:]
        symbols = (("N",) if batched else ()) + ("hidden",) + _SPATIAL_SYMBOLS[self._nd]
        legend = "(" + ", ".join(f"{sym}={n}" for sym, n in zip(symbols, want)) + ")"
        count = len(self.cell_spec.state_names)
        return self._check_states(self._describe(), hx, [want] * count, [legend] * count,
                                  f"{shape_str(input.shape)} read as ({read})", batched, ref)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}, kernel_size={self.kernel_size}"
        s += super().extra_repr()[len(f"{self.input_size}, {self.hidden_size}"):]
        if any(v != 1 for v in self.stride):
            s += f", stride={self.stride}"
        if any(v != 1 for v in self.dilation):
            s += f", dilation={self.dilation}"
        if self.peephole:
            s += ", peephole=True"
        return s


class _ConvLSTMCellBase(_ConvCellBase):
    def __init__(self, input_size: int, hidden_size: int, kernel_size, bias: bool = True, stride=1, dilation=1,
                 peephole: bool = False, device=None, dtype=None, *, peephole_shape=None,
                 backend: str = "auto") -> None:
        super().__init__(self._make_spec(), input_size, hidden_size, kernel_size, bias, stride, dilation, peephole,
                         device, dtype, peephole_shape=peephole_shape, backend=backend)

    def _make_spec(self) -> CellSpec:
        return CONV_LSTM_SPEC


class _ConvGRUCellBase(_ConvCellBase):
    def __init__(self, input_size: int, hidden_size: int, kernel_size, bias: bool = True, stride=1, dilation=1,
                 device=None, dtype=None, *, backend: str = "auto") -> None:
        super().__init__(self._make_spec(), input_size, hidden_size, kernel_size, bias, stride, dilation, False,
                         device, dtype, backend=backend)

    def _make_spec(self) -> CellSpec:
        return CONV_GRU_SPEC


def _cell_doc(kind: str, nd: int, note: str = "") -> str:
    s = ", ".join(_SPATIAL_SYMBOLS[nd])
    s2 = ", ".join(v + "'" for v in _SPATIAL_SYMBOLS[nd])
    lstm = kind == "LSTM"
    return (f"One step of :class:`Conv{kind}{nd}d` (same equations, same parameters without the ``_l[k]`` suffix).\n"
            + (_LSTM_EQUATIONS if lstm else _GRU_EQUATIONS) + note + f"""
    Args:
        input_size, hidden_size, kernel_size, bias, stride, dilation{', peephole, peephole_shape' if lstm else ''}:
            as :class:`Conv{kind}{nd}d`.
        backend: ``'auto'`` or ``'reference'``.

    Inputs: input, hx
        * **input**: ``(N, C, {s})`` or ``(C, {s})`` unbatched.
        * **hx**: {'``(h, c)``, each' if lstm else '``h``'} ``(N, hidden, {s2})`` (no ``N`` unbatched); zeros if None.

    Outputs: {"(h', c')" if lstm else "h'"}, the same shapes as the state.

    Attributes:
        weight_ih: ``({4 if lstm else 3}*hidden, C, *kernel_size)``; weight_hh: ``({4 if lstm else 3}*hidden, hidden, *kernel_size)``;
        bias_ih, bias_hh: ``({4 if lstm else 3}*hidden,)``{'; weight_ci, weight_cf, weight_co with peepholes' if lstm else ''}.

    Examples::

        >>> cell = rnnkit.Conv{kind}{nd}dCell(3, 8, kernel_size=3)
        >>> state = None
        >>> for x_t in torch.randn(5, 2, 3, {', '.join('6' for _ in range(nd))}):
        ...     state = cell(x_t, state)
    """)


class ConvLSTM1dCell(_ConvLSTMCellBase):
    __doc__ = _cell_doc("LSTM", 1)
    _nd = 1


class ConvLSTM2dCell(_ConvLSTMCellBase):
    __doc__ = _cell_doc("LSTM", 2, r"""
    Loads checkpoints of ConvLSTM_pytorch's ``ConvLSTMCell`` (one ``conv`` over
    ``cat([x, h], dim=1)`` with gates ``i, f, o, g``, odd kernel) with
    ``load_state_dict`` as they are, or build one from such a checkpoint with
    :meth:`from_convlstm_pytorch`. The conv weight is split into ``weight_ih``
    and ``weight_hh``, the gates reordered to ``i, f, g, o``, the bias goes to
    ``bias_ih`` and ``bias_hh`` is zero; the outputs are then the same.
""")
    _nd = 2

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "conv.weight"
        if key in state_dict:
            parts = _split_concat_conv(state_dict.pop(key), state_dict.pop(prefix + "conv.bias", None),
                                       self.hidden_size, self.input_size, "conv.weight", self._describe())
            for name, value in parts.items():
                state_dict[prefix + name] = value
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def from_convlstm_pytorch(cls, state_dict, hidden_size: Optional[int] = None, device=None, dtype=None,
                              **kwargs) -> "ConvLSTM2dCell":
        """Build a cell from the ``state_dict`` of a ConvLSTM_pytorch ``ConvLSTMCell``
        (``conv.weight (4*hidden, C+hidden, kh, kw)``, optional ``conv.bias``);
        sizes, kernel and bias are read from the checkpoint."""
        weight = state_dict.get("conv.weight")
        if not isinstance(weight, Tensor) or weight.dim() != 4:
            got = "no 'conv.weight'" if weight is None else f"'conv.weight' of shape {shape_str(weight.shape)}"
            raise ValueError(f"ConvLSTM2dCell.from_convlstm_pytorch: expected a ConvLSTMCell state_dict with a 4-D "
                             f"'conv.weight' (4*hidden, input+hidden, kh, kw), got {got}")
        if weight.shape[0] % 4:
            raise ValueError(f"ConvLSTM2dCell.from_convlstm_pytorch: 'conv.weight' has {weight.shape[0]} output "
                             "channels, not a multiple of 4 (4 gates)")
        hidden = weight.shape[0] // 4
        cell = cls(weight.shape[1] - hidden, hidden, tuple(weight.shape[2:]), bias="conv.bias" in state_dict,
                   device=device, dtype=dtype if dtype is not None else weight.dtype, **kwargs)
        cell.load_state_dict(dict(state_dict), strict=True)
        return cell


class ConvLSTM3dCell(_ConvLSTMCellBase):
    __doc__ = _cell_doc("LSTM", 3)
    _nd = 3


class ConvGRU1dCell(_ConvGRUCellBase):
    __doc__ = _cell_doc("GRU", 1)
    _nd = 1


class ConvGRU2dCell(_ConvGRUCellBase):
    __doc__ = _cell_doc("GRU", 2)
    _nd = 2


class ConvGRU3dCell(_ConvGRUCellBase):
    __doc__ = _cell_doc("GRU", 3)
    _nd = 3


ConvLSTMCell = ConvLSTM2dCell
ConvGRUCell = ConvGRU2dCell

_SMALL_SPATIAL = {1: (6,), 2: (4, 4), 3: (3, 3, 3)}
for _layer, _cell in [(ConvLSTM1d, ConvLSTM1dCell), (ConvLSTM2d, ConvLSTM2dCell), (ConvLSTM3d, ConvLSTM3dCell),
                      (ConvGRU1d, ConvGRU1dCell), (ConvGRU2d, ConvGRU2dCell), (ConvGRU3d, ConvGRU3dCell)]:
    register_layer(LayerEntry(_layer.__name__.lower(), _layer, _cell, kwargs={"kernel_size": 3},
                              spatial=_SMALL_SPATIAL[_layer._nd]))
del _layer, _cell

__all__ = ["ConvLSTM1d", "ConvLSTM2d", "ConvLSTM3d", "ConvLSTM", "ConvGRU1d", "ConvGRU2d", "ConvGRU3d", "ConvGRU",
           "ConvLSTM1dCell", "ConvLSTM2dCell", "ConvLSTM3dCell", "ConvLSTMCell", "ConvGRU1dCell", "ConvGRU2dCell",
           "ConvGRU3dCell", "ConvGRUCell", "ConvGeometry", "conv_same", "conv_project", "conv_lstm_step",
           "conv_gru_step", "CONV_LSTM_SPEC", "CONV_GRU_SPEC"]
