"""IndRNN against a hand-written formula and the generic oracles; the plain RNN's
nonlinearity choice (item 7) against hand-written formulas and its backend choice."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rnnkit
from zoo_oracles import (TOL64, check_cell_is_one_step, check_chunked_streaming, check_gradcheck, check_layouts,
                         check_lengths_oracle, one_thread, randomize_)  # noqa: F401 (autouse fixture)


def hand_indrnn(x, h, p, act=torch.relu, max_abs=None):
    u = p["weight_hh"] if max_abs is None else torch.clamp(p["weight_hh"], -max_abs, max_abs)
    outs = []
    for t in range(x.shape[0]):
        h = act(x[t] @ p["weight_ih"].T + p.get("bias_ih", 0) + u * h + p.get("bias_hh", 0))
        outs.append(h)
    return torch.stack(outs), h


def _p(layer):
    return {k[:-3]: v for k, v in layer.named_parameters() if k.endswith("_l0")}


@pytest.mark.parametrize("nonlinearity, act", [("relu", torch.relu), ("tanh", torch.tanh),
                                               (torch.sin, torch.sin)])
@pytest.mark.parametrize("bias", [True, False])
def test_formula(nonlinearity, act, bias):
    torch.manual_seed(0)
    layer = randomize_(rnnkit.IndRNN(3, 4, nonlinearity=nonlinearity, bias=bias, dtype=torch.float64))
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    h0 = torch.randn(1, 2, 4, dtype=torch.float64)
    out, h = layer(x, h0)
    ref_out, ref_h = hand_indrnn(x, h0[0], _p(layer), act)
    torch.testing.assert_close(out, ref_out, **TOL64)
    torch.testing.assert_close(h[0], ref_h, **TOL64)


def test_relu_is_default_and_params():
    layer = rnnkit.IndRNN(3, 5, num_layers=2, bidirectional=True)
    assert layer.nonlinearity == "relu"
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    assert shapes["weight_hh_l0"] == (5,) and shapes["weight_ih_l1_reverse"] == (5, 10)
    assert shapes["bias_ih_l0"] == (5,) and shapes["bias_hh_l1"] == (5,)
    for name, p in layer.named_parameters():
        if name.startswith("weight_hh"):
            assert p.min() >= 0 and p.max() <= 1
        else:
            assert p.abs().max() <= 1 / 5 ** 0.5
    small = rnnkit.IndRNN(3, 50, recurrent_max_abs=0.5)
    assert 0 <= small.weight_hh_l0.min() and small.weight_hh_l0.max() <= 0.5


def test_recurrent_max_abs_clamps_in_forward_without_mutating():
    torch.manual_seed(0)
    layer = randomize_(rnnkit.IndRNN(3, 4, recurrent_max_abs=0.8, dtype=torch.float64))
    with torch.no_grad():
        layer.weight_hh_l0.copy_(torch.tensor([2.0, -3.0, 0.5, -0.1], dtype=torch.float64))
    before = layer.weight_hh_l0.detach().clone()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    h0 = torch.rand(1, 2, 4, dtype=torch.float64) + 0.5
    out, h = layer(x, h0)
    ref_out, _ = hand_indrnn(x, h0[0], _p(layer), max_abs=0.8)
    torch.testing.assert_close(out, ref_out, **TOL64)
    unclamped, _ = hand_indrnn(x, h0[0], _p(layer))
    assert not torch.allclose(out, unclamped)
    assert torch.equal(layer.weight_hh_l0, before)  # the parameter is not modified
    out.sum().backward()
    g = layer.weight_hh_l0.grad
    assert g[0] == 0 and g[1] == 0  # clamped elements get no gradient (as any clamp)


@pytest.mark.parametrize("value", [0, -1.0, "big", True])
def test_bad_recurrent_max_abs(value):
    with pytest.raises(ValueError, match=r"IndRNN: recurrent_max_abs must be None \(no clamping\) or a positive"):
        rnnkit.IndRNN(3, 4, recurrent_max_abs=value)


def test_bad_nonlinearity():
    with pytest.raises(ValueError, match=r"IndRNN: nonlinearity must be one of \[.*'relu'.*\] or a callable, got 'swish'"):
        rnnkit.IndRNN(3, 4, nonlinearity="swish")


def test_lengths_multilayer_bidirectional():
    layer = randomize_(rnnkit.IndRNN(3, 4, num_layers=2, bidirectional=True, nonlinearity="tanh",
                                     dtype=torch.float64))
    check_lengths_oracle(layer, 3)


def test_cell_equals_one_layer_step():
    layer = randomize_(rnnkit.IndRNN(3, 4, recurrent_max_abs=0.3, dtype=torch.float64), seed=2)
    check_cell_is_one_step(layer, rnnkit.IndRNNCell(3, 4, recurrent_max_abs=0.3, dtype=torch.float64), 3)


def test_gradcheck():
    # tanh: relu's kink makes finite differences unreliable at random points
    layer = randomize_(rnnkit.IndRNN(2, 3, num_layers=2, bidirectional=True, nonlinearity="tanh",
                                     dtype=torch.float64), seed=3)
    check_gradcheck(layer, 2, lengths=torch.tensor([3, 2]))


def test_layouts_and_streaming():
    kw = dict(num_layers=2, bidirectional=True, dtype=torch.float64)
    tm = randomize_(rnnkit.IndRNN(3, 4, **kw), seed=4)
    check_layouts(tm, rnnkit.IndRNN(3, 4, batch_first=True, **kw), 3)
    check_chunked_streaming(randomize_(rnnkit.IndRNN(3, 4, num_layers=3, dtype=torch.float64), seed=5), 3)


def test_torch_backend_declines():
    with pytest.raises(ValueError, match=r"backend='torch' cannot run.*no fused op for the 'indrnn_relu' cell"):
        rnnkit.IndRNN(3, 4, backend="torch")
    with pytest.raises(ValueError, match=r"backend='torch' cannot run this cell"):
        rnnkit.IndRNNCell(3, 4, backend="torch")
    assert rnnkit.get_layer("indrnn").layer is rnnkit.IndRNN


# ----------------------------------------------------------------------------- item 7: RNN nonlinearity


def hand_rnn(x, h, p, act):
    outs = []
    for t in range(x.shape[0]):
        h = act(x[t] @ p["weight_ih"].T + p["bias_ih"] + h @ p["weight_hh"].T + p["bias_hh"])
        outs.append(h)
    return torch.stack(outs), h


def _softplus(v):
    return F.softplus(v)


@pytest.mark.parametrize("nonlinearity, act", [("gelu", F.gelu), ("silu", F.silu), ("sigmoid", torch.sigmoid),
                                               ("identity", lambda v: v), (_softplus, F.softplus)])
def test_rnn_other_activations_formula_and_auto_reference(nonlinearity, act):
    torch.manual_seed(0)
    rnn = randomize_(rnnkit.RNN(3, 4, nonlinearity=nonlinearity, dtype=torch.float64))
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    h0 = torch.randn(1, 2, 4, dtype=torch.float64)
    out, h = rnn(x, h0)
    ref_out, ref_h = hand_rnn(x, h0[0], _p(rnn), act)
    torch.testing.assert_close(out, ref_out, **TOL64)
    torch.testing.assert_close(h[0], ref_h, **TOL64)
    assert rnn.last_backend == "reference" and rnn.which_backend(x) == "reference"
    assert "(last ran: 'reference')" in repr(rnn)
    with pytest.raises(ValueError, match=r"backend='torch' cannot run this configuration: PyTorch has no fused op "
                                         r"for the 'rnn_\w+' cell"):
        rnnkit.RNN(3, 4, nonlinearity=nonlinearity, backend="torch")
    cell = rnnkit.RNNCell(3, 4, nonlinearity=nonlinearity, dtype=torch.float64)
    cell.load_state_dict(_p(rnn))
    torch.testing.assert_close(cell(x[0], h0[0]), ref_out[0], **TOL64)
    assert cell.last_backend == "reference"


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_rnn_tanh_relu_still_pick_a_fused_op(nonlinearity):
    rnn = rnnkit.RNN(3, 4, nonlinearity=nonlinearity)
    rnn(torch.randn(2, 1, 3))
    assert rnn.last_backend in ("torch", "fused")


def test_rnn_callable_with_lengths_and_bidirectional():
    rnn = randomize_(rnnkit.RNN(3, 4, num_layers=2, bidirectional=True, nonlinearity=torch.sin,
                                dtype=torch.float64))
    check_lengths_oracle(rnn, 3)


@pytest.mark.parametrize("bad", ["swish", 3, None])
def test_rnn_bad_nonlinearity(bad):
    with pytest.raises(ValueError, match=r"RNN: nonlinearity must be one of \[.*\] or a callable, got"):
        rnnkit.RNN(3, 4, nonlinearity=bad)


def test_module_activation_is_a_submodule_that_learns():
    """An nn.Module activation (here PReLU, which has a parameter) is registered,
    so it trains and moves with the layer; the result matches the formula."""
    torch.manual_seed(0)
    rnn = randomize_(rnnkit.RNN(3, 4, dtype=torch.float64), seed=1)
    prelu = torch.nn.PReLU(dtype=torch.float64)
    with_module = rnnkit.RNN(3, 4, nonlinearity=prelu, dtype=torch.float64)
    with_module.load_state_dict({**rnn.state_dict(), "nonlinearity.weight": prelu.weight.detach()})
    assert "nonlinearity.weight" in dict(with_module.named_parameters())
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    h0 = torch.randn(1, 2, 4, dtype=torch.float64)
    out, _ = with_module(x, h0)
    act = lambda v: torch.where(v > 0, v, 0.25 * v)  # noqa: E731 (PReLU's initial slope)
    torch.testing.assert_close(out, hand_rnn(x, h0[0], _p(rnn), act)[0], **TOL64)
    out.sum().backward()
    assert prelu.weight.grad is not None and prelu.weight.grad.abs().sum() > 0
    cell = rnnkit.RNNCell(3, 4, nonlinearity=torch.nn.Tanh())
    assert isinstance(cell.nonlinearity, torch.nn.Tanh) and cell(torch.randn(2, 3)).shape == (2, 4)
    ind = rnnkit.IndRNN(3, 4, nonlinearity=torch.nn.ELU())
    assert ind(torch.randn(5, 2, 3))[0].shape == (5, 2, 4)
