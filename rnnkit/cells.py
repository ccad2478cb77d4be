"""One-step cells with torch.nn's contract: :class:`RNNCell`, :class:`LSTMCell`, :class:`GRUCell`.

A cell applies its spec's step once: ``state = step(project(x), state)``, the
same function the sequence runner loops over.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, _VF, nn

from . import _autocast, saving as _saving
from ._checks import (cell_state_words, check_bool, check_cell_sizes, check_dtype_device, check_positive_int,
                      shape_str, split_states)
from .errors import RNNShapeError, RNNTypeError, torch_words
from .functional import GRU_SPEC, LSTM_SPEC, Activation, resolve_activation, rnn_spec
from .spec import CellSpec
from .fused import _build as _fused_build, cells as _fused_cells
from .fused.cells import cell_step as _fused_step, cell_unsupported as _fused_unsupported

_VF_CELLS = {"RNN_TANH": _VF.rnn_tanh_cell, "RNN_RELU": _VF.rnn_relu_cell, "LSTM": _VF.lstm_cell, "GRU": _VF.gru_cell}


class _Owner:
    """A cell's description for error messages, formatted only when one is raised."""

    __slots__ = ("cell",)

    def __init__(self, cell) -> None:
        self.cell = cell

    def __format__(self, spec: str) -> str:
        return format(self.cell._describe(), spec)

    __str__ = lambda self: self.cell._describe()  # noqa: E731


class CellBase(nn.Module):
    """Shared machinery of every rnnkit cell (the analogue of ``torch.nn.RNNCellBase``).

    Subclasses may override :meth:`_param_shapes` and :meth:`reset_parameters`
    to hold other parameters; the step itself is the spec's.
    """

    _is_standard = True

    def __init__(self, cell_spec: CellSpec, input_size: int, hidden_size: int, bias: bool = True,
                 device=None, dtype=None, *, backend: str = "auto") -> None:
        nn.Module.__init__(self)  # not the torch.nn cell's __init__ (RNNCell etc. derive from it too)
        owner = type(self).__name__
        self.cell_spec = cell_spec
        if self._is_standard:  # as torch.nn's cells: any size >= 0, and bias counts by its truth value
            self.input_size, self.hidden_size = check_cell_sizes(owner, input_size, hidden_size, cell_spec.gates)
            self.bias = bias
        else:
            self.input_size = check_positive_int("input_size", input_size, owner=owner)
            self.hidden_size = check_positive_int("hidden_size", hidden_size, owner=owner)
            self.bias = check_bool("bias", bias, owner=owner)
        if backend not in ("auto", "reference", "torch", "fused"):
            raise ValueError(f"{owner}: backend must be one of ['auto', 'reference', 'torch', 'fused'] for a cell, "
                             f"got {backend!r}")
        if backend == "torch" and not self._torch_op():
            raise ValueError(f"{owner}: backend='torch' cannot run this cell: PyTorch has no fused op for the "
                             f"'{cell_spec.name}' cell. Use backend='auto' to pick one that can.")
        self.backend = backend
        self.last_backend: Optional[str] = None
        factory = {"device": device, "dtype": dtype}
        self._param_names = tuple(name for name, _ in self._param_shapes())
        for name, shape in self._param_shapes():
            if shape is None:
                self.register_parameter(name, None)
            else:
                setattr(self, name, nn.Parameter(torch.empty(shape, **factory)))
        self.reset_parameters()
        if backend == "fused":
            reason = _fused_unsupported(self)
            if reason is not None:
                raise ValueError(f"{owner}: backend='fused' cannot run this cell: {reason}. "
                                 "Use backend='auto' to pick one that can.")

    def _make_spec(self) -> Optional[CellSpec]:
        """This cell's spec, built from its plain attributes: ``__init__`` uses it, and
        so does unpickling, so ``torch.save(cell)`` need not pickle the spec (see
        :mod:`rnnkit.saving`). None here: a subclass that passes its own spec and does
        not override this keeps the spec in its pickle."""
        return None

    def __getstate__(self):
        return _saving.module_state(self)

    def __setstate__(self, state) -> None:
        _saving.restore_module(self, state)

    def _param_shapes(self) -> List[Tuple[str, Optional[Tuple[int, ...]]]]:
        gates = self.cell_spec.gates * self.hidden_size
        shapes: List[Tuple[str, Optional[Tuple[int, ...]]]] = [
            ("weight_ih", (gates, self.input_size)), ("weight_hh", (gates, self.hidden_size))]
        shapes += [("bias_ih", (gates,) if self.bias else None), ("bias_hh", (gates,) if self.bias else None)]
        return shapes

    def reset_parameters(self) -> None:
        """Every parameter ~ U(-1/sqrt(hidden_size), 1/sqrt(hidden_size)), as torch.nn."""
        bound = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def _params(self) -> Dict[str, Optional[Tensor]]:
        """The parameters by name, as the module's attributes (so parametrizations such as
        ``weight_norm`` and pruning, which replace a parameter by a computed tensor, apply)."""
        return {name: getattr(self, name) for name in self._param_names}

    def _plain_params(self) -> bool:
        """Every parameter is a plain ``nn.Parameter`` in ``_parameters`` (no parametrization or
        pruning): the direct C++ step reads them from there."""
        params = self._parameters
        return all(name in params for name in self._param_names)

    def _describe(self) -> str:
        return f"{type(self).__name__}(input_size={self.input_size}, hidden_size={self.hidden_size})"

    def _torch_op(self):
        mode = self.cell_spec.extra.get("torch_mode")
        return _VF_CELLS.get(mode) if self._is_standard and mode else None

    def _state_sizes(self) -> List[int]:
        return [self.hidden_size for _ in self.cell_spec.state_names]

    def __prepare_scriptable__(self):
        from .layers import _SCRIPT_MESSAGE
        raise RuntimeError(_SCRIPT_MESSAGE.format(self._describe()))

    def _autocast_cpu_policy(self, packed: bool, x: Tensor) -> str:
        """Under CPU autocast: ``"lower"`` (the autocast dtype), ``"float32"`` or ``"mixed"`` (autocast left
        on), as torch.nn's cells (float32 for the zoo's cells on the CPU)."""
        return _autocast.FLOAT32

    def forward(self, input: Tensor, hx=None):
        mixed = False
        if _autocast.enabled():
            cast = _autocast.compute_dtype(self, input)
            if cast is _autocast.MIXED:
                mixed = True  # autocast stays on: torch's op or the reference step, as torch.nn's composite cell
            elif cast is not None:
                return _autocast.call(self, cast, input, hx)
        # The fast path: a plain inference step of a standard cell goes straight to the fused
        # extension's C++ entry, which checks everything itself and answers NotImplemented
        # unless all is plain (then the full path below validates, with its messages, and runs).
        direct = _fused_cells.direct_step
        if (direct is not None and self._is_standard and (self.backend == "auto" or self.backend == "fused")
                and _fused_build._state["loaded"] and not mixed and not _fused_cells.direct_entry_off()
                and self._plain_params()):
            new = direct(_fused_cells.DIRECT_KIND.get(self.cell_spec.fusable), input, hx, self._parameters,
                         self.input_size, self.hidden_size)
            if new is not NotImplemented:
                if self.last_backend != "fused":  # nn.Module.__setattr__ costs more than the step itself
                    self.last_backend = "fused"
                return new
        owner = _Owner(self)  # formatted only if an error message needs it
        if not isinstance(input, Tensor):
            raise RNNTypeError(f"{owner}: input must be a Tensor, got {type(input).__name__}")
        if input.dim() not in (1, 2):
            raise RNNShapeError(torch_words(
                f"{type(self).__name__}: Expected input to be 1D or 2D, got {input.dim()}D instead",
                f"{owner}: input must be 2-D (N, H_in) or 1-D (H_in,) unbatched, "
                f"got {input.dim()}-D input of shape {shape_str(input.shape)}"))
        batched = input.dim() == 2
        if input.shape[-1] != self.input_size:
            read = f"(N={input.shape[0]}, H_in={input.shape[1]})" if batched else f"(H_in={input.shape[0]},)"
            raise RNNShapeError(torch_words(
                f"input has inconsistent input_size: got {input.shape[-1]} expected {self.input_size}",
                f"{owner}: input of shape {shape_str(input.shape)} was read as {read}; its feature "
                f"axis (the last) must equal input_size={self.input_size}"))
        ref = self.weight_ih
        x = input if batched else input.unsqueeze(0)
        names = self.cell_spec.state_names
        sizes = self._state_sizes()
        if hx is None:
            # torch.zeros, not x.new_zeros: dense states for a sparse input too, as torch.nn's cells
            state = tuple(torch.zeros(x.shape[0], size, dtype=x.dtype, device=x.device) for size in sizes)
        else:
            state = self._check_hx(hx, x.shape[0], batched, sizes, ref, mixed)
        check_dtype_device(self, "input", input, ref, any_dtype=mixed)  # after the shapes, as torch.nn
        op = self._torch_op() if self.backend != "reference" else None
        if self.backend in ("auto", "fused") and _fused_unsupported(self, x) is None and (
                self.backend == "fused" or (not _tracing() and (
                    not torch.is_grad_enabled() or not _any_requires_grad(self, x, state)))):
            # the fused step: one C++ op per inference step (auto uses it where no gradient is needed)
            if self.last_backend != "fused":  # nn.Module.__setattr__ costs more than the step itself
                self.last_backend = "fused"
            new = _fused_step(self, x, state)
        elif self.backend == "fused":
            raise ValueError(f"{owner}: backend='fused' cannot run this input: {_fused_unsupported(self, x)}")
        elif op is not None:
            self.last_backend = "torch"
            p = self._params()
            args = (p["weight_ih"], p["weight_hh"], p["bias_ih"], p["bias_hh"])
            new = op(x, state if len(names) > 1 else state[0], *args)
            new = tuple(new) if isinstance(new, (tuple, list)) else (new,)
        else:
            self.last_backend = "reference"
            p = self._params()
            new = self.cell_spec.step(self.cell_spec.project(x, p), state, p)
        if not batched:
            new = tuple(s.squeeze(0) for s in new)
        return new if len(new) > 1 else new[0]

    def _check_hx(self, hx, batch: int, batched: bool, sizes: List[int], ref: Tensor, any_dtype: bool = False):
        wants = [(batch, size) if batched else (size,) for size in sizes]
        legends = [f"(N={batch}, H={size})" if batched else f"(H={size},)" for size in sizes]
        read = shape_str((batch, self.input_size) if batched else (self.input_size,))
        return self._check_states(_Owner(self), hx, wants, legends, read, batched, ref, any_dtype)

    def _check_states(self, owner, hx, wants, legends, input_desc: str, batched: bool, ref: Tensor,
                      any_dtype: bool = False):
        """``hx`` split into this cell's states, each checked against its expected
        shape (``wants``, spelled out by ``legends``), dtype and device; unbatched
        states gain the batch axis. ``input_desc`` says how the input was read."""
        names = self.cell_spec.state_names
        states = split_states(owner, hx, names, torch_op="lstm_cell" if self.cell_spec.name == "lstm" else None)
        for name, s in zip(names, states):
            if not isinstance(s, Tensor):
                raise RNNTypeError(f"{owner}: {name} must be a Tensor, got {type(s).__name__}")
        # (N, H) states, as torch.nn's cells: torch.nn's words, and its order (every rank, then every shape)
        flat = all(len(want) == (2 if batched else 1) for want in wants)
        order = ([i for i, s in enumerate(states) if s.dim() not in (1, 2)] if flat else []) + list(range(len(names)))
        for i in order:
            name, s, want, legend = names[i], states[i], wants[i], legends[i]
            if tuple(s.shape) != want:
                words = cell_state_words(type(self).__name__, i, len(names), s, want, batched) if flat else None
                raise RNNShapeError(torch_words(words, f"{owner}: {name} has shape {shape_str(s.shape)} but expected "
                                                f"{shape_str(want)} = {legend} for an input of shape {input_desc}"))
        for name, s in zip(names, states):
            check_dtype_device(self, name, s, ref, any_dtype)
        return tuple(s if batched else s.unsqueeze(0) for s in states)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if not self.bias:
            s += ", bias=False"
        return s + f", backend={self.backend!r}"


_tracing = torch._C._get_tracing_state


def _any_requires_grad(cell: CellBase, x: Tensor, state) -> bool:
    return x.requires_grad or any(s.requires_grad for s in state) or any(
        p.requires_grad for p in cell._params().values() if p is not None)


class RNNCell(CellBase, nn.RNNCell):
    r"""An Elman RNN cell: ``h' = tanh(W_ih x + b_ih + W_hh h + b_hh)``, as ``torch.nn.RNNCell``.

    Args:
        input_size, hidden_size, bias, device, dtype: as torch.nn.
        nonlinearity: ``'tanh'``, ``'relu'``, another name from
            :data:`rnnkit.functional.ACTIVATIONS`, or a callable.
        backend: ``'auto'``, ``'reference'``, ``'torch'`` or ``'fused'`` (rnnkit's C++ step;
            ``'auto'`` uses it for inference steps, where no gradient is needed).

    Inputs: ``input (N, H_in)`` or ``(H_in,)``; ``hx (N, H)`` or ``(H,)``, zeros if None.
    Output: ``h' (N, H)`` or ``(H,)``.

    Attributes: ``weight_ih (H, H_in)``, ``weight_hh (H, H)``, ``bias_ih (H,)``, ``bias_hh (H,)``.

    Examples::

        >>> cell = rnnkit.RNNCell(10, 20)
        >>> h = cell(torch.randn(3, 10))
        >>> h.shape
        torch.Size([3, 20])
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: Activation = "tanh",
                 device=None, dtype=None, *, backend: str = "auto") -> None:
        resolve_activation(nonlinearity, owner="RNNCell")
        super().__init__(rnn_spec(nonlinearity), input_size, hidden_size, bias, device, dtype, backend=backend)
        self.nonlinearity = nonlinearity  # after Module.__init__: an nn.Module activation becomes a submodule

    def _autocast_cpu_policy(self, packed: bool, x: Tensor) -> str:
        return _autocast.LOWER  # as torch.nn.RNNCell: a composite op, its matrix products run in the lower dtype

    def _make_spec(self) -> CellSpec:
        return rnn_spec(self.nonlinearity)  # as __init__, which cannot set an nn.Module nonlinearity earlier


class LSTMCell(CellBase, nn.LSTMCell):
    r"""An LSTM cell, gates ``i, f, g, o``, as ``torch.nn.LSTMCell``.

    ``c' = σ(f) c + σ(i) tanh(g)``, ``h' = σ(o) tanh(c')``.

    Inputs: ``input (N, H_in)`` or ``(H_in,)``; ``hx = (h, c)``, each ``(N, H)`` or ``(H,)``, zeros if None.
    Output: ``(h', c')``.

    Attributes: ``weight_ih (4H, H_in)``, ``weight_hh (4H, H)``, ``bias_ih (4H,)``, ``bias_hh (4H,)``.

    Examples::

        >>> cell = rnnkit.LSTMCell(10, 20)
        >>> h, c = cell(torch.randn(3, 10))
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None,
                 *, backend: str = "auto") -> None:
        super().__init__(self._make_spec(), input_size, hidden_size, bias, device, dtype, backend=backend)

    def _make_spec(self) -> CellSpec:
        return LSTM_SPEC

    def _autocast_cpu_policy(self, packed: bool, x: Tensor) -> str:
        return _autocast.MIXED  # as torch.nn.LSTMCell: ATen's composite cell with autocast on (products cast)


class GRUCell(CellBase, nn.GRUCell):
    r"""A GRU cell, gates ``r, z, n``, as ``torch.nn.GRUCell``.

    ``n = tanh(W_in x + b_in + r (W_hn h + b_hn))``, ``h' = (1 - z) n + z h``.

    Inputs: ``input (N, H_in)`` or ``(H_in,)``; ``hx (N, H)`` or ``(H,)``, zeros if None.
    Output: ``h' (N, H)`` or ``(H,)``.

    Attributes: ``weight_ih (3H, H_in)``, ``weight_hh (3H, H)``, ``bias_ih (3H,)``, ``bias_hh (3H,)``.

    Examples::

        >>> cell = rnnkit.GRUCell(10, 20)
        >>> h = cell(torch.randn(3, 10))
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None,
                 *, backend: str = "auto") -> None:
        super().__init__(self._make_spec(), input_size, hidden_size, bias, device, dtype, backend=backend)

    def _make_spec(self) -> CellSpec:
        return GRU_SPEC

    def _autocast_cpu_policy(self, packed: bool, x: Tensor) -> str:
        return _autocast.MIXED  # as torch.nn.GRUCell: ATen's composite cell with autocast on (products cast)
