"""rnnkit's exception classes.

``torch.nn``'s recurrent modules raise ``RuntimeError`` for most input mistakes
(a wrong ``h_0`` shape, a wrong feature size, an empty sequence, a cell's batch
mismatch) and ``ValueError`` or ``TypeError`` for a few others; rnnkit used to
raise ``ValueError`` or ``TypeError`` for all of them. The classes below are
both, so code written for either library keeps working::

    RNNInputError(ValueError, RuntimeError)    an argument does not fit the module
    ├── RNNShapeError                           a shape, size, rank or length is wrong
    ├── RNNDeviceError                          a tensor is on another device than the parameters
    └── RNNTypeError(TypeError, RNNInputError)  a dtype or the kind of an argument is wrong

``except RuntimeError`` (torch.nn code), ``except ValueError`` (rnnkit before
these classes) and ``except TypeError`` (rnnkit's dtype and ``hx``-structure
errors) all still catch what they caught. Each message starts with torch.nn's
own wording for the mistake, then says what rnnkit received, how it read each
axis, what it expected and, where one is clear, the fix.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["RNNInputError", "RNNShapeError", "RNNDeviceError", "RNNTypeError"]


class RNNInputError(ValueError, RuntimeError):
    """An argument (input, initial state, ``lengths``, a size) does not fit the module.

    A ``ValueError`` and a ``RuntimeError``: ``torch.nn`` raises ``RuntimeError``
    for most of these mistakes, rnnkit raised ``ValueError``."""


class RNNShapeError(RNNInputError):
    """A shape, size, rank or length does not fit: the input's feature axis, an
    empty sequence, ``h_0``/``c_0``'s shape, a cell's batch against its state,
    ``lengths`` against the batch, a negative cell size."""


class RNNDeviceError(RNNInputError):
    """A tensor (the input or a state) is on another device than the parameters."""


class RNNTypeError(TypeError, RNNInputError):
    """A tensor has another dtype than the parameters, or an argument is the wrong
    kind of object (``hx`` not a tuple of two tensors for an LSTM, ``lengths`` not
    integers). Also a ``TypeError``, which rnnkit raised for these before."""


def torch_words(words: Optional[str], detail: str) -> str:
    """``detail`` (rnnkit's explanation) after ``words`` (torch.nn's wording for the
    same mistake, or None where torch.nn has none)."""
    if not words:
        return detail
    return f"{words} {detail}" if words.endswith((".", "!")) else f"{words}. {detail}"


_SCALAR_NAMES = {
    torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
    torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble", torch.int64: "Long", torch.int32: "Int",
    torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte", torch.bool: "Bool",
}


def scalar_name(dtype: torch.dtype) -> str:
    """A dtype as ATen's messages name it: ``torch.float64`` -> ``Double``."""
    return _SCALAR_NAMES.get(dtype, str(dtype).replace("torch.", ""))
