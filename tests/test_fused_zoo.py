"""The fused kernels of the zoo cells (peephole LSTM, IndRNN, LayerNorm LSTM): the whole layer against
the reference backend (outputs, final states, every gradient, peepholes
included), gradcheck and torch.library.opcheck of the new ops, shape errors,
and what the backend still declines.

test_lengths_streaming.py also runs these kernels (the lengths oracle and
chunked streaming) through the registry walk."""

from __future__ import annotations

import pytest
import torch

import rnnkit
from rnnkit.backends import BACKENDS
from rnnkit.fused import _ops
from helpers import assert_close, assert_compiled_matches_eager, assert_modules_match, flatten_states, weighted_sum

FUSED = BACKENDS["fused"]
REASON = FUSED.unavailable()
needs_fused = pytest.mark.skipif(REASON is not None, reason=f"fused backend unavailable: {REASON}")
DT = torch.float64

def _clamped_indrnn(h_in, hidden, **kw):
    """recurrent_max_abs=0.7 with u spread over (-1.2, 1.2), so the clamp bites on both sides."""
    m = rnnkit.IndRNN(h_in, hidden, recurrent_max_abs=0.7, nonlinearity="tanh", **kw)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("weight_hh"):
                p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) * 2.4 - 1.2)
    return m


def _perturbed_layernorm_lstm(h_in, hidden, **kw):
    """LayerNormLSTM with eps 1e-3 (the kernel must read it from the spec) and its LN
    gains and shifts moved off their 1 / 0 init, so they matter."""
    m = rnnkit.LayerNormLSTM(h_in, hidden, layer_norm_eps=1e-3, **kw)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("ln_"):
                p.add_(torch.rand(p.shape, generator=g, dtype=p.dtype) - 0.5)
    return m


def _perturbed_layernorm_gru(h_in, hidden, **kw):
    """LayerNormGRU, the same way: eps 1e-3, LN gains and shifts off their init."""
    m = rnnkit.LayerNormGRU(h_in, hidden, layer_norm_eps=1e-3, **kw)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("ln_"):
                p.add_(torch.rand(p.shape, generator=g, dtype=p.dtype) - 0.5)
    return m


LAYERS = {
    "peephole_lstm": lambda h_in, hidden, **kw: rnnkit.PeepholeLSTM(h_in, hidden, **kw),
    "indrnn_relu": lambda h_in, hidden, **kw: rnnkit.IndRNN(h_in, hidden, **kw),
    "indrnn_tanh": lambda h_in, hidden, **kw: rnnkit.IndRNN(h_in, hidden, nonlinearity="tanh", **kw),
    "indrnn_tanh_clamped": _clamped_indrnn,
    "layernorm_lstm": _perturbed_layernorm_lstm,
    "layernorm_gru": _perturbed_layernorm_gru,
}
# The LayerNorm layers' two-layer bidirectional case, with its own float32 gradient
# criterion (layer norms amplify rounding), is in test_fused_ln.py.
LAYERS_AT_1E5 = [name for name in LAYERS if name not in ("layernorm_lstm", "layernorm_gru")]


def _pair(name, h_in, hidden, dtype, **kw):
    """The same layer twice (equal parameters): backend 'fused' and 'reference'."""
    torch.manual_seed(0)
    fused = LAYERS[name](h_in, hidden, backend="fused", dtype=dtype, **kw)
    ref = LAYERS[name](h_in, hidden, backend="reference", dtype=dtype, **kw)
    ref.load_state_dict(fused.state_dict())
    return fused, ref


def _run(module, x, hx, lengths):
    x = x.clone().requires_grad_()
    hx = tuple(h.clone().requires_grad_() for h in hx)
    out, h_n = module(x, hx if len(hx) > 1 else hx[0], lengths=lengths)
    states = flatten_states(h_n)
    names = [n for n, _ in module.named_parameters()]
    leaves = [x, *hx, *module.parameters()]
    grads = torch.autograd.grad(weighted_sum([out, *states]), leaves)
    return out, states, dict(zip(["input"] + [f"hx[{i}]" for i in range(len(hx))] + names, grads))


# ------------------------------------------------------------------ the layer against the reference backend

@needs_fused
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("name", LAYERS_AT_1E5)
def test_layer_matches_reference_backend(name, bias, dtype):
    """Two layers, bidirectional, lengths with a zero, a short and a full row:
    outputs, final states and the gradient of the input, every initial state
    and every parameter (peepholes included) equal the reference backend's."""
    L, N, h_in, hidden, layers = 6, 4, 5, 19, 2  # 19: whole vectors and a remainder in float32 and float64
    fused, ref = _pair(name, h_in, hidden, dtype, num_layers=layers, bidirectional=True, bias=bias)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(L, N, h_in, generator=g, dtype=dtype)
    n_states = fused.cell_spec.num_states
    hx = tuple(torch.randn(2 * layers, N, hidden, generator=g, dtype=dtype) for _ in range(n_states))
    lengths = torch.tensor([6, 0, 3, 1])
    o1, s1, g1 = _run(fused, x, hx, lengths)
    assert fused.last_backend == "fused"
    o2, s2, g2 = _run(ref, x, hx, lengths)
    assert ref.last_backend == "reference"
    assert_close(o1, o2, dtype, "output")
    for i, (a, b) in enumerate(zip(s1, s2)):
        assert_close(a, b, dtype, f"final state {i}")
    assert g1.keys() == g2.keys()
    assert any(k.startswith("weight_ci") for k in g1) or name != "peephole_lstm"
    for k in g1:
        assert_close(g1[k], g2[k], dtype, f"grad of {k}")
    for a, b in zip(s1, hx):  # the zero-length row keeps its initial state exactly
        assert torch.equal(a[:, 1], b[:, 1])


@needs_fused
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_without_lengths_matches_reference_backend(name):
    """No lengths, no initial state, batch_first, one layer: float64."""
    fused, ref = _pair(name, 3, 5, DT, batch_first=True)
    x = torch.randn(2, 7, 3, dtype=DT, generator=torch.Generator().manual_seed(2))
    assert_modules_match(fused, ref, x, DT)


@needs_fused
@pytest.mark.parametrize("name", list(LAYERS))
def test_large_batch_parallel_path_matches_reference_backend(name):
    """A batch and width large enough for the kernels to split rows (and IndRNN's
    unit blocks, with a partial last block) over threads, with lengths: float64."""
    L, N, h_in, hidden = 4, 40, 3, 300
    fused, ref = _pair(name, h_in, hidden, DT)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(L, N, h_in, generator=g, dtype=DT)
    hx = tuple(torch.randn(1, N, hidden, generator=g, dtype=DT) for _ in range(fused.cell_spec.num_states))
    lengths = torch.randint(0, L + 1, (N,), generator=g)
    o1, s1, g1 = _run(fused, x, hx, lengths)
    assert fused.last_backend == "fused"
    o2, s2, g2 = _run(ref, x, hx, lengths)
    assert_close(o1, o2, DT, "output")
    for i, (a, b) in enumerate(zip(s1, s2)):
        assert_close(a, b, DT, f"final state {i}")
    for k in g1:
        assert_close(g1[k], g2[k], DT, f"grad of {k}")


# ------------------------------------------------------------------ the ops: gradcheck, opcheck, errors

def _rand(g):
    def r(*shape, grad=True):
        return (torch.rand(*shape, generator=g, dtype=DT) - 0.5).requires_grad_(grad)
    return r


@needs_fused
@pytest.mark.parametrize("lengths", [None, [0, 2, 4]], ids=["full", "lengths"])
def test_peephole_op_gradcheck(lengths):
    """gradcheck (float64) of peephole_fwd with its hand-written backward: the
    projected input, w_hh, the three peepholes, h0 and c0."""
    L, N, H = 4, 3, 3
    r = _rand(torch.Generator().manual_seed(3))
    lengths = None if lengths is None else torch.tensor(lengths)
    args = (r(L, N, 4 * H), r(4 * H, H), r(H), r(H), r(H), r(N, H), r(N, H))

    def fn(xp, w, wci, wcf, wco, h0, c0):
        return _ops.peephole_sequence(xp, w, wci, wcf, wco, h0, c0, lengths)
    assert torch.autograd.gradcheck(fn, args)


@needs_fused
@pytest.mark.parametrize("act", [0, 1], ids=["tanh", "relu"])
@pytest.mark.parametrize("lengths", [None, [0, 2, 4]], ids=["full", "lengths"])
def test_indrnn_op_gradcheck(act, lengths):
    """gradcheck (float64) of indrnn_fwd with its hand-written backward: the
    projected input, u and h0."""
    L, N, H = 4, 3, 5
    r = _rand(torch.Generator().manual_seed(4))
    lengths = None if lengths is None else torch.tensor(lengths)
    args = (r(L, N, H), r(H) * 3, r(N, H))  # |u| up to 1.5

    def fn(xp, u, h0):
        return _ops.indrnn_sequence(xp, u, h0, lengths, act)
    assert torch.autograd.gradcheck(fn, args)


def _op_samples():
    g = torch.Generator().manual_seed(5)
    r = _rand(g)
    L, N, H = 3, 2, 4
    lengths = torch.tensor([3, 1])
    ops = torch.ops.rnnkit_fused
    samples = [
        (ops.peephole_fwd.default, (r(L, N, 4 * H), r(4 * H, H), r(H), r(H), r(H), r(N, H), r(N, H), lengths)),
        (ops.peephole_fwd.default, (r(L, N, 4 * H), r(4 * H, H), r(H), r(H), r(H), r(N, H), r(N, H), None)),
    ]
    w = [r(4 * H, H, grad=False), r(H, grad=False), r(H, grad=False), r(H, grad=False)]
    h0, c0 = r(N, H, grad=False), r(N, H, grad=False)
    out, h_n, c_n, gates, cs = ops.peephole_fwd(r(L, N, 4 * H, grad=False), *w, h0, c0, lengths)
    samples.append((ops.peephole_bwd.default, (r(L, N, H, grad=False), r(N, H, grad=False), r(N, H, grad=False),
                                               *w, h0, c0, lengths, out, gates, cs)))
    samples += [
        (ops.indrnn_fwd.default, (r(L, N, H), r(H), r(N, H), lengths, 0)),
        (ops.indrnn_fwd.default, (r(L, N, H), r(H), r(N, H), None, 1)),
    ]
    u, h0 = r(H, grad=False), r(N, H, grad=False)
    out, h_n = ops.indrnn_fwd(r(L, N, H, grad=False), u, h0, lengths, 1)
    samples.append((ops.indrnn_bwd.default, (r(L, N, H, grad=False), r(N, H, grad=False), u, h0, lengths, out, 1)))
    return samples


@needs_fused
def test_opcheck():
    """torch.library.opcheck: schema, autograd registration, fake tensors and
    AOT dispatch of the new ops."""
    for op, args in _op_samples():
        torch.library.opcheck(op, args)


@needs_fused
@pytest.mark.parametrize("name", ["peephole_lstm", "indrnn_tanh_clamped"])
def test_torch_compile_traces_the_ops(name):
    """torch.compile (fullgraph, aot_eager: fake tensors + the registered autograd)
    of the fused scan gives the eager results and gradients (input and u / peepholes)."""
    from rnnkit.fused import backend as fb
    torch._dynamo.reset()
    layer = LAYERS[name](3, 4, backend="fused", dtype=DT)
    p = layer._layer_params(0)
    x = torch.randn(5, 2, 3, dtype=DT)
    s0 = tuple(torch.randn(2, 4, dtype=DT) for _ in range(layer.cell_spec.num_states))
    lengths = torch.tensor([5, 2])

    def f(x):
        out, state = fb.fused_scan(layer.cell_spec, p, x, s0, lengths)
        return (out * out).sum() + sum(s.sum() for s in state)
    assert_compiled_matches_eager(f, x, [p["weight_hh"]], DT)


@needs_fused
def test_peephole_op_shape_errors_name_what_was_received():
    ops = torch.ops.rnnkit_fused
    z = torch.zeros
    with pytest.raises(RuntimeError, match=r"w_hh must be \(4H, H\), got \[8, 3\]"):
        ops.peephole_fwd(z(2, 1, 8), z(8, 3), z(2), z(2), z(2), z(1, 2), z(1, 2), None)
    with pytest.raises(RuntimeError, match=r"w_cf has shape \[3\], expected \[2\]"):
        ops.peephole_fwd(z(2, 1, 8), z(8, 2), z(2), z(3), z(2), z(1, 2), z(1, 2), None)
    with pytest.raises(RuntimeError, match=r"c0 has shape \[2, 2\], expected \[1, 2\]"):
        ops.peephole_fwd(z(2, 1, 8), z(8, 2), z(2), z(2), z(2), z(1, 2), z(2, 2), None)
    with pytest.raises(RuntimeError, match=r"xp's last axis must be G = 8, got 6"):
        ops.peephole_fwd(z(2, 1, 6), z(8, 2), z(2), z(2), z(2), z(1, 2), z(1, 2), None)


# ------------------------------------------------------------------ what the backend declines

@needs_fused
def test_regularized_peephole_runs_fused():
    """Zoneout and recurrent dropout run inside the fused kernels (values: tests/test_fused_zoo_regularizers.py)."""
    x = torch.randn(2, 1, 3)
    assert rnnkit.PeepholeLSTM(3, 4, zoneout=0.1).which_backend(x) == "fused"
    rnnkit.PeepholeLSTM(3, 4, backend="fused", zoneout=0.1, recurrent_dropout=0.2)(x)
    assert rnnkit.PeepholeLSTM(3, 4).which_backend(x) == "fused"


@needs_fused
def test_peephole_cell_stays_on_the_step_function():
    """The fused single-step ops cover the torch.nn cells only: the peephole cell
    runs its step function, and an explicit backend='fused' says why not."""
    with pytest.raises(ValueError, match=r"backend='fused' cannot run this cell: no fused kernel for the "
                                         r"'peephole_lstm' cell"):
        rnnkit.PeepholeLSTMCell(3, 4, backend="fused")


@needs_fused
def test_indrnn_op_errors_name_what_was_received():
    ops = torch.ops.rnnkit_fused
    z = torch.zeros
    with pytest.raises(RuntimeError, match=r"act must be 0 \(tanh\) or 1 \(relu\), got 2"):
        ops.indrnn_fwd(z(2, 1, 3), z(3), z(1, 3), None, 2)
    with pytest.raises(RuntimeError, match=r"u must be \(H,\), got \[3, 3\]"):
        ops.indrnn_fwd(z(2, 1, 3), z(3, 3), z(1, 3), None, 0)
    with pytest.raises(RuntimeError, match=r"h0 has shape \[2, 3\], expected \[1, 3\]"):
        ops.indrnn_fwd(z(2, 1, 3), z(3), z(2, 3), None, 0)
    with pytest.raises(RuntimeError, match=r"lengths must be \(N,\) = \(1,\), got \[2\]"):
        ops.indrnn_fwd(z(2, 1, 3), z(3), z(1, 3), torch.tensor([1, 2]), 0)


@needs_fused
def test_backend_declines_other_indrnn_activations():
    with pytest.raises(ValueError, match=r"backend='fused' cannot run this configuration: no fused kernel for the "
                                         r"'indrnn_gelu' cell \(IndRNN is fused for nonlinearity 'relu' and 'tanh' "
                                         r"only\)"):
        rnnkit.IndRNN(3, 4, nonlinearity="gelu", backend="fused")
    assert rnnkit.IndRNN(3, 4, nonlinearity="gelu").which_backend(torch.randn(2, 1, 3)) == "reference"
    assert rnnkit.IndRNN(3, 4, nonlinearity=torch.tanh).which_backend(torch.randn(2, 1, 3)) == "reference"
    for act in ("relu", "tanh"):
        assert rnnkit.IndRNN(3, 4, nonlinearity=act, recurrent_max_abs=2.0).which_backend(
            torch.randn(2, 1, 3)) == "fused"
