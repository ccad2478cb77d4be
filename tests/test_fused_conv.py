"""The fused ConvLSTM / ConvGRU kernels (conv_lstm_fwd/bwd, conv_gru_fwd/bwd): the
whole layer against the reference backend (outputs, final states, the gradient of
the input, every initial state and every parameter, peepholes included) for 1, 2
and 3 spatial dims, odd and even kernels, stride and dilation on the input
convolution, lengths, two bidirectional layers; gradcheck and
torch.library.opcheck of the ops, torch.compile, shape errors, what the backend
declines, and the conv cells, which stay on their step function.

test_lengths_streaming.py also runs these kernels (the lengths oracle and chunked
streaming) through the registry walk."""

from __future__ import annotations

import pytest
import torch

import rnnkit
from rnnkit.backends import BACKENDS
from rnnkit.fused import _ops
from rnnkit.zoo.conv import conv_gru_step, conv_lstm_step, conv_project
from helpers import assert_close, assert_compiled_matches_eager, assert_modules_match, flatten_states, weighted_sum

FUSED = BACKENDS["fused"]
REASON = FUSED.unavailable()
needs_fused = pytest.mark.skipif(REASON is not None, reason=f"fused backend unavailable: {REASON}")
DT = torch.float64


@pytest.fixture
def single_thread():
    """One intra-op thread for tests of tiny sizes: each step's small ATen convolution
    opens an OpenMP region, which on a loaded 2-core machine can stall for milliseconds,
    and gradcheck makes thousands of such calls. The two tests of the parallel path
    (test_large_rows_parallel_path_matches_reference_backend, test_rows_spanning_several_blocks)
    keep every thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


tiny = pytest.mark.usefixtures("single_thread")

# (layer, input spatial size, keyword arguments); hidden = 3 everywhere, so a row holds
# 3 * prod(S') elements: whole vectors and a remainder in float32 and float64.
CASES = {
    "lstm1d_odd": (rnnkit.ConvLSTM1d, (7,), dict(kernel_size=3)),
    "lstm1d_even_peephole": (rnnkit.ConvLSTM1d, (6,), dict(kernel_size=4, peephole=True)),
    "lstm2d_odd_peephole_stride_dilation": (rnnkit.ConvLSTM2d, (5, 6),
                                            dict(kernel_size=3, peephole=True, stride=2, dilation=(1, 2))),
    "lstm2d_even_nobias": (rnnkit.ConvLSTM2d, (4, 5), dict(kernel_size=(2, 3), bias=False)),
    "lstm3d_even_peephole_per_position": (rnnkit.ConvLSTM3d, (3, 4, 2),
                                          dict(kernel_size=2, peephole=True, peephole_shape=(3, 4, 2))),
    "gru1d_even_dilation": (rnnkit.ConvGRU1d, (7,), dict(kernel_size=2, dilation=2)),
    "gru2d_odd_stride": (rnnkit.ConvGRU2d, (5, 6), dict(kernel_size=3, stride=2)),
    "gru2d_even_nobias": (rnnkit.ConvGRU2d, (4, 4), dict(kernel_size=4, bias=False)),
    "gru3d_odd": (rnnkit.ConvGRU3d, (3, 3, 2), dict(kernel_size=3)),
}


def _pair(name, dtype, **extra):
    """The same layer twice (equal parameters): backend 'fused' and 'reference'.
    Peepholes are moved off their small init so they matter."""
    cls, spatial, kw = CASES[name]
    torch.manual_seed(0)
    fused = cls(2, 3, backend="fused", dtype=dtype, **kw, **extra)
    with torch.no_grad():
        for pname, p in fused.named_parameters():
            if pname.startswith(("weight_ci", "weight_cf", "weight_co")):
                p.uniform_(-0.8, 0.8)
    ref = cls(2, 3, backend="reference", dtype=dtype, **kw, **extra)
    ref.load_state_dict(fused.state_dict())
    return fused, ref, spatial


def _state_spatial(module, spatial):
    return tuple((s - 1) // st + 1 for s, st in zip(spatial, module.stride))


def _run(module, x, hx, lengths):
    x = x.clone().requires_grad_()
    hx = tuple(h.clone().requires_grad_() for h in hx)
    out, h_n = module(x, hx if len(hx) > 1 else hx[0], lengths=lengths)
    states = flatten_states(h_n)
    names = [n for n, _ in module.named_parameters()]
    grads = torch.autograd.grad(weighted_sum([out, *states]), [x, *hx, *module.parameters()])
    return out, states, dict(zip(["input"] + [f"hx[{i}]" for i in range(len(hx))] + names, grads))


def _compare(fused, ref, x, hx, lengths, dtype, tol=None):
    o1, s1, g1 = _run(fused, x, hx, lengths)
    assert fused.last_backend == "fused"
    o2, s2, g2 = _run(ref, x, hx, lengths)
    assert ref.last_backend == "reference"
    close = assert_close if tol is None else (lambda a, b, _d, what: torch.testing.assert_close(
        a, b, **tol, msg=lambda m: f"{what}: {m}"))
    close(o1, o2, dtype, "output")
    for i, (a, b) in enumerate(zip(s1, s2)):
        close(a, b, dtype, f"final state {i}")
    assert g1.keys() == g2.keys()
    for k in g1:
        close(g1[k], g2[k], dtype, f"grad of {k}")
    return s1, g1


# ------------------------------------------------------------------ the layer against the reference backend

@needs_fused
@tiny
@pytest.mark.parametrize("name", list(CASES))
def test_layer_matches_reference_backend(name):
    """Two layers, bidirectional, unsorted lengths with a zero, a short and a full
    row, random initial states: float64 at 1e-10 on outputs, final states and
    every gradient (input, h0 / c0, every parameter, peepholes included)."""
    fused, ref, spatial = _pair(name, DT, num_layers=2, bidirectional=True)
    L, N = 5, 4
    g = torch.Generator().manual_seed(1)
    x = torch.randn(L, N, 2, *spatial, generator=g, dtype=DT)
    sp = _state_spatial(fused, spatial)
    hx = tuple(torch.randn(4, N, 3, *sp, generator=g, dtype=DT) for _ in fused.cell_spec.state_names)
    lengths = torch.tensor([3, 0, 5, 1])
    states, grads = _compare(fused, ref, x, hx, lengths, DT)
    if fused.peephole:
        assert {"weight_ci_l0", "weight_cf_l1_reverse", "weight_co_l1"} <= grads.keys()
        assert all(grads[k].abs().sum() > 0 for k in grads if k.startswith("weight_c"))
    if fused.bias:
        assert "bias_hh_l0" in grads
    for a, b in zip(states, hx):  # the zero-length row keeps its initial state exactly
        assert torch.equal(a[:, 1], b[:, 1])


@needs_fused
@tiny
@pytest.mark.parametrize("name", ["lstm2d_odd_peephole_stride_dilation", "lstm1d_even_peephole", "gru2d_odd_stride",
                                  "gru3d_odd"])
def test_layer_matches_reference_backend_float32(name):
    """float32, the same two-layer bidirectional case with lengths, at rtol = atol = 1e-5
    (the suite's float32 tolerance): the kernels' float32 sigmoid / tanh are about
    20 ulp (at::vec's exp_u20) and the weight gradient is one convolution over all
    steps instead of a sum of per-step ones, so results differ from the reference by
    rounding only: measured at most 2.4e-7 on outputs and 2.4e-6 on gradients (which
    sum over every step, row and kernel tap, magnitudes up to about 10)."""
    fused, ref, spatial = _pair(name, torch.float32, num_layers=2, bidirectional=True)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 4, 2, *spatial, generator=g)
    sp = _state_spatial(fused, spatial)
    hx = tuple(torch.randn(4, 4, 3, *sp, generator=g) for _ in fused.cell_spec.state_names)
    _compare(fused, ref, x, hx, torch.tensor([3, 0, 5, 1]), torch.float32)


@needs_fused
@tiny
@pytest.mark.parametrize("name", ["lstm2d_even_nobias", "gru2d_odd_stride"])
def test_layer_without_lengths_batch_first_matches_reference_backend(name):
    """No lengths, no initial state, batch_first, one layer: float64."""
    fused, ref, spatial = _pair(name, DT, batch_first=True)
    x = torch.randn(2, 6, 2, *spatial, dtype=DT, generator=torch.Generator().manual_seed(3))
    assert_modules_match(fused, ref, x, DT)


@needs_fused
@tiny
@pytest.mark.parametrize("name", ["lstm1d_even_peephole", "gru1d_even_dilation"])
def test_inter_layer_dropout_in_training_matches_reference_backend(name):
    """Two layers with dropout 0.5 in training mode, the same seed for both backends
    (the runner draws the same masks: the fused scan draws no random numbers): float64."""
    fused, ref, spatial = _pair(name, DT, num_layers=2, dropout=0.5)
    fused.train(), ref.train()
    x = torch.randn(4, 3, 2, *spatial, dtype=DT, generator=torch.Generator().manual_seed(11))
    results = []
    for m in (fused, ref):
        torch.manual_seed(5)
        xi = x.clone().requires_grad_()
        out, h_n = m(xi, lengths=torch.tensor([4, 1, 3]))
        grads = torch.autograd.grad(weighted_sum([out, *flatten_states(h_n)]), [xi, *m.parameters()])
        results.append((out, grads))
    assert fused.last_backend == "fused"
    (o1, g1), (o2, g2) = results
    assert_close(o1, o2, DT, "output")
    for a, b in zip(g1, g2):
        assert_close(a, b, DT, "grad")


@needs_fused
@pytest.mark.parametrize("name", ["lstm2d_odd_peephole_stride_dilation", "gru2d_even_nobias"])
def test_large_rows_parallel_path_matches_reference_backend(name):
    """States of 3 x 24 x 24 (1728 elements a row; the strided layer reads 48 x 47) and
    a batch of 5, so the kernels split the (row, block) tasks over threads, with
    lengths: float64."""
    cls, _, kw = CASES[name]
    torch.manual_seed(0)
    fused = cls(2, 3, backend="fused", dtype=DT, **kw)
    ref = cls(2, 3, backend="reference", dtype=DT, **kw)
    ref.load_state_dict(fused.state_dict())
    spatial = (24, 24) if fused.stride == (1, 1) else (48, 47)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, 2, *spatial, generator=g, dtype=DT)
    sp = _state_spatial(fused, spatial)
    hx = tuple(torch.randn(1, 5, 3, *sp, generator=g, dtype=DT) for _ in fused.cell_spec.state_names)
    _compare(fused, ref, x, hx, torch.tensor([2, 3, 0, 1, 3]), DT)


@needs_fused
def test_rows_spanning_several_blocks():
    """hidden 5 on 30 x 30: rows of 4500 elements, three blocks, the last partial;
    lengths, float64, ConvLSTM with peepholes and ConvGRU, against the reference."""
    g = torch.Generator().manual_seed(5)
    for cls, kw in [(rnnkit.ConvLSTM2d, dict(peephole=True)), (rnnkit.ConvGRU2d, {})]:
        torch.manual_seed(1)
        fused = cls(1, 5, 3, backend="fused", dtype=DT, **kw)
        ref = cls(1, 5, 3, backend="reference", dtype=DT, **kw)
        ref.load_state_dict(fused.state_dict())
        x = torch.randn(2, 2, 1, 30, 30, generator=g, dtype=DT)
        hx = tuple(torch.randn(1, 2, 5, 30, 30, generator=g, dtype=DT) for _ in fused.cell_spec.state_names)
        _compare(fused, ref, x, hx, torch.tensor([1, 2]), DT)


# ------------------------------------------------------------------ the ops: gradcheck, opcheck, errors

def _rand(g):
    def r(*shape, grad=True):
        return (torch.rand(*shape, generator=g, dtype=DT) - 0.5).requires_grad_(grad)
    return r


@needs_fused
@tiny
@pytest.mark.parametrize("kernel", [(3,), (2, 3)], ids=["1d_odd", "2d_even"])
@pytest.mark.parametrize("peephole", [True, False], ids=["peephole", "nopeephole"])
@pytest.mark.parametrize("lengths", [None, [0, 3, 2]], ids=["full", "lengths"])
def test_conv_lstm_op_gradcheck(kernel, peephole, lengths):
    """gradcheck (float64) of conv_lstm_fwd with its hand-written backward: the
    projected input, w_hh, the three peepholes, h0 and c0."""
    L, N, hid = 3, 3, 2
    spatial = (3,) if len(kernel) == 1 else (2, 3)
    r = _rand(torch.Generator().manual_seed(6))
    lengths = None if lengths is None else torch.tensor(lengths)
    peeps = (r(hid, *spatial), r(hid, *spatial), r(hid, *spatial)) if peephole else ()
    args = (r(L, N, 4 * hid, *spatial), r(4 * hid, hid, *kernel), *peeps, r(N, hid, *spatial), r(N, hid, *spatial))

    def fn(xp, w, *rest):
        if peephole:
            wci, wcf, wco, h0, c0 = rest
        else:
            (h0, c0), wci = rest, None
            wcf = wco = None
        return _ops.conv_lstm_sequence(xp, w, wci, wcf, wco, h0, c0, lengths)
    assert torch.autograd.gradcheck(fn, args)


@needs_fused
@tiny
@pytest.mark.parametrize("kernel", [(3,), (2, 3)], ids=["1d_odd", "2d_even"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("lengths", [None, [0, 3, 2]], ids=["full", "lengths"])
def test_conv_gru_op_gradcheck(kernel, bias, lengths):
    """gradcheck (float64) of conv_gru_fwd with its hand-written backward: the
    projected input, w_hh, b_hh and h0."""
    L, N, hid = 3, 3, 2
    spatial = (3,) if len(kernel) == 1 else (2, 3)
    r = _rand(torch.Generator().manual_seed(7))
    lengths = None if lengths is None else torch.tensor(lengths)
    args = (r(L, N, 3 * hid, *spatial), r(3 * hid, hid, *kernel), r(N, hid, *spatial)) + ((r(3 * hid),) if bias else ())

    def fn(xp, w, h0, *b):
        return _ops.conv_gru_sequence(xp, w, b[0] if b else None, h0, lengths)
    assert torch.autograd.gradcheck(fn, args)


def _op_samples():
    r = _rand(torch.Generator().manual_seed(8))
    L, N, hid, S = 3, 2, 2, (3, 4)
    lengths = torch.tensor([3, 1])
    ops = torch.ops.rnnkit_fused
    peeps = [r(hid, *S), r(hid, *S), r(hid, *S)]
    samples = [
        (ops.conv_lstm_fwd.default, (r(L, N, 4 * hid, *S), r(4 * hid, hid, 3, 3), *peeps, r(N, hid, *S),
                                     r(N, hid, *S), lengths)),
        (ops.conv_lstm_fwd.default, (r(L, N, 4 * hid, 5), r(4 * hid, hid, 2), None, None, None, r(N, hid, 5),
                                     r(N, hid, 5), None)),
        (ops.conv_gru_fwd.default, (r(L, N, 3 * hid, *S), r(3 * hid, hid, 2, 3), r(3 * hid), r(N, hid, *S), lengths)),
        (ops.conv_gru_fwd.default, (r(L, N, 3 * hid, 2, 2, 2), r(3 * hid, hid, 3, 3, 3), None, r(N, hid, 2, 2, 2),
                                    None)),
    ]
    w = r(4 * hid, hid, 3, 3, grad=False)
    pk = [p.detach() for p in peeps]
    h0, c0 = r(N, hid, *S, grad=False), r(N, hid, *S, grad=False)
    out, h_n, c_n, gates, cs = ops.conv_lstm_fwd(r(L, N, 4 * hid, *S, grad=False), w, *pk, h0, c0, lengths)
    samples.append((ops.conv_lstm_bwd.default, (r(L, N, hid, *S, grad=False), r(N, hid, *S, grad=False),
                                                r(N, hid, *S, grad=False), w, *pk, h0, c0, lengths, out, gates, cs)))
    w = r(3 * hid, hid, 2, 3, grad=False)
    out, h_n, rzn, hn = ops.conv_gru_fwd(r(L, N, 3 * hid, *S, grad=False), w, None, h0, lengths)
    samples.append((ops.conv_gru_bwd.default, (r(L, N, hid, *S, grad=False), r(N, hid, *S, grad=False), w, h0,
                                               lengths, out, rzn, hn)))
    return samples


@needs_fused
@tiny
def test_opcheck():
    """torch.library.opcheck: schema, autograd registration, fake tensors and
    AOT dispatch of the conv ops (with and without peepholes, b_hh, lengths)."""
    for op, args in _op_samples():
        torch.library.opcheck(op, args)


@needs_fused
@tiny
@pytest.mark.parametrize("name", ["lstm2d_odd_peephole_stride_dilation", "gru2d_even_nobias"])
def test_torch_compile_traces_the_ops(name):
    """torch.compile (fullgraph, aot_eager: fake tensors + the registered autograd)
    of the fused scan, the input convolution included, gives the eager results and
    gradients (input, w_ih, w_hh, peepholes)."""
    from rnnkit.fused import backend as fb
    torch._dynamo.reset()
    cls, spatial, kw = CASES[name]
    layer = cls(2, 3, backend="fused", dtype=DT, **kw)
    p = layer._layer_params(0)
    x = torch.randn(4, 2, 2, *spatial, dtype=DT)
    sp = _state_spatial(layer, spatial)
    s0 = tuple(torch.randn(2, 3, *sp, dtype=DT) for _ in layer.cell_spec.state_names)
    lengths = torch.tensor([4, 2])
    leaves = [p[k] for k in ("weight_ih", "weight_hh", "weight_ci") if p.get(k) is not None]

    def f(x):
        out, state = fb.fused_scan(layer.cell_spec, p, x, s0, lengths)
        return (out * out).sum() + sum((s * s).sum() for s in state)
    assert_compiled_matches_eager(f, x, leaves, DT)


@needs_fused
@tiny
def test_op_shape_errors_name_what_was_received():
    ops = torch.ops.rnnkit_fused
    z = torch.zeros
    with pytest.raises(RuntimeError, match=r"conv_lstm_fwd: xp must be \(L, N, G, \*S\) with 1 to 3 spatial dims, "
                                           r"got \[2, 1, 8\]"):
        ops.conv_lstm_fwd(z(2, 1, 8), z(8, 2, 3), None, None, None, z(1, 2), z(1, 2), None)
    with pytest.raises(RuntimeError, match=r"conv_lstm_fwd: w_hh must be \(4\*hidden, hidden, \*kernel\) with 2 "
                                           r"kernel dims \(as xp has spatial dims\), got \[8, 2, 3\]"):
        ops.conv_lstm_fwd(z(2, 1, 8, 4, 4), z(8, 2, 3), None, None, None, z(1, 2, 4, 4), z(1, 2, 4, 4), None)
    with pytest.raises(RuntimeError, match=r"conv_gru_fwd: w_hh must be \(3\*hidden, hidden, \*kernel\) with 1 "
                                           r"kernel dims \(as xp has spatial dims\), got \[8, 2, 3\]"):
        ops.conv_gru_fwd(z(2, 1, 6, 4), z(8, 2, 3), None, z(1, 2, 4), None)
    with pytest.raises(RuntimeError, match=r"xp's channel axis \(2\) must be G = 4\*hidden = 8, got 6"):
        ops.conv_lstm_fwd(z(2, 1, 6, 4), z(8, 2, 3), None, None, None, z(1, 2, 4), z(1, 2, 4), None)
    with pytest.raises(RuntimeError, match=r"c0 has shape \[1, 2, 5\], expected \[1, 2, 4\]"):
        ops.conv_lstm_fwd(z(2, 1, 8, 4), z(8, 2, 3), None, None, None, z(1, 2, 4), z(1, 2, 5), None)
    with pytest.raises(RuntimeError, match=r"pass all three peepholes w_ci, w_cf, w_co or none, got 1"):
        ops.conv_lstm_fwd(z(2, 1, 8, 4), z(8, 2, 3), z(2, 4), None, None, z(1, 2, 4), z(1, 2, 4), None)
    with pytest.raises(RuntimeError, match=r"w_cf has shape \[2, 1\], expected \[2, 4\]"):
        ops.conv_lstm_fwd(z(2, 1, 8, 4), z(8, 2, 3), z(2, 4), z(2, 1), z(2, 4), z(1, 2, 4), z(1, 2, 4), None)
    with pytest.raises(RuntimeError, match=r"b_hh has shape \[5\], expected \[6\]"):
        ops.conv_gru_fwd(z(2, 1, 6, 4), z(6, 2, 3), z(5), z(1, 2, 4), None)
    with pytest.raises(RuntimeError, match=r"lengths must be \(N,\) = \(1,\), got \[2\]"):
        ops.conv_gru_fwd(z(2, 1, 6, 4), z(6, 2, 3), None, z(1, 2, 4), torch.tensor([1, 2]))
    with pytest.raises(RuntimeError, match=r"float32 or float64 only, got Half"):
        ops.conv_gru_fwd(z(2, 1, 6, 4, dtype=torch.half), z(6, 2, 3), None, z(1, 2, 4), None)
    with pytest.raises(RuntimeError, match=r"w_hh has dtype Float, expected Double"):
        ops.conv_gru_fwd(z(2, 1, 6, 4, dtype=DT), z(6, 2, 3), None, z(1, 2, 4, dtype=DT), None)


# ------------------------------------------------------------------ what the backend takes and declines

@needs_fused
@tiny
def test_auto_picks_the_fused_kernels_for_conv_layers():
    for cls in (rnnkit.ConvLSTM1d, rnnkit.ConvLSTM2d, rnnkit.ConvLSTM3d, rnnkit.ConvGRU1d, rnnkit.ConvGRU2d,
                rnnkit.ConvGRU3d):
        m = cls(2, 3, 3)
        x = torch.randn(2, 1, 2, *(4,) * m._nd)
        assert m.which_backend(x) == "fused", cls.__name__
        m(x)
        assert m.last_backend == "fused"
    assert rnnkit.ConvLSTM2d(2, 3, 3, dtype=torch.float16).which_backend() == "reference"
    with pytest.raises(ValueError, match=r"backend='fused' cannot run this configuration: the fused kernels run "
                                         r"float32 and float64, got parameters of dtype torch.float16"):
        rnnkit.ConvGRU2d(2, 3, 3, dtype=torch.float16, backend="fused")


@needs_fused
@tiny
def test_input_rank_check_is_per_family():
    """The conv families take (L, N, C, *S) with 1 to 3 spatial dims; the other
    families still take only (L, N, H_in)."""
    conv = rnnkit.ConvLSTM2d(2, 3, 3)
    assert FUSED.unsupported(conv, torch.randn(2, 1, 2, 4, 4)) is None
    assert FUSED.unsupported(rnnkit.ConvGRU3d(2, 3, 3), torch.randn(2, 1, 2, 4, 4, 4)) is None
    assert FUSED.unsupported(conv, torch.randn(2, 1, 2)) == \
        "the fused conv kernels take (L, N, C, *S) inputs with 1 to 3 spatial dims, got 3-D"
    assert FUSED.unsupported(conv, torch.randn(2, 1, 2, 1, 1, 1, 1)) == \
        "the fused conv kernels take (L, N, C, *S) inputs with 1 to 3 spatial dims, got 7-D"
    assert FUSED.unsupported(rnnkit.LSTM(3, 4), torch.randn(2, 1, 3, 1)) == \
        "the fused kernels take (L, N, H_in) inputs, got 4-D"
    assert FUSED.unsupported(rnnkit.LSTM(3, 4), torch.randn(2, 1, 3)) is None


@needs_fused
@tiny
@pytest.mark.parametrize("cls", [rnnkit.ConvLSTM2dCell, rnnkit.ConvGRU1dCell])
def test_conv_cells_stay_on_the_step_function(cls):
    """The fused single-step ops cover the torch.nn cells only: a conv cell runs its
    step function (which the layer's kernels are checked against above), and an
    explicit backend='fused' says why not."""
    name = "conv_lstm" if "LSTM" in cls.__name__ else "conv_gru"
    with pytest.raises(ValueError, match=rf"backend='fused' cannot run this cell: no fused kernel for the "
                                         rf"'{name}' cell"):
        cls(2, 3, 3, backend="fused")
    cell = cls(2, 3, 3, dtype=DT)
    spatial = (4,) * cell._nd
    x = torch.randn(2, 2, *spatial, dtype=DT)
    state = tuple(torch.randn(2, 3, *spatial, dtype=DT) for _ in cell.cell_spec.state_names)
    new = cell(x, state if len(state) > 1 else state[0])
    assert cell.last_backend == "reference"
    p = cell._params()
    step = conv_lstm_step if name == "conv_lstm" else conv_gru_step
    want = step(conv_project(x, p), state, p)
    for a, b in zip(flatten_states(new), want):
        assert_close(a, b, DT, "cell step")
