"""Every error path: the exception class and how the message starts.

Where torch.nn refuses the same mistake, rnnkit raises an instance of torch.nn's
class (for torch.nn's RuntimeErrors: :class:`rnnkit.RNNInputError` and its
subclasses, which are also ValueErrors, rnnkit's class before) and its message
starts with torch.nn's own words, then says what was received, how each axis was
read and what was expected. The parity tables trigger each mistake on torch.nn
and on rnnkit (every backend) and compare live; the deliberate differences and
rnnkit's own checks are spelled out below them.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import rnnkit
from rnnkit import RNNDeviceError, RNNInputError, RNNShapeError, RNNTypeError

BACKENDS = ["reference", "torch", "fused", "auto"]
R = torch.randn


def meta(*shape):
    return torch.empty(*shape, device="meta")


def f64(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def raises(exc, start, fn, *parts):
    """``fn()`` raises an instance of ``exc`` whose message starts with ``start`` and
    contains each of ``parts``; returns the exception."""
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    assert msg.startswith(start), f"message does not start with {start!r}:\n{msg}"
    for part in parts:
        assert part in msg, f"{part!r} not in:\n{msg}"
    return info.value


def caught(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the point is to see what torch.nn raises
        return exc
    return None


# ----------------------------------------------------------------------------- the classes


def test_exception_classes():
    assert issubclass(RNNInputError, ValueError) and issubclass(RNNInputError, RuntimeError)
    for cls in (RNNShapeError, RNNDeviceError, RNNTypeError):
        assert issubclass(cls, RNNInputError)
    assert issubclass(RNNTypeError, TypeError)
    assert rnnkit.errors.RNNShapeError is RNNShapeError
    assert {"RNNInputError", "RNNShapeError", "RNNDeviceError", "RNNTypeError"} <= set(rnnkit.__all__)


@pytest.mark.parametrize("old", [ValueError, RuntimeError, RNNInputError, RNNShapeError])
def test_old_and_torch_except_clauses_still_catch(old):
    """Code written for rnnkit (``except ValueError``) or for torch.nn (``except RuntimeError``)."""
    try:
        rnnkit.GRU(10, 20)(R(5, 3, 10), R(1, 4, 20))
    except old as exc:
        assert str(exc).startswith("Expected hidden size (1, 3, 20), got [1, 4, 20]")
    else:  # pragma: no cover
        pytest.fail("no error")


@pytest.mark.parametrize("old", [TypeError, RuntimeError, ValueError])
def test_dtype_errors_are_type_errors_too(old):
    with pytest.raises(old):
        rnnkit.LSTM(3, 4)(f64(5, 2, 3))


# ----------------------------------------------------------------------------- parity: forward


def _st(name, *shape):
    return (R(*shape), R(*shape)) if name.startswith("LSTM") else R(*shape)


LAYER_MISTAKES = {
    "input-1d": lambda n: (R(10),),
    "input-4d": lambda n: (R(5, 3, 10, 1),),
    "features": lambda n: (R(5, 3, 5),),
    "features-unbatched": lambda n: (R(5, 5),),
    "empty-sequence": lambda n: (R(0, 3, 10),),
    "empty-sequence-unbatched": lambda n: (R(0, 10),),
    "input-dtype": lambda n: (f64(5, 3, 10),),
    "input-device": lambda n: (meta(5, 3, 10),),
    "h0-batch": lambda n: (R(5, 3, 10), _st(n, 1, 4, 20)),
    "h0-hidden": lambda n: (R(5, 3, 10), _st(n, 1, 3, 21)),
    "h0-layers": lambda n: (R(5, 3, 10), _st(n, 2, 3, 20)),
    "h0-2d-batched": lambda n: (R(5, 3, 10), _st(n, 3, 20)),
    "h0-3d-unbatched": lambda n: (R(5, 10), _st(n, 1, 1, 20)),
    "h0-unbatched-shape": lambda n: (R(5, 10), _st(n, 2, 20)),
    "h0-device": lambda n: (R(5, 3, 10), (R(1, 3, 20), meta(1, 3, 20)) if n == "LSTM" else meta(1, 3, 20)),
    "c0-batch": lambda n: (R(5, 3, 10), (R(1, 3, 20), R(1, 4, 20))) if n == "LSTM" else None,
    "c0-hidden": lambda n: (R(5, 3, 10), (R(1, 3, 20), R(1, 3, 21))) if n == "LSTM" else None,
    "hx-3-tuple": lambda n: (R(5, 3, 10), (R(1, 3, 20),) * 3) if n == "LSTM" else None,
    "packed-features": lambda n: (pack_padded_sequence(R(5, 3, 7), [5, 3, 2]),) if n != "LSTM" else None,
    "packed-h0": lambda n: (pack_padded_sequence(R(5, 3, 10), [5, 3, 2]), R(1, 4, 20)) if n != "LSTM" else None,
    "packed-dtype": lambda n: (pack_padded_sequence(f64(5, 3, 10), [5, 3, 2]),) if n != "LSTM" else None,
}

CELL_MISTAKES = {
    "input-3d": lambda n: (R(3, 2, 10),),
    "input-0d": lambda n: (torch.tensor(1.0),),
    "features": lambda n: (R(3, 11),),
    "features-unbatched": lambda n: (R(11),),
    "hidden-size": lambda n: (R(3, 10), _st(n, 3, 21)),
    "batch": lambda n: (R(3, 10), _st(n, 5, 20)),
    "hx-4d": lambda n: (R(3, 10), _st(n, 3, 1, 1, 20)),
    "hx-3d": lambda n: (R(3, 10), _st(n, 1, 3, 20)),
    "unbatched-input-batched-hx": lambda n: (R(10), _st(n, 1, 20)),
    "unbatched-input-batched-hx-3": lambda n: (R(10), _st(n, 3, 20)),
    "batched-input-unbatched-hx": lambda n: (R(3, 10), _st(n, 20)),
    "batch-1-unbatched-hx": lambda n: (R(1, 10), _st(n, 20)),
    "unbatched-hidden-size": lambda n: (R(10), _st(n, 21)),
    "input-dtype": lambda n: (f64(3, 10),),
    "hx-dtype": lambda n: (R(3, 10), (f64(3, 20), R(3, 20)) if n == "LSTMCell" else f64(3, 20)),
    "input-device": lambda n: (meta(3, 10),),
    "hx-device": lambda n: (R(3, 10), (meta(3, 20), R(3, 20)) if n == "LSTMCell" else meta(3, 20)),
    "c-hidden-size": lambda n: (R(3, 10), (R(3, 20), R(3, 21))) if n == "LSTMCell" else None,
    "c-batch": lambda n: (R(3, 10), (R(3, 20), R(5, 20))) if n == "LSTMCell" else None,
    "c-1d-batched": lambda n: (R(3, 10), (R(3, 20), R(20))) if n == "LSTMCell" else None,
    "hx-1-tuple": lambda n: (R(3, 10), (R(3, 20),)) if n == "LSTMCell" else None,
    "hx-3-tuple": lambda n: (R(3, 10), (R(3, 20),) * 3) if n == "LSTMCell" else None,
}


def _cases(names, table):
    return [pytest.param(n, k, id=f"{n}-{k}") for n in names for k, make in table.items() if make(n) is not None]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,mistake", _cases(["RNN", "LSTM", "GRU"], LAYER_MISTAKES) +
                         _cases(["RNNCell", "LSTMCell", "GRUCell"], CELL_MISTAKES))
def test_forward_error_matches_torch_nn(name, mistake, backend):
    """The same mistake on torch.nn and on rnnkit: rnnkit's exception is an instance of
    torch.nn's class and its message starts with torch.nn's message."""
    table = CELL_MISTAKES if name.endswith("Cell") else LAYER_MISTAKES
    torch.manual_seed(0)
    args = table[mistake](name)
    theirs = caught(lambda: getattr(nn, name)(10, 20)(*args))
    assert theirs is not None, "torch.nn accepts this: not a mistake"
    exc = raises(type(theirs), str(theirs), lambda: getattr(rnnkit, name)(10, 20, backend=backend)(*args))
    assert isinstance(exc, RNNInputError)


def test_layer_messages_go_on_with_rnnkits_explanation():
    exc = raises(RuntimeError, "Expected hidden size (1, 3, 20), got [1, 4, 20]. GRU(input_size=10, hidden_size=20): "
                 "h_0 has shape (1, 4, 20) but expected (1, 3, 20) = (D*num_layers=1*1, N=3, H_out=20); the input "
                 "of shape (5, 3, 10) was read as (L=5, N=3, H_in=10) [batch_first=False]",
                 lambda: rnnkit.GRU(10, 20)(R(5, 3, 10), R(1, 4, 20)))
    assert type(exc) is RNNShapeError


def test_cell_messages_go_on_with_rnnkits_explanation():
    raises(RNNShapeError, "Input batch size 3 doesn't match hidden0 batch size 4. RNNCell(input_size=10, "
           "hidden_size=20): h has shape (4, 20) but expected (3, 20) = (N=3, H=20) for an input of shape (3, 10)",
           lambda: rnnkit.RNNCell(10, 20)(R(3, 10), R(4, 20)))


# ----------------------------------------------------------------------------- parity: constructor


LAYER_CONFIGS = [
    dict(input_size=0), dict(input_size=-1), dict(hidden_size=0), dict(hidden_size=-2), dict(num_layers=0),
    dict(num_layers=-1), dict(hidden_size=2.5), dict(input_size=2.0), dict(input_size="10"), dict(dropout=1.5),
    dict(dropout="0.1"), dict(dropout=True), dict(dropout=-0.1), dict(bias=1), dict(bias="True"), dict(bias=0),
    dict(batch_first="yes"), dict(batch_first=0), dict(proj_size=-1), dict(proj_size=20), dict(proj_size=25),
    dict(proj_size=2),
]


@pytest.mark.parametrize("name", ["RNN", "LSTM", "GRU"])
@pytest.mark.parametrize("kwargs", LAYER_CONFIGS, ids=lambda kw: "-".join(f"{k}={v!r}" for k, v in kw.items()))
def test_constructor_error_matches_torch_nn(name, kwargs):
    args = dict(input_size=10, hidden_size=20, **kwargs) if "input_size" not in kwargs and "hidden_size" not in \
        kwargs else {**dict(input_size=10, hidden_size=20), **kwargs}
    theirs = caught(lambda: getattr(nn, name)(**args))
    if theirs is None:  # torch.nn takes it (an LSTM's proj_size=2): so does rnnkit
        getattr(rnnkit, name)(**args)
    else:
        raises(type(theirs), str(theirs), lambda: getattr(rnnkit, name)(**args))


@pytest.mark.parametrize("name", ["RNNCell", "LSTMCell", "GRUCell"])
@pytest.mark.parametrize("sizes", [(10, -1), (-1, 20), (-2, -3)])
def test_negative_cell_size_matches_torch_nn(name, sizes):
    """A negative size: torch.nn's RuntimeError when it creates weight_ih."""
    theirs = caught(lambda: getattr(nn, name)(*sizes))
    exc = raises(RuntimeError, str(theirs), lambda: getattr(rnnkit, name)(*sizes),
                 f"{name}: input_size and hidden_size must be >= 0")
    assert isinstance(exc, RNNShapeError)


# ----------------------------------------------------------------------------- deliberate differences


def test_layer_state_dtype_uses_atens_words():
    """torch.nn's CPU path trips over a state of another dtype inside its kernels
    ('mat1 and mat2 must have the same dtype', or oneDNN's 'get_mkldnn_dtype:
    unsupported data type' for the LSTM); rnnkit uses ATen's own words for it."""
    for name, hx in [("GRU", f64(1, 3, 20)), ("LSTM", (R(1, 3, 20), f64(1, 3, 20)))]:
        assert isinstance(caught(lambda: getattr(nn, name)(10, 20)(R(5, 3, 10), hx)), RuntimeError)
        exc = raises(RuntimeError, "Input and hidden tensors are not the same dtype, found input tensor with Float "
                     "and hidden tensor with Double.", lambda: getattr(rnnkit, name)(10, 20)(R(5, 3, 10), hx),
                     "has dtype torch.float64 but the parameters are torch.float32")
        assert isinstance(exc, RNNTypeError) and isinstance(exc, TypeError)


def test_packed_lstm_uses_the_rnn_and_gru_words():
    """torch.nn's LSTM skips its checks for a PackedSequence without a state and
    fails in its kernels; rnnkit's LSTM says what torch.nn's RNN and GRU say."""
    lstm = rnnkit.LSTM(10, 20)
    raises(RNNShapeError, "input.size(-1) must be equal to input_size. Expected 10, got 7.",
           lambda: lstm(pack_padded_sequence(R(5, 3, 7), [5, 3, 2])))
    raises(RNNShapeError, "Expected hidden[0] size (1, 3, 20), got [1, 4, 20].",
           lambda: lstm(pack_padded_sequence(R(5, 3, 10), [5, 3, 2]), (R(1, 4, 20), R(1, 4, 20))))
    raises(RNNTypeError, "RNN input dtype (torch.float64) does not match weight dtype (torch.float32).",
           lambda: lstm(pack_padded_sequence(f64(5, 3, 10), [5, 3, 2])))


def test_lstm_cell_state_device():
    """torch.nn's words for a cell's device mismatch name the two devices in an order
    that depends on which tensor is off; rnnkit names the parameters' device first."""
    raises(RNNDeviceError, "Tensor on device cpu is not on the expected device meta! LSTMCell(input_size=10, "
           "hidden_size=20): c is on device meta but the parameters are on cpu",
           lambda: rnnkit.LSTMCell(10, 20)(R(3, 10), (R(3, 20), meta(3, 20))))


@pytest.mark.parametrize("name,args,start", [
    # torch.nn: IndexError (indexes the tensor as if it were a tuple)
    ("LSTM", (R(5, 3, 10), R(1, 3, 20)), "LSTM(input_size=10, hidden_size=20): hx must be a tuple (h_0, c_0), got "
                                         "Tensor"),
    # torch.nn: IndexError
    ("LSTM", (R(5, 3, 10), (R(1, 3, 20),)), "lstm expects two hidden states. LSTM(input_size=10, hidden_size=20): "
                                            "hx must be a tuple (h_0, c_0), got a tuple of 1"),
    # torch.nn: AttributeError ('tuple' object has no attribute 'dim')
    ("GRU", (R(5, 3, 10), (R(1, 3, 20),)), "GRU(input_size=10, hidden_size=20): hx must be a single Tensor h_0 for "
                                           "this layer, got a tuple"),
    ("RNN", (R(5, 3, 10), [R(1, 3, 20)]), "RNN(input_size=10, hidden_size=20): hx must be a single Tensor h_0 for "
                                          "this layer, got a list"),
    ("RNNCell", (R(3, 10), (R(3, 20),)), "RNNCell(input_size=10, hidden_size=20): hx must be a single Tensor, got a "
                                         "tuple"),
    # torch.nn: TypeError from the op's argument parser
    ("LSTMCell", (R(3, 10), R(3, 20)), "LSTMCell(input_size=10, hidden_size=20): hx must be a tuple (h, c), got "
                                       "Tensor"),
    # torch.nn: AttributeError ('list' object has no attribute 'dim')
    ("LSTM", ([[1.0] * 10],), "LSTM(input_size=10, hidden_size=20): input must be a Tensor or a PackedSequence, got "
                              "list"),
    ("GRUCell", ([1.0] * 10,), "GRUCell(input_size=10, hidden_size=20): input must be a Tensor, got list"),
    ("LSTM", (R(5, 3, 10), (R(1, 3, 20), [1.0])), "LSTM(input_size=10, hidden_size=20): c_0 must be a Tensor, got "
                                                  "list"),
    ("LSTMCell", (R(3, 10), (R(3, 20), None)), "LSTMCell(input_size=10, hidden_size=20): c must be a Tensor, got "
                                               "NoneType"),
])
def test_wrong_kind_of_argument_is_an_rnn_type_error(name, args, start):
    """Where torch.nn fails by accident (IndexError, AttributeError, its argument
    parser), rnnkit raises an RNNTypeError (a TypeError) saying what it expected."""
    exc = raises(RNNTypeError, start, lambda: getattr(rnnkit, name)(10, 20)(*args))
    assert isinstance(exc, TypeError)


@pytest.mark.parametrize("kwargs,exc,start", [
    (dict(nonlinearity="swish2"), ValueError, "Unknown nonlinearity 'swish2'. RNN: nonlinearity must be one of ["),
    (dict(dropout=None), TypeError, "dropout should be a number in range [0, 1] representing the probability of an "
                                    "element being zeroed. RNN: dropout must be a number in [0, 1]"),
    (dict(num_layers=True), TypeError, "num_layers should be of type int, got: bool. RNN: num_layers must be a "
                                       "positive int, got True of type bool"),
    (dict(num_layers=2.0), TypeError, "num_layers should be of type int, got: float."),
    (dict(bidirectional=None), TypeError, "RNN: bidirectional must be a bool, got None of type NoneType"),
    (dict(bidirectional=1), TypeError, "RNN: bidirectional must be a bool, got 1 of type int"),
    (dict(proj_size=1.5), ValueError, "proj_size argument is only supported for LSTM, not RNN or GRU. RNN: "
                                      "proj_size is only supported by LSTM (got proj_size=1.5)"),
])
def test_constructor_errors_where_torch_fails_later_or_by_accident(kwargs, exc, start):
    """torch.nn accepts these when built and fails when run (or fails in float()/
    torch.empty); rnnkit refuses them when built, with the same class."""
    assert isinstance(caught(lambda: nn.RNN(10, 20, **kwargs)(R(5, 3, 10))), exc)
    raises(exc, start, lambda: rnnkit.RNN(10, 20, **kwargs))


def test_cell_unknown_nonlinearity_fails_when_built():
    """torch.nn.RNNCell takes any nonlinearity and raises RuntimeError('Unknown
    nonlinearity: nope') when run; rnnkit refuses it when built, with the same words
    and an exception that is a RuntimeError (and a ValueError)."""
    assert str(caught(lambda: nn.RNNCell(10, 20, nonlinearity="nope")(R(3, 10)))) == "Unknown nonlinearity: nope"
    exc = raises(RuntimeError, "Unknown nonlinearity: nope. RNNCell: nonlinearity must be one of [",
                 lambda: rnnkit.RNNCell(10, 20, nonlinearity="nope"))
    assert isinstance(exc, ValueError)


@pytest.mark.parametrize("name", ["RNNCell", "LSTMCell", "GRUCell"])
@pytest.mark.parametrize("args,start", [((10, 2.5), "hidden_size should be of type int, got: float. {name}: "
                                                    "hidden_size must be an int, got 2.5 of type float"),
                                        ((10.0, 20), "input_size should be of type int, got: float.")])
def test_cell_size_of_the_wrong_type(name, args, start):
    """torch.nn: a TypeError from torch.empty; rnnkit: a TypeError in the layers' words."""
    assert isinstance(caught(lambda: getattr(nn, name)(*args)), TypeError)
    raises(TypeError, start.format(name=name), lambda: getattr(rnnkit, name)(*args))


def test_lstm_proj_size_of_the_wrong_type():
    assert isinstance(caught(lambda: nn.LSTM(10, 20, proj_size=1.5)), TypeError)
    raises(TypeError, "LSTM: proj_size must be an int, got 1.5", lambda: rnnkit.LSTM(10, 20, proj_size=1.5))


# ----------------------------------------------------------------------------- accepted beyond torch.nn


def test_intentional_extensions_are_accepted():
    """README, differences from torch.nn: lengths with 0 entries, more nonlinearities,
    proj_size=0 spelled out for RNN and GRU."""
    out, h = rnnkit.GRU(3, 4)(R(5, 2, 3), lengths=[0, 5])
    assert torch.equal(h[:, 0], torch.zeros(1, 4)) and torch.equal(out[:, 0], torch.zeros(5, 4))
    assert caught(lambda: nn.RNN(3, 4, nonlinearity="gelu")) is not None
    rnnkit.RNN(3, 4, nonlinearity="gelu")(R(5, 2, 3))
    assert caught(lambda: nn.GRU(3, 4, proj_size=0)) is not None
    rnnkit.GRU(3, 4, proj_size=0)
    rnnkit.RNN(3, 4, proj_size=0)


def test_sizes_given_as_bools_count_as_ints_like_torch_nn():
    assert rnnkit.LSTM(True, 4).input_size == nn.LSTM(True, 4).input_size == 1
    assert rnnkit.GRUCell(True, 4)(R(2, 1)).shape == (2, 4)


# ----------------------------------------------------------------------------- rnnkit's own checks: constructor


@pytest.mark.parametrize("cls", [rnnkit.RNN, rnnkit.LSTM, rnnkit.GRU])
@pytest.mark.parametrize("kwargs,exc,start", [
    (dict(hidden_size=0), ValueError, "hidden_size must be greater than zero. {n}: hidden_size must be a positive "
                                      "int, got 0"),
    (dict(hidden_size=2.5), TypeError, "hidden_size should be of type int, got: float. {n}: hidden_size must be a "
                                       "positive int, got 2.5 of type float"),
    (dict(input_size=-1), ValueError, "input_size must be greater than zero. {n}: input_size must be a positive int, "
                                      "got -1"),
    (dict(num_layers=0), ValueError, "num_layers must be greater than zero. {n}: num_layers must be a positive int, "
                                     "got 0"),
    (dict(num_layers=True), TypeError, "num_layers should be of type int, got: bool. {n}: num_layers must be a "
                                       "positive int, got True of type bool"),
    (dict(dropout=1.5), ValueError, "dropout should be a number in range [0, 1] representing the probability of an "
                                    "element being zeroed. {n}: dropout must be a number in [0, 1] (the probability "
                                    "of an element being zeroed), got 1.5"),
    (dict(dropout="0.1"), ValueError, "dropout should be a number in range [0, 1]"),
    (dict(bias=1), TypeError, "bias should be of type bool, got: int. {n}: bias must be a bool, got 1 of type int"),
    (dict(batch_first="yes"), TypeError, "batch_first should be of type bool, got: str. {n}: batch_first must be a "
                                         "bool"),
    (dict(bidirectional=None), TypeError, "{n}: bidirectional must be a bool"),
    (dict(backend="cudnn"), ValueError, "{n}: backend must be one of ['auto', 'reference', 'torch', 'fused', "
                                        "'triton'], got 'cudnn'"),
])
def test_constructor_rejects(cls, kwargs, exc, start):
    args = dict(input_size=3, hidden_size=4)
    args.update(kwargs)
    raises(exc, start.format(n=cls.__name__), lambda: cls(**args))


def test_proj_size_errors():
    raises(ValueError, "proj_size should be a positive integer or zero to disable projections. LSTM: proj_size must "
           "be >= 0 (0 disables the projection), got -1", lambda: rnnkit.LSTM(3, 4, proj_size=-1))
    raises(ValueError, "proj_size has to be smaller than hidden_size. LSTM: proj_size must be smaller than "
           "hidden_size, got proj_size=4 and hidden_size=4", lambda: rnnkit.LSTM(3, 4, proj_size=4))
    raises(ValueError, "proj_size argument is only supported for LSTM, not RNN or GRU. GRU: proj_size is only "
           "supported by LSTM (got proj_size=2)", lambda: rnnkit.GRU(3, 4, proj_size=2))
    raises(ValueError, "proj_size argument is only supported for LSTM, not RNN or GRU. RNN: proj_size is only "
           "supported by LSTM", lambda: rnnkit.RNN(3, 4, proj_size=2))
    raises(TypeError, "LSTM: proj_size must be an int, got 1.5", lambda: rnnkit.LSTM(3, 4, proj_size=1.5))


def test_unknown_nonlinearity():
    raises(ValueError, "Unknown nonlinearity 'swish2'. RNN: nonlinearity must be one of [",
           lambda: rnnkit.RNN(3, 4, nonlinearity="swish2"), "'relu'", "'tanh'", "or a callable, got 'swish2'")
    raises(RuntimeError, "Unknown nonlinearity: nope. RNNCell: nonlinearity must be one of",
           lambda: rnnkit.RNNCell(3, 4, nonlinearity="nope"))
    raises(ValueError, "Unknown nonlinearity 'swish'. IndRNN: nonlinearity must be one of",
           lambda: rnnkit.IndRNN(3, 4, nonlinearity="swish"))


def test_backend_that_cannot_run_the_configuration():
    raises(ValueError, "RNN(input_size=3, hidden_size=4): backend='torch' cannot run this configuration: PyTorch "
           "has no fused op for the 'rnn_gelu' cell. Use backend='auto'",
           lambda: rnnkit.RNN(3, 4, nonlinearity="gelu", backend="torch"))
    raises(ValueError, "RNNCell: backend='torch' cannot run this cell: PyTorch has no fused op for the",
           lambda: rnnkit.RNNCell(3, 4, nonlinearity=torch.sin, backend="torch"))
    raises(ValueError, "RNNCell: backend must be one of ['auto', 'reference', 'torch', 'fused'] for a cell, got "
           "'cuda'", lambda: rnnkit.RNNCell(3, 4, backend="cuda"))
    raises(ValueError, "LayerNormLSTMCell: backend='fused' cannot run this cell: no fused kernel for the",
           lambda: rnnkit.LayerNormLSTMCell(3, 4, backend="fused"))


def test_backend_that_cannot_run_the_input():
    pytest.importorskip("rnnkit.fused")
    if rnnkit.backends.why_not("fused", rnnkit.GRU(3, 4)) is not None:
        pytest.skip("fused backend unavailable")
    raises(ValueError, "GRU(input_size=3, hidden_size=4): backend='fused' cannot run this configuration: the fused "
           "kernels run float32, float64 and bfloat16, got parameters of dtype torch.float16",
           lambda: rnnkit.GRU(3, 4, backend="fused").half()(R(5, 2, 3).half()))
    raises(ValueError, "GRUCell(input_size=3, hidden_size=4): backend='fused' cannot run this input: the fused "
           "kernels run float32, float64 and bfloat16, got parameters of dtype torch.float16", lambda: rnnkit.GRUCell(3, 4, backend="fused").half()(R(2, 3).half()))


def test_regularizer_errors():
    raises(ValueError, "LSTM: zoneout must be a number in [0, 1) (the probability that a unit of h keeps its "
           "previous value), got 1.0", lambda: rnnkit.LSTM(3, 4, zoneout=1.0))
    raises(TypeError, "GRU: weight_drop must be a number in [0, 1) (the probability of zeroing an element of "
           "weight_hh), got '0.1' of type str", lambda: rnnkit.GRU(3, 4, weight_drop="0.1"))
    raises(ValueError, "RecurrentBase: zoneout_cell is only for layers with a cell state (LSTMs)",
           lambda: rnnkit.layers.RecurrentBase(rnnkit.functional.GRU_SPEC, 3, 4, zoneout_cell=0.1))
    raises(ValueError, "RecurrentBase: recurrent_dropout is not supported by the 'rnn_tanh' cell",
           lambda: rnnkit.layers.RecurrentBase(rnnkit.functional.rnn_spec("tanh"), 3, 4, recurrent_dropout=0.1))


def test_zoo_constructor_errors():
    raises(ValueError, "IndRNN: recurrent_max_abs must be None (no clamping) or a positive number",
           lambda: rnnkit.IndRNN(3, 4, recurrent_max_abs=0))
    raises(ValueError, "LayerNormLSTM: layer_norm_eps must be a positive number (added to the variance), got 0",
           lambda: rnnkit.LayerNormLSTM(3, 4, layer_norm_eps=0))
    raises(TypeError, "MinLSTM: parallel must be a bool, got 'yes'", lambda: rnnkit.MinLSTM(3, 4, parallel="yes"))
    raises(ValueError, "ConvLSTM2d: kernel_size must be a positive int or a tuple of 2 positive ints",
           lambda: rnnkit.ConvLSTM2d(3, 4, kernel_size=(3, 3, 3)))
    raises(ValueError, "ConvGRU1d: kernel_size must be positive, got (0,)", lambda: rnnkit.ConvGRU1d(3, 4, 0))
    raises(TypeError, "ConvLSTM2d: kernel_size must be a positive int or a tuple of 2 positive ints, got True",
           lambda: rnnkit.ConvLSTM2d(3, 4, kernel_size=True))
    raises(TypeError, "ConvLSTM2d: peephole must be a bool, got 1", lambda: rnnkit.ConvLSTM2d(3, 4, 3, peephole=1))
    raises(ValueError, "hidden_size must be greater than zero. PeepholeLSTMCell: hidden_size must be a positive int",
           lambda: rnnkit.PeepholeLSTMCell(3, 0))


def test_dropout_with_one_layer_warns_like_torch():
    with pytest.warns(UserWarning) as record:
        rnnkit.LSTM(3, 4, dropout=0.5)
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        nn.LSTM(3, 4, dropout=0.5)
    assert str(record[0].message) == str(theirs[0].message)


# ----------------------------------------------------------------------------- rnnkit's own checks: input


def test_wrong_rank_names_the_layout():
    raises(RNNShapeError, "LSTM: Expected input to be 2D or 3D, got 1D instead. LSTM(input_size=3, hidden_size=4): "
           "input must be 3-D (L, N, H_in) (batched, batch_first=False) or 2-D (L, H_in) (unbatched), got 1-D input "
           "of shape (3,)", lambda: rnnkit.LSTM(3, 4)(R(3)))
    raises(RNNShapeError, "GRU: Expected input to be 2D or 3D, got 4D instead. GRU(input_size=3, hidden_size=4): "
           "input must be 3-D (N, L, H_in) (batched, batch_first=True)",
           lambda: rnnkit.GRU(3, 4, batch_first=True)(R(2, 3, 4, 3)))
    raises(RNNShapeError, "RNN: Expected input to be 2D or 3D, got 4D tensor instead.",
           lambda: rnnkit.RNN(3, 4)(R(2, 3, 4, 3)))


def test_wrong_feature_size_says_how_the_input_was_read():
    raises(RNNShapeError, "input.size(-1) must be equal to input_size. Expected 50, got 40. LSTM(input_size=50, "
           "hidden_size=100): input of shape (10, 3, 40) was read as (L=10, N=3, H_in=40) [batch_first=False]; its "
           "feature axis (the last, H_in=40) must equal input_size=50. Fix: give the input 50 features on its last "
           "axis, or construct the layer with input_size=40", lambda: rnnkit.LSTM(50, 100)(R(10, 3, 40)))
    raises(RNNShapeError, "input.size(-1) must be equal to input_size. Expected 50, got 40. GRU(input_size=50, "
           "hidden_size=8): input of shape (10, 3, 40) was read as (N=10, L=3, H_in=40) [batch_first=True]",
           lambda: rnnkit.GRU(50, 8, batch_first=True)(R(10, 3, 40)))
    raises(RNNShapeError, "input.size(-1) must be equal to input_size. Expected 3, got 2. RNN(input_size=3, "
           "hidden_size=4): input of shape (5, 2) was read as (L=5, H_in=2) [unbatched]",
           lambda: rnnkit.RNN(3, 4)(R(5, 2)))


def test_wrong_feature_size_suggests_moving_the_feature_axis():
    # channels-first data (N, C, L): the feature axis is in the middle
    raises(RNNShapeError, "input.size(-1) must be equal to input_size. Expected 28, got 20.",
           lambda: rnnkit.LSTM(28, 64, batch_first=True)(R(8, 28, 20)),
           "Fix: axis 1 has size 28 = input_size; if that is your feature axis, move it last, e.g. x.transpose(1, 2)")


def test_empty_sequence_axis():
    raises(RNNShapeError, "Expected sequence length to be larger than 0 in RNN. LSTM(input_size=3, hidden_size=4): "
           "input of shape (0, 2, 3) was read as (L=0, N=2, H_in=3) [batch_first=False]; the sequence axis L is "
           "empty (at least one time step is needed)", lambda: rnnkit.LSTM(3, 4)(R(0, 2, 3)))


def test_dtype_and_device_mismatch_input():
    raises(RNNTypeError, "RNN input dtype (torch.float64) does not match weight dtype (torch.float32). Convert "
           "input: input.to(torch.float32), or convert model: model.to(torch.float64). LSTM(input_size=3, "
           "hidden_size=4): input has dtype torch.float64 but the parameters are torch.float32. Fix: convert the "
           "input with .to(torch.float32) or the module with .to(torch.float64)",
           lambda: rnnkit.LSTM(3, 4)(f64(5, 2, 3)))
    raises(RNNDeviceError, "Input and parameter tensors are not at the same device, found input tensor at meta and "
           "parameter tensor at cpu. GRU(input_size=3, hidden_size=4): input is on device meta but the parameters "
           "are on cpu", lambda: rnnkit.GRU(3, 4)(meta(5, 2, 3)))
    raises(RNNTypeError, "mat1 and mat2 must have the same dtype, but got Double and Float. GRUCell(input_size=3, "
           "hidden_size=4): input has dtype torch.float64", lambda: rnnkit.GRUCell(3, 4)(f64(2, 3)))
    raises(RNNDeviceError, "Tensor on device cpu is not on the expected device meta! RNNCell(input_size=3, "
           "hidden_size=4): input is on device meta", lambda: rnnkit.RNNCell(3, 4)(meta(2, 3)))


# ----------------------------------------------------------------------------- rnnkit's own checks: states


def test_hx_wrong_shape_says_expected_and_meaning():
    raises(RNNShapeError, "Expected hidden size (2, 2, 4), got [1, 2, 4]. GRU(input_size=3, hidden_size=4, "
           "num_layers=2): h_0 has shape (1, 2, 4) but expected (2, 2, 4) = (D*num_layers=1*2, N=2, H_out=4); the "
           "input of shape (5, 2, 3) was read as (L=5, N=2, H_in=3) [batch_first=False]",
           lambda: rnnkit.GRU(3, 4, num_layers=2)(R(5, 2, 3), R(1, 2, 4)))


def test_hx_batch_matches_other_axis_suggests_batch_first():
    raises(RNNShapeError, "Expected hidden[0] size (1, 10, 64), got [1, 32, 64].",
           lambda: rnnkit.LSTM(28, 64)(R(32, 10, 28), (torch.zeros(1, 32, 64), torch.zeros(1, 32, 64))),
           "Fix: h_0's batch size 32 matches input axis 0; if your input is laid out as (N, L, ...), construct the "
           "layer with batch_first=True")


def test_lstm_c0_wrong_shape_with_projection():
    raises(RNNShapeError, "Expected hidden[1] size (1, 2, 6), got [1, 2, 2]. LSTM(input_size=3, hidden_size=6, "
           "proj_size=2): c_0 has shape (1, 2, 2) but expected (1, 2, 6) = (D*num_layers=1*1, N=2, H=6)",
           lambda: rnnkit.LSTM(3, 6, proj_size=2)(R(5, 2, 3), (torch.zeros(1, 2, 2), torch.zeros(1, 2, 2))))


def test_state_of_the_wrong_rank():
    raises(RNNShapeError, "For unbatched 2-D input, hx should also be 2-D but got 3-D tensor. RNN(input_size=3, "
           "hidden_size=4): h_0 has shape (1, 1, 4) but expected (1, 4)", lambda: rnnkit.RNN(3, 4)(R(5, 3),
                                                                                                torch.zeros(1, 1, 4)),
           "Fix: the input is unbatched (no N axis), so the state must be unbatched too")
    raises(RNNShapeError, "For batched 3-D input, hx and cx should also be 3-D but got (2-D, 3-D) tensors.",
           lambda: rnnkit.LSTM(3, 4)(R(5, 2, 3), (R(2, 4), R(1, 2, 4))))


def test_hx_dtype_and_device_mismatch():
    raises(RNNTypeError, "Input and hidden tensors are not the same dtype, found input tensor with Float and hidden "
           "tensor with Double. RNN(input_size=3, hidden_size=4): h_0 has dtype torch.float64 but the parameters are "
           "torch.float32", lambda: rnnkit.RNN(3, 4)(R(5, 2, 3), torch.zeros(1, 2, 4, dtype=torch.float64)))
    raises(RNNDeviceError, "Input and hidden tensors are not at the same device, found input tensor at cpu and "
           "hidden tensor at meta. RNN(input_size=3, hidden_size=4): h_0 is on device meta",
           lambda: rnnkit.RNN(3, 4)(R(5, 2, 3), meta(1, 2, 4)))
    raises(RNNTypeError, "mat1 and mat2 must have the same dtype, but got Double and Float. LSTMCell(input_size=3, "
           "hidden_size=4): c has dtype torch.float64", lambda: rnnkit.LSTMCell(3, 4)(R(2, 3), (R(2, 4), f64(2, 4))))


def test_cell_state_errors():
    cell = rnnkit.LSTMCell(3, 4)
    raises(RNNShapeError, "LSTMCell: Expected input to be 1D or 2D, got 3D instead. LSTMCell(input_size=3, "
           "hidden_size=4): input must be 2-D (N, H_in) or 1-D (H_in,) unbatched, got 3-D",
           lambda: cell(R(2, 2, 3)))
    raises(RNNShapeError, "input has inconsistent input_size: got 5 expected 3. LSTMCell(input_size=3, hidden_size=4): "
           "input of shape (2, 5) was read as (N=2, H_in=5); its feature axis (the last) must equal input_size=3",
           lambda: cell(R(2, 5)))
    raises(RNNShapeError, "Input batch size 2 doesn't match hidden1 batch size 3. LSTMCell(input_size=3, "
           "hidden_size=4): c has shape (3, 4) but expected (2, 4) = (N=2, H=4)",
           lambda: cell(R(2, 3), (torch.zeros(2, 4), torch.zeros(3, 4))))
    raises(RNNShapeError, "LSTMCell: Expected hx[1] to be 1D or 2D, got 3D instead.",
           lambda: cell(R(2, 3), (torch.zeros(2, 4), torch.zeros(1, 2, 4))))
    raises(RNNTypeError, "lstm_cell expects two hidden states. LSTMCell(input_size=3, hidden_size=4): hx must be a "
           "tuple (h, c), got a tuple of 3", lambda: cell(R(2, 3), (torch.zeros(2, 4),) * 3))
    raises(RNNShapeError, "GRUCell: Expected hidden to be 1D or 2D, got 3D instead.",
           lambda: rnnkit.GRUCell(3, 4)(R(2, 3), torch.zeros(1, 2, 4)))


def test_zoo_cell_errors():
    """The zoo cells have no torch.nn twin: rnnkit's words, the same classes."""
    raises(RNNShapeError, "input has inconsistent input_size: got 5 expected 3. LayerNormLSTMCell(input_size=3, "
           "hidden_size=4): input of shape (2, 5)", lambda: rnnkit.LayerNormLSTMCell(3, 4)(R(2, 5)))
    raises(RNNShapeError, "Input batch size 2 doesn't match hidden0 batch size 3. PeepholeLSTMCell(",
           lambda: rnnkit.PeepholeLSTMCell(3, 4)(R(2, 3), (R(3, 4), R(3, 4))))
    conv = rnnkit.ConvLSTM2dCell(3, 4, 3)
    raises(RNNShapeError, "ConvLSTM2dCell(input_size=3, hidden_size=4, kernel_size=(3, 3)): input of shape "
           "(2, 5, 6, 6) was read as (N=2, C=5, H=6, W=6); its channel axis C must equal input_size=3",
           lambda: conv(R(2, 5, 6, 6)))
    raises(RNNShapeError, "ConvLSTM2dCell(input_size=3, hidden_size=4, kernel_size=(3, 3)): input must be 4-D "
           "(N, C, H, W) or 3-D (C, H, W) unbatched, got 2-D", lambda: conv(R(2, 3)))
    raises(RNNShapeError, "ConvLSTM2dCell(input_size=3, hidden_size=4, kernel_size=(3, 3)): h has shape "
           "(2, 4, 5, 6) but expected (2, 4, 6, 6)", lambda: conv(R(2, 3, 6, 6), (R(2, 4, 5, 6), R(2, 4, 6, 6))))
    raises(RNNShapeError, "ConvLSTM2dCell(input_size=3, hidden_size=4, kernel_size=(3, 3)): input of shape "
           "(2, 3, 0, 6) was read as (N=2, C=3, H=0, W=6); its spatial size (0, 6) has an empty axis",
           lambda: conv(R(2, 3, 0, 6)))
    raises(RNNTypeError, "ConvLSTM2dCell(input_size=3, hidden_size=4, kernel_size=(3, 3)): input must be a Tensor",
           lambda: conv("x"))
    peep = rnnkit.ConvLSTM2dCell(3, 4, 3, peephole=True, peephole_shape=(4, 5))
    raises(RNNShapeError, "ConvLSTM2dCell(input_size=3, hidden_size=4, kernel_size=(3, 3)): input of shape "
           "(2, 3, 5, 5) was read as (N=2, C=3, H=5, W=5); the state's spatial size would be (5, 5)",
           lambda: peep(R(2, 3, 5, 5)))


def test_zoo_layer_errors():
    raises(RNNShapeError, "input.size(-1) must be equal to input_size. Expected 3, got 4. MinGRU(input_size=3, "
           "hidden_size=4): input of shape (5, 2, 4)", lambda: rnnkit.MinGRU(3, 4)(R(5, 2, 4)))
    raises(RNNShapeError, "ConvLSTM2d: Expected input to be 4D or 5D, got 3D instead. ConvLSTM2d(",
           lambda: rnnkit.ConvLSTM2d(3, 4, 3)(R(5, 2, 3)))
    raises(RNNShapeError, "For batched 5-D input, hx and cx should also be 5-D but got (5-D, 4-D) tensors. "
           "ConvLSTM2d(", lambda: rnnkit.ConvLSTM2d(3, 4, 3)(R(5, 2, 3, 6, 6), (R(1, 2, 4, 6, 6), R(1, 2, 4, 6))))
    raises(RNNShapeError, "Expected hidden[1] size (1, 2, 4, 6, 6), got [1, 2, 4, 6, 5]. ConvLSTM2d(",
           lambda: rnnkit.ConvLSTM2d(3, 4, 3)(R(5, 2, 3, 6, 6), (R(1, 2, 4, 6, 6), R(1, 2, 4, 6, 5))),
           "c_0 has shape (1, 2, 4, 6, 5) but expected (1, 2, 4, 6, 6) = (D*num_layers=1*1, N=2, hidden=4, H=6, W=6)")
    raises(TypeError, "ConvLSTM2d(", lambda: rnnkit.ConvLSTM2d(3, 4, 3)(pack_padded_sequence(R(5, 2, 3), [5, 3])),
           "a PackedSequence input is not supported for convolutional layers")


# ----------------------------------------------------------------------------- rnnkit's own checks: lengths


@pytest.mark.parametrize("lengths,exc,rest", [
    ([3, 2], RNNShapeError, "lengths has 2 entries but the batch has N=3; the input of shape (5, 3, 3) was read as"),
    ([3, 2, 6], RNNShapeError, "lengths has 6 but the sequence axis holds only L=5 steps"),
    ([3, -1, 2], RNNShapeError, "lengths must be >= 0, got -1"),
    (torch.tensor([3.0, 2.0, 1.0]), RNNTypeError, "lengths must hold integers, got a tensor of dtype torch.float32"),
    (torch.tensor([[3, 2, 1]]), RNNShapeError, "lengths must be 1-D (N,), got shape (1, 3)"),
    ([3, 2.5, 1], RNNTypeError, "lengths must hold integers, got 2.5 of type float"),
    ("3,2,1", RNNTypeError, "lengths must be a 1-D integer tensor or a list of ints, got str"),
])
def test_bad_lengths(lengths, exc, rest):
    raises(exc, f"GRU(input_size=3, hidden_size=4): {rest}", lambda: rnnkit.GRU(3, 4)(R(5, 3, 3), lengths=lengths))


def test_lengths_with_packed_sequence():
    raises(ValueError, "LSTM(input_size=3, hidden_size=4): lengths cannot be given with a PackedSequence input",
           lambda: rnnkit.LSTM(3, 4)(pack_padded_sequence(R(5, 2, 3), [5, 3]), lengths=[5, 3]))


# ----------------------------------------------------------------------------- utilities


def test_utility_errors():
    raises(TypeError, "detach_state: state must be a Tensor or a tuple/list of Tensors, got str",
           lambda: rnnkit.detach_state("h"))
    raises(TypeError, "reset_state: state must be a Tensor or a tuple/list of Tensors, got str",
           lambda: rnnkit.reset_state("h", [True]))
    raises(TypeError, "reset_state: mask must hold booleans", lambda: rnnkit.reset_state(R(1, 2, 4), [1, 0]))
    raises(ValueError, "reset_state: batch_dim=3 is out of range", lambda: rnnkit.reset_state(R(1, 2, 4), [True],
                                                                                             batch_dim=3))
    raises(ValueError, "reset_state: mask has shape (3,) but the state of shape (1, 2, 4) has N=2 rows",
           lambda: rnnkit.reset_state(R(1, 2, 4), [True, False, True]))
    raises(ValueError, "Stream: LSTM(input_size=3, hidden_size=4, bidirectional=True) is bidirectional and cannot "
           "stream", lambda: rnnkit.Stream(rnnkit.LSTM(3, 4, bidirectional=True)))
    raises(TypeError, "lengths_to_mask: lengths must hold integers, got dtype torch.float32",
           lambda: rnnkit.lengths_to_mask(torch.tensor([1.0])))
    raises(ValueError, "lengths_to_mask: lengths must be 1-D (N,), got shape (1, 1)",
           lambda: rnnkit.lengths_to_mask([[1]]))
    raises(ValueError, "lengths_to_mask: lengths must be >= 0, got -1", lambda: rnnkit.lengths_to_mask([-1]))
    raises(ValueError, "lengths_to_mask: max_len=1 is shorter than the longest length 2",
           lambda: rnnkit.lengths_to_mask([2], max_len=1))
    raises(ValueError, "unpad_sequence: padded_sequences must be at least 2-D",
           lambda: rnnkit.unpad_sequence(R(3), [1]))
    raises(ValueError, "unpad_sequence: lengths has 2 entries but the batch has N=3",
           lambda: rnnkit.unpad_sequence(R(4, 3), [1, 2]))
    raises(ValueError, "unpad_sequence: lengths has 5 but L=4", lambda: rnnkit.unpad_sequence(R(4, 1), [5]))
    raises(ValueError, "unknown layer 'nope'; choose from", lambda: rnnkit.get_layer("nope"))
    raises(TypeError, "explain: input must be a Tensor, a PackedSequence or a shape", lambda: rnnkit.explain(
        rnnkit.LSTM(3, 4), "x"))


# ----------------------------------------------------------------------------- explain says what the layer would raise


@pytest.mark.parametrize("module,shape,hx", [
    (rnnkit.LSTM(50, 100), (10, 3, 40), None),
    (rnnkit.GRU(3, 4, batch_first=True), (2, 3, 4, 3), None),
    (rnnkit.RNN(3, 4), (0, 2, 3), None),
    (rnnkit.LSTM(28, 64), (32, 10, 28), ((1, 32, 64), (1, 32, 64))),
    (rnnkit.GRU(28, 64), (32, 10, 28), (32, 64)),
    (rnnkit.LSTM(3, 4), (5, 2, 3), ((1, 2, 4),)),
    (rnnkit.ConvLSTM2d(3, 4, 3), (5, 2, 3, 6, 6), ((1, 2, 4, 6, 6), (1, 2, 4, 6))),
])
def test_explain_reports_the_error_the_layer_raises(module, shape, hx):
    expl = rnnkit.explain(module, shape, hx)
    assert not expl.ok
    state = None if hx is None else (tuple(torch.zeros(s) for s in hx) if isinstance(hx[0], tuple)
                                     else torch.zeros(hx))
    with pytest.raises(Exception) as info:
        module(torch.zeros(shape), state)
    assert expl.error_type == type(info.value).__name__ == expl.to_dict()["error_type"]
    message = str(info.value)
    assert message.startswith(expl.error)
    assert re.sub(r"\.?\s*Fix: .*", "", message) == expl.error
