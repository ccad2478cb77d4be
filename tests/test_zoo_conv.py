"""ConvLSTM / ConvGRU over 1, 2, 3 spatial dims: hand-written F.conv formulas in
float64, gradcheck, the per-sequence lengths oracle, chunked streaming, shapes,
errors, the ConvLSTM_pytorch checkpoint, and a small training run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence

import rnnkit
from helpers import assert_close

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: intra-op threads only add sync cost (10x on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _p(module, name, k=0):
    """Layer parameter ``name`` of layer-direction ``k`` (``weight_ih_l0``...)."""
    suffix = f"_l{k // module.num_directions}" + ("_reverse" if k % module.num_directions else "")
    return getattr(module, name + suffix, None)


# ----------------------------------------------------------------------------- formulas


def _lstm_formula(x, h, c, w_ih, w_hh, b_ih, b_hh, conv, conv_h, peep=None):
    """One ConvLSTM step written out; ``conv(x, w, b)`` is the input convolution,
    ``conv_h`` the recurrent one."""
    hidden = h.shape[1]
    gates = conv(x, w_ih, b_ih) + conv_h(h, w_hh, b_hh)
    gi, gf, gg, go = gates[:, :hidden], gates[:, hidden:2 * hidden], gates[:, 2 * hidden:3 * hidden], gates[:, 3 * hidden:]
    if peep is not None:
        gi = gi + peep[0] * c
        gf = gf + peep[1] * c
    c_new = torch.sigmoid(gf) * c + torch.sigmoid(gi) * torch.tanh(gg)
    if peep is not None:
        go = go + peep[2] * c_new
    return torch.sigmoid(go) * torch.tanh(c_new), c_new


def _gru_formula(x, h, w_ih, w_hh, b_ih, b_hh, conv, conv_h):
    hidden = h.shape[1]
    gx, gh = conv(x, w_ih, b_ih), conv_h(h, w_hh, b_hh)
    r = torch.sigmoid(gx[:, :hidden] + gh[:, :hidden])
    z = torch.sigmoid(gx[:, hidden:2 * hidden] + gh[:, hidden:2 * hidden])
    n = torch.tanh(gx[:, 2 * hidden:] + r * gh[:, 2 * hidden:])
    return (1 - z) * n + z * h


@pytest.mark.parametrize("peephole", [False, True])
def test_conv_lstm2d_matches_formula(peephole):
    torch.manual_seed(0)
    m = rnnkit.ConvLSTM2d(3, 4, 3, peephole=peephole, dtype=F64)
    x = torch.randn(4, 2, 3, 5, 6, dtype=F64)
    h = torch.randn(1, 2, 4, 5, 6, dtype=F64)
    c = torch.randn(1, 2, 4, 5, 6, dtype=F64)
    out, (h_n, c_n) = m(x, (h, c))
    conv = lambda t, w, b: F.conv2d(t, w, b, padding=1)
    peep = (m.weight_ci_l0, m.weight_cf_l0, m.weight_co_l0) if peephole else None
    if peephole:
        assert m.weight_ci_l0.shape == (4, 1, 1)
    ht, ct = h[0], c[0]
    for t in range(4):
        ht, ct = _lstm_formula(x[t], ht, ct, m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0, m.bias_hh_l0, conv, conv,
                               peep)
        assert_close(out[t], ht, F64, f"output step {t}")
    assert_close(h_n[0], ht, F64, "h_n")
    assert_close(c_n[0], ct, F64, "c_n")

    cell = rnnkit.ConvLSTMCell(3, 4, 3, peephole=peephole, dtype=F64)
    cell.load_state_dict({k[:-3]: v for k, v in m.state_dict().items()})
    h1, c1 = cell(x[0], (h[0], c[0]))
    assert_close(h1, out[0], F64, "cell h")


def test_per_position_peepholes_match_formula():
    torch.manual_seed(1)
    m = rnnkit.ConvLSTM2d(2, 3, 3, peephole=True, peephole_shape=(4, 5), dtype=F64)
    assert m.weight_co_l0.shape == (3, 4, 5)
    x = torch.randn(3, 2, 2, 4, 5, dtype=F64)
    out, (h_n, c_n) = m(x)
    conv = lambda t, w, b: F.conv2d(t, w, b, padding=1)
    ht = ct = torch.zeros(2, 3, 4, 5, dtype=F64)
    for t in range(3):
        ht, ct = _lstm_formula(x[t], ht, ct, m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0, m.bias_hh_l0, conv, conv,
                               (m.weight_ci_l0, m.weight_cf_l0, m.weight_co_l0))
    assert_close(out[-1], ht, F64, "output")
    assert_close(c_n[0], ct, F64, "c_n")
    with pytest.raises(ValueError, match=r"state's spatial size would be \(5, 5\).*peephole_shape=\(4, 5\)"):
        m(torch.randn(3, 2, 2, 5, 5, dtype=F64))
    with pytest.raises(ValueError, match="peephole_shape=.*peephole=False"):
        rnnkit.ConvLSTM2d(2, 3, 3, peephole_shape=(4, 5))


def test_even_kernel_matches_formula_and_keeps_size():
    """Kernel (2, 4): 'same' padding is (0 before, 1 after) on H and (1, 2) on W."""
    torch.manual_seed(2)
    m = rnnkit.ConvGRU2d(2, 3, (2, 4), bias=False, dtype=F64)
    x = torch.randn(3, 2, 2, 5, 7, dtype=F64)
    out, h_n = m(x)
    assert out.shape == (3, 2, 3, 5, 7) and h_n.shape == (1, 2, 3, 5, 7)
    conv = lambda t, w, b: F.conv2d(F.pad(t, (1, 2, 0, 1)), w, b)
    ht = torch.zeros(2, 3, 5, 7, dtype=F64)
    for t in range(3):
        ht = _gru_formula(x[t], ht, m.weight_ih_l0, m.weight_hh_l0, None, None, conv, conv)
        assert_close(out[t], ht, F64, f"output step {t}")
    for k in (2, 4, (3, 2), 5):
        out, (h, c) = rnnkit.ConvLSTM2d(2, 3, k)(torch.randn(2, 1, 2, 5, 6))
        assert out.shape == (2, 1, 3, 5, 6) and h.shape == c.shape == (1, 1, 3, 5, 6)


def test_stride_and_dilation_match_formula():
    """Layer 0's input conv strides (here 2) and dilates (here 2); the recurrent conv does neither."""
    torch.manual_seed(3)
    m = rnnkit.ConvLSTM2d(2, 3, 3, stride=2, dilation=2, dtype=F64)
    x = torch.randn(3, 2, 2, 7, 8, dtype=F64)
    out, (h_n, c_n) = m(x)
    assert out.shape == (3, 2, 3, 4, 4) and h_n.shape == (1, 2, 3, 4, 4)
    conv_x = lambda t, w, b: F.conv2d(t, w, b, stride=2, padding=2, dilation=2)
    conv_h = lambda t, w, b: F.conv2d(t, w, b, padding=1)
    ht = ct = torch.zeros(2, 3, 4, 4, dtype=F64)
    for t in range(3):
        ht, ct = _lstm_formula(x[t], ht, ct, m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0, m.bias_hh_l0,
                               conv_x, conv_h)
        assert_close(out[t], ht, F64, f"output step {t}")


def test_conv_gru1d_and_conv_lstm3d_match_formula():
    torch.manual_seed(4)
    m = rnnkit.ConvGRU1d(2, 3, 5, dtype=F64)
    x = torch.randn(3, 2, 2, 9, dtype=F64)
    h0 = torch.randn(1, 2, 3, 9, dtype=F64)
    out, h_n = m(x, h0)
    conv = lambda t, w, b: F.conv1d(t, w, b, padding=2)
    ht = h0[0]
    for t in range(3):
        ht = _gru_formula(x[t], ht, m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0, m.bias_hh_l0, conv, conv)
    assert_close(h_n[0], ht, F64, "ConvGRU1d h_n")
    cell = rnnkit.ConvGRU1dCell(2, 3, 5, dtype=F64)
    cell.load_state_dict({k[:-3]: v for k, v in m.state_dict().items()})
    assert_close(cell(x[0], h0[0]), out[0], F64, "ConvGRU1dCell")

    m3 = rnnkit.ConvLSTM3d(2, 2, 3, dtype=F64)
    x3 = torch.randn(2, 1, 2, 3, 4, 5, dtype=F64)
    out3, (h3, c3) = m3(x3)
    assert out3.shape == (2, 1, 2, 3, 4, 5)
    conv3 = lambda t, w, b: F.conv3d(t, w, b, padding=1)
    ht = ct = torch.zeros(1, 2, 3, 4, 5, dtype=F64)
    for t in range(2):
        ht, ct = _lstm_formula(x3[t], ht, ct, m3.weight_ih_l0, m3.weight_hh_l0, m3.bias_ih_l0, m3.bias_hh_l0,
                               conv3, conv3)
    assert_close(h3[0], ht, F64, "ConvLSTM3d h_n")


def test_second_layer_reads_both_directions():
    torch.manual_seed(5)
    m = rnnkit.ConvGRU1d(2, 3, 3, num_layers=2, bidirectional=True, dtype=F64)
    assert _p(m, "weight_ih", 2).shape == (9, 6, 3)
    x = torch.randn(4, 2, 2, 5, dtype=F64)
    out, h_n = m(x)
    conv = lambda t, w, b: F.conv1d(t, w, b, padding=1)

    def run(inp, k, reverse):
        seq = inp.flip(0) if reverse else inp
        ht, outs = torch.zeros(2, 3, 5, dtype=F64), []
        for t in range(seq.shape[0]):
            ht = _gru_formula(seq[t], ht, _p(m, "weight_ih", k), _p(m, "weight_hh", k), _p(m, "bias_ih", k),
                              _p(m, "bias_hh", k), conv, conv)
            outs.append(ht)
        outs = torch.stack(outs)
        return outs.flip(0) if reverse else outs

    layer0 = torch.cat([run(x, 0, False), run(x, 1, True)], dim=2)
    layer1 = torch.cat([run(layer0, 2, False), run(layer0, 3, True)], dim=2)
    assert_close(out, layer1, F64, "two-layer bidirectional output")


# ----------------------------------------------------------------------------- gradients


def _gradcheck_module(module, x, hx, fast_mode=False):
    names = [n for n, _ in module.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in module.parameters())
    states = tuple(s.clone().requires_grad_() for s in (hx if isinstance(hx, tuple) else (hx,)))
    xi = x.clone().requires_grad_()

    def fn(x_, *rest):
        st, ps = rest[:len(states)], rest[len(states):]
        out, h = functional_call(module, dict(zip(names, ps)), (x_, st if len(st) > 1 else st[0]))
        return (out,) + (tuple(h) if isinstance(h, tuple) else (h,))

    assert torch.autograd.gradcheck(fn, (xi, *states, *params), fast_mode=fast_mode)


def test_gradcheck_conv_lstm2d_with_peepholes():
    torch.manual_seed(6)
    m = rnnkit.ConvLSTM2d(2, 2, 3, peephole=True, dtype=F64)
    x = torch.randn(3, 1, 2, 3, 3, dtype=F64)
    hx = (torch.randn(1, 1, 2, 3, 3, dtype=F64), torch.randn(1, 1, 2, 3, 3, dtype=F64))
    _gradcheck_module(m, x, hx)


def test_gradcheck_conv_gru1d_bidirectional_two_layers():
    torch.manual_seed(7)
    m = rnnkit.ConvGRU1d(2, 2, 2, num_layers=2, bidirectional=True, dtype=F64)
    x = torch.randn(3, 2, 2, 4, dtype=F64)
    _gradcheck_module(m, x, torch.randn(4, 2, 2, 4, dtype=F64), fast_mode=True)


def test_peepholes_learn():
    """Peephole weights are registered parameters that get gradients and move under an optimizer."""
    torch.manual_seed(8)
    m = rnnkit.ConvLSTM1d(2, 3, 3, peephole=True)
    names = {n for n, _ in m.named_parameters()}
    assert {"weight_ci_l0", "weight_cf_l0", "weight_co_l0"} <= names
    assert {"weight_ci_l0", "weight_cf_l0", "weight_co_l0"} <= set(m.state_dict())
    before = m.weight_co_l0.detach().clone()
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    out, _ = m(torch.randn(4, 2, 2, 6), (torch.zeros(1, 2, 3, 6), torch.randn(1, 2, 3, 6)))
    out.square().mean().backward()
    for n in ("weight_ci_l0", "weight_cf_l0", "weight_co_l0"):
        assert getattr(m, n).grad is not None and getattr(m, n).grad.abs().sum() > 0, n
    opt.step()
    assert not torch.equal(before, m.weight_co_l0.detach())


# ----------------------------------------------------------------------------- lengths, streaming, layouts


@pytest.mark.parametrize("cls", [rnnkit.ConvLSTM2d, rnnkit.ConvGRU2d])
def test_lengths_oracle_bidirectional_two_layers(cls):
    """A padded batch with lengths gives each sequence what it gives alone, in both directions."""
    torch.manual_seed(9)
    m = cls(2, 3, 3, num_layers=2, bidirectional=True, dtype=F64)
    L, N = 5, 4
    x = torch.randn(L, N, 2, 4, 3, dtype=F64)
    lengths = torch.tensor([5, 2, 0, 4])
    hx = tuple(torch.randn(4, N, 3, 4, 3, dtype=F64) for _ in m.cell_spec.state_names)
    hx_arg = hx if len(hx) > 1 else hx[0]
    out, states = m(x, hx_arg, lengths=lengths, padding_value=-7.0)
    states = states if isinstance(states, tuple) else (states,)
    assert out.shape == (L, N, 6, 4, 3)
    for n, length in enumerate(lengths.tolist()):
        if length == 0:
            assert (out[:, n] == -7.0).all()
            for s, s0 in zip(states, hx):
                assert torch.equal(s[:, n], s0[:, n])
            continue
        one = tuple(s[:, n:n + 1] for s in hx)
        o1, s1 = m(x[:length, n:n + 1], one if len(one) > 1 else one[0])
        s1 = s1 if isinstance(s1, tuple) else (s1,)
        assert_close(out[:length, n], o1[:, 0], F64, f"output of sequence {n}")
        assert (out[length:, n] == -7.0).all()
        for i, (a, b) in enumerate(zip(states, s1)):
            assert_close(a[:, n], b[:, 0], F64, f"state {i} of sequence {n}")
    # the reverse direction of the last layer starts at each sequence's own last step
    assert_close(states[0][-1, 1], out[0, 1, 3:], F64, "reverse h_n is the reverse output at t=0")
    assert_close(states[0][-2, 1], out[1, 1, :3], F64, "forward h_n is the output at t=length-1")


@pytest.mark.parametrize("cls", [rnnkit.ConvLSTM2d, rnnkit.ConvGRU1d])
def test_chunked_streaming_equals_one_call(cls):
    torch.manual_seed(10)
    m = cls(2, 3, 3, num_layers=2, stride=2, dtype=F64)
    spatial = (5, 6) if cls is rnnkit.ConvLSTM2d else (7,)
    x = torch.randn(7, 2, 2, *spatial, dtype=F64)
    full, s_full = m(x)
    outs, state = [], None
    for chunk in (x[:3], x[3:4], x[4:]):
        o, state = m(chunk, state)
        outs.append(o)
    assert_close(torch.cat(outs), full, F64, "streamed outputs")
    for a, b in zip(s_full if isinstance(s_full, tuple) else (s_full,), state if isinstance(state, tuple) else (state,)):
        assert_close(a, b, F64, "streamed final state")


def test_batch_first_and_unbatched_equal_time_major():
    torch.manual_seed(11)
    m = rnnkit.ConvLSTM1d(2, 3, 3, bidirectional=True, dtype=F64)
    mb = rnnkit.ConvLSTM1d(2, 3, 3, bidirectional=True, batch_first=True, dtype=F64)
    mb.load_state_dict(m.state_dict())
    x = torch.randn(4, 3, 2, 5, dtype=F64)
    out, (h, c) = m(x)
    out_b, (h_b, c_b) = mb(x.transpose(0, 1))
    assert_close(out_b.transpose(0, 1), out, F64, "batch_first output")
    assert_close(h_b, h, F64, "batch_first h_n")
    out_u, (h_u, c_u) = m(x[:, 1])
    assert out_u.shape == (4, 6, 5) and h_u.shape == (2, 3, 5)
    assert_close(out_u, out[:, 1], F64, "unbatched output")
    assert_close(c_u, c[:, 1], F64, "unbatched c_n")
    h0, c0 = torch.randn(2, 3, 5, dtype=F64), torch.randn(2, 3, 5, dtype=F64)  # unbatched states: no N axis
    out_u, (h_u, _) = m(x[:, 1], (h0, c0))
    out_1, (h_1, _) = m(x[:, 1:2], (h0.unsqueeze(1), c0.unsqueeze(1)))
    assert_close(out_u, out_1[:, 0], F64, "unbatched output with hx")
    assert_close(h_u, h_1[:, 0], F64, "unbatched h_n with hx")
    with pytest.raises(ValueError, match=r"Fix: the input is unbatched \(no N axis\), so the state must be unbatched"):
        m(x[:, 1], (h0.unsqueeze(1), c0.unsqueeze(1)))


def test_shapes_1d_2d_3d():
    for cls, spatial in [(rnnkit.ConvLSTM1d, (7,)), (rnnkit.ConvGRU1d, (7,)), (rnnkit.ConvLSTM, (4, 5)),
                         (rnnkit.ConvGRU, (4, 5)), (rnnkit.ConvLSTM3d, (3, 4, 2)), (rnnkit.ConvGRU3d, (3, 4, 2))]:
        m = cls(2, 3, 3, num_layers=2, bidirectional=True, batch_first=True)
        out, states = m(torch.randn(2, 5, 2, *spatial))
        assert out.shape == (2, 5, 6, *spatial), cls.__name__
        for s in states if isinstance(states, tuple) else (states,):
            assert s.shape == (4, 2, 3, *spatial), cls.__name__
        # auto picks the fused kernels where the extension builds (test_fused_conv.py checks them)
        assert m.last_backend == ("reference" if rnnkit.backends.BACKENDS["fused"].unavailable() else "fused")
        assert m.weight_ih_l1.shape[:2] == (m.cell_spec.gates * 3, 6)
    assert rnnkit.ConvLSTM is rnnkit.ConvLSTM2d and rnnkit.ConvGRU is rnnkit.ConvGRU2d
    assert rnnkit.ConvLSTMCell is rnnkit.ConvLSTM2dCell and rnnkit.ConvGRUCell is rnnkit.ConvGRU2dCell


def test_stride_state_size_is_consistent():
    """Stride 2 on (7, 8) gives states (4, 4) in every layer; an hx of that shape is taken,
    one of the input's size is refused with the expected shape spelled out."""
    m = rnnkit.ConvGRU2d(2, 3, 3, num_layers=3, stride=2)
    x = torch.randn(3, 2, 2, 7, 8)
    out, h = m(x)
    assert out.shape == (3, 2, 3, 4, 4) and h.shape == (3, 2, 3, 4, 4)
    out2, h2 = m(x, h)
    assert h2.shape == h.shape
    with pytest.raises(ValueError, match=re.escape("h_0 has shape (3, 2, 3, 7, 8) but expected (3, 2, 3, 4, 4) = "
                                                   "(D*num_layers=1*3, N=2, hidden=3, H=4, W=4)")):
        m(x, torch.zeros(3, 2, 3, 7, 8))
    cell = rnnkit.ConvLSTM1dCell(2, 3, 4, stride=3)
    h1, c1 = cell(torch.randn(2, 2, 10))
    assert h1.shape == c1.shape == (2, 3, 4)


def test_lengths_zero_dropout_and_eval_determinism():
    m = rnnkit.ConvLSTM1d(2, 3, 3, num_layers=2, dropout=0.5)
    x = torch.randn(3, 2, 2, 5)
    m.eval()
    a, _ = m(x)
    b, _ = m(x)
    assert torch.equal(a, b)
    m.train()
    torch.manual_seed(0)
    c, _ = m(x)
    torch.manual_seed(0)
    d, _ = m(x)
    assert torch.equal(c, d) and not torch.equal(a, c)


# ----------------------------------------------------------------------------- errors


def test_errors_name_what_was_read():
    m = rnnkit.ConvLSTM2d(3, 4, 3)
    with pytest.raises(ValueError, match=re.escape("input of shape (5, 2, 4, 6, 6) was read as (L=5, N=2, C=4, H=6, "
                                                   "W=6) [batch_first=False]; its channel axis (C=4")):
        m(torch.randn(5, 2, 4, 6, 6))
    with pytest.raises(ValueError, match=re.escape("input must be 5-D (L, N, C, H, W) (batched, batch_first=False) "
                                                   "or 4-D (L, C, H, W) (unbatched), got 3-D input of shape (5, 2, 3)")):
        m(torch.randn(5, 2, 3))
    with pytest.raises(ValueError, match=r"got 6-D input of shape \(5, 2, 3, 6, 6, 6\)"):
        m(torch.randn(5, 2, 3, 6, 6, 6))
    with pytest.raises(ValueError, match=re.escape("c_0 has shape (1, 2, 4, 6) but expected (1, 2, 4, 6, 6) = "
                                                   "(D*num_layers=1*1, N=2, hidden=4, H=6, W=6)")):
        m(torch.randn(5, 2, 3, 6, 6), (torch.zeros(1, 2, 4, 6, 6), torch.zeros(1, 2, 4, 6)))
    with pytest.raises(TypeError, match=r"hx must be a tuple \(h_0, c_0\)"):
        m(torch.randn(5, 2, 3, 6, 6), torch.zeros(1, 2, 4, 6, 6))
    with pytest.raises(ValueError, match=r"spatial size \(0, 6\) has an empty axis"):
        m(torch.randn(5, 2, 3, 0, 6))
    x = torch.randn(5, 2, 3, 6, 6)
    with pytest.raises(TypeError, match="PackedSequence input is not supported.*lengths="):
        m(pack_padded_sequence(x, [5, 3]))
    with pytest.raises(ValueError, match=r"lengths has 3 entries but the batch has N=2"):
        m(x, lengths=[5, 3, 1])


def test_constructor_errors():
    with pytest.raises(ValueError, match=r"ConvLSTM2d: kernel_size must be a positive int or a tuple of 2 positive "
                                         r"ints \(one per spatial dim\), got \(3, 3, 3\)"):
        rnnkit.ConvLSTM2d(3, 4, (3, 3, 3))
    with pytest.raises(ValueError, match=r"ConvGRU1d: kernel_size must be positive, got \(0,\)"):
        rnnkit.ConvGRU1d(3, 4, 0)
    with pytest.raises(ValueError, match=r"ConvGRU3d: stride must be .* tuple of 3"):
        rnnkit.ConvGRU3d(3, 4, 3, stride=(1, 2))
    with pytest.raises(TypeError, match=r"kernel_size must be a positive int .* got True"):
        rnnkit.ConvLSTM1d(3, 4, True)
    with pytest.raises(TypeError, match=r"peephole must be a bool, got 1"):
        rnnkit.ConvLSTM1d(3, 4, 3, peephole=1)
    with pytest.raises(ValueError, match=r"backend='torch' cannot run this configuration: PyTorch has no fused op "
                                         r"for the 'conv_lstm' cell"):
        rnnkit.ConvLSTM2d(3, 4, 3, backend="torch")
    with pytest.raises(TypeError, match="input_size must be a positive int"):
        rnnkit.ConvGRU2d(3.0, 4, 3)
    import numpy as np
    assert rnnkit.ConvGRU2d(3, 4, np.int64(3), stride=[np.int64(1), 2]).kernel_size == (3, 3)


def test_cell_errors():
    cell = rnnkit.ConvLSTMCell(3, 4, 3)
    with pytest.raises(ValueError, match=re.escape("input of shape (2, 5, 6, 6) was read as (N=2, C=5, H=6, W=6); "
                                                   "its channel axis C must equal input_size=3")):
        cell(torch.randn(2, 5, 6, 6))
    with pytest.raises(ValueError, match=re.escape("input must be 4-D (N, C, H, W) or 3-D (C, H, W) unbatched, got "
                                                   "2-D input of shape (2, 3)")):
        cell(torch.randn(2, 3))
    with pytest.raises(ValueError, match=re.escape("h has shape (2, 4, 5, 6) but expected (2, 4, 6, 6) = (N=2, "
                                                   "hidden=4, H=6, W=6)")):
        cell(torch.randn(2, 3, 6, 6), (torch.zeros(2, 4, 5, 6), torch.zeros(2, 4, 6, 6)))
    with pytest.raises(TypeError, match=r"hx must be a single Tensor"):
        rnnkit.ConvGRU1dCell(3, 4, 3)(torch.randn(2, 3, 5), (torch.zeros(2, 4, 5),))
    with pytest.raises(TypeError, match=r"input has dtype torch.float64 but the parameters are torch.float32"):
        cell(torch.randn(2, 3, 6, 6, dtype=F64))
    h, c = cell(torch.randn(3, 6, 6))  # unbatched
    assert h.shape == c.shape == (4, 6, 6)


# ----------------------------------------------------------------------------- ConvLSTM_pytorch checkpoints


class ReferenceConvLSTMCell(nn.Module):
    """The ConvLSTM_pytorch ConvLSTMCell as its description gives it: one conv over cat([x, h]),
    'kernel // 2' padding, gates split i, f, o, g. (Written here from that description.)"""

    def __init__(self, input_dim, hidden_dim, kernel_size, bias):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.conv = nn.Conv2d(input_dim + hidden_dim, 4 * hidden_dim, kernel_size,
                              padding=(kernel_size[0] // 2, kernel_size[1] // 2), bias=bias)

    def forward(self, x, state):
        h, c = state
        cc_i, cc_f, cc_o, cc_g = torch.split(self.conv(torch.cat([x, h], dim=1)), self.hidden_dim, dim=1)
        c_next = torch.sigmoid(cc_f) * c + torch.sigmoid(cc_i) * torch.tanh(cc_g)
        return torch.sigmoid(cc_o) * torch.tanh(c_next), c_next


class ReferenceConvLSTM(nn.Module):
    """Its stack: ``cell_list`` of cells, layer k reads layer k-1's hidden sequence."""

    def __init__(self, input_dim, hidden_dim, kernel_size, num_layers, bias):
        super().__init__()
        self.cell_list = nn.ModuleList(
            [ReferenceConvLSTMCell(input_dim if k == 0 else hidden_dim, hidden_dim, kernel_size, bias)
             for k in range(num_layers)])

    def forward(self, x):  # (L, N, C, H, W)
        layer_input, finals = x, []
        for cell in self.cell_list:
            h = c = torch.zeros(x.shape[1], cell.hidden_dim, *x.shape[3:], dtype=x.dtype)
            outs = []
            for t in range(x.shape[0]):
                h, c = cell(layer_input[t], (h, c))
                outs.append(h)
            layer_input = torch.stack(outs)
            finals.append((h, c))
        return layer_input, finals


@pytest.mark.parametrize("bias,kernel", [(True, (3, 3)), (False, (5, 3))])
def test_loads_convlstm_pytorch_cell_checkpoint(bias, kernel):
    torch.manual_seed(12)
    ref = ReferenceConvLSTMCell(3, 4, kernel, bias).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.uniform_(-0.5, 0.5)
    ours = rnnkit.ConvLSTMCell(3, 4, kernel, bias=bias, dtype=F64)
    ours.load_state_dict(ref.state_dict(), strict=True)
    if bias:
        assert torch.equal(ours.bias_hh, torch.zeros(16, dtype=F64))
    built = rnnkit.ConvLSTMCell.from_convlstm_pytorch(ref.state_dict())
    assert built.kernel_size == kernel and built.input_size == 3 and built.hidden_size == 4 and built.bias == bias
    xs = torch.randn(4, 2, 3, 6, 7, dtype=F64)
    s_ref = s_ours = s_built = (torch.randn(2, 4, 6, 7, dtype=F64), torch.randn(2, 4, 6, 7, dtype=F64))
    for t in range(4):
        s_ref, s_ours, s_built = ref(xs[t], s_ref), ours(xs[t], s_ours), built(xs[t], s_built)
        for a, b, c in zip(s_ref, s_ours, s_built):
            assert_close(b, a, F64, f"step {t} (load_state_dict)")
            assert_close(c, a, F64, f"step {t} (from_convlstm_pytorch)")


def test_loads_convlstm_pytorch_stack_checkpoint():
    torch.manual_seed(13)
    ref = ReferenceConvLSTM(2, 3, (3, 3), num_layers=2, bias=True).double()
    ours = rnnkit.ConvLSTM2d(2, 3, 3, num_layers=2, dtype=F64)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(5, 2, 2, 4, 6, dtype=F64)
    out_ref, finals = ref(x)
    out, (h_n, c_n) = ours(x)
    assert_close(out, out_ref, F64, "stack output")
    for k, (h, c) in enumerate(finals):
        assert_close(h_n[k], h, F64, f"h_n layer {k}")
        assert_close(c_n[k], c, F64, f"c_n layer {k}")


def test_convlstm_pytorch_checkpoint_errors():
    ref = ReferenceConvLSTMCell(3, 4, (3, 3), True)
    with pytest.raises(ValueError, match=re.escape("conv.weight has shape (16, 7, 3, 3); a ConvLSTM_pytorch conv "
                                                   "over cat([x, h]) for input_size=2, hidden_size=4 has shape "
                                                   "(4*hidden=16, input+hidden=6, *kernel_size)")):
        rnnkit.ConvLSTMCell(2, 4, 3).load_state_dict(ref.state_dict())
    with pytest.raises(ValueError, match=r"expected a ConvLSTMCell state_dict with a 4-D 'conv.weight'.*got no "
                                         r"'conv.weight'"):
        rnnkit.ConvLSTMCell.from_convlstm_pytorch({"weight": torch.zeros(3)})
    stack = ReferenceConvLSTM(2, 3, (3, 3), num_layers=2, bias=True)
    with pytest.raises(ValueError, match=r"cell_list.1.conv.weight.*no one-way counterpart"):
        rnnkit.ConvLSTM2d(2, 3, 3, num_layers=1).load_state_dict(stack.state_dict())


# ----------------------------------------------------------------------------- registry, training, docs


def test_registered_and_runnable_from_the_registry():
    for name in ("convlstm1d", "convlstm2d", "convlstm3d", "convgru1d", "convgru2d", "convgru3d"):
        entry = rnnkit.get_layer(name)
        m = entry.make(2, 3, num_layers=2, bidirectional=True)
        x = torch.randn(entry.input_shape(4, 2, 2))
        out, _ = m(x)
        assert out.shape == (4, 2, 6, *entry.spatial)
        assert entry.cell is not None and entry.cell(2, 3, 3)(x[0]) is not None


def _moving_dots(generator, n=16, length=8, size=8):
    """Dots moving one pixel a step in a random one of 4 directions (wrapping): (L, N, 1, size, size)."""
    pos = torch.randint(0, size, (n, 2), generator=generator)
    vel = torch.tensor([[0, 1], [0, -1], [1, 0], [-1, 0]])[torch.randint(0, 4, (n,), generator=generator)]
    frames = torch.zeros(length, n, 1, size, size)
    for t in range(length):
        p = (pos + t * vel) % size
        frames[t, torch.arange(n), 0, p[:, 0], p[:, 1]] = 1.0
    return frames


def test_conv_lstm_learns_to_predict_the_next_frame():
    """Next-frame prediction of a moving dot on 8x8 as a 64-way classification of its position:
    the loss starts at log(64) ~ 4.2, and only a model that localizes the dot gets below half of it."""
    torch.manual_seed(14)
    gen = torch.Generator().manual_seed(0)
    model = rnnkit.ConvLSTM2d(1, 8, 3)
    head = nn.Conv2d(8, 1, 1)
    opt = torch.optim.Adam(list(model.parameters()) + list(head.parameters()), lr=0.03)

    def loss_of(frames):
        out, _ = model(frames[:-1])
        logits = head(out.flatten(0, 1)).flatten(1)  # (L-1 * N, 64)
        target = frames[1:].flatten(0, 1).flatten(1).argmax(1)
        return F.cross_entropy(logits, target)

    test = _moving_dots(torch.Generator().manual_seed(99))
    with torch.no_grad():
        initial = loss_of(test).item()
    for _ in range(30):
        opt.zero_grad()
        loss_of(_moving_dots(gen)).backward()
        opt.step()
    with torch.no_grad():
        final = loss_of(test).item()
    assert final < 0.5 * initial, (initial, final)


def test_docs_examples_run():
    """Every python block of docs/conv_and_minimal.md runs as written."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "conv_and_minimal.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "docs/conv_and_minimal.md", "exec"), {})


def test_docstring_examples_run():
    import doctest

    import rnnkit.zoo.conv as module
    result = doctest.testmod(module, extraglobs={"rnnkit": rnnkit, "torch": torch})
    assert result.attempted > 0 and result.failed == 0
