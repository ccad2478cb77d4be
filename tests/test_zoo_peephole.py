"""PeepholeLSTM against a hand-written formula, torch.nn.LSTM (peepholes at 0) and the generic oracles."""

from __future__ import annotations

import pytest
import torch

import rnnkit
from zoo_oracles import (TOL64, check_cell_is_one_step, check_chunked_streaming, check_gradcheck, check_layouts,
                         check_lengths_oracle, one_thread, randomize_)  # noqa: F401 (autouse fixture)


def hand_peephole(x, h, c, p):
    H = h.shape[-1]
    outs = []
    for t in range(x.shape[0]):
        a = x[t] @ p["weight_ih"].T + p.get("bias_ih", 0) + h @ p["weight_hh"].T + p.get("bias_hh", 0)
        i = torch.sigmoid(a[:, :H] + p["weight_ci"] * c)
        f = torch.sigmoid(a[:, H:2 * H] + p["weight_cf"] * c)
        g = torch.tanh(a[:, 2 * H:3 * H])
        c = f * c + i * g
        o = torch.sigmoid(a[:, 3 * H:] + p["weight_co"] * c)
        h = o * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs), h, c


@pytest.mark.parametrize("bias", [True, False])
def test_formula(bias):
    torch.manual_seed(0)
    layer = randomize_(rnnkit.PeepholeLSTM(3, 4, bias=bias, dtype=torch.float64))
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    h0, c0 = torch.randn(1, 2, 4, dtype=torch.float64), torch.randn(1, 2, 4, dtype=torch.float64)
    out, (h, c) = layer(x, (h0, c0))
    p = {k[:-3]: v for k, v in layer.named_parameters()}
    ref_out, ref_h, ref_c = hand_peephole(x, h0[0], c0[0], p)
    torch.testing.assert_close(out, ref_out, **TOL64)
    torch.testing.assert_close(h[0], ref_h, **TOL64)
    torch.testing.assert_close(c[0], ref_c, **TOL64)


def test_zero_peepholes_is_torch_lstm():
    torch.manual_seed(0)
    theirs = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64)
    ours = rnnkit.PeepholeLSTM(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64)
    missing, unexpected = ours.load_state_dict(theirs.state_dict(), strict=False)
    assert not unexpected and sorted(missing) == sorted(
        f"weight_c{g}_l{k}{s}" for g in "ifo" for k in (0, 1) for s in ("", "_reverse"))
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.startswith(("weight_ci", "weight_cf", "weight_co")):
                p.zero_()
    x = torch.randn(5, 3, 3, dtype=torch.float64)
    out, (h, c) = ours(x)
    out_t, (h_t, c_t) = theirs(x)
    torch.testing.assert_close(out, out_t, **TOL64)
    torch.testing.assert_close(c, c_t, **TOL64)


def test_peepholes_receive_gradients_and_learn():
    torch.manual_seed(0)
    layer = rnnkit.PeepholeLSTM(3, 4, num_layers=2, bidirectional=True)
    out, (h, c) = layer(torch.randn(5, 2, 3))
    (out.square().sum() + c.sum()).backward()
    for name, p in layer.named_parameters():
        if name.startswith(("weight_ci", "weight_cf", "weight_co")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the peepholes are in parameters(), so an optimizer moves them
    before = layer.weight_co_l1_reverse.detach().clone()
    torch.optim.SGD(layer.parameters(), lr=0.1).step()
    assert not torch.equal(before, layer.weight_co_l1_reverse)


def test_peephole_gradient_matches_finite_difference():
    """d(loss)/d(w_co) by autograd equals a central finite difference in float64."""
    torch.manual_seed(1)
    layer = randomize_(rnnkit.PeepholeLSTM(2, 3, dtype=torch.float64), seed=1)
    x = torch.randn(4, 2, 2, dtype=torch.float64)

    def loss():
        out, (h, c) = layer(x)
        return (out * torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)).sum() + c.sum()

    loss().backward()
    for name in ("weight_ci_l0", "weight_cf_l0", "weight_co_l0"):
        p = getattr(layer, name)
        numeric = torch.zeros_like(p)
        with torch.no_grad():
            for j in range(p.numel()):
                p[j] += 1e-6
                up = loss()
                p[j] -= 2e-6
                down = loss()
                p[j] += 1e-6
                numeric[j] = (up - down) / 2e-6
        torch.testing.assert_close(p.grad, numeric, rtol=1e-6, atol=1e-8)


def test_lengths_multilayer_bidirectional():
    check_lengths_oracle(randomize_(rnnkit.PeepholeLSTM(3, 4, num_layers=2, bidirectional=True,
                                                        dtype=torch.float64)), 3)


def test_cell_equals_one_layer_step():
    layer = randomize_(rnnkit.PeepholeLSTM(3, 4, dtype=torch.float64), seed=2)
    check_cell_is_one_step(layer, rnnkit.PeepholeLSTMCell(3, 4, dtype=torch.float64), 3)


def test_gradcheck():
    layer = randomize_(rnnkit.PeepholeLSTM(2, 3, num_layers=2, bidirectional=True, dtype=torch.float64), seed=3)
    check_gradcheck(layer, 2, lengths=torch.tensor([3, 1]))


def test_layouts_and_streaming():
    kw = dict(num_layers=2, bidirectional=True, dtype=torch.float64)
    tm = randomize_(rnnkit.PeepholeLSTM(3, 4, **kw), seed=4)
    check_layouts(tm, rnnkit.PeepholeLSTM(3, 4, batch_first=True, **kw), 3)
    check_chunked_streaming(randomize_(rnnkit.PeepholeLSTM(3, 4, num_layers=2, dtype=torch.float64), seed=5), 3)


def test_torch_backend_declines():
    with pytest.raises(ValueError, match=r"backend='torch' cannot run.*no fused op for the 'peephole_lstm' cell"):
        rnnkit.PeepholeLSTM(3, 4, backend="torch")
    with pytest.raises(ValueError, match=r"backend='torch' cannot run this cell"):
        rnnkit.PeepholeLSTMCell(3, 4, backend="torch")
    layer = rnnkit.PeepholeLSTM(3, 4)
    layer(torch.randn(2, 3))
    assert layer.last_backend == ("reference" if rnnkit.BACKENDS["fused"].unavailable() else "fused")
    assert rnnkit.get_layer("peephole_lstm").cell is rnnkit.PeepholeLSTMCell
