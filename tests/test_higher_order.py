"""Second derivatives and torch.func transforms, on every registered layer and backend.

The oracle is the reference backend (and torch.nn for the standard layers), in
float64. A fused backward used to be non-differentiable, so second derivatives came
out as exact zeros: every test here also checks the result is not all zero.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call, grad, jacrev, vjp, vmap

import rnnkit
from rnnkit.backends import why_not
from helpers import flatten_states, runnable_backends, weighted_sum, with_torch_nn_twin

F64 = torch.float64
TOL = dict(rtol=1e-8, atol=1e-10)
NAMES = sorted(n for n in rnnkit.LAYERS if not n.endswith("3d"))  # the 3d conv layers: the 1d/2d kernels' family
BACKENDS = runnable_backends()


def _build(name, backend, **kwargs):
    entry = rnnkit.LAYERS[name]
    torch.manual_seed(0)
    module = entry.make(3, 4, dtype=F64, **kwargs)
    x = torch.randn(entry.input_shape(4, 2, 3), dtype=F64)
    if backend != "auto":
        reason = why_not(backend, module, x)
        if reason is not None:
            pytest.skip(f"{backend} cannot run {name}: {reason}")
    module.backend = backend
    ref = copy.deepcopy(module)
    ref.backend = "reference"
    return module, ref, x


def _second_order(module, x, lengths=None):
    """d/d(x, params) of |d loss / d x|^2: a gradient penalty (WGAN-GP style)."""
    xi = x.clone().requires_grad_()
    out, h = module(xi) if lengths is None else module(xi, lengths=lengths)
    (gx,) = torch.autograd.grad(weighted_sum([out, *flatten_states(h)]), xi, create_graph=True)
    params = list(module.parameters())
    found = torch.autograd.grad((gx ** 2).sum(), [xi, *params], allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(found, [xi, *params])]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_second_derivatives_equal_the_reference(name, backend):
    module, ref, x = _build(name, backend)
    got, want = _second_order(module, x), _second_order(ref, x)
    assert module.last_backend in (backend, ) or backend == "auto"
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)
    assert any(g.abs().sum() > 0 for g in got), "second derivatives are all zero"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["lstm", "gru", "rnn", "layernorm_lstm", "peephole_lstm"])
def test_second_derivatives_with_lengths_and_two_bidirectional_layers(name, backend):
    module, ref, x = _build(name, backend, num_layers=2, bidirectional=True)
    lengths = torch.tensor([4, 2])
    for a, b in zip(_second_order(module, x, lengths), _second_order(ref, x, lengths)):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["RNN", "LSTM", "GRU"])
def test_second_derivatives_equal_torch_nn(kind, backend):
    ours, theirs = with_torch_nn_twin(kind, 3, 5, backend=backend)
    x = torch.randn(6, 2, 3, dtype=F64)
    for a, b in zip(_second_order(ours, x), _second_order(theirs, x)):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("backend", ["auto", "fused", "torch", "reference"])
@pytest.mark.parametrize("kind", ["RNNCell", "LSTMCell", "GRUCell"])
def test_cell_second_derivatives_equal_torch_nn(kind, backend):
    if backend not in BACKENDS:
        pytest.skip(f"{backend} is not available here")
    torch.manual_seed(0)
    ours = getattr(rnnkit, kind)(3, 5, dtype=F64, backend=backend)
    theirs = getattr(torch.nn, kind)(3, 5, dtype=F64)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, dtype=F64)

    def penalty(cell):
        xi = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(weighted_sum(flatten_states(cell(xi))), xi, create_graph=True)
        return torch.autograd.grad((gx ** 2).sum(), [xi, *cell.parameters()])

    for a, b in zip(penalty(ours), penalty(theirs)):
        torch.testing.assert_close(a, b, **TOL)


def test_gradgradcheck_through_the_fused_ops():
    """torch.autograd.gradgradcheck on a fused LSTM and GRU layer (float64)."""
    for cls in (rnnkit.LSTM, rnnkit.GRU, rnnkit.RNN):
        torch.manual_seed(0)
        m = cls(2, 3, dtype=F64, backend="fused")
        x = torch.randn(3, 2, 2, dtype=F64, requires_grad=True)
        assert torch.autograd.gradgradcheck(lambda t: m(t)[0], (x,))


# ------------------------------------------------------------------ torch.func

def _loss(module, params, x):
    out, h = functional_call(module, params, (x,))
    return weighted_sum([out, *flatten_states(h)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_func_grad_vjp_jacrev_equal_the_reference(name, backend):
    module, ref, x = _build(name, backend)
    params = {k: v.detach() for k, v in module.named_parameters()}
    got = grad(lambda p: _loss(module, p, x))(params)
    want = grad(lambda p: _loss(ref, p, x))(params)
    for k in params:
        torch.testing.assert_close(got[k], want[k], **TOL)

    out, pullback = vjp(lambda t: module(t)[0], x)
    out_ref, pullback_ref = vjp(lambda t: ref(t)[0], x)
    cot = torch.randn_like(out)
    torch.testing.assert_close(out, out_ref, **TOL)
    torch.testing.assert_close(pullback(cot)[0], pullback_ref(cot)[0], **TOL)

    jac = jacrev(lambda t: module(t)[0])(x)
    torch.testing.assert_close(jac, jacrev(lambda t: ref(t)[0])(x), **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["RNN", "LSTM", "GRU"])
def test_func_per_sample_gradients_equal_torch_nn(kind, backend):
    """vmap(grad(...)): per-sample gradients (torch.nn's LSTM and GRU support this; its RNN
    fails under vmap), against a loop over the samples with torch.nn."""
    torch.manual_seed(0)
    ours = getattr(rnnkit, kind)(3, 4, dtype=F64, backend=backend, batch_first=True)
    theirs = getattr(torch.nn, kind)(3, 4, dtype=F64, batch_first=True)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(5, 6, 3, dtype=F64)

    def per_sample(module):
        params = {k: v.detach() for k, v in module.named_parameters()}

        def loss(p, xi):
            return functional_call(module, p, (xi.unsqueeze(0),))[0].pow(2).sum()

        return vmap(grad(loss), in_dims=(None, 0))(params, x)

    got = per_sample(ours)
    names = [k for k, _ in theirs.named_parameters()]
    loop = [torch.autograd.grad(theirs(xi.unsqueeze(0))[0].pow(2).sum(), list(theirs.parameters())) for xi in x]
    for j, k in enumerate(names):
        torch.testing.assert_close(got[k], torch.stack([g[j] for g in loop]), **TOL)


# ----------------------------------------------------------------------------- forward-mode AD
#
# The fused and triton kernels have no forward-mode (jvp) formula. An op without one raises where an
# input requires grad, and drops the tangent silently where none does (frozen parameters): so they
# decline under forward-mode AD and auto runs a backend that has one. torch's op has none either on its
# oneDNN path (CPU float32/bfloat16: torch.nn raises NotImplementedError there), so the torch backend
# declines there too and auto runs the reference backend.

def _tangents(module, x, t, frozen):
    """The output's and final states' tangents along ``t`` (input only): through a dual_level with the
    parameters frozen, else through torch.func.jvp with the parameters requiring grad."""
    module.requires_grad_(not frozen)
    if frozen:
        import torch.autograd.forward_ad as fwAD
        with fwAD.dual_level():
            out, h = module(fwAD.make_dual(x, t))
            return [fwAD.unpack_dual(o).tangent for o in [out, *flatten_states(h)]]

    def f(x):
        out, h = module(x)
        return (out, *flatten_states(h))
    return list(torch.func.jvp(f, (x,), (t,))[1])


@pytest.mark.parametrize("frozen", [True, False], ids=["dual_level-frozen", "func.jvp"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_forward_mode_ad_equals_the_reference_or_declines(name, backend, frozen):
    module, ref, x = _build(name, backend)
    module(x)  # an ordinary call first: auto keeps its choice, which must not carry into forward-mode AD
    t = torch.randn_like(x)
    want = _tangents(ref, x, t, frozen)
    if backend in ("fused", "triton"):
        with pytest.raises(ValueError, match=f"backend='{backend}' cannot run this configuration: forward-mode AD "
                                             "is active"):
            _tangents(module, x, t, frozen)
        return
    got = _tangents(module, x, t, frozen)
    assert module.last_backend in ("reference", "torch")
    for a, b in zip(got, want):
        assert a is not None, "the tangent was dropped"
        torch.testing.assert_close(a, b, **TOL)
    assert any(a.abs().sum() > 0 for a in got)


@pytest.mark.parametrize("kind", ["RNN", "LSTM", "GRU"])
def test_forward_mode_ad_in_float32(kind):
    """float32 on the CPU. torch.nn's LSTM runs oneDNN, which has no forward-mode AD (torch.nn raises):
    auto runs the reference backend, equal to torch.nn's float64 tangent, and backend='torch' says why not.
    RNN and GRU run ATen's cells, which have it: auto runs torch's op there."""
    ours, theirs = with_torch_nn_twin(kind, 3, 5, dtype=torch.float32, twin_dtype=F64)
    x, t = torch.randn(6, 2, 3), torch.randn(6, 2, 3)
    plain = getattr(torch.nn, kind)(3, 5)
    if kind == "LSTM":
        with pytest.raises(NotImplementedError):
            _tangents(plain, x, t, True)  # what torch.nn does in float32
    got = _tangents(ours, x, t, True)
    assert ours.last_backend == ("reference" if kind == "LSTM" else "torch")
    want = _tangents(theirs, x.double(), t.double(), True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-5)
    ours.backend = "torch"
    if kind == "LSTM":
        with pytest.raises(ValueError, match="forward-mode AD is active and PyTorch's op runs oneDNN here"):
            _tangents(ours, x, t, True)
    else:
        for a, b in zip(_tangents(ours, x, t, True), want):
            torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "fused", "torch", "reference"])
@pytest.mark.parametrize("kind", ["RNNCell", "LSTMCell", "GRUCell"])
def test_cell_forward_mode_ad_equals_torch_nn(kind, backend):
    """A cell's plain no-grad step goes to the fused C++ step: not under forward-mode AD (frozen
    parameters, a dual input: the tangent was dropped)."""
    import torch.autograd.forward_ad as fwAD
    ours, theirs = (m.requires_grad_(False) for m in with_torch_nn_twin(kind, 3, 5, backend=backend))
    x, t = torch.randn(2, 3, dtype=F64), torch.randn(2, 3, dtype=F64)
    ours(x)  # the direct step, outside forward-mode AD

    def tangents(cell):
        with fwAD.dual_level():
            new = cell(fwAD.make_dual(x, t))
            return [fwAD.unpack_dual(s).tangent for s in (new if isinstance(new, tuple) else (new,))]
    if backend == "fused":
        with pytest.raises(ValueError, match="forward-mode AD is active"):
            tangents(ours)
        return
    for a, b in zip(tangents(ours), tangents(theirs)):
        assert a is not None, "the tangent was dropped"
        torch.testing.assert_close(a, b, **TOL)
