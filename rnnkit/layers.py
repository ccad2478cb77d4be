"""Recurrent layers with torch.nn's contract: :class:`RNN`, :class:`LSTM`, :class:`GRU`.

:class:`RecurrentBase` does what ``torch.nn.RNNBase`` does (parameters, their
names and order, initialisation, validation) and hands the sequence to a
backend. The subclasses are mostly docstrings.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import _autocast, backends as _backends, saving as _saving
from ._checks import (check_bool, check_dtype_device, check_lengths, check_positive_int, check_probability,
                      check_size, check_states, read_input)
from .functional import GRU_SPEC, LSTM_SPEC, Activation, resolve_activation, rnn_spec
from .runner import RegularizerRates, drop_connect, mask_padding
from .spec import CellSpec
from .fused import cells as _fused_cells

AUTO_DIRECT_LSTM_MACS = 1 << 20
"""``auto`` runs a plain inference LSTM sequence (``L > 1``) on the direct inference kernel below this many
multiply-adds per step (``N * 4H * H``); at and above it the call goes to ``select`` (the measured choice
between torch.nn's op and the fused kernel; torch.nn's oneDNN op measured as fast or faster there: docs/deploy.md,
"Inference speed"). One step, the GRU and the RNN always take the kernel. The direct entry applies the rule
itself (its ``lstm_macs_limit`` argument), so a one-step call pays nothing for it."""

_PLAIN_KIND_ATTRS = frozenset({"num_layers", "bidirectional", "proj_size", "_is_standard", "zoneout", "zoneout_cell",
                               "training", "recurrent_dropout", "weight_drop", "cell_spec"})
"""The attributes :attr:`RecurrentBase._plain_kind` reads: setting one recomputes ``_direct_kind``."""
_FORWARD_ATTRS = frozenset({"last_backend", "_dropped_weights", "_packed_order"})
"""What ``forward`` itself sets: they leave ``auto``'s remembered choice (``backends.AUTO_CHOICE``) alone."""


def _build_module():
    from .fused import _build
    return _build._state["module"]



def _rate(value) -> str:
    """A rate as a reason's text shows it; while torch.compile traces (``dynamic=True`` makes a module's float
    attributes symbolic, which dynamo cannot format into a string) the word "set": the backends only test
    whether a reason exists there."""
    return "set" if torch.compiler.is_compiling() else str(value)


class RecurrentBase(nn.Module):
    """Shared machinery of every rnnkit layer (the analogue of ``torch.nn.RNNBase``).

    Subclasses set ``cell_spec`` and may override the parameter hooks
    (:meth:`_layer_param_shapes`, :meth:`reset_parameters`) and the layout hooks
    (:meth:`_feature_symbols`, :meth:`_check_features`, :meth:`_state_shapes`).
    """

    cell_spec: CellSpec
    _is_standard = True  # computes exactly what a torch.nn layer computes
    _direct_kind: Optional[int] = None
    """:attr:`_plain_kind`, kept up to date by ``__setattr__`` (forward reads it on every call; the class
    default None, for an instance whose ``__init__`` did not run, only sends calls down the full path)."""

    def __init__(self, cell_spec: CellSpec, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, proj_size: int = 0, device=None, dtype=None,
                 *, backend: str = "auto", recurrent_dropout: float = 0.0, zoneout: float = 0.0,
                 zoneout_cell: Optional[float] = None, weight_drop: float = 0.0) -> None:
        nn.Module.__init__(self)  # not torch.nn.RNNBase's __init__ (RNN, LSTM and GRU derive from it too)
        owner = type(self).__name__
        self.cell_spec = cell_spec
        self.input_size = check_size("input_size", input_size, owner=owner)
        self.hidden_size = check_size("hidden_size", hidden_size, owner=owner)
        self.num_layers = check_positive_int("num_layers", num_layers, owner=owner)
        self.bias = check_bool("bias", bias, owner=owner)
        self.batch_first = check_bool("batch_first", batch_first, owner=owner)
        self.dropout = check_probability("dropout", dropout, owner=owner)
        self.bidirectional = check_bool("bidirectional", bidirectional, owner=owner)
        if proj_size != 0 and cell_spec.name != "lstm":
            raise ValueError(f"proj_size argument is only supported for LSTM, not RNN or GRU. {owner}: proj_size is "
                             f"only supported by LSTM (got proj_size={proj_size!r})")
        if isinstance(proj_size, bool) or not isinstance(proj_size, int):
            raise TypeError(f"{owner}: proj_size must be an int, got {proj_size!r}")
        if proj_size < 0:
            raise ValueError(f"proj_size should be a positive integer or zero to disable projections. {owner}: "
                             f"proj_size must be >= 0 (0 disables the projection), got {proj_size}")
        if proj_size >= hidden_size:
            raise ValueError(
                f"proj_size has to be smaller than hidden_size. {owner}: proj_size must be smaller than hidden_size, "
                f"got proj_size={proj_size} and hidden_size={hidden_size}"
            )
        self.proj_size = proj_size
        if self.dropout > 0 and self.num_layers == 1:
            warnings.warn(
                "dropout option adds dropout after all but last recurrent layer, so non-zero dropout expects "
                f"num_layers greater than 1, but got dropout={dropout} and num_layers={num_layers}",
                stacklevel=3,
            )
        self.backend = _backends.check_backend_name(backend, owner)
        self.last_backend: Optional[str] = None
        self._set_regularizers(owner, recurrent_dropout, zoneout, zoneout_cell, weight_drop)

        factory = {"device": device, "dtype": dtype}
        self._flat_weights_names: List[str] = []
        self._all_weights: List[List[str]] = []
        self._param_keys: List[Dict[str, str]] = []
        for layer in range(self.num_layers):
            for direction in range(self.num_directions):
                suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                layer_input = self.input_size if layer == 0 else self._layer_output_size * self.num_directions
                names = []
                for key, shape in self._layer_param_shapes(layer_input):
                    name = key + suffix
                    setattr(self, name, nn.Parameter(torch.empty(shape, **factory)))
                    names.append(name)
                self._flat_weights_names.extend(names)
                self._all_weights.append(names)
                self._param_keys.append({n[: -len(suffix)]: n for n in names})
        self.reset_parameters()
        self._refresh_direct_kind()
        if self.backend != "auto":
            reason = _backends.why_not(self.backend, self)
            if reason is not None:
                raise ValueError(f"{self._describe()}: backend={self.backend!r} cannot run this configuration: "
                                 f"{reason}. Use backend='auto' to pick one that can.")

    # ------------------------------------------------------------------ pickling

    def _make_spec(self) -> Optional[CellSpec]:
        """This layer's cell spec, built from its plain attributes: ``__init__`` uses
        it, and so does unpickling, so ``torch.save(module)`` need not pickle the spec
        (see :mod:`rnnkit.saving`). None here: a subclass that passes its own spec and
        does not override this keeps the spec in its pickle."""
        return None

    def __getstate__(self):
        return _saving.module_state(self)

    def __setstate__(self, state) -> None:
        _saving.restore_module(self, state)

    # ------------------------------------------------------------------ parameters

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def _layer_output_size(self) -> int:
        """Per-direction output size of one layer (``H_out``)."""
        return self.proj_size if self.proj_size > 0 else self.hidden_size

    def _layer_param_shapes(self, layer_input: int) -> List[Tuple[str, Tuple[int, ...]]]:
        """The parameters of one layer-direction, in torch.nn's order."""
        gates = self.cell_spec.gates * self.hidden_size
        shapes = [("weight_ih", (gates, layer_input)), ("weight_hh", (gates, self._layer_output_size))]
        if self.bias:
            shapes += [("bias_ih", (gates,)), ("bias_hh", (gates,))]
        if self.proj_size > 0:
            shapes += [("weight_hr", (self.proj_size, self.hidden_size))]
        return shapes

    def reset_parameters(self) -> None:
        """Every parameter ~ U(-1/sqrt(hidden_size), 1/sqrt(hidden_size)), as torch.nn
        (same order, so the same seed gives the same weights as torch.nn)."""
        bound = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def _layer_params(self, k: int) -> Dict[str, Optional[Tensor]]:
        """Parameters of layer-direction ``k`` by their unsuffixed names."""
        return {key: self._weight(name) for key, name in self._param_keys[k].items()}

    @property
    def _flat_weights(self) -> List[Tensor]:
        """The parameters in torch.nn's flat order; during a forward with
        ``weight_drop``, each ``weight_hh`` is this forward's dropped copy."""
        return [self._weight(name) for name in self._flat_weights_names]

    @property
    def all_weights(self) -> List[List[nn.Parameter]]:
        """Parameters grouped per layer-direction, as ``torch.nn.RNNBase.all_weights``."""
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    def flatten_parameters(self) -> None:
        """Accepted for drop-in compatibility with torch.nn; rnnkit keeps each
        parameter in its own tensor, so there is nothing to do."""

    def _init_flat_weights(self) -> None:
        """torch.nn.RNNBase's hook after ``.to()``/``_apply`` and unpickling: rnnkit reads its
        weights by name at every forward (:attr:`_flat_weights`), so there is nothing to refresh."""

    def _replicate_for_data_parallel(self):
        return nn.Module._replicate_for_data_parallel(self)

    def __prepare_scriptable__(self):
        raise RuntimeError(_SCRIPT_MESSAGE.format(self._describe()))

    def __setattr__(self, name, value) -> None:
        nn.Module.__setattr__(self, name, value)  # torch.nn.RNNBase's also updates a flat weight list rnnkit has not
        if name not in _FORWARD_ATTRS:  # any other attribute may change auto's choice
            self.__dict__.pop(_backends.AUTO_CHOICE, None)
        if name in _PLAIN_KIND_ATTRS:  # (``train()``/``eval()`` set ``training`` here too)
            self._refresh_direct_kind()

    def _refresh_direct_kind(self) -> None:
        """Recompute ``_direct_kind`` (in ``__dict__`` directly: no ``__setattr__``); None while
        ``__init__`` has not set every attribute :attr:`_plain_kind` reads."""
        try:
            kind = self._plain_kind
        except AttributeError:
            kind = None
        self.__dict__["_direct_kind"] = kind

    def _apply(self, fn, recurse=True):
        self.__dict__.pop(_backends.AUTO_CHOICE, None)  # a new dtype or device may change auto's choice
        return nn.Module._apply(self, fn, recurse)  # no flat-weight references to reset (torch.nn.RNNBase keeps some)

    # ------------------------------------------------------------------ layout hooks

    def _describe(self) -> str:
        args = f"input_size={self.input_size}, hidden_size={self.hidden_size}"
        if self.num_layers != 1:
            args += f", num_layers={self.num_layers}"
        if self.bidirectional:
            args += ", bidirectional=True"
        if self.proj_size:
            args += f", proj_size={self.proj_size}"
        return f"{type(self).__name__}({args})"

    def _feature_symbols(self) -> Sequence[str]:
        return ("H_in",)

    def _check_features(self, feature_shape: Tuple[int, ...]) -> Optional[str]:
        if feature_shape[0] != self.input_size:
            return (f"its feature axis (the last, H_in={feature_shape[0]}) must equal "
                    f"input_size={self.input_size}")
        return None

    def _state_shapes(self, batch: int, feature_shape: Tuple[int, ...]) -> List[Tuple[int, ...]]:
        """Batched shape of each state tensor: ``h`` then (LSTM) ``c``."""
        lead = (self.num_directions * self.num_layers, batch)
        shapes = [lead + (self._layer_output_size,)]
        shapes += [lead + (self.hidden_size,) for _ in self.cell_spec.state_names[1:]]
        return shapes

    def _state_symbols(self, label: str) -> Sequence[str]:
        return ("H_out",) if label.startswith("h") else ("H",)

    # ------------------------------------------------------------------ regularizers

    def _set_regularizers(self, owner: str, recurrent_dropout, zoneout, zoneout_cell, weight_drop) -> None:
        """Validate and store the regularizer rates (all 0 unless a subclass passes them)."""
        self.recurrent_dropout = _check_rate(owner, "recurrent_dropout", recurrent_dropout,
                                             "the probability of zeroing a unit of h_{t-1} in the recurrent input")
        self.zoneout = _check_rate(owner, "zoneout", zoneout, "the probability that a unit of h keeps its "
                                   "previous value")
        if zoneout_cell is not None and len(self.cell_spec.state_names) < 2:
            raise ValueError(f"{owner}: zoneout_cell is only for layers with a cell state (LSTMs); this layer's "
                             f"state is ({', '.join(self.cell_spec.state_names)}), got zoneout_cell={zoneout_cell!r}")
        self.zoneout_cell = self.zoneout if zoneout_cell is None else _check_rate(
            owner, "zoneout_cell", zoneout_cell, "the probability that a unit of c keeps its previous value")
        self.weight_drop = _check_rate(owner, "weight_drop", weight_drop,
                                       "the probability of zeroing an element of weight_hh")
        if self.recurrent_dropout > 0 and not self.cell_spec.extra.get("recurrent_dropout"):
            raise ValueError(f"{owner}: recurrent_dropout is not supported by the '{self.cell_spec.name}' cell "
                             f"(its step does not read h through rnnkit.functional.recurrent_input), "
                             f"got recurrent_dropout={recurrent_dropout!r}")
        self._dropped_weights: Optional[Dict[str, Tensor]] = None
        self._packed_order: Optional[Tensor] = None  # during a call on a PackedSequence: see forward

    def _regularizer_rates(self) -> Optional[RegularizerRates]:
        """The rates the runner applies, or None when every rate is 0."""
        zoneout = (self.zoneout,) + (self.zoneout_cell,) * (len(self.cell_spec.state_names) - 1)
        if self.recurrent_dropout == 0 and self.weight_drop == 0 and not any(zoneout):
            return None
        return RegularizerRates(self.recurrent_dropout, zoneout, self.weight_drop)

    def _regularizers_active(self) -> Optional[str]:
        """What this configuration computes that PyTorch's fused op cannot, or None.

        Weight-drop is not listed: the torch backend runs it by passing the
        dropped ``weight_hh`` in its flat weight list."""
        parts = []
        if self.training and self.recurrent_dropout > 0:
            parts.append(f"recurrent dropout (recurrent_dropout={_rate(self.recurrent_dropout)}, in training mode)")
        if self.zoneout > 0 or self.zoneout_cell > 0:
            rates = f"zoneout={_rate(self.zoneout)}"
            if len(self.cell_spec.state_names) > 1 and self.zoneout_cell != self.zoneout:
                rates += f", zoneout_cell={_rate(self.zoneout_cell)}"
            parts.append(f"zoneout ({rates}; it changes the function in eval mode too)")
        return " or ".join(parts) or None

    def _sample_weight_drop(self) -> Optional[Dict[str, Tensor]]:
        """Each ``weight_hh`` with one DropConnect mask for this forward (training only)."""
        if not (self.training and self.weight_drop > 0):
            return None
        return {name: drop_connect(getattr(self, name), self.weight_drop)
                for name in self._flat_weights_names if name.startswith("weight_hh")}

    def _ref_param(self) -> Tensor:
        """A parameter (the first registered), whose dtype and device the input and states must have."""
        for p in self._parameters.values():
            if p is not None:
                return p
        return next(self.parameters())  # every parameter parametrized: the slow, general way

    def _weight(self, name: str) -> Tensor:
        dropped = self._dropped_weights
        if dropped is not None and name in dropped:
            return dropped[name]
        return getattr(self, name)

    # ------------------------------------------------------------------ forward

    def _autocast_cpu_policy(self, packed: bool, x: Tensor) -> str:
        """Under CPU autocast: run in the autocast dtype (``"lower"``), in ``"float32"`` or with autocast on
        (``"mixed"``) (see :mod:`rnnkit._autocast`: as torch.nn's layers; float32 for the zoo on the CPU).
        ``packed``: a PackedSequence input or ``lengths``; ``x``: the input (its data, packed)."""
        return _autocast.FLOAT32

    def which_backend(self, input: Optional[Tensor] = None, lengths=None) -> str:
        """The name of the backend this module runs (on ``input`` with ``lengths``, if given)."""
        if input is None:
            return _backends.select(self, None, None if lengths is None else torch.as_tensor(lengths)).name
        kind = self._plain_kind if lengths is None and type(input) is Tensor else None
        if kind is not None and _autocast.enabled() and _autocast.compute_dtype(self, input) is _autocast.MIXED:
            kind = None  # forward runs with autocast on: no direct entry
        if kind is not None and (self.backend == "fused" or self.backend == "auto") and \
                not _fused_cells.direct_entry_off() and _fused_cells.get_layer_run() is not None and \
                _build_module().layer_run_reason(kind, input, None, self._parameters, self.input_size,
                                                 self.hidden_size, self.batch_first, self._direct_limit()) is None:
            return "fused"  # forward's direct inference entry runs it (see _direct_layer)
        x, _, lengths, _ = self._time_major(input, lengths)
        return _backends.select(self, x, lengths).name

    def _time_major(self, input, lengths, padding_value: float = 0.0, mixed: bool = False):
        """Read and check ``input`` and ``lengths`` as the backends take them.

        Returns ``x`` time-major ``(L, N, ...)`` (unbatched input gets ``N = 1``),
        its :class:`InputReading`, ``lengths`` as an int64 tensor on ``x``'s device
        (or None), and, for a PackedSequence, its lengths as packed (to repack the
        output), else None.
        """
        packed_lengths = None
        if isinstance(input, PackedSequence):
            if lengths is not None:
                raise ValueError(f"{self._describe()}: lengths cannot be given with a PackedSequence input "
                                 "(it carries its own lengths)")
            x, packed_lengths = pad_packed_sequence(input, padding_value=padding_value)
            reading = read_input(self, x, packed=True)
        else:
            reading = read_input(self, input)
            x = input if reading.batched else input.unsqueeze(1)
            if self.batch_first and reading.batched:
                x = x.transpose(0, 1)
        check_dtype_device(self, "input", x, self._ref_param(), any_dtype=mixed)
        if packed_lengths is not None:
            lengths = packed_lengths.to(x.device)
        elif lengths is not None:
            lengths = check_lengths(self, lengths, reading, x.device)
        return x, reading, lengths, packed_lengths

    def forward(self, input, hx=None, *_exporter_args, lengths=None, padding_value: float = 0.0):
        """See the class docstring. ``lengths`` (N,) gives each sequence's length
        in a padded batch, with no packing; positions past a length are set to
        ``padding_value`` and the final state is the one after each sequence's
        last valid step. ``lengths`` and ``padding_value`` are keyword-only."""
        if _exporter_args:
            lengths, padding_value = _exporter_defaults(self, _exporter_args, lengths, padding_value)
        mixed = False
        if _autocast.enabled():
            cast = _autocast.compute_dtype(self, input, lengths)
            if cast is _autocast.MIXED:
                mixed = True  # autocast stays on: torch's op or the reference backend, as torch.nn's composite op
            elif cast is not None:
                return _autocast.call(self, cast, input, hx, lengths=lengths, padding_value=padding_value)
        if lengths is None and type(input) is Tensor and not mixed:
            kind = self._direct_kind  # self._plain_kind, kept up to date by __setattr__
            if kind is not None:
                # the direct entry, inline (a one-step call costs a few microseconds: see _direct_layer)
                backend = self.backend
                if (backend == "auto" or backend == "fused") and type(hx) is not list \
                        and not _fused_cells.direct_entry_off():
                    direct = _fused_cells.layer_run or _fused_cells.get_layer_run()
                    if direct is not None:
                        fast = direct(kind, input, hx, self._parameters, self.input_size, self.hidden_size,
                                      self.batch_first, AUTO_DIRECT_LSTM_MACS if backend == "auto" else 0)
                        if fast is not NotImplemented:
                            if self.last_backend != "fused":  # nn.Module.__setattr__ costs more than a short call
                                self.last_backend = "fused"
                            return fast
                fast = self._plain_inference(input, hx, kind)
                if fast is not None:
                    return fast
        if len(self._param_keys) != self.num_layers * self.num_directions:
            raise RuntimeError(self._layout_message())
        x, reading, lengths, packed_lengths = self._time_major(input, lengths, padding_value, mixed)
        if lengths is not None:  # padding reads as zeros: a NaN there cannot reach a gradient (the input projection
            x = mask_padding(x, lengths, 0.0)  # runs over every step), as when each sequence runs alone
        ref = self._ref_param()
        # traced, the batch size stays x's own (jit.trace records it), so the zero state fits other batches
        batch = x.shape[1] if torch.jit.is_tracing() else reading.batch
        expected = self._state_shapes(batch, reading.feature_shape)
        if hx is None:
            state0 = tuple(x.new_zeros(shape) for shape in expected)
        else:
            state0 = check_states(self, hx, reading, expected, ref, any_dtype=mixed)

        backend = _backends.select(self, x, lengths)
        if self.last_backend != backend.name:  # nn.Module.__setattr__ is not free: set only on a change
            self.last_backend = backend.name
        dropped = self._sample_weight_drop()
        # a PackedSequence's own order, for the runner's inter-layer dropout (drawn in packed order, as torch.nn)
        order = None
        if packed_lengths is not None and self.dropout and self.training and self.num_layers > 1:
            order = input.sorted_indices
            if order is None:  # packed with enforce_sorted=True: already in order
                order = torch.arange(x.shape[1], device=x.device)
        if dropped is None and order is None:
            out, states = backend.run(self, x, state0, lengths)
        else:
            self._dropped_weights, self._packed_order = dropped, order
            try:
                out, states = backend.run(self, x, state0, lengths)
            finally:
                self._dropped_weights = self._packed_order = None
        out = mask_padding(out, lengths, padding_value)

        if packed_lengths is not None:
            out = _repack(out, input, packed_lengths)
        elif not reading.batched:
            out = out.squeeze(1)
            states = tuple(s.squeeze(1) for s in states)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, (states if len(states) > 1 else states[0])

    def _layout_message(self) -> str:
        """The error for ``num_layers`` / ``bidirectional`` set after construction to a stack the parameters
        do not hold (torch.nn raises a ``RuntimeError`` from its op, or, on oneDNN, runs the first layers)."""
        held = len(self._param_keys)
        return (f"{self._describe()}: num_layers={self.num_layers} and bidirectional={self.bidirectional} need "
                f"{self.num_layers * self.num_directions} layer-directions of parameters, but this module holds "
                f"{held} (its parameters were made for another num_layers or bidirectional). Set them back, or "
                f"build a new module")

    @property
    def _plain_kind(self) -> Optional[int]:
        """The cell's kind (0 LSTM, 1 GRU, 2/3 RNN tanh/relu, as the fused cell step numbers them) when
        this layer is plain: a standard cell, one layer, one direction, no projection, no regularizer
        that changes the function now; else None."""
        if (self.num_layers != 1 or self.bidirectional or self.proj_size or not self._is_standard
                or len(self._param_keys) != 1
                or self.zoneout or self.zoneout_cell
                or (self.training and (self.recurrent_dropout or self.weight_drop))):
            return None
        return _fused_cells.DIRECT_KIND.get(self.cell_spec.fusable)

    def _direct_layer(self, input: Tensor, hx, kind: int, limit: int = 0):
        """A plain inference call (no gradient needed, batched dense contiguous input, any length, the
        parameters as registered) through the fused extension's direct layer entry: the input projection
        and the time loop of the inference-only kernel in one C++ call (no dispatcher, no saved tensors,
        no Python validation: the entry checks every type, shape, dtype, device, gradient and mode itself
        and declines anything not plain), or None: then the next path runs, with its own checks and error
        messages. Returns what the full path returns (new tensors; ``output`` time-major in memory, a transposed
        view for ``batch_first``, as torch.nn's).
        ``limit``: the entry's ``lstm_macs_limit`` (0: none; ``auto`` passes :data:`AUTO_DIRECT_LSTM_MACS`).
        ``forward`` runs the same steps inline (this is what ``_plain_inference`` calls)."""
        direct = _fused_cells.layer_run or _fused_cells.get_layer_run()
        if direct is None or type(hx) is list or _fused_cells.direct_entry_off():  # a list hx: the full path's checks
            return None
        result = direct(kind, input, hx, self._parameters, self.input_size, self.hidden_size, self.batch_first, limit)
        if result is NotImplemented:
            return None
        if self.last_backend != "fused":  # nn.Module.__setattr__ costs more than a short call itself
            self.last_backend = "fused"
        return result

    def _direct_limit(self) -> int:
        """The direct entry's ``lstm_macs_limit`` for this layer's backend: ``auto``'s rule
        (:data:`AUTO_DIRECT_LSTM_MACS`), none (0) for ``backend="fused"``."""
        return AUTO_DIRECT_LSTM_MACS if self.backend == "auto" else 0

    def _plain_inference(self, input: Tensor, hx, kind: int):
        """A plain inference call (no gradient, dense batched input, one layer, one direction, every
        tensor of the parameters' dtype and device and of the expected shape) on the backend ``select``
        picks, without the full path's input reading and state checks; None for anything else (then
        the full path runs: its checks, its error messages). What it returns is what the full path
        returns."""
        if torch.is_grad_enabled() or input.dim() != 3 or _fused_cells.direct_entry_off():
            return None
        ref = self._ref_param()
        dtype, device = ref.dtype, ref.device
        batch_first = self.batch_first
        seq_len, batch = (input.shape[1], input.shape[0]) if batch_first else (input.shape[0], input.shape[1])
        if input.dtype != dtype or input.device != device or input.shape[2] != self.input_size or seq_len == 0:
            return None
        shape = (1, batch, self.hidden_size)
        if hx is None:
            state0 = tuple(input.new_zeros(shape) for _ in range(2 if kind == 0 else 1))
        else:
            state0 = hx if kind == 0 else (hx,)
            if type(state0) is not tuple or len(state0) != len(self.cell_spec.state_names):
                return None
            for s in state0:
                if type(s) is not Tensor or s.shape != shape or s.dtype != dtype or s.device != device:
                    return None
        x = input.transpose(0, 1) if batch_first else input
        backend = _backends.select(self, x, None)
        if backend.name == "fused":  # under no_grad the fused backend is the inference-only kernel
            fast = self._direct_layer(input, hx, kind)
            if fast is not None:
                return fast
        if self.last_backend != backend.name:
            self.last_backend = backend.name
        out, states = backend.run(self, x, state0, None)
        if batch_first:
            out = out.transpose(0, 1)
        return out, (states if len(states) > 1 else states[0])

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.proj_size != 0:
            s += ", proj_size={proj_size}"
        if self.num_layers != 1:
            s += ", num_layers={num_layers}"
        if self.bias is not True:
            s += ", bias={bias}"
        if self.batch_first is not False:
            s += ", batch_first={batch_first}"
        if self.dropout != 0:
            s += ", dropout={dropout}"
        if self.bidirectional is not False:
            s += ", bidirectional={bidirectional}"
        for name in ("recurrent_dropout", "zoneout", "weight_drop"):
            if getattr(self, name, 0):
                s += f", {name}={{{name}}}"
        if len(self.cell_spec.state_names) > 1 and getattr(self, "zoneout_cell", 0) != getattr(self, "zoneout", 0):
            s += ", zoneout_cell={zoneout_cell}"
        s = s.format(**self.__dict__)
        s += f", backend={self.backend!r}"
        if self.last_backend is not None and self.backend == "auto":
            s += f" (last ran: {self.last_backend!r})"
        return s


_SCRIPT_MESSAGE = (
    "{}: torch.jit.script cannot compile rnnkit's layers and cells (TorchScript cannot read their Python "
    "backends). Supported routes: torch.jit.trace(model, example_inputs) for a TorchScript artifact, "
    "torch.export.export(model, args) (dynamic batch and length) or torch.compile(model); or script the torch.nn "
    "equivalent, torch.jit.script(rnnkit.to_torch_nn(model)).")


def _exporter_defaults(module, extra: tuple, lengths, padding_value):
    """``(lengths, padding_value)`` from the positional arguments after ``hx``, which only
    ``torch.onnx.export(..., dynamo=False)`` passes: it calls the exported module with every
    keyword-only argument's default appended positionally. Anywhere else they are an error."""
    if not torch.onnx.is_in_onnx_export() or len(extra) > 2:
        raise TypeError(f"{type(module).__name__}.forward() takes from 2 to 3 positional arguments but "
                        f"{3 + len(extra)} were given (lengths and padding_value are keyword-only)")
    if lengths is None and extra[0] is not None:
        lengths = extra[0]
    if len(extra) > 1 and extra[1] is not None:
        padding_value = extra[1]
    return lengths, padding_value


def _check_rate(owner: str, name: str, value, meaning: str) -> float:
    """A regularizer rate: a real number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a number in [0, 1) ({meaning}), got {value!r} of type "
                        f"{type(value).__name__}")
    if not 0 <= value < 1:
        raise ValueError(f"{owner}: {name} must be a number in [0, 1) ({meaning}), got {value!r}")
    return float(value)


def _repack(out: Tensor, like: PackedSequence, lengths: Tensor) -> PackedSequence:
    """Pack ``out`` (L, N, ...) into the same layout (batch sizes, order) as ``like``."""
    order = like.sorted_indices
    if order is not None:
        out, lengths = out.index_select(1, order), lengths.index_select(0, order.to(lengths.device))
    data = pack_padded_sequence(out, lengths.cpu(), enforce_sorted=True).data
    return PackedSequence(data, like.batch_sizes, like.sorted_indices, like.unsorted_indices)


_SHAPES_DOC = r"""
    Inputs: input, hx (, lengths)
        * **input**: ``(L, N, H_in)``, or ``(N, L, H_in)`` with ``batch_first=True``,
          or ``(L, H_in)`` unbatched, or a :class:`~torch.nn.utils.rnn.PackedSequence`.
        * **{hx}**: initial state{hx_shape}; zeros if not given.
        * **lengths** (keyword): ``(N,)`` integer tensor or list, each sequence's
          length in a padded batch, in any order; no packing needed. A length may
          be 0 (the output is all padding and the final state is the initial one).
        * **padding_value** (keyword): the output past each length (default 0).

    Outputs: output, {hn}
        * **output**: ``(L, N, D * H_out)`` (``(N, L, D * H_out)`` with
          ``batch_first=True``; ``(L, D * H_out)`` unbatched; a PackedSequence
          for a PackedSequence input): the last layer's ``h_t`` for every ``t``.
        * **{hn_first}**: ``(D * num_layers, N, H_out)`` whatever ``batch_first``
          says: each layer-direction's final state, layer-major, direction-minor
          (row ``2 * k`` is layer ``k`` forward, row ``2 * k + 1`` its reverse).{cn}

    Shape legend: ``N`` batch, ``L`` sequence length, ``D`` 2 if bidirectional
    else 1, ``H_in`` input_size, ``H_out`` {hout}.

    For a one-way net ``output[-1] == h_n[-1]``. For a bidirectional one,
    ``h_n[-2]`` (last layer, forward) equals ``output[-1, :, :H_out]`` and
    ``h_n[-1]`` (last layer, reverse) equals ``output[0, :, H_out:]``, so
    ``h_n[-1]`` is NOT ``output[-1]``. With ``lengths``, read ``output`` at
    ``lengths - 1`` instead of ``-1``.
"""

_ARGS_DOC = r"""
        input_size: ``H_in``, the number of features of ``x``.
        hidden_size: ``H``, the number of features of ``h``.
        num_layers: how many layers to stack; layer ``k > 0`` reads layer ``k-1``'s output.
        bias: if False, no ``b_ih`` and ``b_hh``.
        batch_first: if True, ``input`` and ``output`` are ``(N, L, ·)``; states are not affected.
        dropout: dropout probability on each layer's output except the last's, in training only.
        bidirectional: if True, each layer also runs the sequence backwards.
        backend: ``"auto"`` (the fastest backend that computes the same function),
            ``"reference"`` (plain PyTorch step loop, differentiable twice), ``"torch"``
            (PyTorch's fused op), or ``"fused"`` (rnnkit's C++ kernels).
            ``module.last_backend`` names the one that ran."""


_REGULARIZERS_DOC = r"""
        recurrent_dropout (keyword): variational dropout of ``h_{{t-1}}`` where it enters the
            recurrent projection (Gal and Ghahramani 2016): one mask ``(N, H_out)`` per
            sequence and layer-direction, reused at every step, scaled by ``1 / (1 - p)``;
            training only.{gru_note}
        zoneout (keyword): each unit of ``h`` keeps its previous value with probability
            ``p`` at each step in training (a fresh mask per step and unit), and is
            ``p * h_{{t-1}} + (1 - p) * h_t`` in eval (Krueger et al. 2017).{cell_note}
        weight_drop (keyword): DropConnect on every ``weight_hh`` (Merity et al. 2018,
            AWD-LSTM): one mask per forward, scaled by ``1 / (1 - p)``; training only. The
            parameters keep their torch.nn names, so ``state_dict`` is unchanged.
        Each rate is in ``[0, 1)``, default 0. Zoneout (any mode) and recurrent dropout
        (training) run inside the fused kernels (float32, float64; bfloat16: the reference
        backend); weight-drop also runs on ``torch``."""


class RNN(RecurrentBase, nn.RNN):
    __doc__ = r"""Elman RNN: ``torch.nn.RNN`` with rnnkit's backends and ``lengths``.

    .. math:: h_t = \tanh(x_t W_{ih}^T + b_{ih} + h_{t-1} W_{hh}^T + b_{hh})

    (``relu`` instead of ``tanh`` with ``nonlinearity='relu'``; any name in
    :data:`rnnkit.functional.ACTIVATIONS` or a callable runs on the reference backend).

    Equivalent to the following, for one layer and direction::

        h = h0
        for t in range(L):
            h = torch.tanh(x[t] @ weight_ih_l0.T + bias_ih_l0 + h @ weight_hh_l0.T + bias_hh_l0)
            output.append(h)

    Args:""" + _ARGS_DOC.replace("        bias:", "        nonlinearity: ``'tanh'`` (default), ``'relu'``, another name or a callable.\n        bias:") + \
        _SHAPES_DOC.format(hx="hx", hx_shape=" ``(D * num_layers, N, H_out)``", hn="h_n", hn_first="h_n", cn="",
                           hout="hidden_size") + r"""
    Attributes:
        weight_ih_l[k]: ``(hidden_size, input_size)`` for ``k = 0``, else ``(hidden_size, D * hidden_size)``.
        weight_hh_l[k]: ``(hidden_size, hidden_size)``.
        bias_ih_l[k], bias_hh_l[k]: ``(hidden_size,)``.
        All ~ U(-1/sqrt(hidden_size), 1/sqrt(hidden_size)); ``_reverse`` names the backward direction.

    Examples::

        >>> rnn = rnnkit.RNN(10, 20, 2)
        >>> output, h_n = rnn(torch.randn(5, 3, 10), torch.randn(2, 3, 20))
        >>> output.shape, h_n.shape
        (torch.Size([5, 3, 20]), torch.Size([2, 3, 20]))
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: Activation = "tanh",
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device=None, dtype=None, *, backend: str = "auto") -> None:
        resolve_activation(nonlinearity, owner="RNN")
        spec = rnn_spec(nonlinearity)
        super().__init__(spec, input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         proj_size, device, dtype, backend=backend)
        self.nonlinearity = nonlinearity  # after Module.__init__: an nn.Module activation becomes a submodule

    def _autocast_cpu_policy(self, packed: bool, x: Tensor) -> str:
        return _autocast.LOWER  # as torch.nn.RNN: its op is composite, its matrix products run in the lower dtype

    def _make_spec(self) -> CellSpec:
        # __init__ calls rnn_spec itself: an nn.Module nonlinearity can only become
        # self.nonlinearity after Module.__init__ (rnn_spec is cached: the same spec)
        return rnn_spec(self.nonlinearity)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.nonlinearity != "tanh":
            s += f", nonlinearity={self.nonlinearity!r}"
        return s


class LSTM(RecurrentBase, nn.LSTM):
    __doc__ = r"""Long short-term memory: ``torch.nn.LSTM`` with rnnkit's backends and ``lengths``.

    .. math::
        \begin{array}{ll}
        i_t = \sigma(W_{ii} x_t + b_{ii} + W_{hi} h_{t-1} + b_{hi}) \\
        f_t = \sigma(W_{if} x_t + b_{if} + W_{hf} h_{t-1} + b_{hf}) \\
        g_t = \tanh(W_{ig} x_t + b_{ig} + W_{hg} h_{t-1} + b_{hg}) \\
        o_t = \sigma(W_{io} x_t + b_{io} + W_{ho} h_{t-1} + b_{ho}) \\
        c_t = f_t \odot c_{t-1} + i_t \odot g_t \\
        h_t = o_t \odot \tanh(c_t)  \quad (h_t = W_{hr}(o_t \odot \tanh(c_t)) \text{ with proj\_size})
        \end{array}

    Gates are stacked ``i, f, g, o`` in ``weight_ih`` and ``weight_hh``, as in torch.nn.

    Equivalent to the following, for one layer and direction::

        for t in range(L):
            i, f, g, o = (x[t] @ W_ih.T + b_ih + h @ W_hh.T + b_hh).chunk(4, -1)
            c = f.sigmoid() * c + i.sigmoid() * g.tanh()
            h = o.sigmoid() * c.tanh()

    Args:""" + _ARGS_DOC + r"""
        proj_size: if > 0, ``h_t`` is projected to ``proj_size`` features by ``W_hr``.""" + \
        _REGULARIZERS_DOC.format(gru_note="", cell_note="\n        zoneout_cell (keyword): the same for the cell "
                                 "state ``c``; defaults to ``zoneout``.") + "\n" + _SHAPES_DOC.format(hx="hx = (h_0, c_0)", hx_shape="s ``h_0 (D * num_layers, N, H_out)`` and "
                         "``c_0 (D * num_layers, N, H)``", hn="(h_n, c_n)", hn_first="h_n",
                         cn="\n        * **c_n**: ``(D * num_layers, N, H)``: the final cell states, same order.",
                         hout="proj_size if > 0 else hidden_size") + r"""
    Attributes:
        weight_ih_l[k]: ``(4*hidden_size, input_size)`` for ``k = 0``, else ``(4*hidden_size, D * H_out)``.
        weight_hh_l[k]: ``(4*hidden_size, H_out)``.
        bias_ih_l[k], bias_hh_l[k]: ``(4*hidden_size,)``.
        weight_hr_l[k]: ``(proj_size, hidden_size)``, only with ``proj_size > 0``.
        All ~ U(-1/sqrt(hidden_size), 1/sqrt(hidden_size)); ``_reverse`` names the backward direction.

    Examples::

        >>> lstm = rnnkit.LSTM(50, 100, num_layers=2)
        >>> out, (h, c) = lstm(torch.randn(10, 3, 50))
        >>> out.shape, h.shape, c.shape
        (torch.Size([10, 3, 100]), torch.Size([2, 3, 100]), torch.Size([2, 3, 100]))
        >>> torch.equal(out[-1], h[-1])
        True
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
                 device=None, dtype=None, *, backend: str = "auto", recurrent_dropout: float = 0.0,
                 zoneout: float = 0.0, zoneout_cell: Optional[float] = None, weight_drop: float = 0.0) -> None:
        super().__init__(self._make_spec(), input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, proj_size, device, dtype, backend=backend, recurrent_dropout=recurrent_dropout,
                         zoneout=zoneout, zoneout_cell=zoneout_cell, weight_drop=weight_drop)

    def _autocast_cpu_policy(self, packed: bool, x: Tensor) -> str:
        # as torch.nn.LSTM: oneDNN's op (on autocast's CPU list) where it runs, else ATen's composite cells
        if packed or self.proj_size or not _autocast.onednn_lstm(x):
            return _autocast.MIXED
        return _autocast.LOWER

    def _make_spec(self) -> CellSpec:
        return LSTM_SPEC


class GRU(RecurrentBase, nn.GRU):
    __doc__ = r"""Gated recurrent unit: ``torch.nn.GRU`` with rnnkit's backends and ``lengths``.

    .. math::
        \begin{array}{ll}
        r_t = \sigma(W_{ir} x_t + b_{ir} + W_{hr} h_{t-1} + b_{hr}) \\
        z_t = \sigma(W_{iz} x_t + b_{iz} + W_{hz} h_{t-1} + b_{hz}) \\
        n_t = \tanh(W_{in} x_t + b_{in} + r_t \odot (W_{hn} h_{t-1} + b_{hn})) \\
        h_t = (1 - z_t) \odot n_t + z_t \odot h_{t-1}
        \end{array}

    Gates are stacked ``r, z, n``, as in torch.nn.

    Args:""" + _ARGS_DOC + _REGULARIZERS_DOC.format(
        gru_note="\n            The update ``z * h_{t-1}`` reads the unmasked ``h_{t-1}``.", cell_note="") + "\n" + \
        _SHAPES_DOC.format(hx="hx", hx_shape=" ``(D * num_layers, N, H_out)``", hn="h_n", hn_first="h_n", cn="",
                           hout="hidden_size") + r"""
    Attributes:
        weight_ih_l[k]: ``(3*hidden_size, input_size)`` for ``k = 0``, else ``(3*hidden_size, D * hidden_size)``.
        weight_hh_l[k]: ``(3*hidden_size, hidden_size)``.
        bias_ih_l[k], bias_hh_l[k]: ``(3*hidden_size,)``.

    Examples::

        >>> gru = rnnkit.GRU(10, 20, 2)
        >>> out, h = gru(torch.randn(3, 32, 10))
        >>> out.shape, h.shape
        (torch.Size([3, 32, 20]), torch.Size([2, 32, 20]))
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
                 device=None, dtype=None, *, backend: str = "auto", recurrent_dropout: float = 0.0,
                 zoneout: float = 0.0, weight_drop: float = 0.0) -> None:
        super().__init__(self._make_spec(), input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, proj_size, device, dtype, backend=backend, recurrent_dropout=recurrent_dropout,
                         zoneout=zoneout, weight_drop=weight_drop)

    def _autocast_cpu_policy(self, packed: bool, x: Tensor) -> str:
        return _autocast.MIXED  # as torch.nn.GRU: ATen's composite cells, autocast on (products cast, state promoted)

    def _make_spec(self) -> CellSpec:
        return GRU_SPEC
