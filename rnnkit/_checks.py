"""Argument and shape checks. Every message says what was received, how it was
read (which axis was taken as sequence, batch, feature) and what was expected.

The layers, the cells and :func:`rnnkit.explain` share these functions, so an
explanation and an error use the same words.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor


def shape_str(shape: Sequence[int]) -> str:
    """``(3, 4)``; a one-axis shape keeps Python's trailing comma: ``(400,)``."""
    inner = ", ".join(str(int(s)) for s in shape)
    return f"({inner},)" if len(shape) == 1 else f"({inner})"


# ----------------------------------------------------------------------------- constructor


def check_positive_int(name: str, value, *, owner: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}: {name} must be a positive int, got {value!r} of type {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value}")
    return int(value)


def check_bool(name: str, value, *, owner: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be a bool, got {value!r} of type {type(value).__name__}")
    return value


def check_probability(name: str, value, *, owner: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:
        raise ValueError(
            f"{owner}: {name} must be a number in [0, 1] (the probability of an element being zeroed), got {value!r}"
        )
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


def read_input(module, x: Tensor, *, packed: bool = False) -> InputReading:
    """Read ``x`` (a tensor; a PackedSequence's padded, time-major form when
    ``packed``) against ``module``'s layout, or raise a ValueError that says
    how it was read and what was expected."""
    owner = module._describe()
    fsyms = module._feature_symbols()
    fnd = len(fsyms)
    batch_first = bool(getattr(module, "batch_first", False)) and not packed
    expected_b = layout_symbols(batch_first, True, fsyms)
    expected_u = layout_symbols(False, False, fsyms)
    if not isinstance(x, Tensor):
        raise TypeError(f"{owner}: input must be a Tensor or a PackedSequence, got {type(x).__name__}")
    if x.dim() == fnd + 2:
        batched = True
    elif x.dim() == fnd + 1 and not packed:
        batched = False
    else:
        raise ValueError(
            f"{owner}: input must be {fnd + 2}-D {_sym(expected_b)} (batched, batch_first={batch_first}) "
            f"or {fnd + 1}-D {_sym(expected_u)} (unbatched), got {x.dim()}-D input of shape {shape_str(x.shape)}"
        )
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
        raise ValueError(msg + (f". {hint}" if hint else ""))
    if reading.seq_len == 0:
        raise ValueError(
            f"{owner}: input of shape {shape_str(x.shape)} was {reading.describe()}; the sequence axis L is empty "
            "(at least one time step is needed)"
        )
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


def check_dtype_device(module, what: str, t: Tensor, ref: Tensor) -> None:
    if t.dtype != ref.dtype:
        owner = module._describe()
        raise TypeError(
            f"{owner}: {what} has dtype {t.dtype} but the parameters are {ref.dtype}. "
            f"Fix: convert the {what} with .to({ref.dtype}) or the module with .to({t.dtype})"
        )
    if t.device != ref.device:
        owner = module._describe()
        raise ValueError(
            f"{owner}: {what} is on device {t.device} but the parameters are on {ref.device}. "
            f"Fix: move the {what} with .to('{ref.device}') or the module with .to('{t.device}')"
        )


# ----------------------------------------------------------------------------- states


def split_states(owner, hx, labels: Sequence[str], single: str = "") -> Tuple:
    """``hx`` as a tuple with one entry per state (``labels``, e.g. ``("h_0", "c_0")``),
    or a TypeError that names the expected form. ``single`` qualifies the
    message for one-state cells (e.g. ``" h_0 for this layer"``)."""
    if len(labels) == 1:
        if isinstance(hx, (tuple, list)):
            raise TypeError(f"{owner}: hx must be a single Tensor{single}, got a {type(hx).__name__}")
        return (hx,)
    if not isinstance(hx, (tuple, list)) or len(hx) != len(labels):
        got = type(hx).__name__ if not isinstance(hx, (tuple, list)) else f"a {type(hx).__name__} of {len(hx)}"
        raise TypeError(f"{owner}: hx must be a tuple ({', '.join(labels)}), got {got}")
    return tuple(hx)


def check_states(module, hx, reading: InputReading, expected: Sequence[Tuple[int, ...]],
                 ref: Optional[Tensor]) -> Tuple[Tensor, ...]:
    """Check the user's initial state against ``expected`` (one batched shape per
    state tensor, e.g. ``[(D*num_layers, N, H_out), (D*num_layers, N, H)]``) and
    return it batched. An unbatched input takes states without the N axis.
    ``ref`` (a parameter) is what dtype and device are checked against; None
    checks shapes only."""
    owner = module._describe()
    names = module.cell_spec.state_names
    states = split_states(owner, hx, [f"{n}_0" for n in names], single=" h_0 for this layer")
    out = []
    for name, s, shape in zip(names, states, expected):
        label = f"{name}_0"
        if not isinstance(s, Tensor):
            raise TypeError(f"{owner}: {label} must be a Tensor, got {type(s).__name__}")
        want = tuple(shape) if reading.batched else tuple(shape[:1]) + tuple(shape[2:])
        if tuple(s.shape) != want:
            raise ValueError(_state_message(module, label, s, want, reading))
        if ref is not None:
            check_dtype_device(module, label, s, ref)
        out.append(s if reading.batched else s.unsqueeze(1))
    return tuple(out)


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


def check_lengths(module, lengths, reading: InputReading, device: torch.device) -> Tensor:
    """Validate ``lengths`` and return it as an int64 tensor on ``device``."""
    owner = module._describe()
    if isinstance(lengths, Tensor):
        if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
            raise TypeError(f"{owner}: lengths must hold integers, got a tensor of dtype {lengths.dtype}")
        if lengths.dim() > 1:
            raise ValueError(f"{owner}: lengths must be 1-D (N,), got shape {shape_str(lengths.shape)}")
        t = lengths.reshape(-1).to(device=device, dtype=torch.int64)
    elif isinstance(lengths, numbers.Integral) and not isinstance(lengths, bool):
        t = torch.tensor([int(lengths)], dtype=torch.int64, device=device)
    elif isinstance(lengths, (list, tuple)):
        bad = [v for v in lengths if isinstance(v, bool) or not isinstance(v, numbers.Integral)]
        if bad:
            raise TypeError(f"{owner}: lengths must hold integers, got {bad[0]!r} of type {type(bad[0]).__name__}")
        t = torch.tensor([int(v) for v in lengths], dtype=torch.int64, device=device)
    else:
        raise TypeError(f"{owner}: lengths must be a 1-D integer tensor or a list of ints, got {type(lengths).__name__}")
    if t.numel() != reading.batch:
        raise ValueError(
            f"{owner}: lengths has {t.numel()} entries but the batch has N={reading.batch}; "
            f"the input of shape {shape_str(reading.shape)} was {reading.describe()}"
        )
    if t.numel() and not torch.compiler.is_compiling():  # the values are data: not checked while tracing
        lo, hi = int(t.min()), int(t.max())
        if lo < 0:
            raise ValueError(f"{owner}: lengths must be >= 0, got {lo}")
        if hi > reading.seq_len:
            raise ValueError(
                f"{owner}: lengths has {hi} but the sequence axis holds only L={reading.seq_len} steps; "
                f"the input of shape {shape_str(reading.shape)} was {reading.describe()}"
            )
    return t
