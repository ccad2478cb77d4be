"""The inference ops ``lstm_infer`` and ``gru_infer`` (rnnkit/fused/csrc/lstm.cpp, "LSTM inference";
gru.cpp, "GRU inference"): what a no-grad call of a fused LSTM or GRU layer runs in the runner (any
number of layers and directions, lengths, ``proj_size``): nothing saved for a backward, the input
projected in chunks of steps inside the op.

Oracles: the op's reference twin (rnnkit/fused/twins.py, float64 to 1e-10) at sizes whose length
crosses the projection's chunks, and torch.nn's LSTM for whole layers; a spy says which op ran.
No speed is asserted (benchmarks/auto_grid.py measures it)."""

from __future__ import annotations

import pytest
import torch

import rnnkit
from rnnkit.backends import BACKENDS
from rnnkit.fused import _ops, twins
from helpers import assert_close, flatten_states

REASON = BACKENDS["fused"].unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"fused backend unavailable: {REASON}")
DT = torch.float64


def long_enough(n, gates):
    """A length whose projection is chunked (common.h, project_chunk: over 2^23 elements, chunks of 2^18
    elements and at least 256 rows), over many chunks and ending in a partial one."""
    chunk = max(2 ** 18 // (n * gates), -(-256 // n))
    return (2 ** 23 // (n * gates) // chunk + 1) * chunk + chunk // 2 + 1


def _gru_args(L, N, I, H, bias=True, lengths=None, dtype=DT, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return (torch.rand(*shape, generator=g, dtype=dtype) - 0.5) * 0.3
    return (r(L, N, I), r(3 * H, I), r(3 * H) if bias else None, r(3 * H, H), r(3 * H) if bias else None, r(N, H),
            lengths)


@pytest.mark.parametrize("N,H,bias,with_lengths", [(16, 128, True, True), (9, 170, False, False), (1, 300, True, True)])
def test_gru_op_equals_its_twin_across_chunks(N, H, bias, with_lengths):
    L = long_enough(N, 3 * H)
    lengths = None
    if with_lengths:
        lengths = torch.randint(0, L + 1, (N,), generator=torch.Generator().manual_seed(3))
        lengths[0] = L
    args = _gru_args(L, N, 6, H, bias, lengths)
    got = torch.ops.rnnkit_fused.gru_infer(*args)
    want = twins.gru_infer(*args)
    for u, v, what in zip(got, want, ("out", "h_n")):
        assert u.shape == v.shape, what
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-10, msg=lambda m: f"{what}: {m}")


def test_gru_bad_arguments_name_what_they_got():
    x, w_ih, b_ih, w_hh, b_hh, h0, lengths = _gru_args(5, 3, 6, 4)
    with pytest.raises(RuntimeError, match=r"gru_infer: x must be \(L, N, I\), got \[5, 6\]"):
        torch.ops.rnnkit_fused.gru_infer(x[:, 0], w_ih, b_ih, w_hh, b_hh, h0, lengths)
    with pytest.raises(RuntimeError, match=r"b_hh has shape \[11\], expected \[12\]"):
        torch.ops.rnnkit_fused.gru_infer(x, w_ih, b_ih, w_hh, b_hh[:11], h0, lengths)
    with pytest.raises(RuntimeError, match=r"gru_infer: w_hh must be \(3H, H\), got \[12, 5\]"):
        torch.ops.rnnkit_fused.gru_infer(x, w_ih, b_ih, torch.zeros(12, 5, dtype=DT), b_hh, h0, lengths)
    with pytest.raises(RuntimeError, match=r"w_ih has shape \[12, 5\], expected \[12, 6\]"):
        torch.ops.rnnkit_fused.gru_infer(x, w_ih[:, :5], b_ih, w_hh, b_hh, h0, lengths)


def _args(L, N, I, H, P=0, bias=True, lengths=None, dtype=DT, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):  # small weights: a contracting recurrence, so that rounding does not grow over 1000s of steps
        return (torch.rand(*shape, generator=g, dtype=dtype) - 0.5) * 0.3
    out_size = P or H
    return (r(L, N, I), r(4 * H, I), r(4 * H) if bias else None, r(4 * H, out_size), r(out_size, H) if P else None,
            r(N, out_size), r(N, H), lengths)


@pytest.mark.parametrize("N,H,P,bias,with_lengths", [(16, 128, 0, True, True), (12, 161, 7, True, False),
                                                     (20, 96, 0, False, True), (8, 200, 4, False, True)])
def test_op_equals_its_twin_across_chunks(N, H, P, bias, with_lengths):
    L = long_enough(N, 4 * H)
    lengths = None
    if with_lengths:
        lengths = torch.randint(0, L + 1, (N,), generator=torch.Generator().manual_seed(3))
        lengths[0] = L
    args = _args(L, N, 6, H, P, bias, lengths)
    got = torch.ops.rnnkit_fused.lstm_infer(*args)
    want = twins.lstm_infer(*args)
    for u, v, what in zip(got, want, ("out", "h_n", "c_n")):
        assert u.shape == v.shape, what
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-10, msg=lambda m: f"{what}: {m}")


def test_empty_sequence_returns_the_initial_state():
    args = _args(0, 2, 3, 4)
    out, h_n, c_n = torch.ops.rnnkit_fused.lstm_infer(*args)
    assert out.shape == (0, 2, 4)
    assert torch.equal(h_n, args[5]) and torch.equal(c_n, args[6])


@pytest.mark.parametrize("case, message", [
    ("x_2d", r"lstm_infer: x must be \(L, N, I\), got \[5, 6\]"),
    ("w_ih", r"w_ih has shape \[16, 5\], expected \[16, 6\]"),
    ("b", r"b has shape \[15\], expected \[16\]"),
    ("h0", r"h0 has shape \[3, 5\], expected \[3, 4\]"),
    ("dtype", r"w_hh has dtype Float, expected Double"),
    ("int", r"float32 or float64 only, got Long"),
])
def test_bad_arguments_name_what_they_got(case, message):
    """lstm_infer's argument checks name the argument, the shape or dtype received and the one expected."""
    x, w_ih, b, w_hh, w_hr, h0, c0, lengths = _args(5, 3, 6, 4)
    if case == "x_2d":
        x = x[:, 0]
    elif case == "w_ih":
        w_ih = w_ih[:, :5]
    elif case == "b":
        b = b[:15]
    elif case == "h0":
        h0 = torch.zeros(3, 5, dtype=DT)
    elif case == "dtype":
        w_hh = w_hh.float()
    elif case == "int":
        x = x.long()
    with pytest.raises(RuntimeError, match=message):
        torch.ops.rnnkit_fused.lstm_infer(x, w_ih, b, w_hh, w_hr, h0, c0, lengths)


@pytest.fixture
def calls(monkeypatch):
    counts = {"lstm_infer": 0, "gru_infer": 0}
    for name in counts:
        real = getattr(_ops, name)

        def spy(*args, _real=real, _name=name):
            counts[_name] += 1
            return _real(*args)
        monkeypatch.setattr(_ops, name, spy)
    return counts


LAYER_CASES = {"lstm-2layer-bidir": ("lstm", dict(num_layers=2, bidirectional=True)),
               "lstm-proj-bidir": ("lstm", dict(proj_size=5, bidirectional=True)),
               "lstm-2layer-bf": ("lstm", dict(num_layers=2, batch_first=True)),
               "gru-2layer-bidir": ("gru", dict(num_layers=2, bidirectional=True)),
               "gru-bidir-bf-nobias": ("gru", dict(bidirectional=True, batch_first=True, bias=False))}


@pytest.mark.parametrize("case", list(LAYER_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_grad_layers_run_it_and_equal_torch_nn(calls, case, dtype):
    """A no-grad call of a fused LSTM/GRU that the direct entry does not take (layers, directions,
    proj_size, lengths) runs lstm_infer / gru_infer in every layer-direction, and equals torch.nn (with
    lengths: packed)."""
    name, kw = LAYER_CASES[case]
    gates = 4 if name == "lstm" else 3
    torch.manual_seed(0)
    theirs = getattr(torch.nn, name.upper())(6, 128, dtype=dtype, **kw)
    ours = getattr(rnnkit, name.upper())(6, 128, dtype=dtype, backend="fused", **kw)
    ours.load_state_dict(theirs.state_dict())
    N, L = 16, long_enough(16, gates * 128)
    x = torch.randn((N, L, 6) if kw.get("batch_first") else (L, N, 6), dtype=dtype)
    lengths = torch.tensor([L, L - 1, 70, 1] * 4)
    layers_dirs = kw.get("num_layers", 1) * (2 if kw.get("bidirectional") else 1)
    op = f"{name}_infer"
    with torch.no_grad():
        got = ours(x)
        want = theirs(x)
        assert calls[op] == layers_dirs
        got_l = ours(x, lengths=lengths)
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=bool(kw.get("batch_first")),
                                                         enforce_sorted=False)
        out_p, h_p = theirs(packed)
        want_l = (torch.nn.utils.rnn.pad_packed_sequence(out_p, batch_first=bool(kw.get("batch_first")),
                                                         total_length=L)[0], h_p)
    assert calls[op] == 2 * layers_dirs
    for a, b in ((got, want), (got_l, want_l)):
        for u, v in zip([a[0], *flatten_states(a[1])], [b[0], *flatten_states(b[1])]):
            assert_close(u, v, dtype, case)


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_a_call_that_needs_a_gradient_keeps_the_saving_op(calls, name):
    """With a gradient needed the layers run the *_fwd op (whose backward needs what it saves); with none,
    even for an input that requires grad, the inference op."""
    torch.manual_seed(0)
    theirs = getattr(torch.nn, name.upper())(6, 12, bidirectional=True)
    ours = getattr(rnnkit, name.upper())(6, 12, bidirectional=True, backend="fused")
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(9, 3, 6)
    out, _ = ours(x)
    out.sum().backward()
    op = f"{name}_infer"
    assert calls[op] == 0
    with torch.no_grad():
        x.requires_grad_()
        ours(x)
    assert calls[op] == 2
