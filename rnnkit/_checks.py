"""Argument and shape checks. Every message starts with torch.nn's own words for
the mistake (where torch.nn has them), then says what was received, how it was
read (which axis was taken as sequence, batch, feature) and what was expected.
The exception classes are :mod:`rnnkit.errors`' (also ``RuntimeError`` where
torch.nn raises one).

The layers, the cells and :func:`rnnkit.explain` share these functions, so an
explanation and an error use the same words.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.autograd import forward_ad as _forward_ad

from .errors import RNNDeviceError, RNNShapeError, RNNTypeError, scalar_name, torch_words
from . import _autocast
from ._autocast import MIXED_DTYPES as _MIXED_DTYPES


def shape_str(shape: Sequence[int]) -> str:
    """``(3, 4)``; a one-axis shape keeps Python's trailing comma: ``(400,)``."""
    inner = ", ".join(str(s if isinstance(s, torch.SymInt) else int(s)) for s in shape)  # no int(): export keeps a symbolic size
    return f"({inner},)" if len(shape) == 1 else f"({inner})"


# ----------------------------------------------------------------------------- constructor


def check_positive_int(name: str, value, *, owner: str) -> int:
    """A positive int (not a bool): ``num_layers`` and the zoo's sizes."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(torch_words(f"{name} should be of type int, got: {type(value).__name__}",
                                    f"{owner}: {name} must be a positive int, got {value!r} of type "
                                    f"{type(value).__name__}"))
    if value <= 0:
        raise ValueError(torch_words(f"{name} must be greater than zero",
                                     f"{owner}: {name} must be a positive int, got {value}"))
    return int(value)


def check_size(name: str, value, *, owner: str, minimum: Optional[int] = 1) -> int:
    """``input_size`` or ``hidden_size`` as torch.nn takes it: any int (``True``
    counts as 1, as in torch.nn), at least ``minimum`` (1 for a layer; None for a
    cell, whose sizes :func:`check_cell_sizes` checks together)."""
    want = "a positive int" if minimum == 1 else "an int"
    if not isinstance(value, numbers.Integral):
        raise TypeError(torch_words(f"{name} should be of type int, got: {type(value).__name__}",
                                    f"{owner}: {name} must be {want}, got {value!r} of type {type(value).__name__}"))
    if minimum is not None and value < minimum:
        raise ValueError(torch_words(f"{name} must be greater than zero",
                                     f"{owner}: {name} must be {want}, got {value}"))
    return int(value)


def check_cell_sizes(owner: str, input_size, hidden_size, gates: int) -> Tuple[int, int]:
    """A torch.nn cell's sizes: ints >= 0 (``RNNCell(10, 0)`` works, as in torch.nn).
    A negative size is the RuntimeError torch.nn raises when it creates ``weight_ih``
    (``gates * hidden_size`` rows, ``input_size`` columns)."""
    i = check_size("input_size", input_size, owner=owner, minimum=None)
    h = check_size("hidden_size", hidden_size, owner=owner, minimum=None)
    if i < 0 or h < 0:
        shape = [gates * h, i]
        negative = next(n for n in shape if n < 0)
        raise RNNShapeError(torch_words(
            f"Trying to create tensor with negative dimension {negative}: {shape}",
            f"{owner}: input_size and hidden_size must be >= 0, got input_size={i} and hidden_size={h}"))
    return i, h


_TORCH_BOOL_CHECKED = ("bias", "batch_first")  # torch.nn's RNNBase checks these two (bidirectional: not)


def check_bool(name: str, value, *, owner: str) -> bool:
    if not isinstance(value, bool):
        words = f"{name} should be of type bool, got: {type(value).__name__}"
        raise TypeError(torch_words(words if name in _TORCH_BOOL_CHECKED else None,
                                    f"{owner}: {name} must be a bool, got {value!r} of type {type(value).__name__}"))
    return value


def check_probability(name: str, value, *, owner: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:
        # torch.nn calls float(dropout) first: a TypeError for what float() refuses (None, a list)
        cls = ValueError if isinstance(value, (str, bool, numbers.Real)) else TypeError
        raise cls(torch_words(
            f"{name} should be a number in range [0, 1] representing the probability of an element being zeroed",
            f"{owner}: {name} must be a number in [0, 1] (the probability of an element being zeroed), "
            f"got {value!r}"))
    return float(value)


# ----------------------------------------------------------------------------- input reading


@dataclass
class InputReading:
    """How an input tensor was read.

    ``axes`` pairs each input axis with its meaning, for example
    ``[("N", 3, "batch"), ("L", 10, "sequence"), ("H_in", 50, "feature")]``.
    """

    shape: Tuple[int, ...]
    batched: bool
    batch_first: bool
    packed: bool
    seq_len: int
    batch: int
    feature_shape: Tuple[int, ...]
    axes: List[Tuple[str, int, str]]

    def describe(self) -> str:
        parts = ", ".join(f"{sym}={size}" for sym, size, _ in self.axes)
        how = "unbatched" if not self.batched else ("batch_first=True" if self.batch_first else "batch_first=False")
        if self.packed:
            how = "PackedSequence"
        return f"read as ({parts}) [{how}]"


def layout_symbols(batch_first: bool, batched: bool, feature_symbols: Sequence[str]) -> List[str]:
    if not batched:
        return ["L", *feature_symbols]
    return (["N", "L"] if batch_first else ["L", "N"]) + list(feature_symbols)


_MEANING = {"L": "sequence", "N": "batch"}


class _Described:
    """``module._describe()`` for an error message, formatted only when one is raised."""

    __slots__ = ("module",)

    def __init__(self, module) -> None:
        self.module = module

    def __format__(self, spec: str) -> str:
        return format(self.module._describe(), spec)

    def __str__(self) -> str:
        return self.module._describe()


def read_input(module, x: Tensor, *, packed: bool = False) -> InputReading:
    """Read ``x`` (a tensor; a PackedSequence's padded, time-major form when
    ``packed``) against ``module``'s layout, or raise an :class:`RNNShapeError` that
    says how it was read and what was expected."""
    owner = _Described(module)  # formatted only if a message needs it
    fsyms = module._feature_symbols()
    fnd = len(fsyms)
    batch_first = bool(getattr(module, "batch_first", False)) and not packed
    expected_b = layout_symbols(batch_first, True, fsyms)
    expected_u = layout_symbols(False, False, fsyms)
    if not isinstance(x, Tensor):
        raise RNNTypeError(f"{owner}: input must be a Tensor or a PackedSequence, got {type(x).__name__}")
    if x.dim() == fnd + 2:
        batched = True
    elif x.dim() == fnd + 1 and not packed:
        batched = False
    else:
        # torch.nn.RNN alone says "tensor instead"; LSTM and GRU say "instead"
        tensor = " tensor" if any(c.__name__ == "RNN" for c in type(module).__mro__) else ""
        raise RNNShapeError(torch_words(
            f"{type(module).__name__}: Expected input to be {fnd + 1}D or {fnd + 2}D, got {x.dim()}D{tensor} instead",
            f"{owner}: input must be {fnd + 2}-D {_sym(expected_b)} (batched, batch_first={batch_first}) "
            f"or {fnd + 1}-D {_sym(expected_u)} (unbatched), got {x.dim()}-D input of shape {shape_str(x.shape)}"))
    syms = layout_symbols(batch_first, batched, fsyms)
    # the first feature axis holds the features (channels); any after it are spatial
    meanings = [_MEANING.get(s) or ("feature" if i == len(syms) - fnd else "spatial") for i, s in enumerate(syms)]
    axes = [(s, n, m) for s, n, m in zip(syms, x.shape, meanings)]  # no int(): export keeps the sizes symbolic
    sizes = dict((s, n) for s, n, _ in axes)
    feature_shape = tuple(int(n) for n in x.shape[x.dim() - fnd:])
    reading = InputReading(
        shape=tuple(x.shape), batched=batched, batch_first=batch_first, packed=packed,
        seq_len=sizes["L"], batch=sizes.get("N", 1), feature_shape=feature_shape, axes=axes,
    )
    problem = module._check_features(feature_shape)
    if problem is not None:
        msg = f"{owner}: input of shape {shape_str(x.shape)} was {reading.describe()}; {problem}"
        hint = _feature_hint(module, x, fnd)
        words = (f"input.size(-1) must be equal to input_size. Expected {module.input_size}, got {x.shape[-1]}"
                 if fnd == 1 else None)
        raise RNNShapeError(torch_words(words, msg + (f". {hint}" if hint else "")))
    if reading.seq_len == 0:
        raise RNNShapeError(torch_words(
            "Expected sequence length to be larger than 0 in RNN",
            f"{owner}: input of shape {shape_str(x.shape)} was {reading.describe()}; the sequence axis L is empty "
            "(at least one time step is needed)"))
    return reading


def _sym(symbols: Sequence[str]) -> str:
    return "(" + ", ".join(symbols) + ")"


def _feature_hint(module, x: Tensor, fnd: int) -> Optional[str]:
    """Suggest the fix when another axis has the expected feature size."""
    if fnd != 1:
        return None
    want = module.input_size
    last = x.dim() - 1
    others = [a for a in range(last) if x.shape[a] == want]
    if not others:
        return (f"Fix: give the input {want} features on its last axis, or construct the layer with "
                f"input_size={x.shape[last]}")
    a = others[0]
    return (
        f"Fix: axis {a} has size {want} = input_size; if that is your feature axis, move it last, "
        f"e.g. x.transpose({a}, {last}) (the feature axis is always the last one)"
    )


# ----------------------------------------------------------------------------- dtype, device


def check_dtype_device(module, what: str, t: Tensor, ref: Tensor, any_dtype: bool = False) -> None:
    """``t`` (the input, or the state named ``what``) has ``ref``'s (a parameter's)
    dtype and device, or an :class:`RNNTypeError` / :class:`RNNDeviceError` that
    starts with torch.nn's words for the mistake (a layer's differ from a cell's).
    ``any_dtype``: a run with autocast on (:data:`rnnkit._autocast.MIXED`), where torch.nn
    takes any mix of float32, bfloat16 and float16 (autocast casts them)."""
    if t.dtype != ref.dtype and not (any_dtype and t.dtype in _MIXED_DTYPES and ref.dtype in _MIXED_DTYPES):
        owner = module._describe()
        if not hasattr(module, "num_layers"):  # a cell: torch.nn's matmul refuses the mix
            words = (f"mat1 and mat2 must have the same dtype, but got {scalar_name(t.dtype)} and "
                     f"{scalar_name(ref.dtype)}")
        elif what == "input":
            words = (f"RNN input dtype ({t.dtype}) does not match weight dtype ({ref.dtype}). "
                     f"Convert input: input.to({ref.dtype}), or convert model: model.to({t.dtype})")
        else:
            words = (f"Input and hidden tensors are not the same dtype, found input tensor with "
                     f"{scalar_name(ref.dtype)} and hidden tensor with {scalar_name(t.dtype)}")
        raise RNNTypeError(torch_words(words,
            f"{owner}: {what} has dtype {t.dtype} but the parameters are {ref.dtype}. "
            f"Fix: convert the {what} with .to({ref.dtype}) or the module with .to({t.dtype})"))
    if t.device != ref.device:
        owner = module._describe()
        if not hasattr(module, "num_layers"):  # the words of torch.nn's cells (ATen's device check)
            words = f"Tensor on device {ref.device} is not on the expected device {t.device}!"
        elif what == "input":
            words = (f"Input and parameter tensors are not at the same device, found input tensor at {t.device} "
                     f"and parameter tensor at {ref.device}")
        else:
            words = (f"Input and hidden tensors are not at the same device, found input tensor at {ref.device} "
                     f"and hidden tensor at {t.device}")
        raise RNNDeviceError(torch_words(words,
            f"{owner}: {what} is on device {t.device} but the parameters are on {ref.device}. "
            f"Fix: move the {what} with .to('{ref.device}') or the module with .to('{t.device}')"))


# ----------------------------------------------------------------------------- states


def split_states(owner, hx, labels: Sequence[str], single: str = "", torch_op: Optional[str] = None) -> Tuple:
    """``hx`` as a tuple with one entry per state (``labels``, e.g. ``("h_0", "c_0")``),
    or an :class:`RNNTypeError` that names the expected form. ``single`` qualifies the
    message for one-state cells (e.g. ``" h_0 for this layer"``); ``torch_op``
    (``"lstm"``, ``"lstm_cell"``) is the op whose words torch.nn uses for a tuple of
    the wrong length."""
    if len(labels) == 1:
        if isinstance(hx, (tuple, list)):
            raise RNNTypeError(f"{owner}: hx must be a single Tensor{single}, got a {type(hx).__name__}")
        return (hx,)
    if not isinstance(hx, (tuple, list)) or len(hx) != len(labels):
        is_seq = isinstance(hx, (tuple, list))
        got = f"a {type(hx).__name__} of {len(hx)}" if is_seq else type(hx).__name__
        words = f"{torch_op} expects two hidden states" if torch_op and is_seq else None
        raise RNNTypeError(torch_words(words, f"{owner}: hx must be a tuple ({', '.join(labels)}), got {got}"))
    return tuple(hx)


def check_states(module, hx, reading: InputReading, expected: Sequence[Tuple[int, ...]],
                 ref: Optional[Tensor], any_dtype: bool = False) -> Tuple[Tensor, ...]:
    """Check the user's initial state against ``expected`` (one batched shape per
    state tensor, e.g. ``[(D*num_layers, N, H_out), (D*num_layers, N, H)]``) and
    return it batched. An unbatched input takes states without the N axis.
    ``ref`` (a parameter) is what dtype and device are checked against; None
    checks shapes only. In torch.nn's order: the structure, every state's rank,
    every state's shape, then dtypes and devices."""
    owner = module._describe()
    labels = [f"{n}_0" for n in module.cell_spec.state_names]
    states = split_states(owner, hx, labels, single=" h_0 for this layer",
                          torch_op="lstm" if module.cell_spec.name == "lstm" else None)
    for label, s in zip(labels, states):
        if not isinstance(s, Tensor):
            raise RNNTypeError(f"{owner}: {label} must be a Tensor, got {type(s).__name__}")
    expected = [tuple(n if isinstance(n, torch.SymInt) else int(n) for n in shape) for shape in expected]  # export: a symbolic batch stays symbolic
    wants = [shape if reading.batched else shape[:1] + shape[2:] for shape in expected]
    if not reading.packed:  # torch.nn checks the ranks first (not for a PackedSequence)
        for label, s, want in zip(labels, states, wants):
            if s.dim() != len(want):
                raise RNNShapeError(torch_words(_torch_rank_words(states, reading, len(want)),
                                                _state_message(module, label, s, want, reading)))
    for i, (label, s, want, shape) in enumerate(zip(labels, states, wants, expected)):
        if tuple(s.shape) != want:
            got = list(s.shape) if reading.batched or s.dim() != len(want) else list(s.unsqueeze(1).shape)
            which = "hidden" if len(states) == 1 else f"hidden[{i}]"
            raise RNNShapeError(torch_words(f"Expected {which} size {shape}, got {got}",
                                            _state_message(module, label, s, want, reading)))
    if ref is not None:
        for label, s in zip(labels, states):
            check_dtype_device(module, label, s, ref, any_dtype)
    return tuple(s if reading.batched else s.unsqueeze(1) for s in states)


def _torch_rank_words(states, reading: InputReading, rank: int) -> Optional[str]:
    """torch.nn's words for a state of the wrong rank."""
    kind = "batched" if reading.batched else "unbatched"
    head = f"For {kind} {len(reading.shape)}-D input, hx"
    if len(states) == 1:
        return f"{head} should also be {rank}-D but got {states[0].dim()}-D tensor"
    if len(states) == 2:
        return (f"{head} and cx should also be {rank}-D but got ({states[0].dim()}-D, {states[1].dim()}-D) "
                "tensors")
    return None


def _state_message(module, label: str, s: Tensor, want: Tuple[int, ...], reading: InputReading) -> str:
    owner = module._describe()
    d = module.num_directions
    syms = [f"D*num_layers={d}*{module.num_layers}"]
    if reading.batched:
        syms.append(f"N={reading.batch}")
    syms += [f"{sym}={n}" for sym, n in zip(module._state_symbols(label), want[len(syms):])]
    msg = (
        f"{owner}: {label} has shape {shape_str(s.shape)} but expected {shape_str(want)} = ({', '.join(syms)}); "
        f"the input of shape {shape_str(reading.shape)} was {reading.describe()}"
    )
    # the user's batch matches the other axis: they meant the other layout
    if reading.batched and not reading.packed and s.dim() == len(want) and s.shape[1] != reading.batch:
        other = reading.shape[1] if reading.batch_first else reading.shape[0]
        if s.shape[1] == other:
            msg += (
                f". Fix: {label}'s batch size {s.shape[1]} matches input axis {1 if reading.batch_first else 0}; "
                f"if your input is laid out as {'(L, N, ...)' if reading.batch_first else '(N, L, ...)'}, "
                f"construct the layer with batch_first={not reading.batch_first}"
            )
    elif not reading.batched and s.dim() == len(want) + 1:
        msg += ". Fix: the input is unbatched (no N axis), so the state must be unbatched too"
    return msg


def cell_state_words(cls: str, i: int, count: int, s: Tensor, want: Tuple[int, ...], batched: bool) -> Optional[str]:
    """torch.nn's words for a cell's state ``i`` (of ``count``) of the wrong shape:
    its rank check, then ATen's batch and hidden-size checks on the state as
    torch.nn passes it (an unbatched input's state gains a leading axis)."""
    if s.dim() not in (1, 2):
        which = "hidden" if count == 1 else f"hx[{i}]"
        return f"{cls}: Expected {which} to be 1D or 2D, got {s.dim()}D instead"
    shape = tuple(s.shape) if batched else (1,) + tuple(s.shape)
    batch, size = (want[0] if batched else 1), want[-1]
    if shape[0] != batch:
        return f"Input batch size {batch} doesn't match hidden{i} batch size {shape[0]}"
    if len(shape) > 1 and shape[1] != size:
        return f"hidden{i} has inconsistent hidden_size: got {shape[1]}, expected {size}"
    return None


def check_lengths(module, lengths, reading: InputReading, device: torch.device) -> Tensor:
    """Validate ``lengths`` and return it as an int64 tensor on ``device``."""
    owner = module._describe()
    if isinstance(lengths, Tensor):
        if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
            raise RNNTypeError(f"{owner}: lengths must hold integers, got a tensor of dtype {lengths.dtype}")
        if lengths.dim() > 1:
            raise RNNShapeError(f"{owner}: lengths must be 1-D (N,), got shape {shape_str(lengths.shape)}")
        t = lengths.reshape(-1).to(device=device, dtype=torch.int64)
    elif isinstance(lengths, numbers.Integral) and not isinstance(lengths, bool):
        t = torch.tensor([int(lengths)], dtype=torch.int64, device=device)
    elif isinstance(lengths, (list, tuple)):
        bad = [v for v in lengths if isinstance(v, bool) or not isinstance(v, numbers.Integral)]
        if bad:
            raise RNNTypeError(f"{owner}: lengths must hold integers, got {bad[0]!r} of type {type(bad[0]).__name__}")
        t = torch.tensor([int(v) for v in lengths], dtype=torch.int64, device=device)
    else:
        raise RNNTypeError(f"{owner}: lengths must be a 1-D integer tensor or a list of ints, "
                           f"got {type(lengths).__name__}")
    if t.numel() != reading.batch:
        raise RNNShapeError(
            f"{owner}: lengths has {t.numel()} entries but the batch has N={reading.batch}; "
            f"the input of shape {shape_str(reading.shape)} was {reading.describe()}"
        )
    if t.numel() and not torch.compiler.is_compiling():  # the values are data: not checked while tracing
        lo, hi = int(t.min()), int(t.max())
        if lo < 0:
            raise RNNShapeError(f"{owner}: lengths must be >= 0, got {lo}")
        if hi > reading.seq_len:
            raise RNNShapeError(
                f"{owner}: lengths has {hi} but the sequence axis holds only L={reading.seq_len} steps; "
                f"the input of shape {shape_str(reading.shape)} was {reading.describe()}"
            )
    return t


# ----------------------------------------------------------------------------- forward-mode AD


FORWARD_AD_REASON = "forward-mode AD is active (a dual_level, torch.func.jvp, jacfwd or hessian) and the {} have no " \
    "forward-mode (jvp) formula"


def forward_ad_active() -> bool:
    """Whether forward-mode AD is on: inside ``torch.autograd.forward_ad.dual_level()``, or a
    ``torch.func.jvp`` / ``jacfwd`` / ``hessian`` (they open one). The fused and triton kernels have no
    forward-mode formula: an op without one drops a tangent silently where no input requires grad (and
    raises where one does), so they decline then and ``auto`` runs a backend that has one."""
    return _forward_ad._current_level >= 0


def kernel_mode_reason(x: Optional[Tensor], kernels: str) -> Optional[str]:
    """Why rnnkit's own kernels (``kernels``: "fused kernels", "triton kernels") cannot run ``x`` in the
    current mode, or None: forward-mode AD (they have no jvp formula) or CPU autocast's mixed precision (they
    compute in one dtype). Asked with an input only: building a module under either is fine."""
    if x is None:
        return None
    if forward_ad_active():
        return FORWARD_AD_REASON.format(kernels)
    if _autocast.mixed_active(x):
        return _autocast.MIXED_REASON.format(kernels)
    return None
