"""LayerNormLSTM / LayerNormGRU against hand-written formulas and the generic oracles."""

from __future__ import annotations

import math

import pytest
import torch

import rnnkit
from zoo_oracles import (TOL64, check_cell_is_one_step, check_chunked_streaming, check_gradcheck, check_layouts,
                         check_lengths_oracle, one_thread, randomize_)  # noqa: F401 (autouse fixture)

EPS = 1e-5


def ln(v, g, b, eps=EPS):
    """Layer norm written out: (v - mean) / sqrt(biased var + eps) * g + b."""
    mu = v.mean(-1, keepdim=True)
    var = ((v - mu) ** 2).mean(-1, keepdim=True)
    out = (v - mu) / torch.sqrt(var + eps) * g
    return out if b is None else out + b


def _b(p, name):
    return p.get(name, 0)


def hand_ln_lstm(x, h, c, p, eps=EPS):
    outs = []
    for t in range(x.shape[0]):
        a = (ln(x[t] @ p["weight_ih"].T, p["ln_weight_ih"], p.get("ln_bias_ih"), eps) + _b(p, "bias_ih")
             + ln(h @ p["weight_hh"].T, p["ln_weight_hh"], p.get("ln_bias_hh"), eps) + _b(p, "bias_hh"))
        H = h.shape[-1]
        i, f, g, o = a[:, :H], a[:, H:2 * H], a[:, 2 * H:3 * H], a[:, 3 * H:]
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(ln(c, p["ln_weight_c"], p.get("ln_bias_c"), eps))
        outs.append(h)
    return torch.stack(outs), h, c


def hand_ln_gru(x, h, p, eps=EPS):
    outs = []
    H = h.shape[-1]
    for t in range(x.shape[0]):
        a = ln(x[t] @ p["weight_ih"].T, p["ln_weight_ih"], p.get("ln_bias_ih"), eps) + _b(p, "bias_ih")
        b = ln(h @ p["weight_hh"].T, p["ln_weight_hh"], p.get("ln_bias_hh"), eps) + _b(p, "bias_hh")
        r = torch.sigmoid(a[:, :H] + b[:, :H])
        z = torch.sigmoid(a[:, H:2 * H] + b[:, H:2 * H])
        n = torch.tanh(a[:, 2 * H:] + r * b[:, 2 * H:])
        h = (1 - z) * n + z * h
        outs.append(h)
    return torch.stack(outs), h


def _params(layer, suffix="_l0"):
    return {k[: -len(suffix)]: v for k, v in layer.named_parameters() if k.endswith(suffix)}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("eps", [1e-5, 0.1])
def test_ln_lstm_formula(bias, eps):
    torch.manual_seed(0)
    layer = randomize_(rnnkit.LayerNormLSTM(3, 4, bias=bias, dtype=torch.float64, layer_norm_eps=eps,
                                               backend="reference"))
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    h0, c0 = torch.randn(1, 2, 4, dtype=torch.float64), torch.randn(1, 2, 4, dtype=torch.float64)
    out, (h, c) = layer(x, (h0, c0))
    ref_out, ref_h, ref_c = hand_ln_lstm(x, h0[0], c0[0], _params(layer), eps)
    torch.testing.assert_close(out, ref_out, **TOL64)
    torch.testing.assert_close(h[0], ref_h, **TOL64)
    torch.testing.assert_close(c[0], ref_c, **TOL64)
    assert layer.last_backend == "reference"


@pytest.mark.parametrize("bias", [True, False])
def test_ln_gru_formula(bias):
    torch.manual_seed(0)
    layer = randomize_(rnnkit.LayerNormGRU(3, 4, bias=bias, dtype=torch.float64, backend="reference"))
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    h0 = torch.randn(1, 2, 4, dtype=torch.float64)
    out, h = layer(x, h0)
    ref_out, ref_h = hand_ln_gru(x, h0[0], _params(layer))
    torch.testing.assert_close(out, ref_out, **TOL64)
    torch.testing.assert_close(h[0], ref_h, **TOL64)
    assert layer.last_backend == "reference"


def test_bias_false_drops_gate_biases_and_ln_shifts():
    lstm = rnnkit.LayerNormLSTM(3, 4, bias=False)
    assert [n for n, _ in lstm.named_parameters()] == [
        "weight_ih_l0", "weight_hh_l0", "ln_weight_ih_l0", "ln_weight_hh_l0", "ln_weight_c_l0"]
    cell = rnnkit.LayerNormGRUCell(3, 4, bias=False)
    assert [n for n, _ in cell.named_parameters()] == ["weight_ih", "weight_hh", "ln_weight_ih", "ln_weight_hh"]


@pytest.mark.parametrize("cls, gates, cell_norm", [(rnnkit.LayerNormLSTM, 4, True), (rnnkit.LayerNormGRU, 3, False)])
def test_parameters_and_init(cls, gates, cell_norm):
    layer = cls(3, 16, num_layers=2, bidirectional=True)
    shapes = dict((n, tuple(p.shape)) for n, p in layer.named_parameters())
    G = gates * 16
    assert shapes["weight_ih_l0"] == (G, 3) and shapes["weight_ih_l1"] == (G, 32)
    assert shapes["weight_hh_l1_reverse"] == (G, 16)
    assert shapes["ln_weight_ih_l1_reverse"] == (G,) and shapes["ln_bias_hh_l0"] == (G,)
    assert ("ln_weight_c_l0" in shapes) == cell_norm
    bound = 1 / math.sqrt(16)
    for name, p in layer.named_parameters():
        if name.startswith("ln_weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.startswith("ln_bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        else:
            assert p.abs().max() <= bound and p.std() > bound / 4, name


@pytest.mark.parametrize("cls", [rnnkit.LayerNormLSTM, rnnkit.LayerNormGRU])
def test_lengths_multilayer_bidirectional(cls):
    layer = randomize_(cls(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64), seed=1)
    check_lengths_oracle(layer, 3)


@pytest.mark.parametrize("cls, cell_cls", [(rnnkit.LayerNormLSTM, rnnkit.LayerNormLSTMCell),
                                           (rnnkit.LayerNormGRU, rnnkit.LayerNormGRUCell)])
def test_cell_equals_one_layer_step(cls, cell_cls):
    layer = randomize_(cls(3, 4, dtype=torch.float64), seed=2)
    check_cell_is_one_step(layer, cell_cls(3, 4, dtype=torch.float64), 3)


@pytest.mark.parametrize("cls", [rnnkit.LayerNormLSTM, rnnkit.LayerNormGRU])
def test_gradcheck(cls):
    layer = randomize_(cls(2, 3, num_layers=2, bidirectional=True, dtype=torch.float64), seed=3)
    check_gradcheck(layer, 2, lengths=torch.tensor([3, 2]))


@pytest.mark.parametrize("cls", [rnnkit.LayerNormLSTM, rnnkit.LayerNormGRU])
def test_layouts_and_streaming(cls):
    tm = randomize_(cls(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64), seed=4)
    check_layouts(tm, cls(3, 4, num_layers=2, bidirectional=True, batch_first=True, dtype=torch.float64), 3)
    check_chunked_streaming(randomize_(cls(3, 4, num_layers=2, dtype=torch.float64), seed=5), 3)


def test_input_ln_is_applied_once_over_all_steps():
    """The spec's project normalizes each time step's W_ih x on its own (over the
    feature axis), so projecting a whole sequence equals projecting step by step."""
    layer = randomize_(rnnkit.LayerNormLSTM(3, 4, dtype=torch.float64))
    p = layer._layer_params(0)
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    whole = layer.cell_spec.project(x, p)
    torch.testing.assert_close(whole, torch.stack([layer.cell_spec.project(x[t], p) for t in range(6)]), **TOL64)


def test_torch_backend_declines_and_auto_says_reference():
    with pytest.raises(ValueError, match=r"backend='torch' cannot run.*no fused op for the 'layernorm_lstm' cell"):
        rnnkit.LayerNormLSTM(3, 4, backend="torch")
    with pytest.raises(ValueError, match=r"backend='torch' cannot run this cell.*'layernorm_gru'"):
        rnnkit.LayerNormGRUCell(3, 4, backend="torch")
    from rnnkit.backends import BACKENDS
    auto = "fused" if BACKENDS["fused"].unavailable() is None else "reference"  # LayerNormGRU is fused; never torch
    gru = rnnkit.LayerNormGRU(3, 4)
    gru(torch.randn(2, 1, 3))
    assert gru.last_backend == auto and gru.which_backend() == auto


@pytest.mark.parametrize("eps", [0, -1e-5, "small", True])
def test_bad_layer_norm_eps(eps):
    with pytest.raises(ValueError, match=r"LayerNormLSTM: layer_norm_eps must be a positive number.*got"):
        rnnkit.LayerNormLSTM(3, 4, layer_norm_eps=eps)


def test_registered():
    assert rnnkit.get_layer("layernorm_lstm").layer is rnnkit.LayerNormLSTM
    assert rnnkit.get_layer("layernorm-gru").cell is rnnkit.LayerNormGRUCell


def test_ln_lstm_trains_loss_falls():
    """A LayerNormLSTM learns to output the running mean of its input (loss falls 3x)."""
    torch.manual_seed(0)
    model = rnnkit.LayerNormLSTM(1, 16, batch_first=True)
    head = torch.nn.Linear(16, 1)
    opt = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=0.02)
    x = torch.randn(64, 12, 1)
    y = x.cumsum(1) / torch.arange(1, 13).view(1, 12, 1)

    def loss_fn():
        out, _ = model(x)
        return torch.nn.functional.mse_loss(head(out), y)

    first = loss_fn().item()
    for _ in range(80):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    assert loss_fn().item() < first / 3, (first, loss_fn().item())
