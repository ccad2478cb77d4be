"""The classic examples from the RNN tutorials, exactly, and the explainer on them."""

from __future__ import annotations

import pytest
import torch

import rnnkit
from helpers import runnable_backends


@pytest.fixture(params=runnable_backends())
def backend(request):
    return request.param


def test_rnn_5_10_2(backend):
    rnn = rnnkit.RNN(5, 10, 2, backend=backend)
    out, h_n = rnn(torch.randn(6, 3, 5))
    assert out.shape == (6, 3, 10) and h_n.shape == (2, 3, 10)
    assert torch.equal(out[-1], h_n[-1])


def test_rnn_10_20_with_h0(backend):
    rnn = rnnkit.RNN(10, 20, backend=backend)
    output, h_n = rnn(torch.randn(5, 3, 10), torch.randn(1, 3, 20))
    assert output.shape == (5, 3, 20) and h_n.shape == (1, 3, 20)
    assert torch.all(output[-1] == h_n)


def test_lstm_50_100_2(backend):
    lstm = rnnkit.LSTM(50, 100, num_layers=2, backend=backend)
    out, (h, c) = lstm(torch.randn(10, 3, 50))
    assert out.shape == (10, 3, 100) and h.shape == (2, 3, 100) and c.shape == (2, 3, 100)
    assert torch.equal(out[-1], h[-1])


def test_gru_10_20_2(backend):
    out, h = rnnkit.GRU(10, 20, 2, backend=backend)(torch.randn(3, 32, 10))
    assert out.shape == (3, 32, 20) and h.shape == (2, 32, 20)


def test_lstm_row_classifier_batch_first(backend):
    B, T = 7, 28
    lstm = rnnkit.LSTM(input_size=28, hidden_size=64, num_layers=1, batch_first=True, backend=backend)
    r_out, (h_n, h_c) = lstm(torch.randn(B, T, 28))
    assert r_out.shape == (B, T, 64) and h_n.shape == (1, B, 64) and h_c.shape == (1, B, 64)
    assert torch.equal(r_out[:, -1, :], h_n[0])


def test_lstm_parameter_count():
    lstm = rnnkit.LSTM(28, 128)
    weights = sum(p.numel() for n, p in lstm.named_parameters() if n.startswith("weight"))
    biases = sum(p.numel() for n, p in lstm.named_parameters() if n.startswith("bias"))
    assert weights == (128 + 28) * (128 * 4)
    assert biases == 2 * 4 * 128


def test_bidirectional_slices(backend):
    lstm = rnnkit.LSTM(5, 6, num_layers=2, bidirectional=True, backend=backend)
    out, (h_n, _) = lstm(torch.randn(4, 3, 5))
    assert out.shape == (4, 3, 12) and h_n.shape == (4, 3, 6)
    assert torch.equal(h_n[-2], out[-1, :, :6])     # last layer, forward
    assert torch.equal(h_n[-1], out[0, :, 6:])      # last layer, reverse
    assert not torch.allclose(h_n[-1], out[-1, :, 6:])


# ----------------------------------------------------------------------------- explain


def test_explain_lstm_50_100_2():
    expl = rnnkit.explain(rnnkit.LSTM(50, 100, 2), (10, 3, 50))
    d = expl.to_dict()
    shapes = {o["name"]: tuple(o["shape"]) for o in d["outputs"]}
    assert d["ok"] and shapes == {"output": (10, 3, 100), "h_n": (2, 3, 100), "c_n": (2, 3, 100)}
    assert [a["meaning"] for a in d["reading"]["axes"]] == ["sequence", "batch", "feature"]
    text = str(expl)
    assert "output  (10, 3, 100)" in text and "h_n     (2, 3, 100)" in text and "c_n     (2, 3, 100)" in text
    assert "h_n[-1] == output[-1]" in text


def test_explain_parameter_count():
    lstm = rnnkit.LSTM(28, 128)
    d = rnnkit.explain(lstm, (5, 2, 28)).to_dict()
    assert d["total_parameters"] == (128 + 28) * (128 * 4) + 2 * 4 * 128
    assert d["total_parameters"] == sum(p.numel() for p in lstm.parameters())
    assert [(p["name"], tuple(p["shape"])) for p in d["parameters"]] == [
        (n, tuple(p.shape)) for n, p in lstm.named_parameters()]
    assert "total" in str(rnnkit.explain(lstm, (5, 2, 28)))


def test_explain_matches_a_real_forward_for_every_layout():
    for kw in [dict(), dict(batch_first=True), dict(bidirectional=True, num_layers=3), dict(proj_size=3)]:
        lstm = rnnkit.LSTM(4, 5, **kw)
        shape = (2, 6, 4) if kw.get("batch_first") else (6, 2, 4)
        out, (h, c) = lstm(torch.randn(shape))
        shapes = {o["name"]: tuple(o["shape"]) for o in rnnkit.explain(lstm, shape).to_dict()["outputs"]}
        assert shapes == {"output": tuple(out.shape), "h_n": tuple(h.shape), "c_n": tuple(c.shape)}, kw
    out, h = rnnkit.GRU(4, 5)(torch.randn(6, 4))
    shapes = {o["name"]: tuple(o["shape"]) for o in rnnkit.explain(rnnkit.GRU(4, 5), (6, 4)).to_dict()["outputs"]}
    assert shapes == {"output": tuple(out.shape), "h_n": tuple(h.shape)}


def test_explain_bidirectional_batch_first_notes():
    expl = rnnkit.explain(rnnkit.LSTM(5, 6, 2, batch_first=True, bidirectional=True), torch.randn(3, 4, 5))
    text = str(expl)
    assert "h_n     (4, 3, 6)" in text
    assert "0: layer 0 forward, 1: layer 0 reverse, 2: layer 1 forward, 3: layer 1 reverse" in text
    assert "h_n[-2] (last layer, forward) == output[:, -1, :6]" in text
    assert "h_n[-1] (last layer, reverse) == output[:, 0, 6:] -- NOT output[:, -1]" in text
    assert "batch_first=True changes input and output only" in text


def test_explain_bad_input_uses_the_layer_error_and_gives_a_fix():
    lstm = rnnkit.LSTM(50, 100)
    expl = rnnkit.explain(lstm, (10, 3, 40))
    with pytest.raises(ValueError) as info:
        lstm(torch.randn(10, 3, 40))
    assert not expl.ok
    assert expl.error in str(info.value)
    assert expl.fix == "give the input 50 features on its last axis, or construct the layer with input_size=40"
    assert "does not fit" in str(expl) and "fix:" in str(expl)


def test_explain_bad_hx_suggests_batch_first():
    expl = rnnkit.explain(rnnkit.GRU(28, 64), (32, 10, 28), hx=(1, 32, 64))
    assert not expl.ok
    assert "construct the layer with batch_first=True" in expl.fix
    assert rnnkit.explain(rnnkit.GRU(28, 64, batch_first=True), (32, 10, 28), hx=(1, 32, 64)).ok
    assert rnnkit.explain(rnnkit.LSTM(3, 4), (5, 2, 3), hx=((1, 2, 4), (1, 2, 4))).ok


def test_explain_rejects_non_shapes():
    with pytest.raises(TypeError, match=r"explain: input must be a Tensor, a PackedSequence or a shape"):
        rnnkit.explain(rnnkit.GRU(3, 4), "10x3x3")


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("unbatched", [False, True])
def test_explain_slices_are_what_a_real_forward_gives(batch_first, unbatched):
    """Evaluate the slice expressions the explainer prints against a real output."""
    torch.manual_seed(0)
    lstm = rnnkit.LSTM(3, 4, 2, bidirectional=True, batch_first=batch_first, backend="reference")
    x = torch.randn((2, 5, 3) if batch_first else (5, 2, 3))
    if unbatched:
        x = x[0] if batch_first else x[:, 0]
    output, (h_n, _) = lstm(x)
    notes = [n for n in rnnkit.explain(lstm, x).notes if n.startswith("h_n[-")]
    assert len(notes) == 2
    for note in notes:
        lhs, rhs = note.split(" == ")
        rhs = rhs.split(" -- ")[0]
        lhs = lhs.split(" (")[0]
        assert torch.equal(eval(lhs), eval(rhs)), note
    uni = rnnkit.LSTM(3, 4, batch_first=batch_first)
    output, (h_n, _) = uni(x)
    note = next(n for n in rnnkit.explain(uni, x).notes if n.startswith("h_n[-1] =="))
    assert torch.equal(eval(note.split(" == ")[0]), eval(note.split(" == ")[1].split(" (")[0])), note


def test_explain_conv_axes_are_channels_and_spatial():
    d = rnnkit.explain(rnnkit.ConvLSTM(3, 8, kernel_size=3), (4, 2, 3, 6, 6)).to_dict()
    assert [a["meaning"] for a in d["reading"]["axes"]] == ["sequence", "batch", "feature", "spatial", "spatial"]
