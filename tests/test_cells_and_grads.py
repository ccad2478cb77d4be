"""Cells against torch.nn, gradcheck in float64 on the reference backend, dropout."""

from __future__ import annotations

import itertools

import pytest
import torch

import rnnkit
from helpers import assert_close, flatten_states, weighted_sum

CELLS = [
    ("RNNCell", dict(nonlinearity="tanh")), ("RNNCell", dict(nonlinearity="relu")),
    ("LSTMCell", {}), ("GRUCell", {}),
]


@pytest.mark.parametrize("backend", ["reference", "torch", "auto"])
@pytest.mark.parametrize("name,kw", CELLS, ids=lambda v: str(v))
@pytest.mark.parametrize("bias,batched,with_hx,dtype", list(itertools.product(
    [True, False], [True, False], [True, False], [torch.float32, torch.float64])))
def test_cell_matches_torch_nn(name, kw, backend, bias, batched, with_hx, dtype):
    torch.manual_seed(0)
    ours = getattr(rnnkit, name)(4, 5, bias=bias, dtype=dtype, backend=backend, **kw)
    ref = getattr(torch.nn, name)(4, 5, bias=bias, dtype=dtype, **kw)
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn((3, 4) if batched else (4,), dtype=dtype)
    shape = (3, 5) if batched else (5,)
    hx = None
    if with_hx:
        hx = torch.randn(shape, dtype=dtype)
        if name == "LSTMCell":
            hx = (hx, torch.randn(shape, dtype=dtype))
    results = []
    for module in (ours, ref):
        xi = x.clone().requires_grad_()
        hxi = None if hx is None else tuple(t.clone().requires_grad_() for t in flatten_states(hx))
        out = module(xi, None if hxi is None else (hxi if name == "LSTMCell" else hxi[0]))
        weighted_sum(flatten_states(out)).backward()
        grads = [xi.grad] + ([t.grad for t in hxi] if hxi else []) + [p.grad for p in module.parameters()]
        results.append((flatten_states(out), grads))
    (o1, g1), (o2, g2) = results
    for a, b in zip(o1, o2):
        assert_close(a, b, dtype, "output")
    assert len(g1) == len(g2)
    for a, b in zip(g1, g2):
        assert_close(a, b, dtype, "grad")
    assert ours.last_backend == ("reference" if backend == "reference" else "torch")


def test_cell_is_one_step_of_the_layer():
    torch.manual_seed(0)
    lstm = rnnkit.LSTM(3, 4, backend="reference")
    cell = rnnkit.LSTMCell(3, 4)
    cell.load_state_dict({k[:-3]: v for k, v in lstm.state_dict().items()})
    x = torch.randn(1, 2, 3)
    _, (h, c) = lstm(x)
    h1, c1 = cell(x[0])
    torch.testing.assert_close(h[0], h1)
    torch.testing.assert_close(c[0], c1)


def test_callable_nonlinearity_runs_on_reference_and_says_so():
    rnn = rnnkit.RNN(3, 4, nonlinearity=torch.sin, dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    out, h = rnn(x)
    assert rnn.last_backend == "reference" and rnn.which_backend(x) == "reference"
    h_ref = torch.zeros(2, 4, dtype=torch.float64)
    for t in range(5):  # hand-written formula
        h_ref = torch.sin(x[t] @ rnn.weight_ih_l0.T + rnn.bias_ih_l0 + h_ref @ rnn.weight_hh_l0.T + rnn.bias_hh_l0)
    torch.testing.assert_close(h[0], h_ref, rtol=1e-12, atol=1e-12)


def test_auto_picks_torch_for_standard_layers_and_reports_it():
    lstm = rnnkit.LSTM(3, 4)
    lstm(torch.randn(5, 2, 3))
    assert lstm.last_backend in ("torch", "fused")
    assert f"last ran: '{lstm.last_backend}'" in repr(lstm)


# ----------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("cls,kw", [
    (rnnkit.RNN, dict(nonlinearity="tanh")), (rnnkit.LSTM, dict(proj_size=2)), (rnnkit.GRU, {}),
], ids=["rnn", "lstm_proj", "gru"])
def test_gradcheck_reference_layers(cls, kw):
    torch.manual_seed(0)
    layer = cls(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64, backend="reference", **kw)
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    params = list(layer.parameters())
    names = [n for n, _ in layer.named_parameters()]

    def f(x, *ps):
        out, h = torch.func.functional_call(layer, dict(zip(names, ps)), (x,), {"lengths": [4, 2]})
        return (out, *flatten_states(h))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7)


def test_reference_is_twice_differentiable():
    torch.manual_seed(0)
    gru = rnnkit.GRU(2, 3, dtype=torch.float64, backend="reference")
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x: gru(x)[0], (x,))


@pytest.mark.parametrize("name", ["RNNCell", "LSTMCell", "GRUCell"])
def test_gradcheck_reference_cells(name):
    torch.manual_seed(0)
    cell = getattr(rnnkit, name)(3, 4, dtype=torch.float64, backend="reference")
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    hx = (h, torch.randn(2, 4, dtype=torch.float64, requires_grad=True)) if name == "LSTMCell" else h
    inputs = (x, *flatten_states(hx))
    assert torch.autograd.gradcheck(
        lambda x, *s: cell(x, s if name == "LSTMCell" else s[0]), inputs)


# ----------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_dropout_only_between_layers_and_only_in_training(backend):
    torch.manual_seed(0)
    lstm = rnnkit.LSTM(3, 50, num_layers=2, dropout=0.5, backend=backend)
    ref = torch.nn.LSTM(3, 50, num_layers=2)
    ref.load_state_dict(lstm.state_dict())
    x = torch.randn(6, 4, 3)
    lstm.eval()
    out_eval, _ = lstm(x)
    torch.testing.assert_close(out_eval, ref(x)[0])           # eval: no dropout at all
    torch.testing.assert_close(lstm(x)[0], out_eval)           # and deterministic
    lstm.train()
    out_a, (h_a, c_a) = lstm(x)
    out_b, _ = lstm(x)
    assert out_a.shape == (6, 4, 50) and h_a.shape == (2, 4, 50)
    assert not torch.allclose(out_a, out_b)                    # training: random masks between layers
    torch.testing.assert_close(h_a[0], ref(x)[1][0][0])        # layer 0 itself is never dropped


def test_dropout_after_last_layer_never_applied():
    torch.manual_seed(0)
    gru = rnnkit.GRU(3, 8, num_layers=1, backend="reference")
    with pytest.warns(UserWarning):
        gru_d = rnnkit.GRU(3, 8, num_layers=1, dropout=0.9, backend="reference")
    gru_d.load_state_dict(gru.state_dict())
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(gru_d.train()(x)[0], gru(x)[0])


def test_which_backend_reads_input_as_forward_does():
    """which_backend names the backend forward then runs, for every input form,
    and rejects a bad input with forward's own message."""
    lstm = rnnkit.LSTM(3, 4, batch_first=True)
    x = torch.randn(2, 5, 3)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, [5, 2], batch_first=True)
    for inp, kw in [(x, {}), (x, {"lengths": [5, 2]}), (x[0], {}), (packed, {})]:
        lstm(inp, **kw)
        assert lstm.which_backend(inp, **kw) == lstm.last_backend
    with pytest.raises(ValueError, match=r"read as \(N=2, L=5, H_in=4\) \[batch_first=True\]"):
        lstm.which_backend(torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match=r"lengths has 3 entries but the batch has N=2"):
        lstm.which_backend(x, lengths=[5, 2, 1])
