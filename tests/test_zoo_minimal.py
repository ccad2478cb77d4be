"""minGRU and minLSTM: the step against a hand-written formula in float64, the
log-space parallel scan against the step loop (float64 tight, float32 to 1e-5 up
to L = 10,000), initial states of any sign, gradcheck, lengths, streaming."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import rnnkit
from helpers import assert_close
from rnnkit.runner import reference_scan
from rnnkit.zoo.minimal import MIN_GRU_SPEC, MIN_LSTM_SPEC, log_space_scan

F64 = torch.float64
CLASSES = [rnnkit.MinGRU, rnnkit.MinLSTM]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: intra-op threads only add sync cost on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _g(v):
    return torch.where(v >= 0, v + 0.5, 1 / (1 + torch.exp(-v)))


def _formula(cls, x, h, w, b):
    """One step, from the paper's equations (Feng et al. 2024, Algorithms 2 and 4)."""
    hidden = h.shape[-1]
    k = x @ w.T + (b if b is not None else 0)
    if cls is rnnkit.MinGRU:
        z = 1 / (1 + torch.exp(-k[..., :hidden]))
        return (1 - z) * h + z * _g(k[..., hidden:])
    f = 1 / (1 + torch.exp(-k[..., :hidden]))
    i = 1 / (1 + torch.exp(-k[..., hidden:2 * hidden]))
    return f / (f + i) * h + i / (f + i) * _g(k[..., 2 * hidden:])


def _pair(cls, *args, **kwargs):
    """The same weights, parallel scan and step loop."""
    par = cls(*args, **kwargs)
    seq = cls(*args, parallel=False, **kwargs)
    seq.load_state_dict(par.state_dict())
    return par, seq


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("cls", CLASSES)
def test_matches_formula(cls, bias):
    torch.manual_seed(0)
    m = cls(3, 4, bias=bias, dtype=F64)
    # pre-activations on both sides of 0, so both branches of g are used
    x = torch.randn(6, 2, 3, dtype=F64) * 3
    h0 = torch.randn(1, 2, 4, dtype=F64)
    for parallel in (True, False):
        m.cell_spec = MIN_GRU_SPEC if cls is rnnkit.MinGRU else MIN_LSTM_SPEC
        if not parallel:
            m.cell_spec = dataclasses.replace(m.cell_spec, sequence=None)
        out, h_n = m(x, h0)
        h = h0[0]
        for t in range(6):
            h = _formula(cls, x[t], h, m.weight_ih_l0, m.bias_ih_l0 if bias else None)
            assert_close(out[t], h, F64, f"step {t} parallel={parallel}")
        assert_close(h_n[0], h, F64, "h_n")
    cell = (rnnkit.MinGRUCell if cls is rnnkit.MinGRU else rnnkit.MinLSTMCell)(3, 4, bias=bias, dtype=F64)
    cell.load_state_dict({k[:-3]: v for k, v in m.state_dict().items()})
    assert_close(cell(x[0], h0[0]), out[0], F64, "cell")
    assert cell(x[0, 0]).shape == (4,)


def test_parameters_and_paper_activation():
    m = rnnkit.MinLSTM(3, 5, num_layers=2, bidirectional=True)
    assert [(n, tuple(p.shape)) for n, p in m.named_parameters()] == [
        ("weight_ih_l0", (15, 3)), ("bias_ih_l0", (15,)), ("weight_ih_l0_reverse", (15, 3)),
        ("bias_ih_l0_reverse", (15,)), ("weight_ih_l1", (15, 10)), ("bias_ih_l1", (15,)),
        ("weight_ih_l1_reverse", (15, 10)), ("bias_ih_l1_reverse", (15,))]
    v = torch.tensor([-3.0, -0.5, 0.0, 0.5, 2.0], dtype=F64)
    assert_close(rnnkit.zoo.minimal.g(v), torch.tensor([torch.sigmoid(torch.tensor(-3.0, dtype=F64)),
                                                          torch.sigmoid(torch.tensor(-0.5, dtype=F64)),
                                                          0.5, 1.0, 2.5], dtype=F64), F64, "g")
    assert_close(rnnkit.zoo.minimal.log_g(v), torch.log(rnnkit.zoo.minimal.g(v)), F64, "log_g")


# ----------------------------------------------------------------------------- scan == step


@pytest.mark.parametrize("cls", CLASSES)
def test_scan_equals_step_loop_float64(cls):
    torch.manual_seed(1)
    par, seq = _pair(cls, 3, 6, num_layers=2, bidirectional=True, dtype=F64)
    x = torch.randn(300, 4, 3, dtype=F64) * 2
    h0 = torch.randn(4, 4, 6, dtype=F64) * 3  # any sign
    (o1, h1), (o2, h2) = par(x, h0), seq(x, h0)
    torch.testing.assert_close(o1, o2, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(h1, h2, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("cls", CLASSES)
def test_scan_equals_step_loop_float32_10000_steps(cls):
    """The paper's claim, checked: 10,000 steps, float32, scan and loop agree to 1e-5."""
    torch.manual_seed(2)
    par, seq = _pair(cls, 3, 4)
    x = torch.randn(10_000, 2, 3) * 2
    h0 = torch.randn(1, 2, 4)
    (o1, h1), (o2, h2) = par(x, h0), seq(x, h0)
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h1, h2, rtol=1e-5, atol=1e-5)
    # and against float64 (the loop's own rounding stays small: the recurrence contracts)
    ref = seq.double()(x.double(), h0.double())[0]
    torch.testing.assert_close(o1.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", CLASSES)
def test_scan_gradients_equal_step_loop_gradients_over_5000_steps_float32(cls):
    torch.manual_seed(11)
    par, seq = _pair(cls, 3, 4)
    x = torch.randn(5000, 2, 3) * 2
    w = torch.randn(5000, 2, 4)
    grads = []
    for m in (par, seq):
        h0 = torch.randn(1, 2, 4, generator=torch.Generator().manual_seed(1)).requires_grad_()
        out, _ = m(x, h0)
        (out * w).sum().backward()
        grads.append([h0.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(*grads):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_log_space_scan_keeps_any_sign_of_h0_and_saturated_gates():
    """``h_t = a_t h_{t-1} + b_t`` with h0 negative, zero and positive, and a_t from 1e-30 to 1 - 1e-9."""
    torch.manual_seed(3)
    L = 50
    log_a = torch.empty(L, 3, 4, dtype=F64).uniform_(-69, -1e-9)
    log_a[10:20] = -1e-9  # nearly 1: the state is carried
    log_b = torch.randn(L, 3, 4, dtype=F64) * 5
    h0 = torch.tensor([[-2.0], [0.0], [3.0]], dtype=F64).expand(3, 4)
    h, expected = h0, []
    for t in range(L):
        h = log_a[t].exp() * h + log_b[t].exp()
        expected.append(h)
    torch.testing.assert_close(log_space_scan(log_a, log_b, h0), torch.stack(expected), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", CLASSES)
def test_given_h0_any_sign_and_its_gradient(cls):
    """h_0 is the state itself (not passed through g), of any sign; its gradient
    through the scan equals the gradient through the loop."""
    torch.manual_seed(4)
    par, seq = _pair(cls, 3, 4, dtype=F64)
    x = torch.randn(20, 2, 3, dtype=F64)
    h0 = torch.tensor([-1.5, 0.0, 0.3, 4.0], dtype=F64).repeat(1, 2, 1)
    grads = []
    for m in (par, seq):
        h = h0.clone().requires_grad_()
        out, h_n = m(x, h)
        (out * torch.linspace(-1, 1, out.numel(), dtype=F64).view_as(out)).sum().add(h_n.sum()).backward()
        grads.append((out.detach(), h.grad, [p.grad for p in m.parameters()]))
        assert torch.isfinite(h.grad).all()
    assert_close(grads[0][0], grads[1][0], F64, "outputs")
    assert_close(grads[0][1], grads[1][1], F64, "grad h0")
    for a, b in zip(grads[0][2], grads[1][2]):
        assert_close(a, b, F64, "grad weight")
    # the first step uses h0 as given
    assert_close(grads[0][0][0], _formula(cls, x[0], h0[0], par.weight_ih_l0, par.bias_ih_l0), F64, "step 1")


@pytest.mark.parametrize("cls", CLASSES)
def test_gradcheck(cls):
    torch.manual_seed(5)
    m = cls(2, 3, num_layers=2, bidirectional=True, dtype=F64)
    names = [n for n, _ in m.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in m.parameters())
    x = torch.randn(5, 2, 2, dtype=F64, requires_grad=True)
    h0 = torch.randn(4, 2, 3, dtype=F64, requires_grad=True)

    def fn(x_, h_, *ps):
        return functional_call(m, dict(zip(names, ps)), (x_, h_), {"lengths": torch.tensor([5, 3])})

    assert torch.autograd.gradcheck(fn, (x, h0, *params))


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("case", ["last_step_loss", "lengths"])
def test_second_derivatives_equal_step_loop(cls, case):
    """create_graph=True through the parallel scan: finite and equal to the step loop's, also where an
    output's gradient is 0 (a loss on the last step only; steps past a length), where torch's own
    logcumsumexp double backward is NaN (rnnkit/zoo/minimal.py, _LogCumSumExp)."""
    torch.manual_seed(8)
    par, seq = _pair(cls, 3, 4, num_layers=2, bidirectional=True, dtype=F64)
    x = torch.randn(6, 3, 3, dtype=F64)
    results = []
    for m in (par, seq):
        xx = x.clone().requires_grad_()
        if case == "lengths":
            out, _ = m(xx, lengths=torch.tensor([6, 2, 4]))
            loss = (out ** 2).sum()
        else:
            out, _ = m(xx)
            loss = out[-1].sum()
        (gx,) = torch.autograd.grad(loss, xx, create_graph=True)
        results.append(torch.autograd.grad((gx ** 2).sum(), [xx, *m.parameters()]))
    for a, b in zip(*results):
        assert torch.isfinite(a).all()
        assert_close(a, b, F64, case)


def test_log_space_scan_gradgradcheck_with_zero_output_gradients():
    torch.manual_seed(9)
    log_a = (-torch.rand(4, 2, 3, dtype=F64)).requires_grad_()
    log_b = torch.randn(4, 2, 3, dtype=F64, requires_grad=True)
    h0 = torch.randn(2, 3, dtype=F64, requires_grad=True)
    grad_out = torch.randn(4, 2, 3, dtype=F64)
    grad_out[2:] = 0.0  # outputs the loss does not read
    grad_out[0, 1] = 0.0
    assert torch.autograd.gradgradcheck(log_space_scan, (log_a, log_b, h0), (grad_out,))


# ----------------------------------------------------------------------------- lengths, streaming, layouts


@pytest.mark.parametrize("cls", CLASSES)
def test_lengths_oracle(cls):
    torch.manual_seed(6)
    m = cls(3, 4, num_layers=2, bidirectional=True, dtype=F64)
    x = torch.randn(7, 4, 3, dtype=F64)
    lengths = torch.tensor([7, 2, 0, 5])
    h0 = torch.randn(4, 4, 4, dtype=F64)
    out, h_n = m(x, h0, lengths=lengths, padding_value=9.0)
    for n, length in enumerate(lengths.tolist()):
        if length == 0:
            assert torch.equal(h_n[:, n], h0[:, n]) and (out[:, n] == 9.0).all()
            continue
        o1, h1 = m(x[:length, n:n + 1], h0[:, n:n + 1])
        assert_close(out[:length, n], o1[:, 0], F64, f"output {n}")
        assert (out[length:, n] == 9.0).all()
        assert_close(h_n[:, n], h1[:, 0], F64, f"h_n {n}")


@pytest.mark.parametrize("cls", CLASSES)
def test_lengths_hold_the_state_in_the_scan_itself(cls):
    """One layer-direction through the runner's scan: the parallel sequence's final
    state is the step loop's, which holds the state past each length."""
    torch.manual_seed(7)
    m = cls(3, 4, dtype=F64)
    spec = m.cell_spec
    p = m._layer_params(0)
    x = torch.randn(9, 3, 3, dtype=F64)
    h0 = (torch.randn(3, 4, dtype=F64),)
    lengths = torch.tensor([9, 4, 1])
    out_par, (h_par,) = reference_scan(spec, p, x, h0, lengths)
    out_seq, (h_seq,) = reference_scan(dataclasses.replace(spec, sequence=None), p, x, h0, lengths)
    assert_close(h_par, h_seq, F64, "final state")
    valid = torch.arange(9).unsqueeze(1) < lengths
    assert_close(out_par[valid], out_seq[valid], F64, "valid outputs")


@pytest.mark.parametrize("cls", CLASSES)
def test_chunked_streaming_equals_one_call(cls):
    torch.manual_seed(8)
    m = cls(3, 5, num_layers=3, batch_first=True)
    x = torch.randn(2, 40, 3)
    full, h_full = m(x)
    outs, h = [], None
    for chunk in x.split([1, 16, 23], dim=1):
        o, h = m(chunk, h)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h, h_full, rtol=1e-5, atol=1e-6)
    # streaming through the cell step by step gives the same
    cell = (rnnkit.MinGRUCell if cls is rnnkit.MinGRU else rnnkit.MinLSTMCell)(3, 5)
    one = cls(3, 5, batch_first=True)
    cell.load_state_dict({k[:-3]: v for k, v in one.state_dict().items()})
    hc = None
    for t in range(40):
        hc = cell(x[:, t], hc)
    torch.testing.assert_close(hc, one(x)[1][0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", CLASSES)
def test_bidirectional_batch_first_unbatched_and_packed(cls):
    torch.manual_seed(9)
    m = cls(3, 4, num_layers=2, bidirectional=True, batch_first=True, dtype=F64)
    x = torch.randn(3, 6, 3, dtype=F64)
    out, h_n = m(x)
    assert out.shape == (3, 6, 8) and h_n.shape == (4, 3, 4)
    assert_close(h_n[-2], out[:, -1, :4], F64, "forward h_n")
    assert_close(h_n[-1], out[:, 0, 4:], F64, "reverse h_n")
    out_u, h_u = m(x[1])
    assert out_u.shape == (6, 8) and h_u.shape == (4, 4)
    assert_close(out_u, out[1], F64, "unbatched")
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, [6, 2, 4], batch_first=True, enforce_sorted=False)
    out_p, h_p = m(packed)
    _, h_l = m(x, lengths=[6, 2, 4])
    assert_close(h_p, h_l, F64, "packed == lengths")


def test_errors():
    m = rnnkit.MinGRU(3, 4)
    with pytest.raises(ValueError, match=re.escape("input of shape (5, 2, 4) was read as (L=5, N=2, H_in=4) "
                                                   "[batch_first=False]; its feature axis (the last, H_in=4) must "
                                                   "equal input_size=3")):
        m(torch.randn(5, 2, 4))
    with pytest.raises(ValueError, match=re.escape("h_0 has shape (1, 2, 5) but expected (1, 2, 4)")):
        m(torch.randn(5, 2, 3), torch.zeros(1, 2, 5))
    with pytest.raises(TypeError, match="hx must be a single Tensor h_0"):
        rnnkit.MinLSTM(3, 4)(torch.randn(5, 2, 3), (torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)))
    with pytest.raises(TypeError, match=r"MinLSTM: parallel must be a bool, got 'yes'"):
        rnnkit.MinLSTM(3, 4, parallel="yes")
    with pytest.raises(ValueError, match=r"backend='torch' cannot run this configuration: PyTorch has no fused op "
                                         r"for the 'min_gru' cell"):
        rnnkit.MinGRU(3, 4, backend="torch")
    with pytest.raises(ValueError, match=r"backend='torch' cannot run this cell: PyTorch has no fused op for the "
                                         r"'min_lstm' cell"):
        rnnkit.MinLSTMCell(3, 4, backend="torch")
    with pytest.raises(TypeError, match="proj_size"):
        rnnkit.MinGRU(3, 4, proj_size=2)


def test_registered():
    for name, cls, cell in [("mingru", rnnkit.MinGRU, rnnkit.MinGRUCell), ("minlstm", rnnkit.MinLSTM,
                                                                          rnnkit.MinLSTMCell)]:
        entry = rnnkit.get_layer(name)
        assert entry.layer is cls and entry.cell is cell
        m = entry.make(3, 4, num_layers=2)
        out, h = m(torch.randn(entry.input_shape(5, 2, 3)))
        assert out.shape == (5, 2, 4) and h.shape == (2, 2, 4)
        assert m.last_backend == "reference"


def test_min_gru_learns_to_count():
    """Loss falls on a task needing memory: output the running mean of a +-1 sequence."""
    torch.manual_seed(10)
    m = rnnkit.MinGRU(1, 16, batch_first=True)
    head = torch.nn.Linear(16, 1)
    opt = torch.optim.Adam(list(m.parameters()) + list(head.parameters()), lr=0.02)
    x = torch.randint(0, 2, (32, 30, 1)).float() * 2 - 1
    target = x.cumsum(1) / torch.arange(1, 31).view(1, -1, 1)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = F.mse_loss(head(m(x)[0]), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_docstring_examples_run():
    import doctest

    import rnnkit.zoo.minimal as module
    result = doctest.testmod(module, extraglobs={"rnnkit": rnnkit, "torch": torch})
    assert result.attempted > 0 and result.failed == 0


def test_min_lstm_step_is_finite_where_both_gates_underflow():
    """Where sigmoid(k_f) and sigmoid(k_i) both underflow (k below about -90 in float32) the step's normalized
    gates are 0 / 0 in linear space: the step works in log space, as the parallel scan, and gives the scan's
    finite value (f' = i' = 1/2 for equal gates), in the layer's loop and the cell, with finite gradients."""
    scan = rnnkit.MinLSTM(1, 1)
    loop = rnnkit.MinLSTM(1, 1, parallel=False)
    cell = rnnkit.MinLSTMCell(1, 1)
    sd = {"weight_ih_l0": torch.ones(3, 1), "bias_ih_l0": torch.zeros(3)}
    scan.load_state_dict(sd)
    loop.load_state_dict(sd)
    cell.load_state_dict({"weight_ih": torch.ones(3, 1), "bias_ih": torch.zeros(3)})
    x = torch.full((4, 1, 1), -90.0, requires_grad=True)
    h0 = torch.full((1, 1, 1), 0.5)
    want = scan(x, h0)[0]
    got = loop(x, h0)[0]
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(cell(x[0], h0[0]), want[0])
    (g,) = torch.autograd.grad(got.sum(), x)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("cls", [rnnkit.MinGRU, rnnkit.MinLSTM], ids=["mingru", "minlstm"])
def test_parallel_scan_forward_mode_ad_and_hessian(cls):
    """Forward-mode AD through the parallel scan with trainable parameters (a dual level) and torch.func.hessian
    (forward over reverse): the step loop's tangents and Hessian (the scan's logcumsumexp Function had no jvp and
    raised); and gradcheck of that jvp in float64."""
    import torch.autograd.forward_ad as fwAD
    from rnnkit.zoo.minimal import _logcumsumexp
    torch.manual_seed(0)
    scan = cls(3, 4, dtype=torch.float64)
    loop = cls(3, 4, parallel=False, dtype=torch.float64)
    loop.load_state_dict(scan.state_dict())
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(5, 2, 3, generator=g, dtype=torch.float64), torch.randn(5, 2, 3, generator=g, dtype=torch.float64)
    tangents = []
    for m in (scan, loop):
        with fwAD.dual_level():
            tangents.append(fwAD.unpack_dual(m(fwAD.make_dual(x, t))[0]).tangent.detach())
    torch.testing.assert_close(tangents[0], tangents[1], rtol=1e-9, atol=1e-10)
    a = torch.randn(3, 1, 3, generator=g, dtype=torch.float64)
    hess = [torch.func.hessian(lambda v: m(v)[0].sum())(a) for m in (scan, loop)]
    torch.testing.assert_close(hess[0], hess[1], rtol=1e-8, atol=1e-10)
    v = torch.randn(6, 2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_logcumsumexp, (v,), check_forward_ad=True)
