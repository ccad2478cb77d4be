"""Recurrent dropout, zoneout and weight-drop: formulas with fixed masks, drop
rates measured, eval-mode behaviour, reproducibility, backend choice, and the
standard layers with every rate at 0 still equal to torch.nn."""

from __future__ import annotations

import warnings
import zlib

import pytest
import torch

from helpers import runnable_backends
import rnnkit
import rnnkit.runner as runner
from rnnkit.functional import rnn_spec
from zoo_oracles import TOL64, check_gradcheck, check_lengths_oracle, one_thread, randomize_  # noqa: F401

F64 = torch.float64


class FixedMasks:
    """Stands in for rnnkit.runner.bernoulli_mask: draws from its own generator
    (seeded per (what, shape) when ``stable``, so every call gives the same mask)
    and records every mask it hands out, by use."""

    def __init__(self, seed=0, stable=False):
        self.seed, self.stable = seed, stable
        self.gen = torch.Generator().manual_seed(seed)
        self.calls = []

    def __call__(self, shape, prob, like, what):
        gen = self.gen
        if self.stable:
            gen = torch.Generator().manual_seed(self.seed + zlib.crc32(f"{what}{tuple(shape)}".encode()))
        mask = (torch.rand(shape, generator=gen, dtype=like.dtype) < prob).to(like.dtype)
        self.calls.append((what, mask))
        return mask

    def of(self, what):
        return [m for w, m in self.calls if w == what]

    def steps(self, what):
        """Per-step masks: each zoneout draw is one ``(L, *S)`` block per layer-direction."""
        return [row for m in self.of(what) for row in m.unbind(0)]


@pytest.fixture
def masks(monkeypatch):
    fixed = FixedMasks()
    monkeypatch.setattr(runner, "bernoulli_mask", fixed)
    return fixed


def _p(layer, suffix="_l0"):
    return {k[: -len(suffix)]: v for k, v in layer.named_parameters() if k.endswith(suffix)}


def hand_lstm(x, h, c, p, rd=None, zo=None, zo_eval=None, w_hh=None, w_hr=None):
    """torch.nn.LSTM's formula, written out, with a recurrent-dropout mask ``rd``
    (already scaled), per-step zoneout masks ``zo[t] = (k_h, k_c)`` or eval
    rates ``zo_eval = (p_h, p_c)``, and a replacement ``w_hh``."""
    H = c.shape[-1]
    w_hh = p["weight_hh"] if w_hh is None else w_hh
    outs = []
    for t in range(x.shape[0]):
        h_rec = h if rd is None else h * rd
        a = x[t] @ p["weight_ih"].T + p["bias_ih"] + h_rec @ w_hh.T + p["bias_hh"]
        i, f, g, o = torch.sigmoid(a[:, :H]), torch.sigmoid(a[:, H:2 * H]), torch.tanh(a[:, 2 * H:3 * H]), \
            torch.sigmoid(a[:, 3 * H:])
        c_new = f * c + i * g
        h_new = o * torch.tanh(c_new)
        if w_hr is not None:
            h_new = h_new @ w_hr.T
        if zo is not None:
            k_h, k_c = zo[t]
            h_new, c_new = k_h * h + (1 - k_h) * h_new, k_c * c + (1 - k_c) * c_new
        elif zo_eval is not None:
            h_new, c_new = zo_eval[0] * h + (1 - zo_eval[0]) * h_new, zo_eval[1] * c + (1 - zo_eval[1]) * c_new
        h, c = h_new, c_new
        outs.append(h)
    return torch.stack(outs), h, c


def hand_gru(x, h, p, rd=None, zo=None, zo_eval=None):
    H = h.shape[-1]
    outs = []
    for t in range(x.shape[0]):
        h_rec = h if rd is None else h * rd
        a = x[t] @ p["weight_ih"].T + p["bias_ih"]
        b = h_rec @ p["weight_hh"].T + p["bias_hh"]
        r = torch.sigmoid(a[:, :H] + b[:, :H])
        z = torch.sigmoid(a[:, H:2 * H] + b[:, H:2 * H])
        n = torch.tanh(a[:, 2 * H:] + r * b[:, 2 * H:])
        h_new = (1 - z) * n + z * h  # the update reads the unmasked h
        if zo is not None:
            h_new = zo[t] * h + (1 - zo[t]) * h_new
        elif zo_eval is not None:
            h_new = zo_eval * h + (1 - zo_eval) * h_new
        h = h_new
        outs.append(h)
    return torch.stack(outs), h


def _data(L=5, N=3, H_in=3, H=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(L, N, H_in, generator=g, dtype=F64), torch.randn(1, N, H, generator=g, dtype=F64),
            torch.randn(1, N, H, generator=g, dtype=F64))


# ----------------------------------------------------------------------------- every rate at 0


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("backend", runnable_backends())
def test_rates_zero_match_torch_nn_exactly(mode, backend):
    torch.manual_seed(0)
    kw = dict(num_layers=2, bidirectional=True, dtype=F64)
    zero = dict(recurrent_dropout=0.0, zoneout=0.0, weight_drop=0.0)
    if mode == "LSTM":
        zero["zoneout_cell"] = 0.0
    ours = getattr(rnnkit, mode)(3, 4, backend=backend, **kw, **zero)
    theirs = getattr(torch.nn, mode)(3, 4, **kw)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(6, 3, 3, dtype=F64)
    lengths = torch.tensor([4, 6, 2])
    pack = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    out, h = ours(pack)
    out_t, h_t = theirs(pack)
    torch.testing.assert_close(out.data, out_t.data, rtol=0, atol=0 if ours.last_backend == "torch" else 1e-12)
    for a, b in zip(h if mode == "LSTM" else (h,), h_t if mode == "LSTM" else (h_t,)):
        torch.testing.assert_close(a, b, rtol=0, atol=0 if ours.last_backend == "torch" else 1e-12)
    assert ours.last_backend == backend if backend != "auto" else ours.last_backend in ("torch", "fused")
    assert ours._regularizer_rates() is None


# ----------------------------------------------------------------------------- formulas with fixed masks


@pytest.mark.parametrize("backend", [b for b in ("reference", "fused") if b in runnable_backends()])
def test_recurrent_dropout_formula_lstm(masks, backend):
    layer = rnnkit.LSTM(3, 4, recurrent_dropout=0.4, dtype=F64, backend=backend)
    x, h0, c0 = _data()
    out, (h, c) = layer(x, (h0, c0))
    (m,) = masks.of("recurrent_dropout")  # one mask for the whole sequence
    assert m.shape == (3, 4) and len(masks.calls) == 1
    ref_out, ref_h, ref_c = hand_lstm(x, h0[0], c0[0], _p(layer), rd=m / 0.6)
    torch.testing.assert_close(out, ref_out, **TOL64)
    torch.testing.assert_close(c[0], ref_c, **TOL64)
    assert layer.last_backend == backend


def test_recurrent_dropout_formula_gru_update_reads_unmasked_h(masks):
    layer = rnnkit.GRU(3, 4, recurrent_dropout=0.5, dtype=F64)
    x, h0, _ = _data()
    out, h = layer(x, h0)
    (m,) = masks.of("recurrent_dropout")
    ref_out, _ = hand_gru(x, h0[0], _p(layer), rd=m / 0.5)
    torch.testing.assert_close(out, ref_out, **TOL64)
    # and not the variant that masks h in the update too
    masked_everywhere, _ = hand_gru(x, h0[0] * m / 0.5, _p(layer), rd=None)
    assert not torch.allclose(out, masked_everywhere)


def test_recurrent_dropout_one_mask_per_layer_direction(masks):
    layer = rnnkit.LSTM(3, 4, num_layers=3, bidirectional=True, recurrent_dropout=0.3)
    layer(torch.randn(7, 5, 3))
    shapes = [tuple(m.shape) for m in masks.of("recurrent_dropout")]
    assert shapes == [(5, 4)] * 6 and len(masks.calls) == 6


def test_recurrent_dropout_layernorm_gru_formula(masks):
    from test_zoo_ln import ln
    layer = randomize_(rnnkit.LayerNormGRU(3, 4, recurrent_dropout=0.25, dtype=F64))
    x, h0, _ = _data()
    out, _ = layer(x, h0)
    (m,) = masks.of("recurrent_dropout")
    p, h, H = _p(layer), h0[0], 4
    outs = []
    for t in range(5):
        a = ln(x[t] @ p["weight_ih"].T, p["ln_weight_ih"], p["ln_bias_ih"]) + p["bias_ih"]
        b = ln((h * m / 0.75) @ p["weight_hh"].T, p["ln_weight_hh"], p["ln_bias_hh"]) + p["bias_hh"]
        r, z = torch.sigmoid(a[:, :H] + b[:, :H]), torch.sigmoid(a[:, H:2 * H] + b[:, H:2 * H])
        n = torch.tanh(a[:, 2 * H:] + r * b[:, 2 * H:])
        h = (1 - z) * n + z * h
        outs.append(h)
    torch.testing.assert_close(out, torch.stack(outs), **TOL64)


def test_zoneout_formula_lstm_training(masks):
    layer = rnnkit.LSTM(3, 4, zoneout=0.3, zoneout_cell=0.6, dtype=F64)
    x, h0, c0 = _data()
    out, (h, c) = layer(x, (h0, c0))
    assert [m.shape for m in masks.of("zoneout_h") + masks.of("zoneout_c")] == [(5, 3, 4)] * 2  # one draw per state
    k_h, k_c = masks.steps("zoneout_h"), masks.steps("zoneout_c")  # a fresh mask per step
    assert not torch.equal(k_h[0], k_h[1])
    ref_out, ref_h, ref_c = hand_lstm(x, h0[0], c0[0], _p(layer), zo=list(zip(k_h, k_c)))
    torch.testing.assert_close(out, ref_out, **TOL64)
    torch.testing.assert_close(h[0], ref_h, **TOL64)
    torch.testing.assert_close(c[0], ref_c, **TOL64)


def test_zoneout_formula_gru_training(masks):
    layer = rnnkit.GRU(3, 4, zoneout=0.5, dtype=F64)
    x, h0, _ = _data()
    out, h = layer(x, h0)
    ref_out, _ = hand_gru(x, h0[0], _p(layer), zo=masks.steps("zoneout_h"))
    torch.testing.assert_close(out, ref_out, **TOL64)


def test_zoneout_eval_is_the_expectation():
    lstm = rnnkit.LSTM(3, 4, zoneout=0.2, zoneout_cell=0.7, dtype=F64, backend="reference").eval()
    x, h0, c0 = _data()
    out, (h, c) = lstm(x, (h0, c0))
    ref_out, _, ref_c = hand_lstm(x, h0[0], c0[0], _p(lstm), zo_eval=(0.2, 0.7))
    torch.testing.assert_close(out, ref_out, **TOL64)
    torch.testing.assert_close(c[0], ref_c, **TOL64)
    gru = rnnkit.GRU(3, 4, zoneout=0.4, dtype=F64, backend="reference").eval()
    out, _ = gru(x, h0)
    torch.testing.assert_close(out, hand_gru(x, h0[0], _p(gru), zo_eval=0.4)[0], **TOL64)
    assert lstm.last_backend == gru.last_backend == "reference"
    # zoneout_cell defaults to zoneout
    assert rnnkit.LSTM(3, 4, zoneout=0.3).zoneout_cell == 0.3


@pytest.mark.parametrize("backend", [b for b in runnable_backends() if b != "auto"])
def test_weight_drop_equals_torch_nn_with_dropped_weights(masks, backend):
    """Training with weight_drop = torch.nn.LSTM run with W_hh * M / (1 - p); the
    raw weight's gradient is the dropped weight's gradient times M / (1 - p)."""
    torch.manual_seed(0)
    ours = rnnkit.LSTM(3, 4, num_layers=2, bidirectional=True, weight_drop=0.5, backend=backend, dtype=F64)
    x = torch.randn(5, 2, 3, dtype=F64)
    out, (h, c) = ours(x)
    (out.sum() + c.square().sum()).backward()
    dropped_masks = masks.of("weight_drop")
    names = [n for n in ours._flat_weights_names if n.startswith("weight_hh")]
    assert len(dropped_masks) == len(names) == 4  # one mask per weight_hh per forward
    theirs = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True, dtype=F64)
    theirs.load_state_dict(ours.state_dict())
    with torch.no_grad():
        for name, m in zip(names, dropped_masks):
            getattr(theirs, name).mul_(m / 0.5)
    out_t, (h_t, c_t) = theirs(x)
    (out_t.sum() + c_t.square().sum()).backward()
    torch.testing.assert_close(out, out_t, **TOL64)
    torch.testing.assert_close(c, c_t, **TOL64)
    for name, m in zip(names, dropped_masks):
        torch.testing.assert_close(getattr(ours, name).grad, getattr(theirs, name).grad * m / 0.5, **TOL64)
    torch.testing.assert_close(ours.weight_ih_l1.grad, theirs.weight_ih_l1.grad, **TOL64)
    assert ours.last_backend == backend


def test_all_regularizers_together_formula(masks):
    layer = rnnkit.LSTM(3, 4, recurrent_dropout=0.2, zoneout=0.1, zoneout_cell=0.3, weight_drop=0.4, dtype=F64)
    x, h0, c0 = _data()
    out, (h, c) = layer(x, (h0, c0))
    (wd,) = masks.of("weight_drop")
    (rd,) = masks.of("recurrent_dropout")
    zo = list(zip(masks.steps("zoneout_h"), masks.steps("zoneout_c")))
    ref_out, _, ref_c = hand_lstm(x, h0[0], c0[0], _p(layer), rd=rd / 0.8, zo=zo, w_hh=layer.weight_hh_l0 * wd / 0.6)
    torch.testing.assert_close(out, ref_out, **TOL64)
    torch.testing.assert_close(c[0], ref_c, **TOL64)


def test_all_regularizers_with_proj_size(masks):
    """With proj_size, the recurrent-dropout and h-zoneout masks are (N, proj_size),
    the c-zoneout mask (N, H), and only weight_hh (4H, proj_size) is dropped."""
    layer = rnnkit.LSTM(3, 4, proj_size=2, recurrent_dropout=0.2, zoneout=0.1, zoneout_cell=0.3, weight_drop=0.4,
                        dtype=F64)
    x, _, c0 = _data()
    h0 = torch.randn(1, 3, 2, dtype=F64)
    out, (h, c) = layer(x, (h0, c0))
    (wd,) = masks.of("weight_drop")
    (rd,) = masks.of("recurrent_dropout")
    assert wd.shape == (16, 2) and rd.shape == (3, 2) and masks.of("zoneout_c")[0].shape == (5, 3, 4)
    zo = list(zip(masks.steps("zoneout_h"), masks.steps("zoneout_c")))
    ref_out, _, ref_c = hand_lstm(x, h0[0], c0[0], _p(layer), rd=rd / 0.8, zo=zo, w_hh=layer.weight_hh_l0 * wd / 0.6,
                                  w_hr=layer.weight_hr_l0)
    torch.testing.assert_close(out, ref_out, **TOL64)
    torch.testing.assert_close(c[0], ref_c, **TOL64)


# ----------------------------------------------------------------------------- rates, measured


class Spy:
    """Wraps the real bernoulli_mask and keeps what it returned."""

    def __init__(self):
        self.real = runner.bernoulli_mask
        self.calls = []

    def __call__(self, shape, prob, like, what):
        mask = self.real(shape, prob, like, what)
        self.calls.append((what, mask))
        return mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 7), (1,), (0, 4), (2, 64)])
def test_bernoulli_mask_values_shape_and_seed(shape, dtype):
    """The one mask sampler: {0, 1} in ``like``'s dtype, any shape (odd element counts use half
    of the last 64-bit draw), reproducible under ``torch.manual_seed``, and the extreme rates exact."""
    like = torch.empty(0, dtype=dtype)
    torch.manual_seed(3)
    m = runner.bernoulli_mask(shape, 0.4, like, "zoneout_h")
    assert m.shape == shape and m.dtype == dtype and bool(((m == 0) | (m == 1)).all())
    torch.manual_seed(3)
    assert torch.equal(runner.bernoulli_mask(shape, 0.4, like, "zoneout_h"), m)
    for prob, value in ((0.0, 0), (1e-12, 0), (1.0, 1), (1 - 1e-12, 1)):
        assert torch.equal(runner.bernoulli_mask(shape, prob, like, "x"), torch.full(shape, value, dtype=dtype))


@pytest.mark.parametrize("prob", [0.1, 0.25, 0.75])
def test_bernoulli_mask_rate_and_independence(prob):
    """Measured on 400,000 elements (std of a rate ~0.0007): the rate is ``prob``, and the two
    elements drawn from one 64-bit number (even and odd positions) are independent:
    both are 1 with probability ``prob ** 2``; neighbours across draws likewise."""
    torch.manual_seed(0)
    m = runner.bernoulli_mask((400_000,), prob, torch.empty(0), "zoneout_h").double()
    assert abs(m.mean().item() - prob) < 0.004
    pairs = m.view(-1, 2)
    assert abs((pairs[:, 0] * pairs[:, 1]).mean().item() - prob ** 2) < 0.004  # one 64-bit draw
    assert abs((pairs[:-1, 1] * pairs[1:, 0]).mean().item() - prob ** 2) < 0.004  # consecutive draws


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_recurrent_dropout_rate_measured(monkeypatch, rate):
    spy = Spy()
    monkeypatch.setattr(runner, "bernoulli_mask", spy)
    torch.manual_seed(0)
    layer = rnnkit.GRU(2, 50, recurrent_dropout=rate)
    layer(torch.randn(2, 2000, 2))
    (what, m), = spy.calls
    zeros = (m == 0).double().mean().item()  # 100,000 draws: std ~ 0.0016
    assert what == "recurrent_dropout" and abs(zeros - rate) < 0.01, zeros


@pytest.mark.parametrize("rate", [0.2, 0.6])
def test_weight_drop_rate_measured(rate):
    torch.manual_seed(0)
    layer = rnnkit.LSTM(4, 100, weight_drop=rate)  # weight_hh: 40,000 elements
    dropped = layer._sample_weight_drop()["weight_hh_l0"]
    zeros = (dropped == 0).double().mean().item()
    assert abs(zeros - rate) < 0.015, zeros
    kept = dropped != 0
    torch.testing.assert_close(dropped[kept], layer.weight_hh_l0[kept] / (1 - rate))
    assert layer.eval()._sample_weight_drop() is None  # eval: the weights themselves


def test_zoneout_rate_measured_end_to_end():
    """Without looking at any mask: the fraction of units whose h did not change
    between two steps is the zoneout rate (a plain GRU unit never stays equal)."""
    torch.manual_seed(0)
    layer = rnnkit.GRU(3, 40, zoneout=0.3)
    out, _ = layer(torch.randn(4, 1000, 3))
    same = (out[1:] == out[:-1]).double().mean().item()  # 120,000 draws
    assert abs(same - 0.3) < 0.01, same
    plain = rnnkit.GRU(3, 40)
    plain.load_state_dict(layer.state_dict())
    out_p, _ = plain(torch.randn(4, 1000, 3))
    assert (out_p[1:] == out_p[:-1]).double().mean().item() < 1e-3


# ----------------------------------------------------------------------------- modes, seeds, backends


def test_eval_mode_is_deterministic_and_plain():
    torch.manual_seed(0)
    reg = rnnkit.LSTM(3, 4, num_layers=2, recurrent_dropout=0.5, weight_drop=0.5, dropout=0.3).eval()
    theirs = torch.nn.LSTM(3, 4, num_layers=2, dropout=0.3).eval()
    theirs.load_state_dict(reg.state_dict())
    x = torch.randn(6, 2, 3)
    out1, _ = reg(x)
    out2, _ = reg(x)
    assert torch.equal(out1, out2)
    assert reg.last_backend in ("torch", "fused")  # recurrent dropout and weight-drop are off in eval
    exact = reg.last_backend == "torch"  # the same op as torch.nn; fused float32 rounds differently
    torch.testing.assert_close(out1, theirs(x)[0], rtol=0 if exact else 1e-5, atol=0 if exact else 1e-6)
    zo = rnnkit.GRU(3, 4, zoneout=0.5).eval()
    assert torch.equal(zo(x)[0], zo(x)[0])


@pytest.mark.parametrize("make", [
    lambda: rnnkit.LSTM(3, 4, 2, bidirectional=True, recurrent_dropout=0.3, zoneout=0.2, weight_drop=0.4),
    lambda: rnnkit.GRU(3, 4, recurrent_dropout=0.3, zoneout=0.2, weight_drop=0.4),
    lambda: rnnkit.LayerNormLSTM(3, 4, recurrent_dropout=0.3, zoneout=0.2, weight_drop=0.4),
    lambda: rnnkit.PeepholeLSTM(3, 4, recurrent_dropout=0.3, zoneout_cell=0.2, weight_drop=0.4),
], ids=["lstm", "gru", "layernorm_lstm", "peephole_lstm"])
def test_reproducible_under_manual_seed(make):
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(5, 3, 3)

    def run(seed):
        torch.manual_seed(seed)
        layer.zero_grad()
        out, _ = layer(x)
        out.sum().backward()
        return out.detach(), [p.grad.clone() for p in layer.parameters()]

    (o1, g1), (o2, g2), (o3, _) = run(7), run(7), run(8)
    assert torch.equal(o1, o2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert not torch.equal(o1, o3)


def test_backend_choice_and_errors():
    x = torch.randn(4, 2, 3)
    rd = rnnkit.LSTM(3, 4, recurrent_dropout=0.2)
    rd(x)
    assert rd.last_backend == ("fused" if "fused" in runnable_backends() else "reference")  # LSTM: fused kernels
    rd.eval()(x)
    assert rd.last_backend in ("torch", "fused")  # eval: no regularizer left, a fused op runs
    zo = rnnkit.GRU(3, 4, zoneout=0.2)
    fused_or_ref = "fused" if "fused" in runnable_backends() else "reference"  # LSTM, GRU: fused kernels
    zo(x)
    assert zo.last_backend == fused_or_ref
    zo.eval()(x)
    assert zo.last_backend == fused_or_ref  # the eval expectation is no torch.nn function either
    wd = rnnkit.GRU(3, 4, weight_drop=0.2)
    wd(x)
    assert wd.last_backend in ("torch", "fused")  # weight-drop runs on the fused ops with the dropped weights
    with pytest.raises(ValueError, match=r"LSTM\(input_size=3, hidden_size=4\): backend='torch' cannot run this "
                                         r"configuration: PyTorch's fused op has no zoneout \(zoneout=0.1, "
                                         r"zoneout_cell=0.5; it changes the function in eval mode too\)"):
        rnnkit.LSTM(3, 4, zoneout=0.1, zoneout_cell=0.5, backend="torch")
    with pytest.raises(ValueError, match=r"PyTorch's fused op has no recurrent dropout \(recurrent_dropout=0.3, "
                                         r"in training mode\)"):
        rnnkit.GRU(3, 4, recurrent_dropout=0.3, backend="torch")
    rnnkit.LSTM(3, 4, weight_drop=0.3, backend="torch")(x)
    # a torch-backend layer switched to training with recurrent dropout set later is refused at forward
    late = rnnkit.LSTM(3, 4, backend="torch")
    late.recurrent_dropout = 0.5
    with pytest.raises(ValueError, match=r"backend='torch' cannot run this configuration: .*recurrent dropout"):
        late(x)


def test_weight_drop_keeps_parameters_and_warns_nothing():
    lstm = rnnkit.LSTM(3, 4, num_layers=2, bidirectional=True, weight_drop=0.5)
    names = [n for n, _ in torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True).named_parameters()]
    assert [n for n, _ in lstm.named_parameters()] == names
    assert list(lstm.state_dict()) == names
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            out, _ = lstm(torch.randn(5, 2, 3))
            out.sum().backward()
    torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True).load_state_dict(lstm.state_dict(), strict=True)
    assert all(isinstance(getattr(lstm, n), torch.nn.Parameter) for n in names)
    assert lstm._dropped_weights is None  # nothing of a forward is left behind
    assert "weight_drop=0.5" in repr(lstm)


def test_regularized_layers_work_with_lengths_in_eval():
    for layer in (rnnkit.LayerNormLSTM(3, 4, 2, bidirectional=True, zoneout=0.3, zoneout_cell=0.6, dtype=F64),
                  rnnkit.PeepholeLSTM(3, 4, 2, bidirectional=True, zoneout=0.5, dtype=F64),
                  rnnkit.GRU(3, 4, 2, bidirectional=True, zoneout=0.4, dtype=F64)):
        check_lengths_oracle(randomize_(layer).eval(), 3)


def test_gradcheck_with_fixed_masks(monkeypatch):
    monkeypatch.setattr(runner, "bernoulli_mask", FixedMasks(stable=True))
    layer = randomize_(rnnkit.LSTM(2, 3, num_layers=2, bidirectional=True, recurrent_dropout=0.3, zoneout=0.2,
                                   zoneout_cell=0.4, weight_drop=0.3, dtype=F64))
    check_gradcheck(layer, 2, lengths=torch.tensor([3, 2]))


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("name", ["recurrent_dropout", "zoneout", "zoneout_cell", "weight_drop"])
@pytest.mark.parametrize("value", [1.0, -0.1, 1.5])
def test_rate_out_of_range(name, value):
    with pytest.raises(ValueError, match=rf"LSTM: {name} must be a number in \[0, 1\) \(.*\), got {value}"):
        rnnkit.LSTM(3, 4, **{name: value})


@pytest.mark.parametrize("value", ["0.1", True, None])
def test_rate_wrong_type(value):
    with pytest.raises(TypeError, match=r"GRU: weight_drop must be a number in \[0, 1\) .* of type"):
        rnnkit.GRU(3, 4, weight_drop=value)


def test_zoneout_cell_needs_a_cell_state():
    with pytest.raises(ValueError, match=r"GRU: zoneout_cell is only for layers with a cell state .*got "
                                         r"zoneout_cell=0.2"):
        rnnkit.RecurrentBase.__init__(rnnkit.GRU.__new__(rnnkit.GRU), rnnkit.GRU(1, 1).cell_spec, 3, 4,
                                      zoneout_cell=0.2)
    with pytest.raises(TypeError):
        rnnkit.GRU(3, 4, zoneout_cell=0.2)  # not in its signature


def test_recurrent_dropout_needs_a_cell_that_reads_the_mask():
    with pytest.raises(ValueError, match=r"recurrent_dropout is not supported by the 'rnn_tanh' cell"):
        rnnkit.RecurrentBase(rnn_spec("tanh"), 3, 4, recurrent_dropout=0.2)
